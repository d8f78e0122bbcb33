//! ClickHouse's HTTP insert protocol against real ClickHouse and real clients nobody here
//! wrote: the official JavaScript client (`@clickhouse/client`, npm) and clickhouse-connect
//! (PyPI), both unmodified and installed by `scripts/install-deps.sh`; clickhouse-bulk-style
//! requests with the statement in the body; and a differential test: the same JSONEachRow rows
//! inserted into a current ClickHouse (chdb) directly and through the gateway, the stored
//! values compared row by row.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use buffergate::Config;
use common::{ClickHouseServer, Gateway, clickhouse, config, http, migrate};
use serde_json::{Value, json};

const KEY: &str = "secret-key-1";

fn uuid(n: u64) -> String {
    format!("00000000-0000-7000-8000-{n:012}")
}

/// The default stream (the seed table) and a `logs` stream, both in `db`, one API key.
async fn two_streams(ch: &ClickHouseServer, db: &str) -> Config {
    let mut config = config(ch, db);
    config.auth.api_keys = KEY.into();
    config.add_stream("logs", |s| {
        s.table.destination_table = "logs".into();
        s.table.buffer_table = "logs_buffer".into();
        s.table.partition_key = "host".into();
    });
    migrate(&config.streams()[0]).await;
    ch.exec(&format!(
        "CREATE TABLE `{db}`.logs (event_id UUID, event_ts DateTime, host String, level String, message String) \
         ENGINE = MergeTree ORDER BY (event_ts, event_id)"
    ))
    .await;
    migrate(&config.streams()[1]).await;
    config
}

