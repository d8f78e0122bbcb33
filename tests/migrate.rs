//! `buffergate migrate` against a real ClickHouse, run as the binary an operator runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use common::{clickhouse, command, config};
use serde_json::json;

fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().expect("buffergate runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_the_seed_schema_idempotently_with_the_closest_types() {
    let ch = clickhouse();
    let db = ch.fresh_database("migrate");
    let mut config = config(ch, &db);
    config.table.buffer_num_layers = 4;
    config.table.buffer_max_bytes = 64 * 1024 * 1024;
    let (ok, stderr) = run(&mut command(&config, &["migrate"]));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("no DateTime64") && stderr.contains("no Map"), "says what it adapted: {stderr}");
    let (ok, stderr) = run(&mut command(&config, &["migrate"]));
    assert!(ok, "a second run changes nothing: {stderr}");
    assert!(stderr.contains("exists"), "{stderr}");

    for table in ["events_raw", "events_buffer"] {
        let columns = ch
            .rows(&format!("SELECT name, type FROM system.columns WHERE database = '{db}' AND table = '{table}'"))
            .await;
        assert_eq!(
            columns,
            vec![
                json!({"name": "event_id", "type": "UUID"}),
                json!({"name": "event_ts", "type": "DateTime"}),
                json!({"name": "user_id", "type": "UInt64"}),
                json!({"name": "event_type", "type": "LowCardinality(String)"}),
                json!({"name": "payload", "type": "String"}),
                json!({"name": "metadata", "type": "String"}),
            ],
            "{table}"
        );
    }
    let engines =
        ch.rows(&format!("SELECT name, engine_full FROM system.tables WHERE database = '{db}' ORDER BY name")).await;
    assert_eq!(
        engines[0]["engine_full"],
        format!("Buffer('{db}', 'events_raw', 4, 10, 60, 100000, 1000000, 10485760, 67108864)")
    );
    assert!(engines[1]["engine_full"].as_str().unwrap().starts_with("MergeTree"), "{engines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_buffer_whose_columns_differ_from_the_destination() {
    let ch = clickhouse();
    let db = ch.fresh_database("mismatch");
    let config = config(ch, &db);
    let (ok, stderr) = run(&mut command(&config, &["migrate"]));
    assert!(ok, "{stderr}");
    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;
    ch.exec(&format!(
        "CREATE TABLE {db}.events_buffer (event_id UUID, event_ts String, user_id UInt64, event_type LowCardinality(String), \
         payload String, metadata String) ENGINE = Buffer({db}, events_raw, 1, 10, 60, 100, 1000, 1000, 100000)"
    ))
    .await;
    let (ok, stderr) = run(&mut command(&config, &["migrate"]));
    assert!(!ok, "migrate must fail: {stderr}");
    assert!(
        stderr.contains("differ") && stderr.contains("event_ts String in the buffer but event_ts DateTime"),
        "{stderr}"
    );

    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;
    ch.exec(&format!("CREATE TABLE {db}.events_buffer (x UInt8) ENGINE = Memory")).await;
    let (ok, stderr) = run(&mut command(&config, &["migrate"]));
    assert!(!ok && stderr.contains("not a Buffer table"), "{stderr}");
}

#[test]
fn bad_configuration_is_refused_with_the_key_named() {
    let mut cmd = command(&buffergate::Config::default(), &["migrate"]);
    cmd.env("BUFFERGATE_QUEUE_CAPACITY", "-3");
    let out = cmd.output().expect("buffergate runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("QUEUE_CAPACITY") || stderr.contains("queue_capacity"), "{stderr}");
}
