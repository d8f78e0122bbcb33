//! JSON values → ClickHouse RowBinary, driven by the column's real type.
//!
//! Each function appends to the row being built and, on failure, returns the reason only; the
//! caller names the field and rolls the row back. RowBinary layout reference: integers and
//! floats little-endian, strings and arrays prefixed by an unsigned LEB128 length, `Nullable`
//! by a null byte, `LowCardinality` unwrapped, UUID as two little-endian halves (high first),
//! IPv6 as 16 network-order bytes.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use super::time::{self, Timestamp};
use super::types::ColumnType;

/// Why a value does not fit its column.
pub type Reason = String;

/// `DateTime64` and `Date32` cover 1900-01-01 ..= 2299-12-31 23:59:59.
const MIN_SECONDS_64: i64 = -2_208_988_800;
const MAX_SECONDS_64: i64 = 10_413_791_999;
const MIN_DAYS_32: i64 = -25_567;
const MAX_DAYS_32: i64 = 120_529;

const CLICKHOUSE_TIME_FORMS: &str =
    "expected epoch seconds (a number, or a string of digits), 'YYYY-MM-DD[ hh:mm:ss[.fff]]' or an RFC 3339 string";

/// How a request's values are read where the conventions producers follow differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// buffergate's own API: a number is a time in epoch milliseconds, a time without an
    /// offset is UTC, an object or array sent to a String column is kept as compact JSON.
    #[default]
    Gateway,
    /// ClickHouse's `JSONEachRow`, as a ClickHouse server reads it: a number (or a string of
    /// digits) is a time in epoch seconds, and any value that is not a string goes to a String
    /// column exactly as sent. ClickHouse reads a time without an offset in the server's (or
    /// the column's) time zone: `naive_utc` says that zone is UTC; when it is not, such a time
    /// is refused rather than read in a zone the gateway would have to guess.
    ClickHouse { naive_utc: bool },
}

const TIME_FORMS: &str = "expected an RFC 3339 string, 'YYYY-MM-DD hh:mm:ss[.fff]' (UTC) or integer epoch milliseconds";

