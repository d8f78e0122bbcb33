//! Exactly once, against real ClickHouse and real Redis; the semantic tests run three times: on
//! one Redis, on a Redis Cluster (three primaries) and on the embedded store. A primary of a
//! cluster with replicas is killed under load at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use buffergate::Config;
use buffergate::config::OnStoreError;
use common::{
    ClickHouseServer, Gateway, Process, RedisCluster, RedisServer, clickhouse, command, config, eventually, free_port,
    http, migrate,
};
use serde_json::{Value, json};

fn redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(|| RedisServer::start("redis"))
}

/// The Redis Cluster shared by this binary's tests: three primaries, no replicas.
fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start("redis-cluster", 3, 0))
}

#[derive(Debug, Clone, Copy)]
enum Store {
    Redis,
    Cluster,
    Embedded,
}

impl Store {
    /// The store's URL: empty for the embedded one.
    fn url(self) -> String {
        match self {
            Store::Redis => redis().url.clone(),
            Store::Cluster => cluster().url.clone(),
            Store::Embedded => String::new(),
        }
    }
}

async fn setup(ch: &ClickHouseServer, prefix: &str, store: Store, tune: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = config(ch, &ch.fresh_database(prefix));
    config.idempotency.redis_url = store.url();
    // Databases are fresh per test, but the Redis servers are shared: keep keys apart.
    config.idempotency.dedup_key_prefix = format!("{}:", config.table.database);
    tune(&mut config);
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    gw
}

fn events(from: u64, n: u64) -> Value {
    Value::Array(
        (from..from + n)
            .map(|i| json!({"event_id": format!("00000000-0000-7000-8000-{i:012}"), "user_id": i, "event_type": "e"}))
            .collect(),
    )
}

/// A metric's series in Prometheus text, each by its label set (sorted) with its value.
/// Enough for the label values here, which hold no `,`, `=` or quote.
fn series(text: &str, name: &str) -> BTreeMap<Vec<(String, String)>, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, labels)) => (metric, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let mut labels: Vec<(String, String)> = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            labels.sort();
            Some((labels, value.parse().unwrap()))
        })
        .collect()
}

