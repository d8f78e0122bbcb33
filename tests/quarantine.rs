//! The quarantine: rejected events parked in `<destination>_quarantine` exactly once (also
//! across a ClickHouse SIGKILL), replayed into the destination once they fit, and a 5 MiB
//! malformed event kept truncated. Real ClickHouse; every test asserts on the rows stored.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::collections::HashMap;
use std::time::Duration;

use buffergate::Config;
use buffergate::config::DedupMode;
use common::{ClickHouseServer, Gateway, Process, clickhouse, command, config, eventually, http, migrate, scratch};
use serde_json::{Value, json};
use uuid::Uuid;

const ADMIN: &str = "admin-token";

fn number(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_str()?.parse().ok()).unwrap()
}

/// Every row of the quarantine (through its Buffer: also what is not flushed yet), by index.
async fn parked(ch: &ClickHouseServer, config: &Config) -> Vec<Value> {
    ch.rows(&format!(
        "SELECT toString(quarantine_id) AS id, event_index, field, toString(reason) AS reason, error, raw, raw_bytes, \
         replayed, toString(stream) AS stream FROM `{}`.`{}_quarantine_buffer` ORDER BY event_index, updated",
        config.table.database, config.table.destination_table
    ))
    .await
}

/// How many times each event id is in the destination (through its Buffer).
async fn stored(ch: &ClickHouseServer, config: &Config) -> HashMap<String, u64> {
    let rows = ch
        .rows(&format!(
            "SELECT toString(event_id) AS id, count() AS n FROM `{}`.`{}` GROUP BY id",
            config.table.database, config.table.buffer_table
        ))
        .await;
    rows.iter().map(|r| (r["id"].as_str().unwrap().to_string(), number(&r["n"]))).collect()
}

/// 100 events, three of them bad: a field the table lacks (7), a value its column cannot hold
/// (42), not an object (77).
fn hundred_with_three_bad() -> (Vec<String>, Vec<Value>) {
    let mut ids = Vec::new();
    let events = (0..100)
        .map(|i| {
            let id = Uuid::new_v4().to_string();
            match i {
                7 => json!({"event_id": id, "user_id": i, "colour": "red"}),
                42 => json!({"event_id": id, "user_id": "forty-two"}),
                77 => json!(7),
                _ => {
                    ids.push(id.clone());
                    json!({"event_id": id, "user_id": i})
                }
            }
        })
        .collect();
    (ids, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bad_events_of_a_hundred_are_parked_once_each_also_across_a_clickhouse_sigkill() {
    let ch = ClickHouseServer::start("quarantine-kill");
    let mut config = common::holding_buffer(config(&ch, "quarantine_kill"));
    config.journal.data_dir = scratch("quarantine-kill-data").display().to_string();
    config.journal.confirm_interval_ms = 200;
    migrate(&config).await;
    let gateway = Gateway::start(config.clone()).await;
    gateway.wait_ready().await;
    let (ids, events) = hundred_with_three_bad();
    let sent: Vec<String> = events.iter().map(Value::to_string).collect();
    let (status, answer) =
        gateway.post("/v1/events", "application/json", None, format!("[{}]", sent.join(",")).into_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 97);
    let rejected: Vec<(u64, Value, String)> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["field"].clone(), r["reason"].as_str().unwrap().to_string()))
        .collect();
    let expected = vec![
        (7, json!("colour"), "unknown_field".to_string()),
        (42, json!("user_id"), "invalid_value".to_string()),
        (77, Value::Null, "not_an_event".to_string()),
    ];
    assert_eq!(rejected, expected, "the answer still lists them, with their reason codes");

    // Both Buffers hold their rows (hour-long thresholds) when ClickHouse dies: only the
    // journals have them.
    ch.kill();
    ch.restart();
    eventually(Duration::from_secs(60), "the journals to restore both tables", || async {
        let parked = parked(&ch, &config).await.len();
        let stored = stored(&ch, &config).await;
        parked >= 3 && ids.iter().all(|id| stored.contains_key(id))
    })
    .await;
    let stored = stored(&ch, &config).await;
    assert_eq!(stored.len(), 97, "exactly the 97 good events");
    assert!(stored.values().all(|n| *n == 1), "each once: {stored:?}");
    let rows = parked(&ch, &config).await;
    assert_eq!(rows.len(), 3, "each rejected event parked once: {rows:#?}");
    for ((index, field, reason), row) in expected.iter().zip(&rows) {
        assert_eq!(number(&row["event_index"]), *index);
        assert_eq!(row["reason"], *reason);
        assert_eq!(row["field"], field.as_str().unwrap_or(""));
        assert_eq!(row["raw"], sent[*index as usize], "the event as sent");
        assert_eq!(number(&row["raw_bytes"]), sent[*index as usize].len() as u64);
        assert_eq!(row["stream"], "default");
        assert_eq!(number(&row["replayed"]), 0);
    }
    let metrics = http().get(format!("{}/metrics", gateway.url)).send().await.unwrap().text().await.unwrap();
    for reason in ["unknown_field", "invalid_value", "not_an_event"] {
        let name = format!("buffergate_quarantined_events_total{{stream=\"default\",reason=\"{reason}\"}}");
        assert!(common::sample(&metrics, &name).is_some_and(|n| n >= 1.0), "{name} in\n{metrics}");
    }
    gateway.stop().await;
}

