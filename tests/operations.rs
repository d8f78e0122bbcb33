//! Operating the gateway: `check` flags each tuning problem on a real ClickHouse set up to have
//! it and passes a good setup; `drain` empties a loaded Buffer; a column added while a gateway
//! serves traffic loses nothing; producer API keys and the admin API.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use buffergate::Config;
use buffergate::check::{self, Options, Severity};
use buffergate::clickhouse::ClickHouse;
use common::{Gateway, RedisServer, clickhouse, command, config, eventually, free_port, http, migrate};
use serde_json::{Value, json};

async fn cores() -> u64 {
    let rows = clickhouse().rows("SELECT toString(value) AS v FROM system.settings WHERE name = 'max_threads'").await;
    rows[0]["v"].as_str().unwrap().trim_matches(|c: char| !c.is_ascii_digit()).parse().unwrap()
}

/// A migrated database whose Buffer has `num_layers` = the server's cores, then `tune`d.
async fn setup(prefix: &str, tune: impl FnOnce(&mut Config)) -> Config {
    let ch = clickhouse();
    let mut config = config(ch, &ch.fresh_database(prefix));
    config.table.buffer_num_layers = cores().await as u32;
    tune(&mut config);
    migrate(&config).await;
    config
}

const GOOD: Options = Options { rate: Some(1_000_000.0), server_memory: Some(64 << 30) };