/// What changed from `before` to `after` in a metric's series: series that appeared count
/// from 0, unchanged ones are left out.
fn increase(
    before: &BTreeMap<Vec<(String, String)>, f64>,
    after: &BTreeMap<Vec<(String, String)>, f64>,
) -> Vec<(Vec<(String, String)>, f64)> {
    after
        .iter()
        .map(|(labels, v)| (labels.clone(), v - before.get(labels).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

async fn metrics_text(url: &str) -> String {
    http().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// Rows waiting in the gateway's partitions, summed over the `queue_rows` gauges of its
/// `/metrics`: only for a gateway that is a process of its own (the recorder is per process).
async fn queued_rows(url: &str) -> f64 {
    series(&metrics_text(url).await, "buffergate_coalescer_queue_rows").values().sum()
}

/// Rows waiting in an in-process gateway's partitions, by its own count (`GET /v1/status`).
async fn status_queue_rows(gw: &Gateway) -> u64 {
    let status = gw.status().await;
    status["queue_rows"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum()
}

async fn stored(ch: &ClickHouseServer, gw: &Gateway) -> (u64, u64) {
    gw.drain(ch).await;
    let rows = ch.rows(&format!("SELECT count() AS n, uniqExact(event_id) AS u FROM {}", gw.destination())).await;
    let num = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap();
    (num(&rows[0]["n"]), num(&rows[0]["u"]))
}

async fn same_batch_twice(store: Store) {
    let ch = clickhouse();
    let gw = setup(ch, "twice", store, |_| {}).await;
    let (status, body) = gw.post_json(&events(1, 10)).await;
    assert_eq!((status, body["accepted"].as_u64(), body["duplicates"].as_u64()), (200, Some(10), Some(0)), "{body}");
    let (status, body) = gw.post_json(&events(1, 10)).await;
    assert_eq!((status, body["accepted"].as_u64(), body["duplicates"].as_u64()), (200, Some(0), Some(10)), "{body}");
    // Within one request, a repeated id is collapsed; a UUID in another spelling is the same id.
    let mixed = json!([
        {"event_id": "00000000-0000-7000-8000-000000000100", "user_id": 100},
        {"event_id": "00000000000070008000000000000100", "user_id": 100},
        {"event_id": "00000000-0000-7000-8000-000000000005", "user_id": 5},
        {"user_id": 101},
    ]);
    let (status, body) = gw.post_json(&mixed).await;
    assert_eq!((status, body["accepted"].as_u64(), body["duplicates"].as_u64()), (200, Some(2), Some(2)), "{body}");
    // Large requests overlapping by 200 ids: the second's 400 new rows are kept and written
    // as a block of their own (made after the duplicates are dropped).
    let (status, body) = gw.post_json(&events(1000, 300)).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(300)), "{body}");
    let (status, body) = gw.post_json(&events(1100, 600)).await;
    assert_eq!((status, body["accepted"].as_u64(), body["duplicates"].as_u64()), (200, Some(400), Some(200)), "{body}");
    assert_eq!(stored(ch, &gw).await, (712, 712));
    gw.stop().await;
}

async fn concurrent_senders_store_one_copy(store: Store) {
    let ch = clickhouse();
    let gw = setup(ch, "concurrent", store, |_| {}).await;
    let batch = events(1, 20);
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (url, batch) = (format!("{}/v1/events", gw.url), batch.clone());
        senders.push(tokio::spawn(async move {
            let response = http().post(url).json(&batch).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }));
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for sender in senders {
        let (status, body) = sender.await.unwrap();
        assert_eq!(status, 200, "{body}");
        accepted += body["accepted"].as_u64().unwrap();
        duplicates += body["duplicates"].as_u64().unwrap();
    }
    assert_eq!((accepted, duplicates), (20, 15 * 20));
    assert_eq!(stored(ch, &gw).await, (20, 20));
    gw.stop().await;
}

async fn a_failed_write_is_not_remembered(store: Store) {
    let ch = ClickHouseServer::start(&format!("idem-chdown-{store:?}"));
    let gw = setup(&ch, "chdown", store, |c| {
        c.clickhouse.insert_retries = 1;
        c.clickhouse.circuit_failures = 0;
        c.clickhouse.clickhouse_timeout_ms = 2_000;
    })
    .await;
    ch.kill();
    let (status, body) = gw.post_json(&events(1, 10)).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("flush_failed")), "{body}");
    ch.restart();
    gw.wait_ready().await;
    let (status, body) = gw.post_json(&events(1, 10)).await;
    assert_eq!((status, body["accepted"].as_u64(), body["duplicates"].as_u64()), (200, Some(10), Some(0)), "{body}");
    assert_eq!(stored(&ch, &gw).await, (10, 10));
    gw.stop().await;
}

async fn idempotency_key_replays_conflicts_and_refuses_reuse(store: Store) {
    let ch = clickhouse();
    // The first request's batch lingers until the admin flush below, so it is still in flight
    // for the retry however long the steps in between take.
    let gw = setup(ch, "reqkey", store, |c| {
        c.batching.flush_linger_ms = 600_000;
        c.auth.admin_token = "admin".into();
    })
    .await;
    let post = |key: &'static str, batch: Value| {
        let url = format!("{}/v1/events", gw.url);
        async move {
            let response = http().post(url).header("idempotency-key", key).json(&batch).send().await.unwrap();
            let replayed = response.headers().get("idempotent-replayed").is_some();
            (response.status().as_u16(), replayed, response.text().await.unwrap())
        }
    };
    let first = tokio::spawn(post("k-1", events(1, 5)));
    // Its rows are queued only after its key was claimed.
    eventually(Duration::from_secs(20), "the first request's rows queued", || async {
        status_queue_rows(&gw).await == 5
    })
    .await;
    let (status, _, body) = post("k-1", events(1, 5)).await;
    assert_eq!(status, 409, "a retry while the first is in flight: {body}");
    assert!(body.contains("request_in_flight"), "{body}");
    assert!(!first.is_finished(), "the first is still waiting for its flush");
    let response = http().post(format!("{}/admin/flush", gw.url)).bearer_auth("admin").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (status, replayed, original) = first.await.unwrap();
    assert_eq!((status, replayed), (200, false), "{original}");

    let (status, replayed, body) = post("k-1", events(1, 5)).await;
    assert_eq!((status, replayed, body.as_str()), (200, true, original.as_str()), "the first answer, replayed");
    let (status, _, body) = post("k-1", events(6, 5)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("idempotency_key_reused"), "{body}");
    assert_eq!(stored(ch, &gw).await, (5, 5));
    gw.stop().await;
}