/// Runs `buffergate replay` against `gateway`, with `filters` (`--reason`, `--since`); its
/// JSON answer.
fn replay_only(config: &Config, gateway: &Gateway, filters: &[&str]) -> Value {
    let args = [&["replay", "--gateway", &gateway.url][..], filters].concat();
    let output = command(config, &args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "replay: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap()
}

fn replay(config: &Config, gateway: &Gateway) -> Value {
    replay_only(config, gateway, &[])
}

/// `buffergate check`'s quarantine finding: (severity, message).
fn quarantine_finding(config: &Config) -> Option<(String, String)> {
    let out = command(config, &["check", "--format", "json"]).output().expect("check runs");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("JSON: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    let found = findings.iter().find(|f| f["check"] == "quarantine")?;
    Some((found["severity"].as_str()?.to_string(), found["message"].as_str()?.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_a_field_the_table_lacks_are_replayed_once_the_column_is_added() {
    let ch = clickhouse();
    let db = ch.fresh_database("quarantine_replay");
    let mut config = config(ch, &db);
    config.auth.admin_token = ADMIN.into();
    // No deduplication by key: what keeps a replay run twice from storing twice is the
    // replay's own look-up of the events in the destination.
    config.idempotency.dedup = DedupMode::Off;
    migrate(&config).await;
    let gateway = Gateway::start(config.clone()).await;
    gateway.wait_ready().await;
    // 15 good events; 16–18 carry `colour`, which the table lacks (18 without an id); 19
    // carries it and a user_id no UInt64 holds.
    let mut events: Vec<Value> =
        (0..15).map(|i| json!({"event_id": Uuid::new_v4().to_string(), "user_id": i})).collect();
    for i in 15..18 {
        events.push(json!({"event_id": Uuid::new_v4().to_string(), "user_id": i, "colour": "red"}));
    }
    events.push(json!({"user_id": 18, "colour": "blue"}));
    events.push(json!({"event_id": Uuid::new_v4().to_string(), "user_id": "nineteen", "colour": "green"}));
    let (status, answer) = gateway.post_json(&Value::Array(events)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_array().map(Vec::len)), (Some(15), Some(5)));
    assert!(answer["rejected"].as_array().unwrap().iter().all(|r| r["reason"] == "unknown_field"), "{answer}");

    // `check` tells that they wait, and that they came in the last hour, once the quarantine's
    // Buffer has flushed them into its table.
    let flush = format!("OPTIMIZE TABLE `{db}`.`{}_quarantine_buffer`", config.table.destination_table);
    ch.exec(&flush).await;
    let (severity, message) = quarantine_finding(&config).expect("a quarantine finding");
    assert_eq!(severity, "warning", "{message}");
    assert!(
        message.starts_with("5 rejected events wait in")
            && message.contains("(unknown_field 5), 5 of them parked in the last hour"),
        "{message}"
    );

    // The producer's new field, added to the table: the Buffer is swapped for one with it.
    ch.exec(&format!("ALTER TABLE `{db}`.`{}` ADD COLUMN colour String", config.table.destination_table)).await;
    migrate(&config).await;
    // Filters that match none of them move none.
    let nothing = json!({"stream": "default", "stored": 0, "rejected": 0, "truncated": 0});
    assert_eq!(replay_only(&config, &gateway, &["--reason", "invalid_value"]), nothing, "another reason");
    let later = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    assert_eq!(replay_only(&config, &gateway, &["--since", &later]), nothing, "received before --since");
    let first = replay_only(&config, &gateway, &["--reason", "unknown_field", "--since", "2020-01-01T00:00:00Z"]);
    assert_eq!(first, json!({"stream": "default", "stored": 4, "rejected": 1, "truncated": 0}));
    let rows = ch
        .rows(&format!(
            "SELECT toString(event_id) AS id, user_id, colour FROM `{db}`.`{}` ORDER BY user_id",
            config.table.buffer_table
        ))
        .await;
    assert_eq!(rows.len(), 19, "15 + the 4 that now fit: {rows:#?}");
    let colours: Vec<&str> = rows.iter().skip(15).map(|r| r["colour"].as_str().unwrap()).collect();
    assert_eq!(colours, ["red", "red", "red", "blue"], "with the values they carried");
    let quarantine = format!("`{db}`.`{}_quarantine`", config.table.destination_table);
    let latest = ch
        .rows(&format!(
            "SELECT toString(quarantine_id) AS id, event_index, replayed, toString(reason) AS reason, field \
             FROM {quarantine} FINAL ORDER BY event_index"
        ))
        .await;
    let states: Vec<(u64, u64, &str, &str)> = latest
        .iter()
        .map(|r| {
            (
                number(&r["event_index"]),
                number(&r["replayed"]),
                r["reason"].as_str().unwrap(),
                r["field"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (15, 1, "unknown_field", "colour"),
            (16, 1, "unknown_field", "colour"),
            (17, 1, "unknown_field", "colour"),
            (18, 1, "unknown_field", "colour"),
            (19, 0, "invalid_value", "user_id"),
        ],
        "replayed ones marked; the one that still does not fit keeps its new reason"
    );
    // The event that came without an id got its quarantine id as its id.
    let id_of_18 = latest[3]["id"].as_str().unwrap();
    assert_eq!(rows[18]["id"], id_of_18);

    let second = replay(&config, &gateway);
    assert_eq!(second, json!({"stream": "default", "stored": 0, "rejected": 1, "truncated": 0}), "nothing moves twice");
    // One still waits, refused again just now.
    ch.exec(&flush).await;
    let (severity, message) = quarantine_finding(&config).expect("a quarantine finding");
    assert_eq!(severity, "warning", "{message}");
    assert!(message.starts_with("1 rejected events wait in") && message.contains("(invalid_value 1)"), "{message}");

    // A replay cut short after the events were written and before they were marked: sent
    // again, the destination's own look-up finds them.
    ch.exec(&format!("ALTER TABLE {quarantine} DELETE WHERE replayed = 1")).await;
    eventually(Duration::from_secs(30), "the marks to be deleted", || async {
        ch.count(&format!("{quarantine} WHERE replayed = 1")).await == 0
    })
    .await;
    let third = replay(&config, &gateway);
    assert_eq!(third["stored"], 4, "{third}");
    let stored = stored(ch, &config).await;
    assert_eq!(stored.len(), 19);
    assert!(stored.values().all(|n| *n == 1), "each event once: {stored:?}");

    // Refusals of the admin call.
    let ask = |query: &str| http().post(format!("{}/admin/replay?{query}", gateway.url)).bearer_auth(ADMIN).send();
    let bad_reason = ask("reason=nope").await.unwrap();
    assert_eq!(bad_reason.status(), 400);
    assert_eq!(ask("stream=nope").await.unwrap().status(), 404);
    let unauthorized = http().post(format!("{}/admin/replay", gateway.url)).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_rejected_events_cannot_be_parked_writes_nothing() {
    let ch = clickhouse();
    let db = ch.fresh_database("quarantine_refused");
    let config = config(ch, &db);
    migrate(&config).await;
    // A quarantine whose Buffer holds an index up to 255 only: the row of event 299 is refused.
    let buffer = format!("`{db}`.`{}_quarantine_buffer`", config.table.destination_table);
    ch.exec(&format!("DROP TABLE {buffer}")).await;
    ch.exec(&format!(
        "CREATE TABLE {buffer} (quarantine_id UUID, received DateTime, stream String, api_key String, \
         producer_id String, event_index UInt8, raw String, raw_bytes UInt64, field String, reason String, \
         error String, replayed UInt8, updated UInt64) ENGINE = Buffer('{db}', '{}_quarantine', 1, 1, 2, 1, 10, 1, 100000)",
        config.table.destination_table
    ))
    .await;
    let gateway = Gateway::start(config.clone()).await;
    gateway.wait_ready().await;
    let batch = |bad: usize| {
        let events = (0..300).map(|i| {
            if i == bad {
                json!({"user_id": "bad"})
            } else {
                json!({"event_id": Uuid::new_v4().to_string(), "user_id": i})
            }
        });
        Value::Array(events.collect())
    };
    let (status, answer) = gateway.post_json(&batch(299)).await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("quarantine_unavailable")), "{answer}");
    gateway.drain(ch).await;
    assert_eq!(ch.count(&gateway.destination()).await, 0, "nothing of the request is written");
    let (status, answer) = gateway.post_json(&batch(5)).await;
    assert_eq!((status, answer["accepted"].as_u64()), (200, Some(299)), "{answer}");
    gateway.drain(ch).await;
    assert_eq!(ch.count(&gateway.destination()).await, 299);
    assert_eq!(ch.count(&buffer).await, 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_mib_malformed_event_is_parked_truncated_within_the_memory_bound() {
    let ch = clickhouse();
    let db = ch.fresh_database("quarantine_big");
    let mut config = config(ch, &db);
    config.http.listen = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
    migrate(&config).await;
    let process = Process::spawn(command(&config, &["serve"]), &scratch("quarantine-big-logs").join("gateway.log"));
    let url = format!("http://{}", config.http.listen);
    eventually(Duration::from_secs(30), "the gateway to be ready", || {
        let url = format!("{url}/readyz");
        async move { http().get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    // A line that never closes its string: malformed, 5 MiB long.
    let malformed = format!("{{\"user_id\": 1, \"payload\": \"{}", "x".repeat(5 * 1024 * 1024));
    let good = |i: u64| json!({"event_id": Uuid::new_v4().to_string(), "user_id": i}).to_string();
    let requests = 8;
    let mut pending = Vec::new();
    for r in 0..requests {
        let body = format!("{}\n{malformed}\n{}\n", good(r), good(r + 100));
        let url = format!("{url}/v1/events");
        pending.push(tokio::spawn(async move {
            let response =
                http().post(url).header("content-type", "application/x-ndjson").body(body).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }));
    }
    for request in pending {
        let (status, answer) = request.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["accepted"], 2, "the lines around it are stored: {answer}");
        let rejected = &answer["rejected"][0];
        assert_eq!((rejected["index"].as_u64(), rejected["reason"].as_str()), (Some(1), Some("malformed")), "{answer}");
        assert!(answer.to_string().len() < 2048, "the answer echoes a bounded part: {}", answer.to_string().len());
    }
    let rows = parked(ch, &config).await;
    assert_eq!(rows.len(), requests as usize);
    for row in &rows {
        assert_eq!(row["reason"], "malformed");
        assert_eq!(number(&row["raw_bytes"]), malformed.len() as u64, "its full length");
        let raw = row["raw"].as_str().unwrap();
        assert_eq!(raw.len(), config.table.quarantine_max_raw_bytes, "kept truncated");
        assert!(malformed.starts_with(raw));
    }
    assert_eq!(stored(ch, &config).await.len(), 2 * requests as usize);
    let peak = common::peak_rss_kib(process.pid);
    eprintln!("the gateway's peak RSS: {peak} KiB");
    // Eight 5 MiB bodies at once, each held once: far below what copies of them would take.
    assert!(peak < 160 * 1024, "peak RSS {peak} KiB");
    process.signal(libc::SIGTERM);
    process.wait_exit(Duration::from_secs(30));
}