/// Runs `tests/clients/js/run.mjs` (the official client) with `plan`; its outcomes.
fn javascript(plan: &Value) -> Vec<Value> {
    client(Command::new("node").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/js/run.mjs")), plan)
}

/// Runs `tests/clients/python/run.py` (clickhouse-connect) with `plan`; its outcomes.
fn python(plan: &Value) -> Vec<Value> {
    client(Command::new("python3").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/python/run.py")), plan)
}

fn client(command: &mut Command, plan: &Value) -> Vec<Value> {
    let out = command.arg(plan.to_string()).stderr(Stdio::piped()).output().expect("the client runs");
    assert!(
        out.status.success(),
        "client failed (installed by scripts/install-deps.sh?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|_| panic!("{text}"))
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

async fn stored(ch: &ClickHouseServer, sql: &str) -> Vec<Value> {
    ch.rows(sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_writes_two_streams_exactly_once() {
    let ch = clickhouse();
    let db = ch.fresh_database("chproto_js");
    let gw = Gateway::start(two_streams(ch, &db).await).await;
    gw.wait_ready().await;

    let events: Vec<Value> = (0..5)
        .map(|i| json!({"event_id": uuid(i), "user_id": i, "event_type": "js", "event_ts": 1_764_586_800 + i}))
        .collect();
    let plan = json!({
        "url": gw.url, "password": KEY, "database": db,
        "actions": [
            {"op": "ping"},
            {"op": "insert", "table": "events_raw", "values": events, "format": "JSONEachRow"},
            // The client's default format, by position, with a column list.
            {"op": "insert", "table": "logs", "columns": ["event_id", "host", "level", "message"],
             "values": [[uuid(100), "h1", "info", "one"], [uuid(101), "h2", "warn", "two"], [uuid(102), "h1", "info", "three"]]},
            // A resend (a client's retry after a lost answer): nothing stored twice.
            {"op": "insert", "table": "events_raw", "values": events, "format": "JSONEachRow"},
            // One bad row: the whole INSERT refused, as the client's own error with the code.
            {"op": "insert", "table": "events_raw", "format": "JSONEachRow",
             "values": [{"event_id": uuid(50), "user_id": 1, "event_type": "bad"}, {"event_id": uuid(51), "user_id": "x"}]},
            {"op": "insert", "table": "not_a_stream", "values": [{"a": 1}], "format": "JSONEachRow"},
            // The default format without a column list: every column, in table order.
            {"op": "insert", "table": "events_raw", "values": [[uuid(200), 1_764_586_800, 200, "compact", "", ""]]},
        ]
    });
    let outcomes = javascript(&plan);
    assert_eq!(outcomes[0], json!({"ok": true}), "{outcomes:?}");
    assert_eq!(outcomes[1], json!({"ok": true, "written": 5}), "{outcomes:?}");
    assert_eq!(outcomes[2], json!({"ok": true, "written": 3}), "{outcomes:?}");
    assert_eq!(outcomes[3], json!({"ok": true, "written": 0}), "a resend writes nothing: {outcomes:?}");
    assert_eq!(
        (outcomes[4]["code"].as_str(), outcomes[4]["type"].as_str()),
        (Some("27"), Some("CANNOT_PARSE_INPUT_ASSERTION_FAILED"))
    );
    let message = outcomes[4]["message"].as_str().unwrap();
    assert!(message.contains("user_id") && message.contains("row 2"), "names the row and field: {message}");
    assert_eq!(outcomes[5]["code"], "60", "{outcomes:?}");
    assert_eq!(outcomes[6], json!({"ok": true, "written": 1}), "{outcomes:?}");

    gw.drain(ch).await;
    ch.exec(&format!("OPTIMIZE TABLE `{db}`.logs_buffer")).await;
    let rows = stored(
        ch,
        &format!("SELECT toString(event_id) AS id, event_ts, event_type FROM `{db}`.events_raw ORDER BY id"),
    )
    .await;
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert_eq!(rows[0]["event_ts"], "2025-12-01 11:00:00", "integer times are epoch seconds, as ClickHouse reads them");
    assert_eq!(rows.iter().filter(|r| r["event_type"] == "js").count(), 5, "{rows:?}");
    assert!(rows.iter().all(|r| r["event_type"] != "bad"), "nothing of the refused INSERT: {rows:?}");
    assert_eq!(rows[5]["event_type"], "compact", "{rows:?}");
    let logs = stored(ch, &format!("SELECT host, level, message FROM `{db}`.logs ORDER BY message")).await;
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert_eq!(logs[0], json!({"host": "h1", "level": "info", "message": "one"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_connect_connects_and_writes_exactly_once() {
    let ch = clickhouse();
    let db = ch.fresh_database("chproto_py");
    let gw = Gateway::start(two_streams(ch, &db).await).await;
    gw.wait_ready().await;

    let body: String =
        (0..4).map(|i| format!("{{\"event_id\":\"{}\",\"user_id\":{i},\"event_type\":\"py\"}}\n", uuid(i))).collect();
    let plan = json!({
        "host": "127.0.0.1", "port": port_of(&gw.url), "username": "producer", "password": KEY,
        "actions": [
            {"op": "raw_insert", "table": format!("{db}.events_raw"), "body": body},
            {"op": "raw_insert", "table": format!("{db}.events_raw"), "body": body},
            {"op": "raw_insert", "table": format!("{db}.logs"), "body": "{\"host\":\"h\",\"message\":\"m\",\"extra\":1}\n"},
            {"op": "raw_insert", "table": format!("{db}.logs"), "body": "{\"host\":\"h\",\"extra\":1}\n",
             "settings": {"input_format_skip_unknown_fields": 0}},
            {"op": "query", "sql": "SELECT 1"},
        ]
    });
    let outcomes = python(&plan);
    assert_eq!(outcomes[0]["ok"], true, "get_client connects: {outcomes:?}");
    assert_eq!(outcomes[1], json!({"ok": true, "written": 4}), "{outcomes:?}");
    assert_eq!(outcomes[2], json!({"ok": true, "written": 0}), "a resend writes nothing: {outcomes:?}");
    assert_eq!(
        outcomes[3],
        json!({"ok": true, "written": 1}),
        "unknown fields skipped, as by ClickHouse: {outcomes:?}"
    );
    assert_eq!(outcomes[4]["code"], "117", "refused when the INSERT says so: {outcomes:?}");
    assert_eq!(outcomes[5], json!({"ok": true, "rows": [[1]]}), "{outcomes:?}");

    gw.drain(ch).await;
    ch.exec(&format!("OPTIMIZE TABLE `{db}`.logs_buffer")).await;
    assert_eq!(ch.count(&format!("`{db}`.events_raw")).await, 4);
    assert_eq!(ch.count(&format!("`{db}`.logs")).await, 1);
}

/// A POST to `/` the way clickhouse-bulk users and curl scripts send it.
async fn post(
    gw: &Gateway,
    query: Option<&str>,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, String, String) {
    let mut request = http().post(format!("{}/", gw.url)).body(body);
    if let Some(query) = query {
        request = request.query(&[("query", query)]);
    }
    if let Some(key) = key {
        request = request.header("x-clickhouse-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let code = response.headers().get("x-clickhouse-exception-code").map(|v| v.to_str().unwrap().to_string());
    (status, code.unwrap_or_default(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_the_body_and_what_is_refused() {
    let ch = clickhouse();
    let db = ch.fresh_database("chproto_raw");
    let mut config = two_streams(ch, &db).await;
    // A second key that may write only `logs`.
    let keys = common::scratch("chproto-keys").join("keys");
    std::fs::write(&keys, format!("all={KEY}\nlogsonly=logs-key streams=logs\n")).unwrap();
    config.auth.api_keys = String::new();
    config.auth.api_keys_file = keys.display().to_string();
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    // The statement as the body's first line, the rows after it.
    let body = format!("INSERT INTO {db}.events_raw FORMAT JSONEachRow\n{{\"user_id\":1}}\n{{\"user_id\":2}}\n");
    assert_eq!(post(&gw, None, Some(KEY), body).await.0, 200);
    // The statement split over lines, with a column list and settings; rows as an array.
    let body = format!(
        "insert into `{db}`.`events_raw`\n  (user_id, event_type)\n  SETTINGS async_insert = 1, max_threads = 4\n  FORMAT JSONEachRow [{{\"user_id\":3,\"event_type\":\"a\"}}]"
    );
    let (status, _, text) = post(&gw, None, Some(KEY), body).await;
    assert_eq!(status, 200, "{text}");
    // A gzip body with the statement in the URL.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"{\"user_id\":4}\n").unwrap();
    let response = http()
        .post(format!("{}/", gw.url))
        .query(&[("query", format!("INSERT INTO {db}.events_raw FORMAT JSONEachRow").as_str()), ("password", KEY)])
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap());

    let insert = format!("INSERT INTO {db}.events_raw FORMAT JSONEachRow");
    // The statement in the URL (if any), the key, the body; the status and code expected.
    type Refusal<'a> = (Option<&'a str>, Option<&'a str>, String, u16, &'a str);
    let refusals: Vec<Refusal<'_>> = vec![
        (Some(insert.as_str()), None, "{\"user_id\":9}".into(), 401, "516"),
        (Some(insert.as_str()), Some("wrong"), "{\"user_id\":9}".into(), 401, "516"),
        (Some(insert.as_str()), Some("logs-key"), "{\"user_id\":9}".into(), 403, "497"),
        (None, Some(KEY), format!("INSERT INTO {db}.nope FORMAT JSONEachRow\n{{}}"), 404, "60"),
        (None, Some(KEY), format!("INSERT INTO {db}.events_raw VALUES (9)"), 400, "62"),
        (None, Some(KEY), format!("INSERT INTO {db}.events_raw FORMAT CSV\n9"), 404, "73"),
        (None, Some(KEY), format!("DROP TABLE {db}.events_raw"), 400, "62"),
        (None, Some(KEY), format!("SELECT * FROM {db}.events_raw"), 403, "164"),
        (Some(insert.as_str()), Some(KEY), "{\"user_id\":9,".into(), 400, "117"),
        (
            None,
            Some(KEY),
            format!("INSERT INTO {db}.events_raw (user_id, user_id) FORMAT JSONEachRow\n{{}}"),
            400,
            "15",
        ),
        (None, Some(KEY), format!("INSERT INTO {db}.events_raw (nope) FORMAT JSONEachRow\n{{}}"), 400, "16"),
        (
            None,
            Some(KEY),
            format!(
                "INSERT INTO {db}.events_raw (user_id) SETTINGS input_format_skip_unknown_fields = 0 FORMAT JSONEachRow\n{{\"user_id\":1,\"event_type\":\"a\"}}"
            ),
            400,
            "117",
        ),
    ];
    for (query, key, body, status, code) in refusals {
        let (got, got_code, text) = post(&gw, query, key, body.clone()).await;
        assert_eq!((got, got_code.as_str()), (status, code), "{body}: {text}");
        assert!(text.starts_with(&format!("Code: {code}. DB::Exception: ")), "{text}");
    }
    // An INSERT over GET is refused, as ClickHouse refuses writes over GET.
    let response = http()
        .get(format!("{}/", gw.url))
        .query(&[("query", format!("{insert} {{\"user_id\":9}}").as_str()), ("password", KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-clickhouse-exception-code"], "164");
    // Rows in the query parameter, then more in the body, a line apart; the query_id echoed.
    let response = http()
        .post(format!("{}/", gw.url))
        .query(&[("query", format!("{insert} {{\"user_id\":5}}").as_str()), ("query_id", "q-1")])
        .header("x-clickhouse-key", KEY)
        .body("{\"user_id\":6}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-clickhouse-query-id"], "q-1");
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap());
    // The restricted key writes its own stream.
    let (status, _, text) =
        post(&gw, Some(&format!("INSERT INTO {db}.logs FORMAT JSONEachRow")), Some("logs-key"), "{\"host\":\"h\"}")
            .await;
    assert_eq!(status, 200, "{text}");
    let ping = http().get(format!("{}/ping", gw.url)).send().await.unwrap();
    assert_eq!(ping.text().await.unwrap(), "Ok.\n");

    gw.drain(ch).await;
    let rows = stored(ch, &format!("SELECT user_id FROM `{db}`.events_raw ORDER BY user_id")).await;
    let ids: Vec<u64> = rows.iter().map(|r| r["user_id"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6], "only the accepted INSERTs are stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_stream_answers_503_that_clients_report() {
    // Its own server: the Buffer's fill on 18.16 is the server-wide total.
    let ch = ClickHouseServer::start("chproto-shed");
    let config = common::small_buffer(&ch, "chproto_shed");
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let batch = |n: u64| -> Value {
        Value::Array((0..50).map(|i| json!({"user_id": n * 100 + i, "payload": "x".repeat(1000)})).collect())
    };
    let mut saturated = false;
    for n in 0..60 {
        if gw.post_json(&batch(n)).await.0 == 503 {
            saturated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(saturated, "the Buffer never saturated");
    let before = ch.count("chproto_shed.events_buffer").await;

    let row = json!({"user_id": 999_999, "event_type": "late"});
    let js = javascript(&json!({
        "url": gw.url, "database": "chproto_shed",
        "actions": [{"op": "insert", "table": "events_raw", "values": [row], "format": "JSONEachRow"}]
    }));
    assert_eq!((js[0]["code"].as_str(), js[0]["type"].as_str()), (Some("252"), Some("TOO_MANY_PARTS")), "{js:?}");
    // clickhouse-connect retries a 503 a few times, then reports it.
    let py = python(&json!({
        "host": "127.0.0.1", "port": port_of(&gw.url),
        "actions": [{"op": "raw_insert", "table": "chproto_shed.events_raw", "body": row.to_string()}]
    }));
    assert_eq!(py[1]["code"], "252", "{py:?}");
    let response = http()
        .post(format!("{}/", gw.url))
        .query(&[("query", "INSERT INTO chproto_shed.events_raw FORMAT JSONEachRow")])
        .body(row.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert_eq!(ch.count("chproto_shed.events_buffer").await, before, "nothing of the refused INSERTs");
}

/// One column per case: its type, and the JSON texts sent for it.
const CASES: &[(&str, &[&str])] = &[
    (
        "String",
        &[
            r#""a""#,
            "1",
            "1.50",
            "true",
            "null",
            r#"{"x": 1}"#,
            "[1, 2]",
            r#""\u00e9\n\t\"\\""#,
            r#""\ud83d\ude00""#,
            r#""""#,
        ],
    ),
    ("FixedString(4)", &[r#""ab""#, r#""abcd""#, r#""abcde""#, "1", "null"]),
    ("UInt8", &["1", r#""1""#, "255", "256", "-1", "1.0", "1.5", "true", "null", r#""abc""#, "1e2"]),
    ("Int16", &["-32768", "32767", "32768", r#""-3""#]),
    ("Int64", &["9223372036854775807", "9223372036854775808", "-9223372036854775808", r#""-3""#, "1e3"]),
    ("UInt64", &["18446744073709551615", "18446744073709551616", "-1", "0"]),
    ("Float32", &["1.5", r#""1.5""#, "1e40", "null", r#""nan""#, r#""inf""#, "true", "3", "-0.0"]),
    ("Float64", &["1.5", r#""1.5""#, "1e308", "null", r#""-inf""#, "0.1", "123456789.123456789", "-1e-300"]),
    ("UUID", &[r#""0190d6a2-5c5e-7f3a-9b1c-123456789abc""#, r#""0190d6a25c5e7f3a9b1c123456789abc""#, r#""x""#, "null"]),
    ("Date", &[r#""2025-12-01""#, "20423", r#""20423""#, r#""2025-12-01 11:00:00""#, "null", r#""2025-12-1""#]),
    (
        "DateTime",
        &[
            "1764586800",
            r#""1764586800""#,
            r#""2025-12-01 11:00:00""#,
            r#""2025-12-01T11:00:00""#,
            r#""2025-12-01T11:00:00Z""#,
            r#""2025-12-01 11:00:00.250""#,
            r#""2025-12-01""#,
            "1764586800123",
            "-5",
            "1.5",
            "null",
            "true",
            r#""2025-12-01 11:00:00+02:00""#,
            r#""yesterday""#,
        ],
    ),
    (
        "DateTime('Asia/Tokyo')",
        &["1764586800", r#""2025-12-01 11:00:00""#, r#""2025-12-01T11:00:00Z""#, r#""2025-12-01 20:00:00+09:00""#],
    ),
    ("Decimal(10, 3)", &["1.5", r#""1.5""#, "1.23456", "1e2", "12345678.9", "null", r#""abc""#, "-0.001"]),
    ("Enum8('a' = 1, 'b' = 2)", &[r#""a""#, "1", r#""1""#, r#""c""#, "3"]),
    ("Array(Int32)", &["[1,2]", "[]", r#"["1"]"#, "[null]", "null", "1", "[1.5]"]),
    ("Nullable(String)", &["null", r#""x""#, "1"]),
    ("Nullable(UInt8)", &["null", "1", r#""x""#]),
    ("UInt32 DEFAULT k * 10", &["7", "null"]),
];

/// Where the gateway refuses what ClickHouse stores: ClickHouse wraps, clamps or guesses, the
/// gateway answers 400 (docs/clickhouse-protocol.md lists each).
const REFUSED: &[(&str, &str)] = &[
    ("UInt8", "256"),
    ("UInt8", "true"),
    ("Int16", "32768"),
    ("Int64", "9223372036854775808"),
    ("UInt64", "18446744073709551616"),
    ("Float32", "1e40"),
    ("Float32", "true"),
    ("Date", r#""2025-12-1""#),
    ("DateTime", "1764586800123"),
    ("DateTime", "-5"),
    ("Enum8('a' = 1, 'b' = 2)", r#""1""#),
    // A time without an offset in a column whose zone is not UTC: read in that zone by
    // ClickHouse, refused by the gateway rather than guessed.
    ("DateTime('Asia/Tokyo')", r#""2025-12-01 11:00:00""#),
];

/// Where the gateway stores what ClickHouse refuses, with the meaning the text has: an
/// integral number in exponent or decimal form; a date given with a time of day; a time with
/// an offset or a fraction (which ClickHouse takes with `date_time_input_format =
/// 'best_effort'`, not with its default `basic`).
const LENIENT: &[(&str, &str)] = &[
    ("UInt8", "1.0"),
    ("UInt8", "1e2"),
    ("Int64", "1e3"),
    ("Date", r#""2025-12-01 11:00:00""#),
    ("DateTime", r#""2025-12-01T11:00:00Z""#),
    ("DateTime", r#""2025-12-01 11:00:00.250""#),
    ("DateTime", r#""2025-12-01 11:00:00+02:00""#),
    ("DateTime('Asia/Tokyo')", r#""2025-12-01T11:00:00Z""#),
    ("DateTime('Asia/Tokyo')", r#""2025-12-01 20:00:00+09:00""#),
];

/// The column of case `i`.
fn column(i: usize) -> String {
    format!("c{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_each_row_stores_what_clickhouse_stores() {
    let ch = clickhouse();
    let db = ch.fresh_database("chproto_diff");
    let columns: Vec<String> = CASES.iter().enumerate().map(|(i, (ty, _))| format!("{} {ty}", column(i))).collect();
    let ddl =
        |table: &str| format!("CREATE TABLE {table} (k UInt32, {}) ENGINE = MergeTree ORDER BY k", columns.join(", "));
    ch.exec(&format!("CREATE DATABASE `{db}`")).await;
    ch.exec(&ddl(&format!("`{db}`.typed"))).await;
    let mut config = config(ch, &db);
    config.table.destination_table = "typed".into();
    config.table.buffer_table = "typed_buffer".into();
    config.table.partition_key = "k".into();
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    // Every case is one row of its own: k, and the case's field.
    let mut rows = Vec::new();
    for (i, (_, texts)) in CASES.iter().enumerate() {
        for text in *texts {
            rows.push((i, *text, format!("{{\"k\":{},\"{}\":{text}}}", rows.len(), column(i))));
        }
    }
    let select = format!(
        "SELECT k, {} FROM {{table}} ORDER BY k",
        (0..CASES.len()).map(|i| format!("toString({c}) AS {c}", c = column(i))).collect::<Vec<_>>().join(", ")
    );

    // Through the gateway, one INSERT each.
    let mut through = Vec::new();
    for (_, _, row) in &rows {
        let (status, code, _) =
            post(&gw, Some(&format!("INSERT INTO {db}.typed FORMAT JSONEachRow")), None, row.clone()).await;
        through.push(if status == 200 { None } else { Some(code) });
    }
    gw.drain(ch).await;
    let gateway_stored = stored(ch, &select.replace("{table}", &format!("`{db}`.typed"))).await;

    // Straight into a current ClickHouse, one INSERT each, with its defaults.
    let plan = json!({
        "ddl": ddl("typed"), "table": "typed",
        "settings": "date_time_input_format = 'basic'",
        "rows": rows.iter().map(|(_, _, row)| row.clone()).collect::<Vec<_>>(),
        "select": select.replace("{table}", "typed"),
    });
    let session = common::scratch("chproto-chdb");
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb_each_row.py"))
        .arg(&session)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), plan.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chdb: {}", String::from_utf8_lossy(&out.stderr));
    let reference: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference_stored: Vec<Value> =
        reference["stored"].as_str().unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();

    let by_k = |stored: &[Value]| -> HashMap<u64, Value> {
        stored.iter().map(|r| (r["k"].as_u64().or_else(|| r["k"].as_str()?.parse().ok()).unwrap(), r.clone())).collect()
    };
    let (ours, theirs) = (by_k(&gateway_stored), by_k(&reference_stored));
    let mut differences = Vec::new();
    let mut listed = Vec::new();
    for (k, (case, text, _)) in rows.iter().enumerate() {
        let (ty, col) = (CASES[*case].0, column(*case));
        let k = k as u64;
        let value = |stored: &HashMap<u64, Value>| stored.get(&k).map(|r| normal(ty, &r[&col]));
        let clickhouse_took = reference["inserts"][k as usize]["ok"] == true;
        let verdict = match (clickhouse_took, &through[k as usize]) {
            (true, None) if value(&ours) == value(&theirs) => continue,
            (true, None) => format!("stored differently: ClickHouse {:?}, gateway {:?}", value(&theirs), value(&ours)),
            (false, Some(_)) => continue,
            (true, Some(_)) if REFUSED.contains(&(ty, text)) => {
                listed.push((ty, *text));
                continue;
            }
            (true, Some(code)) => format!("refused (code {code}); ClickHouse stores {:?}", value(&theirs)),
            (false, None) if LENIENT.contains(&(ty, text)) => {
                listed.push((ty, *text));
                continue;
            }
            (false, None) => format!(
                "stored {:?}; ClickHouse refuses ({})",
                value(&ours),
                reference["inserts"][k as usize]["message"].as_str().unwrap_or_default()
            ),
        };
        differences.push(format!("{ty} {text}: {verdict}"));
    }
    assert!(differences.is_empty(), "{} differences:\n{}", differences.len(), differences.join("\n"));
    for case in REFUSED.iter().chain(LENIENT) {
        assert!(listed.contains(case), "{case:?} is listed as a difference but is none: take it off the list");
    }
}

/// A stored value as text, in a form both servers print alike (18.16 pads decimals with zeros).
fn normal(ty: &str, value: &Value) -> String {
    let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
    // Day 0 as 18.16 prints it.
    let text = text.replace("0000-00-00", "1970-01-01");
    if ty.starts_with("Decimal") && text.contains('.') {
        return text.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    text
}