async fn producer_offsets_resume_without_gap_or_duplicate(store: Store) {
    let ch = clickhouse();
    let gw = setup(ch, "offsets", store, |_| {}).await;
    let post = |from: u64, offset: u64| {
        let url = format!("{}/v1/events", gw.url);
        async move {
            // No event ids: only the offset protects these batches.
            let batch: Vec<Value> = (from..from + 10).map(|i| json!({"user_id": i})).collect();
            let response = http()
                .post(url)
                .header("x-producer-id", "etl-1")
                .header("x-producer-partition", "3")
                .header("x-producer-offset", offset.to_string())
                .json(&batch)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let offsets = || async {
        http().get(format!("{}/v1/offsets/etl-1", gw.url)).send().await.unwrap().json::<Value>().await.unwrap()
    };
    assert_eq!(offsets().await, json!({"producer_id": "etl-1", "partitions": {}}));
    assert_eq!(post(0, 9).await.1["accepted"], 10);
    assert_eq!(offsets().await, json!({"producer_id": "etl-1", "partitions": {"3": 9}}));
    // The worker crashes after sending offset 19 but before it saved its own checkpoint...
    assert_eq!(post(10, 19).await.1["accepted"], 10);
    // ...restarts from its own stale checkpoint and replays: nothing is written twice.
    let (status, body) = post(10, 19).await;
    assert_eq!((status, body["accepted"].as_u64(), body["duplicates"].as_u64()), (200, Some(0), Some(10)), "{body}");
    let (_, body) = post(0, 9).await;
    assert_eq!(body["duplicates"], 10, "offsets only move forward");
    // A worker that asks the gateway resumes at committed + 1: no gap.
    let committed = offsets().await["partitions"]["3"].as_u64().unwrap();
    assert_eq!(committed, 19);
    assert_eq!(post(committed + 1, committed + 10).await.1["accepted"], 10);
    gw.drain(ch).await;
    let rows = ch
        .rows(&format!("SELECT count() AS n, uniqExact(user_id) AS u, max(user_id) AS m FROM {}", gw.destination()))
        .await;
    assert_eq!(rows[0], json!({"n": "30", "u": "30", "m": "29"}));
    let (status, body) = gw.post("/v1/events", "application/json", None, b"[]".to_vec()).await;
    assert_eq!(status, 200, "{body}");
    let response = http()
        .post(format!("{}/v1/events", gw.url))
        .header("x-producer-id", "p")
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400, "an id without an offset");
    gw.stop().await;
}

async fn producer_offsets_expire_and_partitions_are_capped(store: Store) {
    let ch = clickhouse();
    let gw = setup(ch, "offset_bounds", store, |c| {
        c.idempotency.producer_offset_ttl_s = 1;
        c.idempotency.producer_max_partitions = 2;
    })
    .await;
    let post = |partition: u32, offset: u64| {
        let url = format!("{}/v1/events", gw.url);
        async move {
            let response = http()
                .post(url)
                .header("x-producer-id", "bounded")
                .header("x-producer-partition", partition.to_string())
                .header("x-producer-offset", offset.to_string())
                .json(&json!([{"user_id": u64::from(partition) * 1000 + offset}]))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let offsets = || async {
        let url = format!("{}/v1/offsets/bounded", gw.url);
        http().get(url).send().await.unwrap().json::<Value>().await.unwrap()["partitions"].clone()
    };
    assert_eq!(post(0, 1).await.0, 200);
    assert_eq!(post(1, 1).await.0, 200);
    assert_eq!(post(0, 2).await.0, 200, "a partition it has is not counted again");
    let (status, body) = post(2, 1).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_header")), "a third partition: {body}");
    assert!(body["message"].as_str().unwrap().contains("2 partitions"), "{body}");
    assert_eq!(offsets().await, json!({"0": 2, "1": 1}));
    // Kept a second after the last write, then forgotten: the producer starts afresh.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(offsets().await, json!({}));
    assert_eq!(post(2, 1).await.0, 200);
    gw.drain(ch).await;
    assert_eq!(stored(ch, &gw).await.0, 4, "the refused batch stored nothing");
    gw.stop().await;
}

async fn a_replayed_answer_is_kept_within_its_bound(store: Store) {
    let ch = clickhouse();
    let gw = setup(ch, "answer_bound", store, |_| {}).await;
    // 3,000 events refused, each with a 200-byte reason: an answer of about 900 KB.
    let mut batch: Vec<Value> = (0..3000).map(|i| json!({"user_id": format!("{i}{}", "x".repeat(200))})).collect();
    batch.push(json!({"user_id": 1}));
    let post = || {
        let (url, batch) = (format!("{}/v1/events", gw.url), batch.clone());
        async move {
            let response = http().post(url).header("idempotency-key", "big").json(&batch).send().await.unwrap();
            let replayed = response.headers().get("idempotent-replayed").is_some();
            (response.status().as_u16(), replayed, response.bytes().await.unwrap())
        }
    };
    let (status, replayed, first) = post().await;
    let first: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!((status, replayed, first["rejected"].as_array().unwrap().len()), (200, false, 3000));
    let (status, replayed, kept) = post().await;
    assert_eq!((status, replayed), (200, true));
    assert!(kept.len() <= 64 * 1024, "the kept answer is bounded: {} bytes", kept.len());
    let kept: Value = serde_json::from_slice(&kept).unwrap();
    let listed = kept["rejected"].as_array().unwrap().len();
    assert_eq!((kept["accepted"].as_u64(), kept["rejected_omitted"].as_u64()), (Some(1), Some(3000 - listed as u64)));
    assert_eq!(kept["rejected"][0], first["rejected"][0], "the first refusals, as answered");
    gw.stop().await;
}

/// One module of tests per store: `on_stores!(module_name: Store, …; [test, …])`.
macro_rules! on_stores {
    ($($module:ident: $store:ident),+; $tests:tt) => { $(on_store!($module, $store, $tests);)+ };
}

macro_rules! on_store {
    ($module:ident, $store:ident, [$($name:ident),* $(,)?]) => {
        mod $module {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Store::$store).await })*
        }
    };
}

