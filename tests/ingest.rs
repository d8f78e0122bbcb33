//! POST /v1/events end to end: a real ClickHouse, the gateway in-process, and assertions on the
//! exact rows stored in the destination table.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::io::Write;
use std::time::Duration;

use buffergate::config::InsertFormat;
use buffergate::schema::{ColumnInfo, SpecialColumns, TableSchema};
use common::{Gateway, clickhouse, config, eventually, migrate};
use serde_json::{Value, json};

async fn seeded_gateway(prefix: &str) -> Gateway {
    let ch = clickhouse();
    let config = config(ch, &ch.fresh_database(prefix));
    migrate(&config).await;
    Gateway::start(config).await
}

fn seed_event(i: u64) -> Value {
    json!({
        "event_id": format!("00000000-0000-4000-8000-{i:012}"),
        "event_ts": "2024-05-01T12:00:00.250Z",
        "user_id": i,
        "event_type": if i.is_multiple_of(2) { "click" } else { "view" },
        "payload": {"page": format!("/p/{i}"), "n": i},
        "metadata": {"source": "test"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_array_lands_in_the_destination_exactly() {
    let ch = clickhouse();
    let gw = seeded_gateway("array").await;
    let events: Vec<Value> = (1..=50).map(seed_event).collect();
    let (status, body) = gw.post_json(&Value::Array(events)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"accepted": 50, "duplicates": 0, "rejected": []}));
    gw.drain(ch).await;
    let rows = ch
        .rows(&format!(
            "SELECT toString(event_id) AS id, toString(event_ts) AS ts, user_id, event_type, payload, metadata FROM {} ORDER BY user_id",
            gw.destination()
        ))
        .await;
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[6]["id"], "00000000-0000-4000-8000-000000000007");
    // 18.16 has no DateTime64: migrate created DateTime, so the time is stored to the second.
    assert_eq!(rows[6]["ts"], "2024-05-01 12:00:00");
    assert_eq!(rows[6]["user_id"].to_string().trim_matches('"'), "7");
    assert_eq!(rows[6]["event_type"], "view");
    assert_eq!(rows[6]["payload"], r#"{"n":7,"page":"/p/7"}"#);
    assert_eq!(rows[6]["metadata"], r#"{"source":"test"}"#);
    gw.stop().await;
}

/// A large request's rows travel as a block made ahead of the INSERT; small requests' rows are
/// merged into one block at the INSERT. Both kinds in one INSERT land exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_small_requests_in_one_insert_land_exactly() {
    let ch = clickhouse();
    let mut config = config(ch, &ch.fresh_database("blocks"));
    config.batching.partitions = 1;
    // Long enough for the three requests to share the partition's one INSERT.
    config.batching.flush_linger_ms = 300;
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    let events = |from: u64, n: u64| Value::Array((from..from + n).map(seed_event).collect());
    let (small, large, other) = (events(1, 3), events(1000, 700), events(2000, 5));
    let (a, b, c) = tokio::join!(gw.post_json(&small), gw.post_json(&large), gw.post_json(&other));
    for (status, body) in [&a, &b, &c] {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(
        [a.1["accepted"].as_u64(), b.1["accepted"].as_u64(), c.1["accepted"].as_u64()],
        [Some(3), Some(700), Some(5)]
    );
    gw.drain(ch).await;
    let table = gw.destination();
    let stored = ch
        .rows(&format!(
            "SELECT count() AS n, uniqExact(user_id) AS ids, sum(user_id) AS total, \
             countIf(payload = concat('{{\"n\":', toString(user_id), ',\"page\":\"/p/', toString(user_id), '\"}}')) AS exact \
             FROM {table}"
        ))
        .await;
    let total: u64 = (1..4).chain(1000..1700).chain(2000..2005).sum();
    assert_eq!(stored[0]["n"].to_string().trim_matches('"'), "708", "{stored:?}");
    assert_eq!(stored[0]["ids"].to_string().trim_matches('"'), "708", "{stored:?}");
    assert_eq!(stored[0]["total"].to_string().trim_matches('"'), total.to_string(), "{stored:?}");
    assert_eq!(stored[0]["exact"].to_string().trim_matches('"'), "708", "every payload intact: {stored:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_gzip_and_zstd_bodies() {
    let ch = clickhouse();
    let gw = seeded_gateway("formats").await;
    let ndjson: String = (1..=10).map(|i| format!("{}\n", seed_event(i))).collect();
    let (status, body) = gw.post("/v1/events", "application/x-ndjson", None, ndjson.into_bytes()).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(10)), "{body}");

    let array = Value::Array((11..=20).map(seed_event).collect()).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(array.as_bytes()).unwrap();
    let (status, body) = gw.post("/v1/events", "application/json", Some("gzip"), gz.finish().unwrap()).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(10)), "{body}");

    let ndjson: String = (21..=30).map(|i| format!("{}\r\n", seed_event(i))).collect();
    let packed = zstd::encode_all(ndjson.as_bytes(), 3).unwrap();
    let (status, body) = gw.post("/v1/events", "application/x-ndjson", Some("zstd"), packed).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(10)), "{body}");

    gw.drain(ch).await;
    let rows = ch.rows(&format!("SELECT user_id FROM {} ORDER BY user_id", gw.destination())).await;
    let ids: Vec<u64> = rows.iter().map(|r| r["user_id"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids, (1..=30).collect::<Vec<u64>>());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_is_rejected_alone() {
    let ch = clickhouse();
    let gw = seeded_gateway("partial").await;
    let events = json!([
        seed_event(1),
        {"user_id": -5},
        {"event_id": "not-a-uuid", "user_id": 3},
        "not an object",
        {"user_id": 4, "surprise": true},
        {"user_id": 5, "event_ts": "last tuesday"},
        seed_event(6),
    ]);
    let (status, body) = gw.post_json(&events).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    let rejected: Vec<(u64, Value)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["field"].clone()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, json!("user_id")),
            (2, json!("event_id")),
            (3, Value::Null),
            (4, json!("surprise")),
            (5, json!("event_ts"))
        ]
    );
    assert!(body["rejected"][0]["error"].as_str().unwrap().contains("out of range"), "{body}");
    assert!(body["rejected"][1]["error"].as_str().unwrap().contains("not a UUID"), "{body}");
    gw.drain(ch).await;
    let rows = ch.rows(&format!("SELECT user_id FROM {} ORDER BY user_id", gw.destination())).await;
    assert_eq!(rows, vec![json!({"user_id": "1"}), json!({"user_id": "6"})]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_outside_the_window_are_rejected_alone() {
    let ch = clickhouse();
    let mut config = config(ch, &ch.fresh_database("window"));
    config.table.timestamp_max_age_s = 30 * 86_400;
    config.table.timestamp_max_ahead_s = 3_600;
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let at = |offset_ms: i64| now_ms + offset_ms;
    let events = json!([
        {"user_id": 1, "event_ts": at(-29 * 86_400_000)},
        {"user_id": 2, "event_ts": at(-31 * 86_400_000)},
        {"user_id": 3, "event_ts": at(3_000_000)},
        {"user_id": 4, "event_ts": at(2 * 3_600_000)},
        {"user_id": 5, "event_ts": now_ms * 1000},
        {"user_id": 6, "event_ts": "2015-01-01T00:00:00Z"},
        {"user_id": 7},
    ]);
    let (status, body) = gw.post_json(&events).await;
    assert_eq!(status, 200, "{body}");
    let rejected: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["field"].as_str().unwrap()))
        .collect();
    assert_eq!(rejected, vec![(1, "event_ts"), (3, "event_ts"), (4, "event_ts"), (5, "event_ts")], "{body}");
    assert!(body["rejected"][0]["error"].as_str().unwrap().contains("timestamp_max_age_s"), "{body}");
    assert!(body["rejected"][1]["error"].as_str().unwrap().contains("timestamp_max_ahead_s"), "{body}");
    gw.drain(ch).await;
    let rows = ch.rows(&format!("SELECT user_id FROM {} ORDER BY user_id", gw.destination())).await;
    assert_eq!(rows, vec![json!({"user_id": "1"}), json!({"user_id": "3"}), json!({"user_id": "7"})]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_fields_get_generated_ids_receive_time_and_defaults() {
    let ch = clickhouse();
    let gw = seeded_gateway("defaults").await;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (status, body) = gw.post_json(&json!([{"user_id": 1}, {"user_id": 2}])).await;
    assert_eq!(status, 200, "{body}");
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    gw.drain(ch).await;
    let rows = ch
        .rows(&format!(
            "SELECT toString(event_id) AS id, toUInt32(event_ts) AS ts, event_type, payload, metadata FROM {} ORDER BY user_id",
            gw.destination()
        ))
        .await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let id = row["id"].as_str().unwrap();
        assert_eq!(&id[14..15], "7", "a generated event_id is a UUIDv7: {id}");
        let ts = row["ts"].as_u64().unwrap();
        assert!(ts >= before && ts <= after, "event_ts is the receive time: {ts} not in [{before}, {after}]");
        assert_eq!(
            (row["event_type"].as_str(), row["payload"].as_str(), row["metadata"].as_str()),
            (Some(""), Some(""), Some(""))
        );
    }
    assert_ne!(rows[0]["id"], rows[1]["id"]);
    gw.stop().await;
}