/// Appends `value` encoded as `ty`. JSON `null` on a non-Nullable type writes the type's
/// default, as ClickHouse's own JSON input does.
pub fn encode(ty: &ColumnType, value: &Value, dialect: Dialect, out: &mut Vec<u8>) -> Result<(), Reason> {
    match (ty, value) {
        (ColumnType::LowCardinality(inner), _) => encode(inner, value, dialect, out),
        (ColumnType::Nullable(_), Value::Null) => {
            out.push(1);
            Ok(())
        }
        (ColumnType::Nullable(inner), _) => {
            out.push(0);
            encode(inner, value, dialect, out)
        }
        (_, Value::Null) => {
            encode_default(ty, out);
            Ok(())
        }
        (ColumnType::String, _) => {
            match value {
                Value::String(s) => write_bytes(out, s.as_bytes()),
                Value::Bool(b) => write_bytes(out, if *b { b"true" } else { b"false" }),
                // Objects and arrays are kept as compact JSON text; numbers as written.
                other => write_bytes(out, other.to_string().as_bytes()),
            }
            Ok(())
        }
        (ColumnType::FixedString(n), Value::String(s)) => fixed_string(*n, s, out),
        (ColumnType::UInt8, _) => int(value, 0, u8::MAX.into()).map(|v| out.push(v as u8)),
        (ColumnType::UInt16, _) => int(value, 0, u16::MAX.into()).map(|v| out.extend((v as u16).to_le_bytes())),
        (ColumnType::UInt32, _) => int(value, 0, u32::MAX.into()).map(|v| out.extend((v as u32).to_le_bytes())),
        (ColumnType::UInt64, _) => int(value, 0, u64::MAX.into()).map(|v| out.extend((v as u64).to_le_bytes())),
        (ColumnType::Int8, _) => int(value, i8::MIN.into(), i8::MAX.into()).map(|v| out.push(v as i8 as u8)),
        (ColumnType::Int16, _) => {
            int(value, i16::MIN.into(), i16::MAX.into()).map(|v| out.extend((v as i16).to_le_bytes()))
        }
        (ColumnType::Int32, _) => {
            int(value, i32::MIN.into(), i32::MAX.into()).map(|v| out.extend((v as i32).to_le_bytes()))
        }
        (ColumnType::Int64, _) => {
            int(value, i64::MIN.into(), i64::MAX.into()).map(|v| out.extend((v as i64).to_le_bytes()))
        }
        (ColumnType::Float32, _) => float32(value, out),
        (ColumnType::Float64, _) => float(value).map(|f| out.extend(f.to_le_bytes())),
        (ColumnType::Bool, _) => boolean(value, out),
        (ColumnType::Uuid, Value::String(s)) => {
            let uuid = uuid::Uuid::parse_str(s).map_err(|_| format!("{s:?} is not a UUID"))?;
            write_uuid(out, uuid);
            Ok(())
        }
        (ColumnType::Date, _) => date(value, out),
        (ColumnType::Date32, _) => date32(value, out),
        (ColumnType::DateTime | ColumnType::DateTime64(_), _) => encode_time(ty, instant(value, dialect)?, out),
        (ColumnType::Decimal(precision, scale), _) => decimal_value(value, *precision, *scale, out),
        (ColumnType::Enum { wide, variants }, _) => enum_value(value, *wide, variants, out),
        (ColumnType::Ipv4, _) => ipv4(value, out),
        (ColumnType::Ipv6, Value::String(s)) => ipv6(s, out),
        (ColumnType::Array(inner), Value::Array(items)) => {
            write_len(out, items.len());
            for (i, item) in items.iter().enumerate() {
                encode(inner, item, dialect, out).map_err(|reason| format!("element {i}: {reason}"))?;
            }
            Ok(())
        }
        (ColumnType::Map(key_ty, value_ty), Value::Object(entries)) => map((key_ty, value_ty), entries, dialect, out),
        (ty, value) => Err(format!("expected {}, got {}", expectation(ty), kind(value))),
    }
}

fn fixed_string(n: usize, s: &str, out: &mut Vec<u8>) -> Result<(), Reason> {
    if s.len() > n {
        return Err(format!("{} bytes do not fit FixedString({n})", s.len()));
    }
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + n - s.len(), 0);
    Ok(())
}

fn float32(value: &Value, out: &mut Vec<u8>) -> Result<(), Reason> {
    let f = float(value)?;
    if f.is_finite() && f.abs() > f64::from(f32::MAX) {
        return Err(format!("{f} is out of range for Float32"));
    }
    out.extend((f as f32).to_le_bytes());
    Ok(())
}

fn boolean(value: &Value, out: &mut Vec<u8>) -> Result<(), Reason> {
    let b = match value {
        Value::Bool(b) => *b,
        Value::Number(n) if n.as_u64() == Some(0) => false,
        Value::Number(n) if n.as_u64() == Some(1) => true,
        Value::String(s) if s == "true" || s == "1" => true,
        Value::String(s) if s == "false" || s == "0" => false,
        _ => return Err("expected true or false".into()),
    };
    out.push(u8::from(b));
    Ok(())
}

fn date(value: &Value, out: &mut Vec<u8>) -> Result<(), Reason> {
    let days = days(value)?;
    let days = u16::try_from(days).map_err(|_| "out of range for Date (1970-01-01 to 2149-06-06)".to_string())?;
    out.extend(days.to_le_bytes());
    Ok(())
}

fn date32(value: &Value, out: &mut Vec<u8>) -> Result<(), Reason> {
    let days = days(value)?;
    if !(MIN_DAYS_32..=MAX_DAYS_32).contains(&days) {
        return Err("out of range for Date32 (1900-01-01 to 2299-12-31)".into());
    }
    out.extend((days as i32).to_le_bytes());
    Ok(())
}