on_stores!(
    redis_store: Redis, redis_cluster: Cluster, embedded_store: Embedded;
    [
        same_batch_twice,
        concurrent_senders_store_one_copy,
        a_failed_write_is_not_remembered,
        idempotency_key_replays_conflicts_and_refuses_reuse,
        producer_offsets_resume_without_gap_or_duplicate,
        producer_offsets_expire_and_partitions_are_capped,
        a_replayed_answer_is_kept_within_its_bound,
    ]
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_rejects_or_accepts_as_configured_and_recovers() {
    let ch = clickhouse();
    let own_redis = RedisServer::start("redis-down");
    let mut reject = config(ch, &ch.fresh_database("redisdown"));
    reject.idempotency.redis_url = own_redis.url.clone();
    reject.idempotency.redis_timeout_ms = 300;
    migrate(&reject).await;
    let accept = {
        let mut config = reject.clone();
        config.idempotency.dedup_on_store_error = OnStoreError::Accept;
        config
    };
    let (gw_reject, gw_accept) = (Gateway::start(reject).await, Gateway::start(accept).await);
    gw_reject.wait_ready().await;
    own_redis.kill();

    // The recorder is the process's, shared with every gateway of this test binary: what
    // each request adds is measured as the change across it. No other test fails a store call.
    const ERRORS: &str = "buffergate_idempotency_store_errors_total";
    const BYPASSED: &str = "buffergate_dedup_bypassed_events_total";
    let counters = || async {
        let text = metrics_text(&gw_accept.url).await;
        (series(&text, ERRORS), series(&text, BYPASSED))
    };
    let (errors, bypassed) = counters().await;
    let (status, body) = gw_reject.post_json(&events(1, 5)).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("idempotency_unavailable")), "{body}");
    let (errors_after, bypassed_after) = counters().await;
    assert_eq!(increase(&errors, &errors_after), [(labels(&[("op", "reserve")]), 1.0)], "one failed reservation");
    assert_eq!(increase(&bypassed, &bypassed_after), [], "reject mode bypasses nothing");

    let (errors, bypassed) = (errors_after, bypassed_after);
    let (status, body) = gw_accept.post_json(&events(1, 5)).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(5)), "accept mode writes without dedup: {body}");
    let (errors_after, bypassed_after) = counters().await;
    assert_eq!(increase(&errors, &errors_after), [(labels(&[("op", "reserve")]), 1.0)], "one failed reservation");
    assert_eq!(increase(&bypassed, &bypassed_after), [(labels(&[]), 5.0)], "the five events, undeduplicated");

    own_redis.restart();
    eventually(Duration::from_secs(15), "the reject-mode gateway to reconnect", || async {
        gw_reject.post_json(&events(1, 5)).await.0 == 200
    })
    .await;
    // The same table: 5 from accept mode (undeduplicated). Redis came back empty, so the
    // reject-mode gateway looked the 5 up in ClickHouse, found them and wrote none again.
    assert_eq!(stored(ch, &gw_reject).await, (5, 5));
    gw_reject.stop().await;
    gw_accept.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_flush_leaves_leases_that_expire_and_the_retry_stores_once() {
    let ch = clickhouse();
    let mut config = config(ch, &ch.fresh_database("sigkill"));
    config.idempotency.redis_url = redis().url.clone();
    config.idempotency.dedup_key_prefix = format!("{}:", config.table.database);
    config.batching.flush_linger_ms = 5_000;
    config.idempotency.dedup_lease_ms = 1_500;
    config.idempotency.dedup_pending_wait_ms = 6_000;
    migrate(&config).await;
    let dir = common::scratch("sigkill");
    let start = |config: &Config, log: &str| {
        let mut config = config.clone();
        let port = free_port();
        config.http.listen = format!("127.0.0.1:{port}").parse().unwrap();
        (Process::spawn(command(&config, &["serve"]), &dir.join(log)), format!("http://127.0.0.1:{port}"))
    };
    let (first, url) = start(&config, "first.log");
    let ready = |url: String| async move {
        eventually(Duration::from_secs(20), "gateway ready", || {
            let url = format!("{url}/readyz");
            async move { http().get(url).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
    };
    ready(url.clone()).await;
    let in_flight = tokio::spawn(http().post(format!("{url}/v1/events")).json(&events(1, 10)).send());
    // Rows are queued once their ids are reserved; the 5 s linger keeps them there.
    eventually(Duration::from_secs(20), "the request's rows queued", || async { queued_rows(&url).await == 10.0 })
        .await;
    first.signal(libc::SIGKILL);
    assert!(in_flight.await.unwrap().is_err(), "the producer never got an answer");

    config.batching.flush_linger_ms = 0;
    let (_second, url) = start(&config, "second.log");
    ready(url.clone()).await;
    let response = http().post(format!("{url}/v1/events")).json(&events(1, 10)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["accepted"].as_u64(), body["duplicates"].as_u64()), (Some(10), Some(0)), "{body}");
    ch.exec(&format!("OPTIMIZE TABLE {}.events_buffer", config.table.database)).await;
    let rows = ch
        .rows(&format!("SELECT count() AS n, uniqExact(event_id) AS u FROM {}.events_raw", config.table.database))
        .await;
    assert_eq!(rows[0], json!({"n": "10", "u": "10"}));
}

/// POSTs `body` until it is answered 200 (through the 503s of a store coming back), and
/// returns the answer.
async fn answered(gw: &Gateway, body: &Value) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = gw.post_json(body).await;
        if status == 200 {
            return answer;
        }
        assert!(status == 503 && std::time::Instant::now() < deadline, "{status}: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The counts of an answer: (accepted, duplicates).
fn counts(answer: &Value) -> (Option<u64>, Option<u64>) {
    (answer["accepted"].as_u64(), answer["duplicates"].as_u64())
}

/// A gateway on its own database and the Redis at `url` (the whole store to itself), with an
/// admin token for `/v1/status`.
async fn gateway_on(ch: &ClickHouseServer, prefix: &str, url: &str, tune: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = config(ch, &ch.fresh_database(prefix));
    config.idempotency.redis_url = url.to_string();
    config.auth.admin_token = "admin".into();
    tune(&mut config);
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    gw
}

/// Redis without persistence restarts empty: every id it committed reads as fresh. The gateway
/// notices (the epoch it wrote is gone, the `run_id` changed) and looks the ids up in
/// ClickHouse before writing them, so a producer's resend stores nothing twice; also a gateway
/// restarted on its data directory while Redis restarted empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_redis_restarted_empty_forgot_are_looked_up_in_clickhouse() {
    let ch = clickhouse();
    let own_redis = RedisServer::start("redis-forgets");
    let gw = gateway_on(ch, "forgets", &own_redis.url, |_| {}).await;
    assert_eq!(counts(&answered(&gw, &events(1, 50)).await), (Some(50), Some(0)));
    let status = gw.status().await;
    assert_eq!(
        (status["idempotency"]["looking_up"].as_bool(), status["idempotency"]["last_loss"].is_null()),
        (Some(false), true),
        "{status}"
    );

    own_redis.kill();
    own_redis.restart();
    // The producer whose answer was lost sends the batch again, at once.
    assert_eq!(counts(&answered(&gw, &events(1, 50)).await), (Some(0), Some(50)), "every id found in ClickHouse");
    assert_eq!(counts(&answered(&gw, &events(51, 10)).await), (Some(10), Some(0)), "fresh ids are written");
    eventually(Duration::from_secs(10), "the loss in /v1/status", || async {
        let idempotency = gw.status().await["idempotency"].clone();
        idempotency["looking_up"] == true
            && idempotency["lookup_until"].is_string()
            && idempotency["last_loss"]["sign"].is_string()
    })
    .await;
    let metrics = metrics_text(&gw.url).await;
    assert!(series(&metrics, "buffergate_idempotency_store_losses_total").values().sum::<f64>() >= 1.0, "{metrics}");
    let looked_up = series(&metrics, "buffergate_idempotency_looked_up_events_total");
    assert!(
        looked_up.get(&labels(&[("outcome", "present"), ("stream", "default")])).is_some_and(|n| *n >= 50.0),
        "{looked_up:?}"
    );

    // Both restarted: the gateway knows the epoch it had from its data directory.
    let config = gw.config.clone();
    gw.stop().await;
    own_redis.kill();
    own_redis.restart();
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    assert_eq!(counts(&answered(&gw, &events(1, 60)).await), (Some(0), Some(60)), "every id found in ClickHouse");
    assert_eq!(gw.status().await["idempotency"]["last_loss"]["sign"], "epoch_gone");
    assert_eq!(stored(ch, &gw).await, (60, 60));
    gw.stop().await;
}

/// A store emptied without a restart (`FLUSHALL`: no connection breaks, the `run_id` stays):
/// the first reservation finds its group's epoch gone, before any check has run, and the
/// batch sent again at once is looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_emptied_under_the_gateway_is_known_at_the_first_reservation() {
    let ch = clickhouse();
    let own_redis = RedisServer::start("redis-flushed");
    let gw = gateway_on(ch, "flushed", &own_redis.url, |_| {}).await;
    assert_eq!(counts(&answered(&gw, &events(1, 20)).await), (Some(20), Some(0)));
    assert_eq!(common::redis_cli(own_redis.port(), &["FLUSHALL"]), "OK");
    assert_eq!(counts(&answered(&gw, &events(1, 20)).await), (Some(0), Some(20)), "every id found in ClickHouse");
    assert_eq!(stored(ch, &gw).await, (20, 20));
    gw.stop().await;
}

/// One primary of a Redis Cluster restarted empty (its slots' ids forgotten, the others'
/// kept): the ids of its groups are looked up, the rest answered by Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_cluster_primary_restarted_empty_forgot_are_looked_up_in_clickhouse() {
    let ch = clickhouse();
    let redis = RedisCluster::start("redis-forgets-cluster", 3, 0);
    // A commit's token status may live on the emptied primary: its ids elsewhere then read as
    // in flight (503 events_in_flight) until their lease ends, and are looked up after it.
    let gw = gateway_on(ch, "forgetscl", &redis.url, |c| c.idempotency.dedup_lease_ms = 3_000).await;
    assert_eq!(counts(&answered(&gw, &events(1, 60)).await), (Some(60), Some(0)));
    let port = redis.primaries()[0];
    redis.kill(port);
    redis.restart(port);
    redis.wait_healthy(3, 0);
    assert_eq!(counts(&answered(&gw, &events(1, 60)).await), (Some(0), Some(60)), "every id a duplicate");
    eventually(Duration::from_secs(10), "the loss in /v1/status", || async {
        gw.status().await["idempotency"]["last_loss"]["sign"].is_string()
    })
    .await;
    assert_eq!(stored(ch, &gw).await, (60, 60));
    gw.stop().await;
}

