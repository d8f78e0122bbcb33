//! The column type parser and the encoders: `<type>\n<JSON value>`. Never a panic, and the
//! request path (the value read by the scanner, common forms encoded from its text) agrees
//! with the value path (serde_json, then `encode`) byte for byte and message for message. The
//! ClickHouse protocol's reading (`Dialect::ClickHouse`) is run on the same input too: no panic.
#![no_main]

use buffergate::config::UnknownFields;
use buffergate::decode::{EventSchema, Scanner};
use buffergate::schema::encode::{Reason, encode};
use buffergate::schema::{
    ColumnInfo, ColumnType, Dialect, EncodeContext, EventFields, SpecialColumns, TableSchema, Timestamp,
};
use libfuzzer_sys::fuzz_target;

/// Encodes `raw` as the one field `v` of an event, as the request path does.
fn through_scanner(type_text: &str, raw: &str, dialect: Dialect, out: &mut Vec<u8>) -> Result<(), Reason> {
    let info = ColumnInfo { name: "v".into(), type_text: type_text.into(), default_kind: String::new() };
    let special =
        SpecialColumns { id: String::new(), timestamp: String::new(), partition_key: String::new(), sharding: None };
    let schema = TableSchema::new(1, "db", "t", vec![info], &special);
    let text = format!("{{\"v\": {raw}}}");
    let mut fields = EventFields::default();
    let mut scanner = Scanner::new(&text);
    scanner
        .event(EventSchema { schema: &schema, unknown: UnknownFields::Reject, order: None }, &mut fields)
        .map_err(|e| e.reason.to_string())?;
    scanner.ws();
    if !scanner.at_end() {
        return Err("trailing characters".into());
    }
    let ctx =
        EncodeContext { dialect, ..EncodeContext::new(Timestamp { seconds: 0, nanos: 0 }, UnknownFields::Reject) };
    schema.encode_fields(&fields, &ctx, out).map(drop).map_err(|rejection| rejection.error)
}

fn is_string(ty: &ColumnType) -> bool {
    match ty {
        ColumnType::String => true,
        ColumnType::LowCardinality(inner) | ColumnType::Nullable(inner) => is_string(inner),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (type_text, raw) = text.split_once('\n').unwrap_or((text, "null"));
    let Ok(ty) = ColumnType::parse(type_text) else { return };
    let mut by_text = vec![7];
    let text_result = through_scanner(type_text, raw, Dialect::Gateway, &mut by_text);
    for naive_utc in [true, false] {
        let _ = through_scanner(type_text, raw, Dialect::ClickHouse { naive_utc }, &mut Vec::new());
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(raw) else {
        // An object or array in a String column is kept as sent once the scanner found it to be
        // JSON; serde_json also refuses valid JSON it cannot represent (a number beyond f64,
        // `1e400`), which the text is free to hold.
        let kept_as_text = is_string(&ty) && matches!(raw.trim_start().as_bytes().first(), Some(b'{' | b'['));
        assert!(text_result.is_err() || kept_as_text, "{type_text} {raw:?}: what serde_json refuses is refused");
        return;
    };
    let mut by_value = vec![7];
    let value_result = encode(&ty, &value, Dialect::Gateway, &mut by_value);
    assert_eq!(text_result, value_result, "{type_text} {raw:?}");
    // An object or array in a String column is stored as sent (escapes and key order kept,
    // docs/ingestion.md); the value path can only re-serialise it.
    let as_sent = (value.is_object() || value.is_array()) && is_string(&ty);
    if text_result.is_ok() && !as_sent {
        assert_eq!(by_text, by_value, "{type_text} {raw:?}");
    }
});