fn decimal_value(value: &Value, precision: u32, scale: u32, out: &mut Vec<u8>) -> Result<(), Reason> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err("expected a decimal number or string".into()),
    };
    let v =
        decimal(&text, precision, scale).ok_or_else(|| format!("{text:?} is not a Decimal({precision}, {scale})"))?;
    match precision {
        0..=9 => out.extend((v as i32).to_le_bytes()),
        10..=18 => out.extend((v as i64).to_le_bytes()),
        _ => out.extend(v.to_le_bytes()),
    }
    Ok(())
}

fn enum_value(value: &Value, wide: bool, variants: &[(String, i16)], out: &mut Vec<u8>) -> Result<(), Reason> {
    let found = match value {
        Value::String(s) => variants.iter().find(|(name, _)| name == s).map(|(_, v)| *v),
        Value::Number(n) => n.as_i64().and_then(|n| variants.iter().find(|(_, v)| i64::from(*v) == n)).map(|(_, v)| *v),
        _ => None,
    };
    let v = found.ok_or_else(|| {
        let names: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
        format!("{value} is not one of {names:?}")
    })?;
    if wide {
        out.extend(v.to_le_bytes());
    } else {
        out.push(v as i8 as u8);
    }
    Ok(())
}

fn ipv4(value: &Value, out: &mut Vec<u8>) -> Result<(), Reason> {
    let ip = match value {
        Value::String(s) => {
            s.parse::<Ipv4Addr>().map(u32::from).map_err(|_| format!("{s:?} is not an IPv4 address"))?
        }
        _ => int(value, 0, u32::MAX.into())? as u32,
    };
    out.extend(ip.to_le_bytes());
    Ok(())
}