fn redis_store(url: &str) -> buffergate::idempotency::RedisStore {
    buffergate::idempotency::RedisStore::new(url, Duration::from_secs(2)).unwrap()
}

/// Calls of each command, as Redis counts them (commands a script runs included).
async fn command_calls(url: &str) -> impl Fn(&str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.unwrap();
    move |name: &str| {
        info.lines()
            .filter(|l| l.starts_with(&format!("cmdstat_{name}:")))
            .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum::<u64>()
    }
}

/// Reservations of concurrent requests share Redis calls, each call costs a few commands per
/// request rather than one per key, and a key wanted by many requests at once goes to exactly
/// one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_share_calls_and_each_key_goes_to_one_request() {
    use buffergate::idempotency::{Idempotency, KeyState, Store};
    use std::sync::Arc;

    let redis = RedisServer::start("redis-batch");
    let idem = Arc::new(Idempotency::new(Store::Redis(redis_store(&redis.url)), &Config::default()));
    // The first call loads the script.
    idem.reserve(&Idempotency::new_tokens(1), &[(0, b"warm".to_vec())]).await.unwrap();
    let before = command_calls(&redis.url).await;

    let shared: Vec<Vec<u8>> = (0..10).map(|i| format!("shared-{i}").into_bytes()).collect();
    let requests = 200;
    let tasks: Vec<_> = (0..requests)
        .map(|r| {
            let (idem, shared) = (Arc::clone(&idem), shared.clone());
            tokio::spawn(async move {
                let own: Vec<Vec<u8>> = (0..10).map(|i| format!("own-{r}-{i}").into_bytes()).collect();
                let keys: Vec<(usize, Vec<u8>)> = shared.into_iter().chain(own).map(|k| (0, k)).collect();
                idem.reserve(&Idempotency::new_tokens(1), &keys).await.unwrap()
            })
        })
        .collect();
    let mut winners = [0usize; 10];
    for task in tasks {
        let states = task.await.unwrap();
        assert_eq!(states.len(), 20);
        for (i, state) in states[..10].iter().enumerate() {
            match state {
                KeyState::Reserved => winners[i] += 1,
                KeyState::Pending => {}
                KeyState::Committed => panic!("nothing was committed"),
            }
        }
        assert!(states[10..].iter().all(|s| *s == KeyState::Reserved), "a request's own keys are its own");
    }
    assert_eq!(winners, [1; 10], "each shared key is reserved by exactly one request");
    let after = command_calls(&redis.url).await;
    let delta = |name: &str| after(name) - before(name);
    let scripts = delta("evalsha") + delta("eval");
    assert!(scripts < requests, "{scripts} script calls for {requests} concurrent requests: not batched");
    // Nothing per token when reserving; per call and id group one HMGET per 2,000 ids (a second
    // one only once a previous slot exists, not in this fresh Redis) and an HSET per 1,000 new
    // ones (2,000 values); the holders of the shared keys are looked up once per request that
    // met them.
    let (groups, ids) = (1, requests * 20); // one group on one primary, by default
    assert_eq!(delta("set"), 0, "no status written when reserving");
    let (hmgets, hsets) = (delta("hmget"), delta("hset"));
    assert!(hsets <= scripts * groups + ids / 1000, "{hsets} HSETs in {scripts} calls");
    assert!(hmgets <= scripts * groups + ids / 2000, "{hmgets} HMGETs in {scripts} calls");
    assert!(delta("mget") <= requests, "at most one status lookup per request");
}

