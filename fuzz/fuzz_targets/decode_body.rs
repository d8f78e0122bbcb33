//! The request body path: decompression (capped), then the event reader and encoders against a
//! table with one column of each common type. Never a panic; and a body the reader accepts as
//! JSON must be JSON to serde_json too.
#![no_main]

use buffergate::config::UnknownFields;
use buffergate::decode::{BatchShape, DecodeError, Encoding, Format, Placing, decompress, encode_batch};
use buffergate::schema::{ColumnInfo, EncodeContext, SpecialColumns, TableSchema, Timestamp};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fn schema() -> &'static TableSchema {
    static SCHEMA: std::sync::OnceLock<TableSchema> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(build_schema)
}

fn build_schema() -> TableSchema {
    let columns = [
        ("event_id", "UUID"),
        ("event_ts", "DateTime64(3)"),
        ("user_id", "UInt64"),
        ("event_type", "LowCardinality(String)"),
        ("payload", "String"),
        ("metadata", "Map(String, String)"),
        ("n", "Nullable(Int32)"),
        ("f", "Float32"),
        ("d", "Decimal(9, 2)"),
        ("day", "Date"),
        ("tags", "Array(String)"),
        ("ip", "IPv6"),
        ("kind", "Enum8('a' = 1, 'b' = 2)"),
        ("code", "FixedString(3)"),
    ];
    let infos = columns
        .iter()
        .map(|(name, ty)| ColumnInfo { name: (*name).into(), type_text: (*ty).into(), default_kind: String::new() })
        .collect();
    let special = SpecialColumns {
        id: "event_id".into(),
        timestamp: "event_ts".into(),
        partition_key: "user_id".into(),
        sharding: None,
    };
    TableSchema::new(1, "db", "t", infos, &special)
}

/// serde_json's messages for a lone surrogate escape.
fn lone_surrogate(message: &str) -> bool {
    message.contains("surrogate") || message.contains("hex escape")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let format = if mode & 1 == 0 { Format::JsonArray } else { Format::Ndjson };
    let encoding = match (mode >> 1) % 3 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Zstd,
    };
    let Ok(text) = decompress(bytes::Bytes::copy_from_slice(body), encoding, LIMIT) else { return };
    let unknown = if mode & 0x80 == 0 { UnknownFields::Reject } else { UnknownFields::Ignore };
    let ctx = EncodeContext::new(Timestamp { seconds: 1_700_000_000, nanos: 0 }, unknown);
    let shape = BatchShape {
        partitions: 3,
        placing: Placing::Shard(0),
        max_events: 1000,
        keep_ids: true,
        ids: None,
        keep_raw: (data.len() % 2 == 0).then_some(64),
    };
    let result = encode_batch(&text, format, schema(), &ctx, &shape);
    if format == Format::JsonArray && !matches!(result, Err(DecodeError::TooManyEvents { .. })) {
        let ours = result.is_ok();
        let theirs = serde_json::from_slice::<serde_json::Value>(&text);
        // serde_json refuses lone surrogate escapes in the text ("lone leading surrogate", or
        // "unexpected end of hex escape" when a high one is not followed by `\u`); the reader
        // refuses them per field instead (the event is rejected, the body is not).
        // And a number beyond f64 (`1e400`) is JSON that serde_json cannot hold: the reader
        // leaves it to the column's encoder.
        let surrogate = theirs.as_ref().is_err_and(|e| {
            let message = e.to_string();
            lone_surrogate(&message) || message.contains("number out of range")
        });
        // The reader takes an array of values or one object; serde_json, any value.
        let shape_ok = theirs.as_ref().is_ok_and(|v| v.is_array() || v.is_object());
        if !surrogate {
            assert_eq!(ours, shape_ok, "reader {result:?} vs serde_json {theirs:?}");
        }
    }
    if let Ok(batch) = result {
        assert_eq!(batch.accepted, batch.events.len());
    }
});