/// Every type 18.16 has, on a table of our own; the types only modern servers have
/// (DateTime64, Map, Bool, IPv4/6, Date32) are proven against ClickHouse 26 in `conformance.rs`.
/// Rows go to ClickHouse as Native blocks by default; this table's types all transcode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_of_the_installed_server_as_native() {
    every_type("types_native", "", InsertFormat::Native).await;
}

/// `LowCardinality(Nullable(...))` is not transcoded: such a table gets RowBinary, as does
/// every table with `insert_format = "row_binary"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_of_the_installed_server_as_rowbinary() {
    every_type("types_rowbinary", "lcn LowCardinality(Nullable(String)), ", InsertFormat::RowBinary).await;
}

async fn every_type(prefix: &str, extra: &str, format: InsertFormat) {
    let ch = clickhouse();
    let db = ch.fresh_database(prefix);
    ch.exec(&format!("CREATE DATABASE {db}")).await;
    let columns = format!(
        "s String, fs FixedString(4), lc LowCardinality(String), {extra}\
        n Nullable(Int32), u8 UInt8, u16 UInt16, u32 UInt32, u64 UInt64, i8 Int8, i16 Int16, i32 Int32, i64 Int64, \
        f32 Float32, f64 Float64, id UUID, d Date, dt DateTime, dtz DateTime('Asia/Tokyo'), \
        a Array(String), an Array(Nullable(UInt8)), aa Array(Array(Int16)), e8 Enum8('a' = 1, 'b' = -2), \
        e16 Enum16('big' = 1000, 'small' = 1), dec Decimal(10, 3), d32 Decimal32(2), computed UInt64 DEFAULT u64 * 2"
    );
    ch.exec(&format!("CREATE TABLE {db}.raw ({columns}) ENGINE = MergeTree() ORDER BY tuple()")).await;
    ch.exec(&format!("CREATE TABLE {db}.buf AS {db}.raw ENGINE = Buffer({db}, raw, 1, 100, 100, 1000000, 1000000, 100000000, 100000000)"))
        .await;
    let mut config = config(ch, &db);
    config.table.buffer_table = "buf".into();
    config.table.destination_table = "raw".into();
    config.clickhouse.insert_format = format;
    // Its queries are logged (scripts/clickhouse-server.sh): the test sees the INSERTs' format.
    config.clickhouse.clickhouse_user = "logged".into();
    // The format the gateway's schema picks for this table (it is built from the same DESCRIBE).
    let described: Vec<ColumnInfo> = ch
        .rows(&format!("DESCRIBE TABLE {db}.buf"))
        .await
        .into_iter()
        .map(|c| serde_json::from_value(c).unwrap())
        .collect();
    let special =
        SpecialColumns { id: "id".into(), timestamp: "dt".into(), partition_key: "u64".into(), sharding: None };
    let schema = TableSchema::new(1, &db, "buf", described, &special);
    let (sql, _) = schema.insert("t", 0, 0, &[], format);
    let expected =
        if format == InsertFormat::Native && extra.is_empty() { "FORMAT Native" } else { "FORMAT RowBinary" };
    assert!(sql.ends_with(expected), "{sql}");
    let gw = Gateway::start(config).await;
    let full = json!({
        "s": "ünïcode ✓", "fs": "ab", "lc": "low", "n": -7, "u8": 255, "u16": 65535,
        "u32": 4294967295u64, "u64": "18446744073709551615", "i8": -128, "i16": -32768, "i32": 2147483647,
        "i64": -9223372036854775808i64, "f32": 1.5, "f64": -2.25e-10, "id": "123e4567-e89b-12d3-a456-426614174000",
        "d": "2024-02-29", "dt": 1717243200123u64, "dtz": "2024-06-01T12:00:00+09:00", "a": ["x", "", "y"],
        "an": [1, null, 3], "aa": [[1, 2], [], [-3]], "e8": "b", "e16": 1000, "dec": "-1234567.891", "d32": 12.34,
        "computed": 5
    });
    let sparse = json!({"u64": 21, "e8": 1});
    let (status, body) = gw.post_json(&json!([full, sparse])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    gw.drain(ch).await;
    let rows = ch
        .rows(&format!(
            "SELECT s, fs = 'ab\\0\\0' AS fs_padded, lc, n, u8, u16, u32, toString(u64) AS u64, i8, i16, i32, toString(i64) AS i64, \
             f32, f64, toString(id) AS id, toString(d) AS d, toUnixTimestamp(dt) AS dt, toUnixTimestamp(dtz) AS dtz, a, an, aa, \
             toString(e8) AS e8, toString(e16) AS e16, toString(dec) AS dec, toString(d32) AS d32, toString(computed) AS computed \
             FROM {db}.raw ORDER BY length(s) DESC"
        ))
        .await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let expected_full = json!({
        "s": "ünïcode ✓", "fs_padded": 1, "lc": "low", "n": -7, "u8": 255, "u16": 65535, "u32": 4294967295u64,
        "u64": "18446744073709551615", "i8": -128, "i16": -32768, "i32": 2147483647, "i64": "-9223372036854775808",
        "f32": 1.5, "f64": -2.25e-10, "id": "123e4567-e89b-12d3-a456-426614174000", "d": "2024-02-29",
        "dt": 1717243200, "dtz": 1717210800, "a": ["x", "", "y"], "an": [1, null, 3], "aa": [[1, 2], [], [-3]],
        "e8": "b", "e16": "big", "dec": "-1234567.891", "d32": "12.34", "computed": "5"
    });
    assert_eq!(rows[0], expected_full);
    // Omitted fields take the column's default: zero values, NULL, the smallest Enum value, and
    // the DEFAULT expression evaluated by ClickHouse (u64 * 2).
    assert_eq!(rows[1]["computed"], "42");
    assert_eq!(rows[1]["e16"], "small");
    assert_eq!(rows[1]["n"], Value::Null);
    assert_eq!(rows[1]["id"], "00000000-0000-0000-0000-000000000000");
    assert_eq!(rows[1]["e8"], "a");
    // What reached the server, not only what the schema would pick.
    ch.exec("SYSTEM FLUSH LOGS").await;
    let formats = ch
        .rows(&format!(
            "SELECT extract(query, 'FORMAT ([A-Za-z]+)') AS format, count() AS n FROM system.query_log \
             WHERE type = 2 AND user = 'logged' AND query LIKE 'INSERT INTO `{db}`.`buf`%' GROUP BY format"
        ))
        .await;
    let sent = if expected.ends_with("Native") { "Native" } else { "RowBinary" };
    assert_eq!(formats.len(), 1, "{formats:?}");
    assert_eq!(formats[0]["format"], sent, "{formats:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::type_complexity)]
async fn limits_and_bad_requests_get_precise_json_errors_and_store_nothing() {
    let ch = clickhouse();
    let db = ch.fresh_database("limits");
    let mut config = config(ch, &db);
    config.http.max_body_bytes = 64 * 1024;
    config.http.max_decompressed_bytes = 128 * 1024;
    config.http.max_events_per_request = 100;
    config.http.body_timeout_ms = 300;
    migrate(&config).await;
    let gw = Gateway::start(config).await;

    let big = json!([{"payload": "x".repeat(70 * 1024)}]).to_string().into_bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(json!([{"payload": " ".repeat(1024 * 1024)}]).to_string().as_bytes()).unwrap();
    let bomb = gz.finish().unwrap();
    let many = Value::Array((0..101).map(|i| json!({"user_id": i})).collect()).to_string().into_bytes();
    let json = "application/json";
    // (path, content type, content encoding, body, expected status, expected error code)
    let cases: Vec<(&str, &str, Option<&str>, Vec<u8>, u16, &str)> = vec![
        ("/v1/events", json, None, big, 413, "body_too_large"),
        ("/v1/events", json, Some("gzip"), bomb, 413, "decompressed_body_too_large"),
        ("/v1/events", json, None, many, 413, "too_many_events"),
        ("/v1/events", "text/csv", None, b"a,b".to_vec(), 415, "unsupported_media_type"),
        ("/v1/events", json, Some("br"), b"[]".to_vec(), 415, "unsupported_encoding"),
        ("/v1/events", json, Some("gzip"), b"not gzip".to_vec(), 400, "bad_encoding"),
        ("/v1/events?wait=maybe", json, None, b"[]".to_vec(), 400, "bad_query"),
        ("/v1/nothing", json, None, b"[]".to_vec(), 404, "not_found"),
    ];
    for (path, content_type, encoding, body, status, code) in cases {
        let (got, answer) = gw.post(path, content_type, encoding, body).await;
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }

    let malformed = b"[{\"user_id\": 1},\n  {\"user_id\" 2}]".to_vec();
    let (status, body) = gw.post("/v1/events", json, None, malformed).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("malformed_json")), "{body}");
    assert_eq!((body["line"].as_u64(), body["column"].as_u64()), (Some(2), Some(14)), "{body}");
    assert!(body["message"].as_str().unwrap().contains("line 2, column 14"), "{body}");
    // A line of NDJSON that does not parse is rejected alone (and parked: quarantine = table).
    let malformed = b"{\"user_id\": 1}\n{\"user_id\": }\n".to_vec();
    let (status, body) = gw.post("/v1/events", "application/x-ndjson", None, malformed).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(1)), "{body}");
    let rejected = &body["rejected"][0];
    assert_eq!((rejected["index"].as_u64(), rejected["reason"].as_str()), (Some(1), Some("malformed")), "{body}");

    // A body that stops coming is answered 408 after the body timeout, not held for the
    // request timeout and then called overload.
    let answer = stalled_upload(&gw.url).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");

    let response = common::http().get(format!("{}/v1/events", gw.url)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "method_not_allowed");

    // The gateway is still healthy and nothing of the refused requests was stored: only the
    // good line of the NDJSON body with a malformed one, and this.
    let (status, body) = gw.post_json(&json!([{"user_id": 9}])).await;
    assert_eq!(status, 200, "{body}");
    gw.drain(ch).await;
    assert_eq!(ch.count(&gw.destination()).await, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_false_answers_202_and_the_rows_follow() {
    let ch = clickhouse();
    let gw = seeded_gateway("nowait").await;
    let (status, body) = gw
        .post(
            "/v1/events?wait=false",
            "application/json",
            None,
            Value::Array((1..=5).map(seed_event).collect()).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 5);
    let table = gw.destination();
    eventually(Duration::from_secs(10), "the 202-acknowledged rows to be stored", || async {
        gw.drain(ch).await;
        ch.count(&table).await == 5
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_schema_changes_without_restart() {
    let ch = clickhouse();
    let db = ch.fresh_database("ready");
    let config = config(ch, &db);
    let gw = Gateway::start(config.clone()).await;
    let get = |path: &'static str| {
        let url = format!("{}{path}", gw.url);
        async move {
            let response = common::http().get(url).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await, (200, json!({"status": "ok"})));
    let (status, body) = get("/readyz").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("not_ready")), "no table yet: {body}");
    let (status, body) = gw.post_json(&json!([{"user_id": 1}])).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("not_ready")), "{body}");

    migrate(&config).await;
    eventually(Duration::from_secs(10), "readiness after migrate", || async { get("/readyz").await.0 == 200 }).await;

    // A column added to the destination and the Buffer is picked up by the running gateway.
    ch.exec(&format!("ALTER TABLE {db}.events_raw ADD COLUMN country LowCardinality(String) DEFAULT 'zz'")).await;
    ch.exec(&format!("ALTER TABLE {db}.events_buffer ADD COLUMN country LowCardinality(String) DEFAULT 'zz'")).await;
    eventually(Duration::from_secs(10), "the new column to be accepted", || async {
        gw.post_json(&json!([{"user_id": 2, "country": "fr"}])).await.1["accepted"] == 1
    })
    .await;
    let (status, _) = gw.post_json(&json!([{"user_id": 3}])).await;
    assert_eq!(status, 200);
    gw.drain(ch).await;
    let rows = ch.rows(&format!("SELECT user_id, country FROM {db}.events_raw ORDER BY user_id")).await;
    assert_eq!(rows, vec![json!({"user_id": "2", "country": "fr"}), json!({"user_id": "3", "country": "zz"})]);
    gw.stop().await;
}

/// Sends the headers and a tenth of an announced body, then waits for the answer.
async fn stalled_upload(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
    let head = "POST /v1/events HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(b"[{\"user_i").await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut answer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}