/// Different partitions of one request in one call: ids grouped by group and token, answers in
/// the request's order; more ids than the script handles in one step (and than Lua unpacks at
/// once).
async fn a_requests_partitions_are_reserved_and_answered_in_order(store: Store) {
    use buffergate::idempotency::{Idempotency, KeyState, Reservation};

    let config = {
        let mut config = Config::default();
        config.idempotency.dedup_key_prefix = "order:".into();
        config
    };
    let idem = Idempotency::new(buffergate::idempotency::Store::Redis(redis_store(&store.url())), &config);
    let tokens = Idempotency::new_tokens(3);
    let keys: Vec<(usize, Vec<u8>)> = (0..9000u32).map(|i| (i as usize % 3, i.to_le_bytes().to_vec())).collect();
    assert!(idem.reserve(&tokens, &keys).await.unwrap().iter().all(|s| *s == KeyState::Reserved));
    idem.commit(&[Reservation { token: tokens[1].clone() }]).await.unwrap();
    idem.release(&[Reservation { token: tokens[2].clone() }]).await.unwrap();
    let again: Vec<(usize, Vec<u8>)> = keys.iter().map(|(_, k)| (0, k.clone())).collect();
    let expected: Vec<KeyState> =
        (0..9000).map(|i| [KeyState::Pending, KeyState::Committed, KeyState::Reserved][i % 3]).collect();
    assert_eq!(idem.reserve(&Idempotency::new_tokens(1), &again).await.unwrap(), expected);
}