fn ipv6(s: &str, out: &mut Vec<u8>) -> Result<(), Reason> {
    let ip = match s.parse::<IpAddr>().map_err(|_| format!("{s:?} is not an IP address"))? {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend(ip.octets());
    Ok(())
}

fn map(
    (key_ty, value_ty): (&ColumnType, &ColumnType),
    map: &serde_json::Map<String, Value>,
    dialect: Dialect,
    out: &mut Vec<u8>,
) -> Result<(), Reason> {
    write_len(out, map.len());
    for (key, item) in map {
        match key_ty.unwrapped() {
            ColumnType::String => write_bytes(out, key.as_bytes()),
            _ => encode(key_ty, &Value::String(key.clone()), dialect, out)
                .map_err(|reason| format!("key {key:?}: {reason}"))?,
        }
        encode(value_ty, item, dialect, out).map_err(|reason| format!("key {key:?}: {reason}"))?;
    }
    Ok(())
}

/// Appends the value whose JSON text (as found in the request body) is `raw`, encoded as `ty`;
/// `content` is a string literal's content as the scanner unescaped it. The common forms are
/// read straight from the text; anything else is parsed into a value and goes through
/// [`encode`], so both paths follow the same rules and give the same messages.
pub fn encode_raw(
    ty: &ColumnType,
    raw: &str,
    content: Option<&[u8]>,
    dialect: Dialect,
    out: &mut Vec<u8>,
) -> Result<(), Reason> {
    let start = out.len();
    if encode_text(ty, raw, content, dialect, out) {
        return Ok(());
    }
    out.truncate(start);
    let value: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    encode(ty, &value, dialect, out)
}

/// The fast path of [`encode_raw`]: `false` (with `out` possibly partly written) when `raw`
/// is not in a form read here, or does not fit; the value path then decides and explains.
fn encode_text(ty: &ColumnType, raw: &str, content: Option<&[u8]>, dialect: Dialect, out: &mut Vec<u8>) -> bool {
    let Some(&first) = raw.as_bytes().first() else { return false };
    match ty {
        ColumnType::LowCardinality(inner) => encode_text(inner, raw, content, dialect, out),
        ColumnType::Nullable(_) if raw == "null" => {
            out.push(1);
            true
        }
        ColumnType::Nullable(inner) => {
            out.push(0);
            encode_text(inner, raw, content, dialect, out)
        }
        ColumnType::String => match (first, content) {
            (b'"', Some(content)) => {
                write_bytes(out, content);
                true
            }
            // ClickHouse keeps any other value's text exactly as sent.
            (_, _) if matches!(dialect, Dialect::ClickHouse { .. }) && first != b'"' => {
                write_bytes(out, raw.as_bytes());
                true
            }
            // Objects and arrays are kept as JSON text, as sent without insignificant whitespace.
            (b'{' | b'[', _) => {
                write_json_text(out, raw);
                true
            }
            _ => false,
        },
        ColumnType::UInt8 => int_text(raw, 0, u8::MAX.into()).map(|v| out.push(v as u8)).is_some(),
        ColumnType::UInt16 => int_text(raw, 0, u16::MAX.into()).map(|v| out.extend((v as u16).to_le_bytes())).is_some(),
        ColumnType::UInt32 => int_text(raw, 0, u32::MAX.into()).map(|v| out.extend((v as u32).to_le_bytes())).is_some(),
        ColumnType::UInt64 => int_text(raw, 0, u64::MAX.into()).map(|v| out.extend((v as u64).to_le_bytes())).is_some(),
        ColumnType::Int8 => int_text(raw, i8::MIN.into(), i8::MAX.into()).map(|v| out.push(v as i8 as u8)).is_some(),
        ColumnType::Int16 => {
            int_text(raw, i16::MIN.into(), i16::MAX.into()).map(|v| out.extend((v as i16).to_le_bytes())).is_some()
        }
        ColumnType::Int32 => {
            int_text(raw, i32::MIN.into(), i32::MAX.into()).map(|v| out.extend((v as i32).to_le_bytes())).is_some()
        }
        ColumnType::Int64 => {
            int_text(raw, i64::MIN.into(), i64::MAX.into()).map(|v| out.extend((v as i64).to_le_bytes())).is_some()
        }
        ColumnType::Float64 if first == b'-' || first.is_ascii_digit() => match raw.parse::<f64>() {
            Ok(f) if f.is_finite() => {
                out.extend(f.to_le_bytes());
                true
            }
            _ => false,
        },
        ColumnType::Uuid => match content.and_then(|c| uuid::Uuid::try_parse_ascii(c).ok()) {
            Some(uuid) => {
                write_uuid(out, uuid);
                true
            }
            None => false,
        },
        ColumnType::DateTime | ColumnType::DateTime64(_) => {
            let at = match (dialect, content) {
                (Dialect::Gateway, Some(content)) => time::parse_bytes(content),
                (Dialect::Gateway, None) => None,
                (Dialect::ClickHouse { naive_utc }, Some(content)) => clickhouse_time(content, naive_utc).ok(),
                (Dialect::ClickHouse { .. }, None) => epoch_seconds(raw.as_bytes()),
            };
            at.is_some_and(|at| encode_time(ty, at, out).is_ok())
        }
        _ => false,
    }
}

/// An integer literal (no sign but `-`, no fraction, no exponent) within `[min, max]`.
fn int_text(raw: &str, min: i128, max: i128) -> Option<i128> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || digits.len() > 38 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // At most 38 digits: the magnitude fits an i128 without overflow checks.
    let magnitude = digits.bytes().fold(0i128, |n, b| n * 10 + i128::from(b - b'0'));
    let value = if digits.len() < raw.len() { -magnitude } else { magnitude };
    (min..=max).contains(&value).then_some(value)
}

/// Appends JSON text (valid, as the parser checked it) as a String, without the whitespace
/// between tokens.
fn write_json_text(out: &mut Vec<u8>, raw: &str) {
    let bytes = raw.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        return write_bytes(out, bytes);
    }
    let mut compact = Vec::with_capacity(bytes.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        compact.push(b);
    }
    write_bytes(out, &compact);
}

