//! Modern-server conformance: what buffergate encodes (and the DDL `migrate` writes for a
//! modern server) is read back exactly by a current ClickHouse, here chdb (ClickHouse 26.x
//! embedded in Python, installed by `scripts/install-deps.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::process::{Command, Stdio};

use buffergate::clickhouse::{Capabilities, migrate, probes};
use buffergate::config::{Config, UnknownFields};
use buffergate::schema::{ColumnInfo, EncodeContext, SpecialColumns, TableSchema, Timestamp};
use serde_json::{Value, json};

/// Runs statements in one chdb session; returns each statement's output.
fn chdb(session: &std::path::Path, statements: &[(&str, &str)]) -> Vec<String> {
    let input: Vec<Value> = statements.iter().map(|(sql, format)| json!({"sql": sql, "format": format})).collect();
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb_query.py"))
        .arg(session)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), Value::Array(input).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chdb failed (is chdb-core installed? scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON array")
}

fn described(text: &str) -> Vec<ColumnInfo> {
    text.lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            ColumnInfo {
                name: row["name"].as_str().unwrap().into(),
                type_text: row["type"].as_str().unwrap().into(),
                default_kind: row["default_type"].as_str().unwrap_or_default().into(),
            }
        })
        .collect()
}

/// The `file()` structure argument for `columns`, quoted for a SQL string literal.
fn structure(columns: &[ColumnInfo]) -> String {
    let list: Vec<String> = columns.iter().map(|c| format!("{} {}", c.name, c.type_text)).collect();
    list.join(", ").replace('\\', "\\\\").replace('\'', "\\'")
}