/// Ids live in one hash per window-long slot: a committed id is still found once the slot has
/// turned, and slots older than the previous one are removed.
#[tokio::test]
async fn ids_are_seen_across_a_slot_boundary_and_old_slots_are_removed() {
    use buffergate::idempotency::{Idempotency, KeyState, Reservation, Store};

    let window = 1000u64;
    let config = {
        let mut config = Config::default();
        config.idempotency.dedup_window_ms = window;
        config.idempotency.dedup_key_prefix = "slots:".into();
        config
    };
    let idem = Idempotency::new(Store::Redis(redis_store(&redis().url)), &config);
    let client = redis::Client::open(redis().url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut redis_ms = async || {
        let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut connection).await.unwrap();
        s * 1000 + us / 1000
    };
    // Reserve and commit late in a slot, so the commit is still inside the window when the
    // next slot begins.
    while redis_ms().await % window < 700 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = redis_ms().await;
    let slot = now / window;
    let t1 = Idempotency::new_tokens(1);
    let k = vec![(0, b"turning".to_vec())];
    assert_eq!(idem.reserve(&t1, &k).await.unwrap(), [KeyState::Reserved]);
    idem.commit(&[Reservation { token: t1[0].clone() }]).await.unwrap();
    tokio::time::sleep(Duration::from_millis((slot + 1) * window + 50 - now)).await;
    assert_eq!(redis_ms().await / window, slot + 1, "the slot turned");
    let t2 = Idempotency::new_tokens(1);
    assert_eq!(idem.reserve(&t2, &k).await.unwrap(), [KeyState::Committed], "found in the previous slot");

    // Two slots on, the commit has expired and the first slot's hash is gone.
    tokio::time::sleep(Duration::from_millis(window + 100)).await;
    assert_eq!(idem.reserve(&t2, &k).await.unwrap(), [KeyState::Reserved]);
    let keys: Vec<String> = redis::cmd("KEYS").arg("slots:{*}h:*").query_async(&mut connection).await.unwrap();
    assert!(!keys.iter().any(|k| k.ends_with(&format!("h:{slot}"))), "{keys:?}");
    assert!(keys.len() <= 2, "{keys:?}");
}

/// The store's own semantics on a real Redis: per-partition commit and release, a void
/// reservation taken over once its lease has run out.
async fn redis_reservations_commit_release_and_expire_per_partition(store: Store) {
    use buffergate::idempotency::{Idempotency, KeyState, Reservation};

    let prefix = "semantics:";
    let config = {
        let mut config = Config::default();
        config.idempotency.dedup_lease_ms = 300;
        config.idempotency.dedup_key_prefix = prefix.into();
        config
    };
    let key = |name: &str| name.as_bytes().to_vec();
    let idem = Idempotency::new(buffergate::idempotency::Store::Redis(redis_store(&store.url())), &config);
    let (t1, t2) = (Idempotency::new_tokens(2), Idempotency::new_tokens(1));
    let keys1 = vec![(0, key("k1")), (1, key("k2"))];
    let keys2 = vec![(0, key("k1")), (0, key("k2"))];
    assert_eq!(idem.reserve(&t1, &keys1).await.unwrap(), [KeyState::Reserved, KeyState::Reserved]);
    assert_eq!(idem.reserve(&t2, &keys2).await.unwrap(), [KeyState::Pending, KeyState::Pending]);
    idem.commit(&[Reservation { token: t1[0].clone() }]).await.unwrap();
    idem.release(&[Reservation { token: t1[1].clone() }]).await.unwrap();
    assert_eq!(idem.reserve(&t2, &keys2).await.unwrap(), [KeyState::Committed, KeyState::Reserved]);

    // A gateway that dies holding k3: after the lease, the next request takes it over.
    let (t3, t4) = (Idempotency::new_tokens(1), Idempotency::new_tokens(1));
    let k3 = vec![(0, key("k3"))];
    assert_eq!(idem.reserve(&t3, &k3).await.unwrap(), [KeyState::Reserved]);
    assert_eq!(idem.reserve(&t4, &k3).await.unwrap(), [KeyState::Pending]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idem.reserve(&t4, &k3).await.unwrap(), [KeyState::Reserved]);
    // ...and the committed key stays a duplicate for the window.
    assert_eq!(idem.reserve(&t4, &keys2[..1]).await.unwrap(), [KeyState::Committed]);
}