/// Appends the value a column takes when nothing is given: zero, empty, or NULL; an Enum's
/// smallest value. (Columns with a DEFAULT expression are left out of the INSERT instead.)
pub fn encode_default(ty: &ColumnType, out: &mut Vec<u8>) {
    let zeros = match ty {
        ColumnType::LowCardinality(inner) => return encode_default(inner, out),
        ColumnType::Nullable(_) => {
            out.push(1);
            return;
        }
        ColumnType::Enum { wide, variants } => {
            let v = variants.iter().map(|(_, v)| *v).min().unwrap_or(0);
            if *wide {
                out.extend(v.to_le_bytes());
            } else {
                out.push(v as i8 as u8);
            }
            return;
        }
        ColumnType::String | ColumnType::Array(_) | ColumnType::Map(..) => 1,
        fixed => fixed.fixed_size().unwrap_or(0),
    };
    out.resize(out.len() + zeros, 0);
}

/// Appends an instant to a time column (`DateTime`, `DateTime64`, possibly wrapped).
pub fn encode_time(ty: &ColumnType, at: Timestamp, out: &mut Vec<u8>) -> Result<(), Reason> {
    match ty {
        ColumnType::LowCardinality(inner) => encode_time(inner, at, out),
        ColumnType::Nullable(inner) => {
            out.push(0);
            encode_time(inner, at, out)
        }
        ColumnType::DateTime => {
            let seconds = u32::try_from(at.seconds)
                .map_err(|_| "out of range for DateTime (1970-01-01 to 2106-02-07)".to_string())?;
            out.extend(seconds.to_le_bytes());
            Ok(())
        }
        ColumnType::DateTime64(precision) => {
            let ticks = Some(at)
                .filter(|t| (MIN_SECONDS_64..=MAX_SECONDS_64).contains(&t.seconds))
                .and_then(|t| t.ticks(*precision))
                .ok_or_else(|| "out of range for DateTime64 (1900-01-01 to 2299-12-31)".to_string())?;
            out.extend(ticks.to_le_bytes());
            Ok(())
        }
        other => Err(format!("{other} is not a time type")),
    }
}

/// Appends a UUID to a UUID column (possibly Nullable).
pub fn write_uuid_column(ty: &ColumnType, uuid: uuid::Uuid, out: &mut Vec<u8>) {
    match ty {
        ColumnType::LowCardinality(inner) => write_uuid_column(inner, uuid, out),
        ColumnType::Nullable(inner) => {
            out.push(0);
            write_uuid_column(inner, uuid, out);
        }
        _ => write_uuid(out, uuid),
    }
}

/// Appends a UUID (RowBinary: high and low 64-bit halves, each little-endian).
pub fn write_uuid(out: &mut Vec<u8>, uuid: uuid::Uuid) {
    let (high, low) = uuid.as_u64_pair();
    out.extend(high.to_le_bytes());
    out.extend(low.to_le_bytes());
}

/// The UUID at the start of `bytes`, a value of a UUID column of type `ty` (RowBinary: high
/// then low half, each little-endian); `None` for NULL.
pub fn read_uuid(ty: &ColumnType, bytes: &[u8]) -> Option<uuid::Uuid> {
    match ty {
        ColumnType::LowCardinality(inner) => read_uuid(inner, bytes),
        ColumnType::Nullable(inner) => (*bytes.first()? == 0).then(|| read_uuid(inner, bytes.get(1..)?)).flatten(),
        ColumnType::Uuid => {
            let high = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
            let low = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
            Some(uuid::Uuid::from_u64_pair(high, low))
        }
        _ => None,
    }
}

/// The whole seconds of the time value at the start of `bytes`, of type `ty`; `None` for NULL.
pub fn read_seconds(ty: &ColumnType, bytes: &[u8]) -> Option<i64> {
    match ty {
        ColumnType::LowCardinality(inner) => read_seconds(inner, bytes),
        ColumnType::Nullable(inner) => (*bytes.first()? == 0).then(|| read_seconds(inner, bytes.get(1..)?)).flatten(),
        ColumnType::DateTime => Some(i64::from(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))),
        ColumnType::DateTime64(precision) => {
            let ticks = i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
            Some(ticks.div_euclid(10i64.checked_pow(*precision)?))
        }
        _ => None,
    }
}

