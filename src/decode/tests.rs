//! The encoding of whole events as the request path does it: scanned from text, validated
//! against a schema, encoded into RowBinary.

use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::config::UnknownFields;
use crate::schema::encode::{Reason, encode, write_len};
use crate::schema::{ColumnInfo, ColumnType, SpecialColumns, Timestamp};

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn info(name: &str, ty: &str, kind: &str) -> ColumnInfo {
    ColumnInfo { name: name.into(), type_text: ty.into(), default_kind: kind.into() }
}

fn schema() -> TableSchema {
    let special = SpecialColumns {
        id: "event_id".into(),
        timestamp: "event_ts".into(),
        partition_key: "user_id".into(),
        sharding: None,
    };
    TableSchema::new(
        1,
        "db",
        "t",
        vec![
            info("event_id", "UUID", ""),
            info("event_ts", "DateTime64(3)", ""),
            info("user_id", "UInt64", ""),
            info("n", "UInt8", "DEFAULT"),
            info("m", "String", "MATERIALIZED"),
            info("t", "Tuple(UInt8, UInt8)", ""),
        ],
        &special,
    )
}

fn ctx() -> EncodeContext {
    EncodeContext::new(Timestamp { seconds: 1, nanos: 0 }, UnknownFields::Reject)
}

#[test]
fn fills_id_and_time_and_omits_defaults() {
    let s = schema();
    let mut out = Vec::new();
    let omitted = encode_event(&s, &json!({"user_id": 5}), &ctx(), &mut out).unwrap();
    assert_eq!(omitted, 1);
    assert_eq!(out.len(), 16 + 8 + 8);
    assert_eq!(out[1] >> 4, 7, "a generated id is a UUIDv7 (version nibble of the high half)");
    assert_eq!(out[16..24], 1000i64.to_le_bytes());
    assert_eq!(s.insert_sql(omitted), "INSERT INTO `db`.`t` (`event_id`, `event_ts`, `user_id`) FORMAT RowBinary");
    assert_eq!(s.insert_sql(0), "INSERT INTO `db`.`t` (`event_id`, `event_ts`, `user_id`, `n`) FORMAT RowBinary");
}

#[test]
fn rejections_name_the_field_and_roll_back() {
    let s = schema();
    let mut out = vec![9];
    for (event, field) in [
        (json!({"user_id": -1}), Some("user_id")),
        (json!({"nope": 1}), Some("nope")),
        (json!({"m": "x"}), Some("m")),
        (json!({"t": [1, 2]}), Some("t")),
        (json!([1]), None),
    ] {
        let err = encode_event(&s, &event, &ctx(), &mut out).unwrap_err();
        assert_eq!(err.field.as_deref(), field, "{event}");
        assert_eq!(out, [9]);
    }
    // Ignore mode drops the unknown field and writes the rest as if it had not been sent.
    let ignore = EncodeContext { unknown_fields: UnknownFields::Ignore, ..ctx() };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let at_known_time = json!({"event_id": "018f2b6e-1d2c-7a3b-9c4d-5e6f708192a3", "user_id": 5});
    let mut sent = at_known_time.clone();
    sent["nope"] = json!(1);
    assert_eq!(encode_event(&s, &sent, &ignore, &mut with), Ok(1));
    assert_eq!(encode_event(&s, &at_known_time, &ctx(), &mut without), Ok(1));
    assert_eq!(with, without);
}