fn json_rows(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Encodes events with the schema built from `columns`; writes a RowBinary file.
fn encode_file(path: &std::path::Path, columns: Vec<ColumnInfo>, events: &[Value]) -> TableSchema {
    let special = SpecialColumns {
        id: "event_id".into(),
        timestamp: "event_ts".into(),
        partition_key: "user_id".into(),
        sharding: None,
    };
    let schema = TableSchema::new(1, "conf", "t", columns, &special);
    let ctx = EncodeContext::new(Timestamp { seconds: 1_700_000_000, nanos: 500_000_000 }, UnknownFields::Reject);
    let mut data = Vec::new();
    for event in events {
        let omitted = buffergate::decode::encode_event(&schema, event, &ctx, &mut data)
            .unwrap_or_else(|r| panic!("{event}: {r:?}"));
        assert_eq!(omitted, 0);
    }
    std::fs::write(path, data).unwrap();
    schema
}

#[test]
fn seed_schema_on_a_modern_server_round_trips_through_the_buffer() {
    let dir = common::scratch("conformance-seed");
    let session = dir.join("session");
    let config = {
        let mut config = Config::default();
        config.table.database = "conf".into();
        config
    };
    let caps = Capabilities::modern();
    let ddl_destination = migrate::destination_ddl(&config, &caps);
    let ddl_buffer = migrate::buffer_ddl(&config);
    let out = chdb(
        &session,
        &[
            ("CREATE DATABASE IF NOT EXISTS conf", "CSV"),
            (&ddl_destination, "CSV"),
            (&ddl_buffer, "CSV"),
            ("DESCRIBE TABLE conf.events_buffer", "JSONEachRow"),
            // The capability probes succeed on a modern server (they fail on 18.16; see below).
            (probes::DATETIME64, "CSV"),
            (probes::MAP, "CSV"),
            (probes::TABLES_TOTAL_BYTES, "CSV"),
        ],
    );
    let columns = described(&out[3]);
    let types: Vec<&str> = columns.iter().map(|c| c.type_text.as_str()).collect();
    assert_eq!(types, ["UUID", "DateTime64(3)", "UInt64", "LowCardinality(String)", "String", "Map(String, String)"]);

    let events = vec![
        json!({"event_id": "018f2b6e-1d2c-7a3b-9c4d-5e6f708192a3", "event_ts": "2024-05-01T12:34:56.789Z", "user_id": 42,
               "event_type": "click", "payload": {"b": [1, 2], "a": "x"}, "metadata": {"k": "v", "empty": ""}}),
        json!({"event_id": "00000000-0000-0000-0000-000000000001", "event_ts": 1714566896789u64, "user_id": "18446744073709551615",
               "event_type": "view", "payload": "plain text", "metadata": {}}),
        json!({"user_id": 7}),
    ];
    let file = dir.join("seed.rowbinary");
    let schema = encode_file(&file, columns.clone(), &events);
    let insert = schema.insert_sql(0).replace(" FORMAT RowBinary", "").replace("`conf`.`t`", "conf.events_buffer");
    let insert = format!("{insert} SELECT * FROM file('{}', RowBinary, '{}')", file.display(), structure(&columns));
    let out = chdb(
        &session,
        &[
            (&insert, "CSV"),
            ("OPTIMIZE TABLE conf.events_buffer", "CSV"),
            (
                "SELECT toString(event_id) AS id, toString(event_ts) AS ts, toString(user_id) AS user, event_type, payload, metadata \
                 FROM conf.events_raw ORDER BY user_id",
                "JSONEachRow",
            ),
        ],
    );
    let rows = json_rows(&out[2]);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["user"], "7");
    assert_eq!(&rows[0]["id"].as_str().unwrap()[14..15], "7", "generated UUIDv7");
    assert_eq!(rows[0]["ts"], "2023-11-14 22:13:20.500", "receive time with milliseconds");
    assert_eq!(rows[0]["metadata"], json!({}));
    assert_eq!(
        rows[1],
        json!({"id": "018f2b6e-1d2c-7a3b-9c4d-5e6f708192a3", "ts": "2024-05-01 12:34:56.789", "user": "42",
               "event_type": "click", "payload": r#"{"a":"x","b":[1,2]}"#, "metadata": {"empty": "", "k": "v"}})
    );
    assert_eq!(
        rows[2],
        json!({"id": "00000000-0000-0000-0000-000000000001", "ts": "2024-05-01 12:34:56.789", "user": "18446744073709551615",
               "event_type": "view", "payload": "plain text", "metadata": {}})
    );
}

#[test]
fn types_only_modern_servers_have_read_back_exactly() {
    let dir = common::scratch("conformance-types");
    let session = dir.join("session");
    let table = "CREATE TABLE IF NOT EXISTS conf.modern (b Bool, ip4 IPv4, ip6 IPv6, d32 Date32, t6 DateTime64(6, 'UTC'), \
        t0 DateTime64(0), m Map(String, UInt64), mn Map(String, Array(Nullable(String))), lcn LowCardinality(Nullable(String)), \
        u Nullable(UUID), e Enum16('a' = -300, 'b' = 300), dec Decimal128(6), an Array(Nullable(Int64))) ENGINE = Memory";
    let out = chdb(
        &session,
        &[("CREATE DATABASE IF NOT EXISTS conf", "CSV"), (table, "CSV"), ("DESCRIBE TABLE conf.modern", "JSONEachRow")],
    );
    let columns = described(&out[2]);
    let events = vec![
        json!({"b": true, "ip4": "192.168.1.20", "ip6": "2001:db8::ff00:42:8329", "d32": "1901-02-03", "t6": "2024-05-01 12:34:56.123456",
               "t0": "2024-05-01T12:34:56Z", "m": {"x": 1, "y": "18446744073709551615"}, "mn": {"k": ["a", null]}, "lcn": "lc",
               "u": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "e": "a", "dec": "-12345678901234567890.123456", "an": [null, -1]}),
        json!({"b": false, "ip4": "0.0.0.0", "ip6": "10.0.0.1", "d32": "2299-12-31", "t6": 1714566896789u64, "t0": 0,
               "m": {}, "mn": {}, "lcn": null, "u": null, "e": 300, "dec": 0.5, "an": []}),
    ];
    let file = dir.join("modern.rowbinary");
    encode_file(&file, columns.clone(), &events);
    let out = chdb(
        &session,
        &[
            (
                &format!(
                    "INSERT INTO conf.modern SELECT * FROM file('{}', RowBinary, '{}')",
                    file.display(),
                    structure(&columns)
                ),
                "CSV",
            ),
            (
                "SELECT b, toString(ip4) AS ip4, toString(ip6) AS ip6, toString(d32) AS d32, toString(t6) AS t6, toString(t0) AS t0, \
                 m, mn, lcn, toString(u) AS u, toString(e) AS e, toString(dec) AS dec, an FROM conf.modern ORDER BY b DESC",
                "JSONEachRow",
            ),
        ],
    );
    let rows = json_rows(&out[1]);
    assert_eq!(
        rows[0],
        json!({"b": true, "ip4": "192.168.1.20", "ip6": "2001:db8::ff00:42:8329", "d32": "1901-02-03", "t6": "2024-05-01 12:34:56.123456",
               "t0": "2024-05-01 12:34:56", "m": {"x": 1, "y": 18446744073709551615u64}, "mn": {"k": ["a", null]}, "lcn": "lc",
               "u": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "e": "a", "dec": "-12345678901234567890.123456", "an": [null, -1]})
    );
    assert_eq!(
        rows[1],
        json!({"b": false, "ip4": "0.0.0.0", "ip6": "::ffff:10.0.0.1", "d32": "2299-12-31", "t6": "2024-05-01 12:34:56.789000",
               "t0": "1970-01-01 00:00:00", "m": {}, "mn": {}, "lcn": null, "u": null, "e": "b", "dec": "0.5", "an": []})
    );
}

/// `deploy/clickhouse/schema.sql` runs on a current ClickHouse, and its materialized view
/// counts rows once they reach the destination through the Buffer.
#[test]
fn the_deploy_ddl_runs_on_a_modern_server() {
    let dir = common::scratch("conformance-ddl");
    let ddl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/clickhouse/schema.sql")).unwrap();
    let without_comments: String =
        ddl.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
    let mut statements: Vec<(&str, &str)> =
        without_comments.split(';').map(str::trim).filter(|s| !s.is_empty()).map(|s| (s, "CSV")).collect();
    statements.push((
        "INSERT INTO analytics.events_buffer (event_id, event_ts, user_id, event_type) VALUES (generateUUIDv4(), now(), 1, 'click'), (generateUUIDv4(), now(), 2, 'click')",
        "CSV",
    ));
    statements.push(("OPTIMIZE TABLE analytics.events_buffer", "CSV"));
    statements.push((
        "SELECT event_type, sum(events) AS n FROM analytics.events_per_type_hourly GROUP BY event_type",
        "JSONEachRow",
    ));
    let out = chdb(&dir.join("session"), &statements);
    assert_eq!(json_rows(out.last().unwrap()), vec![json!({"event_type": "click", "n": 2})]);
}

/// The same probes fail on the installed 18.16 server, so `migrate` takes the fallback path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_probes_detect_the_old_server() {
    let ch = common::clickhouse();
    let config = common::config(ch, "default");
    let caps = buffergate::clickhouse::ClickHouse::new(&config).capabilities().await.unwrap();
    assert!(caps.version.starts_with("18."), "{caps:?}");
    assert!(
        !caps.datetime64 && !caps.map && !caps.tables_total_bytes && caps.low_cardinality_needs_setting,
        "{caps:?}"
    );
}

/// The Native blocks the gateway sends by default hold exactly what the RowBinary rows they
/// are transcoded from hold: both files inserted into twin tables read back the same, for
/// every type the transcoder takes (and a table with one it does not take goes as RowBinary).
#[test]
fn native_blocks_read_back_like_the_rowbinary_they_come_from() {
    let dir = common::scratch("conformance-native");
    let session = dir.join("session");
    let columns_sql = "event_id UUID, event_ts DateTime64(3, 'UTC'), user_id UInt64, event_type LowCardinality(String), \
        b Bool, ip4 IPv4, ip6 IPv6, d Date, d32 Date32, t DateTime, f Float64, i8 Int8, e Enum8('a' = -1, 'b' = 2), \
        dec Decimal(20, 4), fs FixedString(3), lcu LowCardinality(FixedString(2)), s Nullable(String), u Nullable(UUID), \
        a Array(Nullable(Int64)), aa Array(Array(String)), m Map(String, Array(Nullable(String))), mu Map(String, UInt64)";
    let out = chdb(
        &session,
        &[
            ("CREATE DATABASE IF NOT EXISTS conf", "CSV"),
            (&format!("CREATE TABLE conf.rb ({columns_sql}) ENGINE = Memory"), "CSV"),
            (&format!("CREATE TABLE conf.nat ({columns_sql}) ENGINE = Memory"), "CSV"),
            ("DESCRIBE TABLE conf.rb", "JSONEachRow"),
        ],
    );
    let columns = described(&out[3]);
    let kinds = ["click", "view", "purchase", ""];
    let pairs = ["ab", "cd", "ef"];
    let mut events: Vec<Value> = (0..300u64)
        .map(|n| {
            json!({"event_id": format!("00000000-0000-4000-8000-{n:012x}"), "event_ts": 1_714_566_896_789u64 + n, "user_id": n,
                   "event_type": kinds[n as usize % 4], "b": n % 2 == 0, "ip4": format!("10.0.{}.{}", n / 256, n % 256),
                   "ip6": "2001:db8::1", "d": "2024-05-01", "d32": "1950-01-02", "t": 1_714_566_896u64 + n, "f": n as f64 / 3.0,
                   "i8": -(n as i64 % 100), "e": if n % 3 == 0 { "a" } else { "b" }, "dec": format!("{n}.25"), "fs": "abc",
                   "lcu": pairs[n as usize % 3], "s": if n % 5 == 0 { Value::Null } else { json!(format!("s{n}\n\"q\"")) },
                   "u": if n % 2 == 0 { Value::Null } else { json!("6ba7b810-9dad-11d1-80b4-00c04fd430c8") },
                   "a": (0..n % 4).map(|i| if i == 1 { Value::Null } else { json!(i) }).collect::<Vec<_>>(),
                   "aa": if n % 3 == 0 { json!([]) } else { json!([["x", "y"], [], ["z"]]) },
                   "m": if n % 2 == 0 { json!({}) } else { json!({"k": ["v", null], "e": []}) },
                   "mu": {"one": 1, "n": n}})
        })
        .collect();
    // Missing fields take the column's default in both forms.
    events.push(json!({"user_id": 1000}));
    let file = dir.join("rows.rowbinary");
    let schema = encode_file(&file, columns.clone(), &events);
    let rows = std::fs::read(&file).unwrap();
    let (sql, block) =
        schema.insert("conf.nat", 0, events.len(), &[rows.into()], buffergate::config::InsertFormat::Native);
    assert!(sql.ends_with("FORMAT Native"), "{sql}");
    let native = dir.join("rows.native");
    std::fs::write(&native, &block).unwrap();
    let out = chdb(
        &session,
        &[
            (
                &format!(
                    "INSERT INTO conf.rb SELECT * FROM file('{}', RowBinary, '{}')",
                    file.display(),
                    structure(&columns)
                ),
                "CSV",
            ),
            (&format!("INSERT INTO conf.nat SELECT * FROM file('{}', Native)", native.display()), "CSV"),
            ("SELECT * EXCEPT event_id, toString(event_id) AS id FROM conf.rb ORDER BY user_id", "JSONEachRow"),
            ("SELECT * EXCEPT event_id, toString(event_id) AS id FROM conf.nat ORDER BY user_id", "JSONEachRow"),
        ],
    );
    let (from_rows, from_block) = (json_rows(&out[2]), json_rows(&out[3]));
    assert_eq!(from_rows.len(), events.len());
    assert_eq!(from_rows[1]["s"], "s1\n\"q\"");
    assert_eq!(from_rows, from_block);

    // LowCardinality(Nullable(...)) is not transcoded: those tables get RowBinary.
    let unsupported = vec![ColumnInfo {
        name: "lcn".into(),
        type_text: "LowCardinality(Nullable(String))".into(),
        default_kind: String::new(),
    }];
    let special =
        SpecialColumns { id: "id".into(), timestamp: "ts".into(), partition_key: "lcn".into(), sharding: None };
    let schema = TableSchema::new(1, "conf", "t", unsupported, &special);
    let (sql, body) = schema.insert("conf.t", 0, 1, &[vec![1].into()], buffergate::config::InsertFormat::Native);
    assert!(sql.ends_with("FORMAT RowBinary") && body[..] == [1], "{sql}");
}

/// The sharding keys the gateway computes itself are ClickHouse's own, on 18.16 and on 26:
/// `cityHash64` of strings of every length class CityHash treats apart, `intHash64` of
/// integers across the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharding_hashes_match_old_and_new_servers() {
    use buffergate::schema::sharding::{city_hash64, int_hash64};
    let strings: Vec<String> = [0usize, 1, 3, 4, 8, 9, 16, 17, 32, 33, 64, 65, 100, 1000]
        .iter()
        .map(|&n| "k".repeat(n) + &n.to_string())
        .collect();
    let numbers: [u64; 6] = [0, 1, 12345, 1 << 32, u64::MAX - 1, u64::MAX];
    let select = {
        let s: Vec<String> = strings.iter().map(|t| format!("toString(cityHash64('{t}'))")).collect();
        let n: Vec<String> = numbers.iter().map(|v| format!("toString(intHash64(toUInt64({v})))")).collect();
        format!("SELECT [{}] AS h", s.into_iter().chain(n).collect::<Vec<_>>().join(", "))
    };
    let want: Vec<String> = strings
        .iter()
        .map(|t| city_hash64(t.as_bytes()))
        .chain(numbers.iter().map(|&v| int_hash64(v)))
        .map(|h| h.to_string())
        .collect();
    let old = common::clickhouse().rows(&select).await;
    let old: Vec<String> = serde_json::from_value(old[0]["h"].clone()).unwrap();
    assert_eq!(old, want, "ClickHouse 18.16");
    let dir = common::scratch("conformance-hashes");
    let new = chdb(&dir.join("session"), &[(&select, "JSONEachRow")]);
    let new: Value = serde_json::from_str(new[0].lines().next().unwrap()).unwrap();
    let new: Vec<String> = serde_json::from_value(new["h"].clone()).unwrap();
    assert_eq!(new, want, "ClickHouse 26");
}