async fn findings(config: &Config, options: Options) -> Vec<(&'static str, Severity)> {
    let found = check::run(&ClickHouse::new(config), config, options).await.unwrap();
    found.iter().map(|f| (f.check, f.severity)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_setup_and_flags_each_problem() {
    let ch = clickhouse();
    // Good: producers need a key (without one, `check` says so).
    let good = setup("check_good", |c| c.auth.api_keys = "a-key".into()).await;
    assert_eq!(findings(&good, GOOD).await, vec![], "a good setup has no findings");
    let out = command(
        &good,
        &["check", "--format", "json", "--rate", "1000000", "--server-memory", &(64u64 << 30).to_string()],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report, json!({"ok": true, "findings": []}));

    let cases: Vec<(&str, Config, Options, &str, Severity)> = vec![
        (
            "min_bytes",
            setup("check_minbytes", |c| c.table.buffer_min_bytes = 1000).await,
            GOOD,
            "min_bytes",
            Severity::Warning,
        ),
        (
            "layers",
            setup("check_layers", |c| c.table.buffer_num_layers = 64).await,
            GOOD,
            "num_layers",
            Severity::Warning,
        ),
        ("time", good.clone(), Options { rate: Some(10.0), ..GOOD }, "time_trigger", Severity::Warning),
        (
            "flush",
            setup("check_flush", |c| c.table.buffer_max_rows = 50_000).await,
            GOOD,
            "flush_sizes",
            Severity::Error,
        ),
        ("memory", good.clone(), Options { server_memory: Some(100 << 20), ..GOOD }, "capacity", Severity::Error),
    ];
    for (name, config, options, check_name, severity) in cases {
        let found = findings(&config, options).await;
        assert!(found.contains(&(check_name, severity)), "{name}: {found:?}");
    }

    let mv = setup("check_mv", |_| {}).await;
    ch.exec(&format!(
        "CREATE MATERIALIZED VIEW {0}.per_type ENGINE = MergeTree() ORDER BY event_type AS SELECT event_type, count() AS n FROM {0}.events_buffer GROUP BY event_type",
        mv.table.database
    ))
    .await;
    assert!(findings(&mv, GOOD).await.contains(&("materialized_views", Severity::Warning)));

    let open = setup("check_auth", |_| {}).await;
    assert_eq!(findings(&open, GOOD).await, vec![("api_keys", Severity::Info)], "producer authentication off");

    let columns = setup("check_columns", |_| {}).await;
    ch.exec(&format!("ALTER TABLE {}.events_buffer MODIFY COLUMN payload FixedString(8)", columns.table.database))
        .await;
    assert!(findings(&columns, GOOD).await.contains(&("columns", Severity::Error)));

    let missing = setup("check_missing", |_| {}).await;
    ch.exec(&format!("DROP TABLE {}.events_raw", missing.table.database)).await;
    assert!(findings(&missing, GOOD).await.contains(&("destination", Severity::Error)));

    let chained = setup("check_chained", |_| {}).await;
    let db = &chained.table.database;
    ch.exec(&format!("CREATE TABLE {db}.inner AS {db}.events_raw ENGINE = Buffer({db}, events_raw, 1, 10, 60, 10, 100, 10000000, 100000000)")).await;
    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;
    ch.exec(&format!("CREATE TABLE {db}.events_buffer AS {db}.events_raw ENGINE = Buffer({db}, inner, 2, 10, 60, 100000, 1000000, 10485760, 134217728)")).await;
    assert!(findings(&chained, GOOD).await.contains(&("destination", Severity::Error)));

    let full = setup("check_fill", |c| c.shed.buffer_capacity_bytes = 1000).await;
    ch.exec(&format!(
        "INSERT INTO {}.events_buffer (user_id, payload) VALUES (1, '{}')",
        full.table.database,
        "x".repeat(2000)
    ))
    .await;
    assert!(findings(&full, GOOD).await.contains(&("fill", Severity::Error)));
    let out = command(&full, &["check", "--rate", "1000000", "--server-memory", "68719476736"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "findings fail the command");
    assert!(String::from_utf8_lossy(&out.stdout).contains("fix:"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// With Redis configured, `check` looks at it too: reachable, and neither evicting remembered
/// ids nor freeing a whole slot's hash on its main thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flags_a_redis_that_is_down_evicts_or_frees_in_the_foreground() {
    let redis_server = RedisServer::start("check-redis");
    let mut good = setup("check_redis", |c| c.auth.api_keys = "a-key".into()).await;
    good.idempotency.redis_url = redis_server.url.clone();
    let client = redis::Client::open(redis_server.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut set = async |name: &str, value: &str| {
        redis::cmd("CONFIG").arg("SET").arg(name).arg(value).query_async::<()>(&mut connection).await.unwrap();
    };
    // Redis's defaults free expired keys in the foreground.
    set("lazyfree-lazy-expire", "no").await;
    assert_eq!(findings(&good, GOOD).await, vec![("redis_lazyfree", Severity::Warning)]);
    set("lazyfree-lazy-expire", "yes").await;
    assert_eq!(findings(&good, GOOD).await, vec![], "a good Redis has no findings");

    set("maxmemory", "100mb").await;
    set("maxmemory-policy", "allkeys-lru").await;
    assert_eq!(findings(&good, GOOD).await, vec![("redis_eviction", Severity::Warning)]);
    set("maxmemory-policy", "noeviction").await;
    assert_eq!(findings(&good, GOOD).await, vec![]);

    let down = {
        let mut config = good.clone();
        config.idempotency.redis_url = format!("redis://127.0.0.1:{}/0", free_port());
        config
    };
    assert_eq!(findings(&down, GOOD).await, vec![("redis", Severity::Error)]);
    let off = {
        let mut config = down;
        config.idempotency.dedup = buffergate::config::DedupMode::Off;
        config
    };
    assert_eq!(findings(&off, GOOD).await, vec![], "without deduplication Redis is not checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_empties_a_loaded_buffer() {
    let ch = clickhouse();
    let config = setup("drain", |_| {}).await;
    ch.exec(&format!(
        "INSERT INTO {}.events_buffer (user_id) SELECT number FROM system.numbers LIMIT 1234",
        config.table.database
    ))
    .await;
    assert_eq!(ch.count(&format!("{}.events_raw", config.table.database)).await, 0, "the rows wait in the Buffer");
    ch.exec(&format!("INSERT INTO {}.events_raw_quarantine_buffer (raw) VALUES ('parked')", config.table.database))
        .await;
    let out = command(&config, &["drain"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1234 rows moved to") && stdout.contains("1 rows moved to"), "{stdout}");
    assert_eq!(ch.count(&format!("{}.events_raw", config.table.database)).await, 1234);
    assert_eq!(ch.count(&format!("{}.events_raw_quarantine", config.table.database)).await, 1, "and the quarantine's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_while_serving_loses_nothing_and_is_written_afterwards() {
    let ch = clickhouse();
    let config = setup("addcolumn", |c| c.clickhouse.schema_refresh_interval_ms = 200).await;
    let gw = Arc::new(Gateway::start(config.clone()).await);
    gw.wait_ready().await;
    let (stop, acknowledged, next) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (gw, stop, acknowledged, next) =
            (Arc::clone(&gw), Arc::clone(&stop), Arc::clone(&acknowledged), Arc::clone(&next));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let from = next.fetch_add(10, Ordering::Relaxed);
                let batch: Vec<Value> = (from..from + 10).map(|i| json!({"user_id": i})).collect();
                let (status, body) = gw.post_json(&Value::Array(batch)).await;
                if status == 200 {
                    acknowledged.fetch_add(body["accepted"].as_u64().unwrap(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    ch.exec(&format!(
        "ALTER TABLE {}.events_raw ADD COLUMN country LowCardinality(String) DEFAULT 'zz'",
        config.table.database
    ))
    .await;
    migrate(&config).await;
    eventually(Duration::from_secs(10), "the new column to be accepted", || async {
        gw.post_json(&json!([{"user_id": 1_000_000, "country": "fr"}])).await.1["accepted"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    gw.drain(ch).await;
    let table = gw.destination();
    let total = acknowledged.load(Ordering::Relaxed) + 1;
    assert!(total > 100, "traffic flowed: {total}");
    assert_eq!(ch.count(&table).await, total, "every acknowledged event is stored");
    assert_eq!(ch.count(&format!("{table} WHERE country = 'fr'")).await, 1);
    Arc::try_unwrap(gw).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_the_admin_api() {
    let ch = clickhouse();
    let dir = common::scratch("keys");
    std::fs::write(dir.join("keys"), "# producers\nteam-a=alpha-key\nbeta-key\n").unwrap();
    let config = setup("auth", |c| {
        c.auth.api_keys_file = dir.join("keys").display().to_string();
        c.auth.api_key_rate_per_s = 1.0;
        c.auth.api_key_burst = 3;
        c.auth.admin_token = "admin-secret".into();
        c.batching.flush_linger_ms = 30_000;
        // 202 at once, with rows left lingering: without the journal, which would hold each
        // 202 until its batch is journaled, after the linger.
        c.journal.journal = false;
    })
    .await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    let post = |key: Option<&'static str>| {
        let url = format!("{}/v1/events?wait=false", gw.url);
        async move {
            let mut request = http().post(url).json(&json!([{"user_id": 1}]));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            let headers = response.headers().clone();
            (response.status().as_u16(), headers, response.json::<Value>().await.unwrap())
        }
    };
    let (status, headers, body) = post(None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")), "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, body) = post(Some("wrong")).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");
    for _ in 0..3 {
        assert_eq!(post(Some("alpha-key")).await.0, 202);
    }
    let (status, headers, body) = post(Some("alpha-key")).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("rate_limited")), "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(post(Some("beta-key")).await.0, 202, "limits are per key");
    let response = http().get(format!("{}/v1/offsets/x", gw.url)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401, "offsets need a key too");
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http().get(format!("{}{open}", gw.url)).send().await.unwrap().status().as_u16(), 200, "{open}");
    }

    // Admin: the token, the status, and a flush that does not wait for the 30 s linger.
    let admin = |path: &'static str, token: &'static str| http().get(format!("{}{path}", gw.url)).bearer_auth(token);
    assert_eq!(admin("/v1/status", "nope").send().await.unwrap().status().as_u16(), 401);
    let status: Value = admin("/v1/status", "admin-secret").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        status["queue_rows"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        4,
        "{status}"
    );
    assert_eq!(status["ready"], true, "{status}");
    assert!(status["clickhouse_version"].as_str().unwrap().starts_with("18."), "{status}");
    assert_eq!(status["idempotency_store"], "embedded");
    let flushed: Value = http()
        .post(format!("{}/admin/flush?drain=true", gw.url))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(flushed["flushed"], true, "{flushed}");
    assert_eq!(ch.count(&gw.destination()).await, 4, "flushed and drained at once");
    gw.stop().await;

    let plain = Gateway::start(setup("noadmin", |_| {}).await).await;
    let response = http().post(format!("{}/admin/flush", plain.url)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404, "no admin token: no admin API");
    plain.stop().await;
}

/// Keys configured but none read (an empty Secret, a file of comments) must not open the
/// gateway to everyone: the gateway refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_keys_that_hold_no_key_refuse_to_start() {
    let ch = clickhouse();
    let dir = common::scratch("no-keys");
    std::fs::write(dir.join("keys"), "# to be filled by the deployment\n\n").unwrap();
    for (name, file, inline) in [("a file of comments", true, ""), ("separators only", false, " , ,")] {
        let mut config = config(ch, "default");
        if file {
            config.auth.api_keys_file = dir.join("keys").display().to_string();
        }
        config.auth.api_keys = inline.into();
        config.http.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = command(&config, &["serve"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(status.is_some_and(|s| !s.success()), "{name}: it must not serve ({status:?}): {stderr}");
        assert!(stderr.contains("hold no key"), "{name}: {stderr}");
    }
}