#[test]
fn partition_hash_is_stable_per_key() {
    let s = schema();
    let hash = |text: &str, fallback: u64| {
        let mut fields = EventFields::default();
        Scanner::new(text)
            .event(EventSchema { schema: &s, unknown: UnknownFields::Reject, order: None }, &mut fields)
            .unwrap();
        s.partition_hash(&fields, fallback)
    };
    assert_eq!(hash(r#"{"user_id": 5}"#, 0), hash(r#"{"user_id": "5"}"#, 1));
    assert_eq!(hash(r#"{"user_id": -5}"#, 0), hash(r#"{"user_id": "-5"}"#, 1));
    assert_eq!(hash(r#"{"user_id": 5}"#, 0), hash(r#"{"user_id": "\u0035"}"#, 1), "escapes are read");
    assert_ne!(hash(r#"{"user_id": 5}"#, 0), hash(r#"{"user_id": 6}"#, 0));
    assert_eq!(hash("{}", 42), 42);
    // Sequential ids and text keys spread evenly over the partitions.
    for partitions in [2u64, 3, 8] {
        for key in [|i: u64| format!("{i}"), |i: u64| format!("\"user-{i}\"")] {
            let mut counts = vec![0u64; partitions as usize];
            for i in 0..8000 {
                counts[(hash(&format!(r#"{{"user_id": {}}}"#, key(i)), 0) % partitions) as usize] += 1;
            }
            let fair = 8000 / partitions;
            assert!(counts.iter().all(|&c| c.abs_diff(fair) < fair / 10), "{partitions}: {counts:?}");
        }
    }
}

/// Encodes `raw` as the request path does: read by the scanner as the one field of an event
/// (which unescapes string literals), then encoded.
fn through_scanner(ty: &str, raw: &str, out: &mut Vec<u8>) -> Result<(), Reason> {
    let info = ColumnInfo { name: "v".into(), type_text: ty.into(), default_kind: String::new() };
    let special =
        SpecialColumns { id: String::new(), timestamp: String::new(), partition_key: String::new(), sharding: None };
    let schema = TableSchema::new(1, "db", "t", vec![info], &special);
    let text = format!("{{\"v\": {raw}}}");
    let mut fields = EventFields::default();
    Scanner::new(&text)
        .event(EventSchema { schema: &schema, unknown: UnknownFields::Reject, order: None }, &mut fields)
        .map_err(|e| e.reason.to_string())?;
    let ctx = EncodeContext::new(Timestamp { seconds: 0, nanos: 0 }, UnknownFields::Reject);
    schema.encode_fields(&fields, &ctx, out).map(drop).map_err(|rejection| rejection.error)
}

/// The text path must agree with the value path byte for byte, and fall back to it (same
/// message) whenever it does not read a form itself.
#[test]
fn text_path_agrees_with_value_path() {
    let cases = [
        ("UInt8", "255"),
        ("UInt8", "256"),
        ("UInt64", "18446744073709551615"),
        ("UInt64", "18446744073709551616"),
        ("UInt32", "-1"),
        ("Int64", "-9223372036854775808"),
        ("Int16", "\"-2\""),
        ("Int32", "2.0"),
        ("Int32", "1e3"),
        ("Float64", "1.25"),
        ("Float64", "-0.0"),
        // Correctly rounded on both paths (serde_json's float_roundtrip feature), found by fuzzing.
        ("Float64", "1.5e38"),
        ("Float64", "2.504264299114886e-212"),
        ("Float64", "\"3.5\""),
        ("String", "\"h\\u00e9 \\\"q\\\"\""),
        ("String", "\"plain\""),
        ("String", "\"\\ud83d\\ude00 \\/\\b\\f\\n\\r\\t \\u0041\\u00e9\""),
        ("String", "\"\\udc00\""),
        ("String", "\"\\ud800x\""),
        ("String", "12"),
        ("String", "true"),
        ("LowCardinality(String)", "\"click\""),
        ("Nullable(String)", "null"),
        ("LowCardinality(Nullable(String))", "\"x\""),
        ("Nullable(UInt8)", "300"),
        ("UUID", "\"018f2b6e-1d2c-7a3b-9c4d-5e6f708192a3\""),
        ("UUID", "\"nope\""),
        ("DateTime64(3)", "\"2024-05-01T12:00:00.123Z\""),
        ("DateTime", "\"2024-05-01 12:00:00\""),
        ("DateTime", "\"1900-01-01 00:00:00\""),
        ("DateTime", "1714564800000"),
        ("Array(UInt8)", "[1, 2]"),
        ("Map(String, String)", "{\"k\": \"v\"}"),
    ];
    for (ty, raw) in cases {
        let mut text = vec![7];
        let by_text = through_scanner(ty, raw, &mut text);
        let ty = ColumnType::parse(ty).unwrap();
        let Ok(parsed) = serde_json::from_str::<Value>(raw) else {
            assert!(by_text.is_err(), "{ty} {raw}: what serde_json refuses is refused");
            continue;
        };
        let mut value = vec![7];
        let by_value = encode(&ty, &parsed, crate::schema::Dialect::Gateway, &mut value);
        assert_eq!(by_text, by_value, "{ty} {raw}");
        if by_text.is_ok() {
            assert_eq!(text, value, "{ty} {raw}");
        }
    }
}

#[test]
fn escaped_strings_get_the_right_length_prefix() {
    for n in [0usize, 1, 63, 64, 127, 128, 129, 200, 16_383, 16_384, 20_000] {
        // Each escape shrinks two bytes to one, crossing prefix sizes.
        let raw = format!("\"{}\"", "\\n".repeat(n));
        let mut out = Vec::new();
        through_scanner("String", &raw, &mut out).unwrap();
        let mut expected = Vec::new();
        write_bytes(&mut expected, "\n".repeat(n).as_bytes());
        assert_eq!(out, expected, "{n}");
    }
}

/// Escapes of every kind at every offset of a word, against serde_json's unescaping.
#[test]
fn unescapes_like_serde_json() {
    let escapes = [r#"\""#, r"\\", r"\/", r"\b", r"\f", r"\n", r"\r", r"\t", r"\u00e9", r"\ud83d\ude00", "é", "x"];
    for lead in 0..17 {
        for (k, escape) in escapes.iter().enumerate() {
            for gap in [0, 1, 7, 8, 9] {
                let second = escapes[(k + 5) % escapes.len()];
                let raw = format!("\"{}{escape}{}{second}tail\"", "a".repeat(lead), "b".repeat(gap));
                let expected: String = serde_json::from_str(&raw).unwrap();
                let mut out = Vec::new();
                through_scanner("String", &raw, &mut out).unwrap();
                let mut want = Vec::new();
                write_bytes(&mut want, expected.as_bytes());
                assert_eq!(out, want, "{raw}");
            }
        }
    }
}

#[test]
fn json_text_in_a_string_column_loses_only_whitespace() {
    let mut out = Vec::new();
    through_scanner("String", "{ \"b\" : [1, 2],\n \"a\": \"x y\\\" z\" }", &mut out).unwrap();
    assert_eq!(out[1..], *br#"{"b":[1,2],"a":"x y\" z"}"#);
    assert_eq!(usize::from(out[0]), out.len() - 1);
}

/// The scanner against serde_json on generated JSON: the same accept/reject on valid text and
/// on mutations of it, and for an event object the same value for every field (its raw text
/// reads back as serde_json's value, a string's content is serde_json's string).
mod differential {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::decode::scan::tests::check;

    const KEYS: [&str; 4] = ["a", "b", "c", "d"];

    fn text() -> impl Strategy<Value = String> {
        // Escapes, quotes, controls, non-ASCII and astral characters, in short and long strings
        // (read a byte at a time and a word at a time).
        prop::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('\u{1}'),
                Just('é'),
                Just('😀'),
                any::<char>(),
                prop::char::range('a', 'z')
            ],
            0..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            text().prop_map(Value::String),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(text(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An event: some of the four columns, each with any value.
    fn event() -> impl Strategy<Value = Value> {
        prop::collection::btree_map(prop::sample::select(&KEYS[..]), value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    /// Text for `value`: compact or pretty, every non-ASCII character escaped or not.
    fn render(value: &Value, pretty: bool, ascii: bool) -> String {
        let text = if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) };
        let text = text.unwrap_or_default();
        if !ascii {
            return text;
        }
        // Escaping every non-ASCII character as \uXXXX (pairs for astral ones) keeps the JSON
        // valid: outside strings there is none.
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out
    }

    fn schema() -> TableSchema {
        let special = SpecialColumns {
            id: String::new(),
            timestamp: String::new(),
            partition_key: String::new(),
            sharding: None,
        };
        TableSchema::new(1, "db", "t", KEYS.iter().map(|k| info(k, "String", "")).collect(), &special)
    }

    /// One-byte edits: replace, delete or insert, with bytes that matter to JSON.
    fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> Option<String> {
        const ALPHABET: &[u8] = b" \t\n\"\\/:,[]{}0123456789-+.eEutrfalsn\x01x";
        let mut bytes = text.as_bytes().to_vec();
        for &(at, op, byte) in edits {
            let byte = ALPHABET[usize::from(byte) % ALPHABET.len()];
            let at = at % (bytes.len() + 1);
            match op % 3 {
                0 if at < bytes.len() => bytes[at] = byte,
                1 if at < bytes.len() => drop(bytes.remove(at)),
                _ => bytes.insert(at, byte),
            }
        }
        String::from_utf8(bytes).ok()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn valid_json_is_accepted(value in value(), pretty: bool, ascii: bool) {
            let text = render(&value, pretty, ascii);
            prop_assert_eq!(check(&text), Ok(()), "{}", text);
        }

        #[test]
        fn fields_read_as_serde_json_reads_them(event in event(), pretty: bool, ascii: bool) {
            let text = render(&event, pretty, ascii);
            // What serde_json reads back, the way the gateway's value path reads it.
            let event: Value = serde_json::from_str(&text).unwrap();
            let schema = schema();
            let mut fields = EventFields::default();
            Scanner::new(&text).event(EventSchema { schema: &schema, unknown: UnknownFields::Reject, order: None }, &mut fields).unwrap();
            prop_assert!(fields.problem.is_none());
            for (i, key) in KEYS.iter().enumerate() {
                let (sent, read) = (event.get(*key), fields.field(i));
                prop_assert_eq!(sent.is_some(), read.is_some(), "{}: {}", key, text);
                let (Some(sent), Some(read)) = (sent, read) else { continue };
                prop_assert_eq!(&serde_json::from_str::<Value>(read.raw).unwrap(), sent, "{}", text);
                if let Value::String(s) = sent {
                    prop_assert_eq!(fields.string(read), Some(s.as_bytes()), "{}", text);
                }
            }
        }

        #[test]
        fn mutations_are_refused_exactly_when_serde_json_refuses_them(
            value in value(),
            pretty: bool,
            ascii: bool,
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
        ) {
            let Some(text) = mutate(&render(&value, pretty, ascii), &edits) else { return Ok(()) };
            let theirs = serde_json::from_str::<Value>(&text);
            // A lone surrogate escape ("lone leading surrogate", or "unexpected end of hex
            // escape" for a high one not followed by `\u`): the scanner takes the text and
            // the encoder refuses the field (with serde_json's message) instead.
            if theirs.as_ref().is_err_and(|e| e.to_string().contains("surrogate") || e.to_string().contains("hex escape")) {
                return Ok(());
            }
            // A number beyond f64 (`1e400`) is JSON; serde_json cannot hold it (and says so
            // before it reads on, so the rest may be anything), the scanner leaves it to the
            // column's encoder (a String column keeps its text).
            if theirs.as_ref().is_err_and(|e| e.to_string().contains("number out of range")) {
                return Ok(());
            }
            prop_assert_eq!(check(&text).is_ok(), theirs.is_ok(), "{}: {:?}", text, theirs);
        }
    }
}

/// `JSONCompactEachRow`: values by position; one for a column the gateway does not write
/// (MATERIALIZED, or of a type it cannot encode) refuses its row, as a field of that name does.
#[test]
fn compact_rows_fill_columns_by_position_and_refuse_computed_ones() {
    let s = schema();
    let columns = |names: &[&str]| -> Arc<[usize]> { names.iter().map(|n| s.column_index(n).unwrap()).collect() };
    let read = |text: &str, order: Arc<[usize]>| {
        let mut fields = EventFields::default();
        let schema = EventSchema { schema: &s, unknown: UnknownFields::Reject, order: Some(&order) };
        Scanner::new(text).event(schema, &mut fields).unwrap();
        let mut out = Vec::new();
        s.encode_fields(&fields, &ctx(), &mut out).map(|_| out)
    };
    let stored = read(r#"[7, "00000000-0000-7000-8000-000000000001"]"#, columns(&["user_id", "event_id"])).unwrap();
    assert_eq!(stored[16 + 8..], 7u64.to_le_bytes(), "the first value is user_id");
    let computed = read(r#"[7, "x"]"#, columns(&["user_id", "m"])).unwrap_err();
    assert_eq!(computed.field.as_deref(), Some("m"), "{computed:?}");
    let unsupported = read("[7, [1, 2]]", columns(&["user_id", "t"])).unwrap_err();
    assert_eq!(unsupported.field.as_deref(), Some("t"), "{unsupported:?}");
    let short = read("[7]", columns(&["user_id", "n"])).unwrap_err();
    assert!(short.error.contains("1 values, the INSERT 2 columns"), "{short:?}");
    let object = read(r#"{"user_id": 7}"#, columns(&["user_id"])).unwrap_err();
    assert!(object.error.contains("JSON array"), "{object:?}");
}

/// The ClickHouse dialect: numbers are epoch seconds for every time type, a fraction kept;
/// a time without an offset is refused when the zone it would be read in is not UTC.
#[test]
fn the_clickhouse_dialect_reads_times_as_clickhouse_does() {
    use crate::schema::Dialect;
    let s = schema();
    let encode = |event: &str, naive_utc: bool| {
        let mut fields = EventFields::default();
        let schema = EventSchema { schema: &s, unknown: UnknownFields::Reject, order: None };
        Scanner::new(event).event(schema, &mut fields).unwrap();
        let ctx = EncodeContext { dialect: Dialect::ClickHouse { naive_utc }, ..ctx() };
        let mut out = Vec::new();
        s.encode_fields(&fields, &ctx, &mut out).map(|_| i64::from_le_bytes(out[16..24].try_into().unwrap()))
    };
    // event_ts is DateTime64(3): ticks of a millisecond.
    assert_eq!(encode(r#"{"event_ts": 1764586800}"#, true), Ok(1_764_586_800_000));
    assert_eq!(encode(r#"{"event_ts": 1764586800.25}"#, true), Ok(1_764_586_800_250));
    assert_eq!(encode(r#"{"event_ts": "1764586800.5"}"#, true), Ok(1_764_586_800_500));
    assert_eq!(encode(r#"{"event_ts": "2025-12-01 11:00:00.125"}"#, true), Ok(1_764_586_800_125));
    assert!(encode(r#"{"event_ts": "2025-12-01 11:00:00"}"#, false).unwrap_err().error.contains("no UTC offset"));
    assert_eq!(encode(r#"{"event_ts": "2025-12-01T20:00:00+09:00"}"#, false), Ok(1_764_586_800_000));
    assert_eq!(encode(r#"{"event_ts": 1764586800}"#, false), Ok(1_764_586_800_000));
}