/// Appends an unsigned LEB128 length.
pub fn write_len(out: &mut Vec<u8>, len: usize) {
    let mut n = len as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads an unsigned LEB128 value (at most 10 bytes) off the front of `bytes`: the value and
/// the bytes it took; `None` when it is cut off.
pub fn read_len(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((value, i + 1));
        }
    }
    None
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// An integer in `[min, max]`, from a JSON integer, an integral float, or a string of digits.
fn int(value: &Value, min: i128, max: i128) -> Result<i128, Reason> {
    let v = match value {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i128::from(i)
            } else if let Some(u) = n.as_u64() {
                i128::from(u)
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e38 => f as i128,
                    _ => return Err(format!("{n} is not an integer")),
                }
            }
        }
        Value::String(s) => s.trim().parse::<i128>().map_err(|_| format!("{s:?} is not an integer"))?,
        other => return Err(format!("expected an integer, got {}", kind(other))),
    };
    if v < min || v > max {
        return Err(format!("{v} is out of range [{min}, {max}]"));
    }
    Ok(v)
}

fn float(value: &Value) -> Result<f64, Reason> {
    match value {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        Value::String(s) => s.trim().parse::<f64>().map_err(|_| format!("{s:?} is not a number")),
        other => Err(format!("expected a number, got {}", kind(other))),
    }
}

fn instant(value: &Value, dialect: Dialect) -> Result<Timestamp, Reason> {
    if let Dialect::ClickHouse { naive_utc } = dialect {
        return match value {
            Value::String(s) => clickhouse_time(s.as_bytes(), naive_utc),
            Value::Number(n) => epoch_seconds(n.to_string().as_bytes())
                .or_else(|| n.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15).map(seconds_of_float))
                .ok_or_else(|| format!("{n} is not a time: {CLICKHOUSE_TIME_FORMS}")),
            other => Err(format!("expected a time, got {}: {CLICKHOUSE_TIME_FORMS}", kind(other))),
        };
    }
    match value {
        Value::String(s) => time::parse(s).ok_or_else(|| format!("{s:?} is not a timestamp: {TIME_FORMS}")),
        Value::Number(n) => {
            n.as_i64().map(Timestamp::from_epoch_millis).ok_or_else(|| format!("{n} is not a timestamp: {TIME_FORMS}"))
        }
        other => Err(format!("expected a timestamp, got {}: {TIME_FORMS}", kind(other))),
    }
}

/// A time as ClickHouse reads a JSON string: epoch seconds when it is all digits (with an
/// optional fraction), else a date or date and time.
fn clickhouse_time(text: &[u8], naive_utc: bool) -> Result<Timestamp, Reason> {
    if let Some(at) = epoch_seconds(text) {
        return Ok(at);
    }
    let shown = || String::from_utf8_lossy(&text[..text.len().min(64)]).into_owned();
    let at = time::parse_bytes(text).ok_or_else(|| format!("{:?} is not a time: {CLICKHOUSE_TIME_FORMS}", shown()))?;
    if !naive_utc && !time::has_offset(text) {
        return Err(format!(
            "{:?} has no UTC offset, and ClickHouse would read it in a time zone that is not UTC; send it with an offset or as epoch seconds",
            shown()
        ));
    }
    Ok(at)
}

/// `[-]digits[.digits]` as seconds since the epoch (fractional digits past nanoseconds cut).
fn epoch_seconds(text: &[u8]) -> Option<Timestamp> {
    let (negative, text) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, text),
    };
    let (whole, fraction) = match text.iter().position(|&b| b == b'.') {
        Some(dot) => (&text[..dot], &text[dot + 1..]),
        None => (text, &[][..]),
    };
    if whole.is_empty() || whole.len() > 12 || !whole.iter().chain(fraction).all(u8::is_ascii_digit) {
        return None;
    }
    let seconds = whole.iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
    let nanos =
        fraction.iter().take(9).enumerate().fold(0u32, |n, (i, &d)| n + u32::from(d - b'0') * 10u32.pow(8 - i as u32));
    Some(match (negative, nanos) {
        (false, _) => Timestamp { seconds, nanos },
        (true, 0) => Timestamp { seconds: -seconds, nanos: 0 },
        (true, _) => Timestamp { seconds: -seconds - 1, nanos: 1_000_000_000 - nanos },
    })
}

