//! Microbenchmarks of the request path's CPU: parse + validate + encode per event, for the
//! seed schema, as a JSON array and as NDJSON. `cargo bench --bench encode`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: fail loudly

use buffergate::config::{InsertFormat, UnknownFields};
use buffergate::decode::{BatchShape, Format, Placing, encode_batch};
use buffergate::schema::{ColumnInfo, EncodeContext, SpecialColumns, TableSchema, Timestamp};

fn main() {
    divan::main();
}

fn seed_schema() -> TableSchema {
    let column =
        |name: &str, ty: &str| ColumnInfo { name: name.into(), type_text: ty.into(), default_kind: String::new() };
    let special = SpecialColumns {
        id: "event_id".into(),
        timestamp: "event_ts".into(),
        partition_key: "user_id".into(),
        sharding: None,
    };
    TableSchema::new(
        1,
        "analytics",
        "events_buffer",
        vec![
            column("event_id", "UUID"),
            column("event_ts", "DateTime64(3)"),
            column("user_id", "UInt64"),
            column("event_type", "LowCardinality(String)"),
            column("payload", "String"),
            column("metadata", "Map(String, String)"),
        ],
        &special,
    )
}

/// A batch of `partitions` partitions on one shard, ids kept when `keep_ids`.
fn shape(partitions: usize, keep_ids: bool) -> BatchShape {
    BatchShape { partitions, placing: Placing::Shard(0), max_events: 10_000, keep_ids, ids: None, keep_raw: None }
}

fn events(n: u64, separator: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"event_id":"00000000-0000-4000-8000-{i:012x}","event_ts":"2024-05-01T12:00:00.{:03}Z","user_id":{i},"event_type":"click","payload":{{"page":"/p/{}","ref":"campaign-{}"}},"metadata":{{"source":"web","ip":"10.0.0.{}"}}}}"#,
                i % 1000,
                i % 997,
                i % 31,
                i % 256
            )
        })
        .collect::<Vec<_>>()
        .join(separator)
}

#[divan::bench(args = [10, 1000], sample_count = 50)]
fn json_array(bencher: divan::Bencher, n: u64) {
    let schema = seed_schema();
    let body = format!("[{}]", events(n, ","));
    let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
    let shape = shape(2, false);
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench(|| encode_batch(divan::black_box(body.as_bytes()), Format::JsonArray, &schema, &ctx, &shape).unwrap());
}

/// The benchmark harness's event on ClickHouse 18.16's types: JSON objects sent as escaped
/// text in String columns, whole-second DateTime. String scanning and unescaping dominate.
fn string_events(n: u64) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"event_id":"00000000-0000-4000-8000-{i:012x}","event_ts":"2024-05-01 12:00:{:02}","user_id":{i},"event_type":"click","payload":"{{\"page\":\"/p/{}\",\"ref\":\"campaign-{}\",\"ms\":{}}}","metadata":"{{\"source\":\"web\",\"ip\":\"10.0.0.{}\"}}"}}"#,
                i % 60,
                i % 997,
                i % 31,
                i % 5000,
                i % 256
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The benchmark harness's table on ClickHouse 18.16.
fn text_schema() -> TableSchema {
    let column =
        |name: &str, ty: &str| ColumnInfo { name: name.into(), type_text: ty.into(), default_kind: String::new() };
    let special = SpecialColumns {
        id: "event_id".into(),
        timestamp: "event_ts".into(),
        partition_key: "user_id".into(),
        sharding: None,
    };
    TableSchema::new(
        1,
        "analytics",
        "events_buffer",
        vec![
            column("event_id", "UUID"),
            column("event_ts", "DateTime"),
            column("user_id", "UInt64"),
            column("event_type", "String"),
            column("payload", "String"),
            column("metadata", "String"),
        ],
        &special,
    )
}

#[divan::bench(args = [1000], sample_count = 50)]
fn json_array_text_columns(bencher: divan::Bencher, n: u64) {
    let schema = text_schema();
    let body = format!("[{}]", string_events(n));
    let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
    let shape = shape(2, false);
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench(|| encode_batch(divan::black_box(body.as_bytes()), Format::JsonArray, &schema, &ctx, &shape).unwrap());
}

/// The step before each INSERT: encoded rows transposed into a Native block.
#[divan::bench(args = [1000], sample_count = 50)]
fn native_block_text_columns(bencher: divan::Bencher, n: u64) {
    let schema = text_schema();
    let body = format!("[{}]", string_events(n));
    let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
    let shape = shape(1, false);
    let batch = encode_batch(body.as_bytes(), Format::JsonArray, &schema, &ctx, &shape).unwrap();
    let chunk = &batch.partitions[0].chunks[0];
    bencher.counter(divan::counter::ItemsCount::new(n)).bench(|| {
        let pieces = vec![bytes::Bytes::from(chunk.data.clone())];
        schema.insert("events_buffer", chunk.omitted, chunk.rows, divan::black_box(&pieces), InsertFormat::Native)
    });
}

#[divan::bench(args = [1000], sample_count = 50)]
fn ndjson_with_ids(bencher: divan::Bencher, n: u64) {
    let schema = seed_schema();
    let body = events(n, "\n");
    let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
    let shape = shape(2, true);
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench(|| encode_batch(divan::black_box(body.as_bytes()), Format::Ndjson, &schema, &ctx, &shape).unwrap());
}