on_stores!(
    store_calls_on_redis: Redis, store_calls_on_cluster: Cluster;
    [a_requests_partitions_are_reserved_and_answered_in_order, redis_reservations_commit_release_and_expire_per_partition]
);

/// A primary SIGKILLed under load, its replica promoted: with `redis_wait_replicas = 1` every
/// id and commit a 200 stands on was on the replica, so each acknowledged event is stored once
/// and every acknowledged batch sent again afterwards is all duplicates. Producers retry what
/// was refused (503 while the slot had no primary, or no replica to confirm a write) until it
/// is acknowledged. The gateway is a
/// process of its own: its failed store calls stay out of this binary's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_under_load_loses_no_committed_id() {
    let ch = clickhouse();
    let redis = RedisCluster::start("redis-failover", 3, 1);
    let mut config = config(ch, &ch.fresh_database("failover"));
    config.idempotency.redis_url = redis.url.clone();
    config.idempotency.redis_wait_replicas = 1;
    config.idempotency.redis_wait_timeout_ms = 500;
    config.idempotency.redis_timeout_ms = 500;
    migrate(&config).await;
    let port = free_port();
    config.http.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = common::scratch("failover-gateway");
    let _gateway = Process::spawn(command(&config, &["serve"]), &dir.join("gateway.log"));
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(20), "gateway ready", || async {
        http().get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    let (producers, batches) = (4u64, 30u64);
    let send = {
        let url = format!("{url}/v1/events");
        move |first: u64| {
            let url = url.clone();
            async move {
                let response = http().post(url).json(&events(first, 10)).send().await.ok()?;
                let status = response.status().as_u16();
                Some((status, response.json::<Value>().await.ok()?))
            }
        }
    };
    let senders: Vec<_> = (0..producers)
        .map(|p| {
            let send = send.clone();
            tokio::spawn(async move {
                let mut refused = 0;
                for b in 0..batches {
                    while !matches!(send((p * batches + b) * 10).await, Some((200, _))) {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                refused
            })
        })
        .collect();
    // Kill the primary of one id group while the load runs. Its promoted replica has no replica
    // of its own, so writes there cannot be confirmed (503) until the killed node is back, as
    // the replica of the new primary.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = redis.primary_of("{0}");
    redis.kill(victim);
    eventually(Duration::from_secs(30), "a replica to take over the killed primary's slots", || async {
        redis.primaries().len() == 3
    })
    .await;
    redis.restart(victim);
    let mut refused = 0;
    for sender in senders {
        refused += tokio::time::timeout(Duration::from_secs(120), sender).await.expect("producers finish").unwrap();
    }
    let total = producers * batches * 10;
    let destination = format!("`{}`.`{}`", config.table.database, config.table.destination_table);
    ch.exec(&format!("OPTIMIZE TABLE `{}`.`{}`", config.table.database, config.table.buffer_table)).await;
    let count = format!("SELECT toString(count()) AS n, toString(uniqExact(event_id)) AS u FROM {destination}");
    let once = json!({"n": total.to_string(), "u": total.to_string()});
    assert_eq!(ch.rows(&count).await[0], once, "every acknowledged event once ({refused} refusals retried)");
    for p in 0..producers {
        for b in 0..batches {
            // Refusals just after the failover are retried, as a producer would.
            let mut answer = send((p * batches + b) * 10).await;
            for _ in 0..100 {
                if matches!(answer, Some((200, _))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                answer = send((p * batches + b) * 10).await;
            }
            let accepted = answer.as_ref().and_then(|(_, body)| body["accepted"].as_u64());
            assert_eq!(accepted, Some(0), "batch {p}/{b} again: {answer:?}");
        }
    }
    ch.exec(&format!("OPTIMIZE TABLE `{}`.`{}`", config.table.database, config.table.buffer_table)).await;
    assert_eq!(ch.rows(&count).await[0], once);
}