fn seconds_of_float(f: f64) -> Timestamp {
    let seconds = f.floor();
    Timestamp { seconds: seconds as i64, nanos: (((f - seconds) * 1e9) as u32).min(999_999_999) }
}

/// Days since the epoch, from a date/timestamp string or an integer day number.
fn days(value: &Value) -> Result<i64, Reason> {
    match value {
        Value::String(s) => {
            time::parse(s).map(Timestamp::days).ok_or_else(|| format!("{s:?} is not a date (YYYY-MM-DD)"))
        }
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("{n} is not a day number")),
        other => Err(format!("expected a date, got {}", kind(other))),
    }
}

/// Parses decimal text (optionally with an exponent) into an integer scaled by `10^scale`,
/// truncating extra fractional digits; `None` when malformed or wider than `precision` digits.
fn decimal(text: &str, precision: u32, scale: u32) -> Option<i128> {
    let text = text.trim();
    let (negative, text) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut value: i128 = 0;
    // Digits are shifted by `scale + exponent` places; those falling below 10^0 are truncated.
    let shift = scale as i32 + exponent;
    for (i, c) in whole.bytes().chain(fraction.bytes()).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        let place = whole.len() as i32 - 1 - i as i32 + shift;
        if place < 0 {
            continue;
        }
        let digit = i128::from(c - b'0');
        value = value.checked_add(digit.checked_mul(10i128.checked_pow(place as u32)?)?)?;
    }
    if value >= 10i128.checked_pow(precision)? {
        return None;
    }
    Some(if negative { -value } else { value })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn expectation(ty: &ColumnType) -> String {
    match ty {
        ColumnType::FixedString(_) | ColumnType::Uuid | ColumnType::Ipv6 => {
            format!("a string ({ty})")
        }
        ColumnType::Array(_) => format!("an array ({ty})"),
        ColumnType::Map(..) => format!("an object ({ty})"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[allow(clippy::needless_pass_by_value)] // json!(...) at every call site
    fn enc(ty: &str, value: Value) -> Result<Vec<u8>, Reason> {
        let mut out = Vec::new();
        encode(&ColumnType::parse(ty).unwrap(), &value, Dialect::Gateway, &mut out).map(|()| out)
    }

    #[test]
    fn scalars() {
        assert_eq!(enc("UInt8", json!(255)).unwrap(), [255]);
        assert!(enc("UInt8", json!(256)).unwrap_err().contains("out of range"));
        assert!(enc("UInt32", json!(-1)).is_err());
        assert_eq!(enc("Int16", json!("-2")).unwrap(), (-2i16).to_le_bytes());
        assert_eq!(enc("UInt64", json!(u64::MAX)).unwrap(), u64::MAX.to_le_bytes());
        assert!(enc("Int32", json!(1.5)).is_err());
        assert_eq!(enc("Int32", json!(2.0)).unwrap(), 2i32.to_le_bytes());
        assert_eq!(enc("Float32", json!(1.5)).unwrap(), 1.5f32.to_le_bytes());
        assert!(enc("Float32", json!(1e300)).is_err());
        assert_eq!(enc("Bool", json!(true)).unwrap(), [1]);
        assert!(enc("Bool", json!("yes")).is_err());
        assert_eq!(enc("String", json!("hé")).unwrap(), [3, b'h', 0xc3, 0xa9]);
        assert_eq!(enc("String", json!({"a": [1, 2]})).unwrap()[1..], *br#"{"a":[1,2]}"#);
        assert_eq!(enc("FixedString(3)", json!("ab")).unwrap(), [b'a', b'b', 0]);
        assert!(enc("FixedString(1)", json!("ab")).is_err());
        assert_eq!(enc("Nullable(UInt8)", json!(null)).unwrap(), [1]);
        assert_eq!(enc("Nullable(UInt8)", json!(7)).unwrap(), [0, 7]);
        assert_eq!(enc("UInt8", json!(null)).unwrap(), [0], "null on a non-Nullable column is its default");
        assert_eq!(enc("LowCardinality(String)", json!("x")).unwrap(), [1, b'x']);
    }

    #[test]
    fn uuid_halves_are_little_endian() {
        let out = enc("UUID", json!("00112233-4455-6677-8899-aabbccddeeff")).unwrap();
        assert_eq!(
            out,
            [0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88]
        );
        assert!(enc("UUID", json!("not-a-uuid")).unwrap_err().contains("not a UUID"));
        assert!(enc("UUID", json!(5)).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(enc("DateTime", json!("2023-11-14T22:13:20Z")).unwrap(), 1_700_000_000u32.to_le_bytes());
        assert_eq!(enc("DateTime", json!(1_700_000_000_999i64)).unwrap(), 1_700_000_000u32.to_le_bytes());
        assert!(enc("DateTime", json!("1969-12-31 23:59:59")).is_err());
        assert_eq!(enc("DateTime64(3)", json!("2023-11-14 22:13:20.123")).unwrap(), 1_700_000_000_123i64.to_le_bytes());
        assert_eq!(
            enc("DateTime64(6, 'UTC')", json!(1_700_000_000_123i64)).unwrap(),
            1_700_000_000_123_000i64.to_le_bytes()
        );
        assert!(enc("DateTime64(3)", json!("2400-01-01 00:00:00")).is_err());
        assert!(enc("DateTime64(3)", json!(true)).is_err());
        assert_eq!(enc("Date", json!("1970-01-03")).unwrap(), 2u16.to_le_bytes());
        assert_eq!(enc("Date32", json!("1969-12-31")).unwrap(), (-1i32).to_le_bytes());
    }

    #[test]
    fn containers() {
        assert_eq!(enc("Array(UInt8)", json!([1, 2])).unwrap(), [2, 1, 2]);
        assert!(enc("Array(UInt8)", json!([1, 300])).unwrap_err().starts_with("element 1"));
        assert_eq!(enc("Map(String, UInt8)", json!({"a": 1})).unwrap(), [1, 1, b'a', 1]);
        assert_eq!(enc("Map(UInt16, String)", json!({"7": "x"})).unwrap(), [1, 7, 0, 1, b'x']);
        assert!(enc("Map(String, String)", json!([])).is_err());
        let long: Vec<u8> = vec![0; 200];
        assert_eq!(enc("Array(UInt8)", json!(long)).unwrap()[..2], [0xc8, 0x01]);
    }

    #[test]
    fn enums_ips_decimals() {
        assert_eq!(enc("Enum8('a' = 1, 'b' = -2)", json!("b")).unwrap(), [0xfe]);
        assert_eq!(enc("Enum16('a' = 1000)", json!(1000)).unwrap(), 1000i16.to_le_bytes());
        assert!(enc("Enum8('a' = 1)", json!("c")).is_err());
        assert_eq!(enc("IPv4", json!("1.2.3.4")).unwrap(), 0x0102_0304u32.to_le_bytes());
        assert_eq!(enc("IPv6", json!("::1")).unwrap()[15], 1);
        assert_eq!(enc("IPv6", json!("1.2.3.4")).unwrap()[10..], [0xff, 0xff, 1, 2, 3, 4]);
        assert_eq!(enc("Decimal(10, 2)", json!("12.345")).unwrap(), 1234i64.to_le_bytes());
        assert_eq!(enc("Decimal(9, 2)", json!(-0.5)).unwrap(), (-50i32).to_le_bytes());
        assert_eq!(enc("Decimal(38, 0)", json!("1e3")).unwrap(), 1000i128.to_le_bytes());
        assert!(enc("Decimal(4, 2)", json!("123.4")).is_err());
        assert!(enc("Decimal(4, 2)", json!("1x")).is_err());
    }

    #[test]
    fn defaults() {
        let mut out = Vec::new();
        for ty in ["String", "UInt64", "Nullable(String)", "Enum8('x' = 5, 'y' = 3)", "FixedString(2)"] {
            encode_default(&ColumnType::parse(ty).unwrap(), &mut out);
        }
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0]);
    }
}
