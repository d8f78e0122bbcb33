//! ClickHouse column types as `system.columns` spells them, parsed into a tree the encoders
//! are built from. Covers both old (18.x) and current spellings.

use std::fmt;

/// A column type buffergate can encode as RowBinary.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnType {
    String,
    FixedString(usize),
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    Uuid,
    Date,
    Date32,
    DateTime,
    /// Precision (0–9); the time zone only changes how the server displays values.
    DateTime64(u32),
    /// Precision (1–38) and scale.
    Decimal(u32, u32),
    /// Names and values, in declaration order; `wide` is Enum16.
    Enum {
        wide: bool,
        variants: Vec<(String, i16)>,
    },
    Ipv4,
    Ipv6,
    Nullable(Box<ColumnType>),
    /// Sent as its inner type: RowBinary carries LowCardinality values unwrapped.
    LowCardinality(Box<ColumnType>),
    Array(Box<ColumnType>),
    Map(Box<ColumnType>, Box<ColumnType>),
}

/// A type string buffergate cannot encode (yet), or cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported column type {0}")]
pub struct UnsupportedType(pub String);

impl ColumnType {
    /// The largest `FixedString` ClickHouse creates (`MAX_FIXEDSTRING_SIZE`).
    const MAX_FIXED_STRING: usize = 0xFF_FFFF;

    /// Parses a type as `system.columns.type` prints it.
    pub fn parse(text: &str) -> Result<Self, UnsupportedType> {
        let unsupported = || UnsupportedType(text.to_string());
        let text = text.trim();
        let (name, args) = match text.find('(') {
            Some(open) if text.ends_with(')') => (&text[..open], Some(&text[open + 1..text.len() - 1])),
            Some(_) => return Err(unsupported()),
            None => (text, None),
        };
        let one_arg = || -> Result<Self, UnsupportedType> { Self::parse(args.ok_or_else(unsupported)?) };
        let ty = match (name, args) {
            ("String", None) => Self::String,
            // ClickHouse refuses a FixedString of 0 or of more than 0xFFFFFF bytes; a size past
            // that is no type a server has, and each row would be that many bytes.
            ("FixedString", Some(n)) => match n.trim().parse() {
                Ok(n @ 1..=Self::MAX_FIXED_STRING) => Self::FixedString(n),
                _ => return Err(unsupported()),
            },
            ("UInt8", None) => Self::UInt8,
            ("UInt16", None) => Self::UInt16,
            ("UInt32", None) => Self::UInt32,
            ("UInt64", None) => Self::UInt64,
            ("Int8", None) => Self::Int8,
            ("Int16", None) => Self::Int16,
            ("Int32", None) => Self::Int32,
            ("Int64", None) => Self::Int64,
            ("Float32", None) => Self::Float32,
            ("Float64", None) => Self::Float64,
            ("Bool", None) => Self::Bool,
            ("UUID", None) => Self::Uuid,
            ("Date", None) => Self::Date,
            ("Date32", None) => Self::Date32,
            ("DateTime", _) => Self::DateTime,
            ("DateTime64", Some(args)) => {
                let precision = split_args(args)
                    .first()
                    .and_then(|p| p.trim().parse().ok())
                    .filter(|p| *p <= 9)
                    .ok_or_else(unsupported)?;
                Self::DateTime64(precision)
            }
            ("Decimal", Some(args)) => {
                let parts: Vec<u32> = split_args(args).iter().filter_map(|p| p.trim().parse().ok()).collect();
                match parts[..] {
                    [p, s] if (1..=38).contains(&p) && s <= p => Self::Decimal(p, s),
                    _ => return Err(unsupported()),
                }
            }
            ("Decimal32" | "Decimal64" | "Decimal128", Some(scale)) => {
                let precision = match name {
                    "Decimal32" => 9,
                    "Decimal64" => 18,
                    _ => 38,
                };
                let scale: u32 = scale.trim().parse().map_err(|_| unsupported())?;
                if scale > precision {
                    return Err(unsupported());
                }
                Self::Decimal(precision, scale)
            }
            ("Enum8" | "Enum16", Some(args)) => {
                Self::Enum { wide: name == "Enum16", variants: parse_enum(args).ok_or_else(unsupported)? }
            }
            ("IPv4", None) => Self::Ipv4,
            ("IPv6", None) => Self::Ipv6,
            ("Nullable", _) => Self::Nullable(Box::new(one_arg()?)),
            ("LowCardinality", _) => Self::LowCardinality(Box::new(one_arg()?)),
            ("Array", _) => Self::Array(Box::new(one_arg()?)),
            ("Map", Some(args)) => match split_args(args)[..] {
                [key, value] => Self::Map(Box::new(Self::parse(key)?), Box::new(Self::parse(value)?)),
                _ => return Err(unsupported()),
            },
            _ => return Err(unsupported()),
        };
        Ok(ty)
    }

    /// The type with `LowCardinality` wrappers removed (what RowBinary carries).
    pub fn unwrapped(&self) -> &ColumnType {
        match self {
            Self::LowCardinality(inner) => inner.unwrapped(),
            other => other,
        }
    }

    /// A timestamp type (`DateTime`, `DateTime64`), possibly Nullable or LowCardinality.
    pub fn is_time(&self) -> bool {
        match self.unwrapped() {
            Self::DateTime | Self::DateTime64(_) => true,
            Self::Nullable(inner) => inner.is_time(),
            _ => false,
        }
    }

    /// The size of each value of a fixed-size type: its RowBinary and Native bytes alike.
    pub fn fixed_size(&self) -> Option<usize> {
        Some(match self {
            Self::FixedString(n) => *n,
            Self::UInt8 | Self::Int8 | Self::Bool => 1,
            Self::UInt16 | Self::Int16 | Self::Date => 2,
            Self::UInt32 | Self::Int32 | Self::Float32 | Self::Date32 | Self::DateTime | Self::Ipv4 => 4,
            Self::UInt64 | Self::Int64 | Self::Float64 | Self::DateTime64(_) => 8,
            Self::Uuid | Self::Ipv6 => 16,
            Self::Enum { wide, .. } => 1 + usize::from(*wide),
            Self::Decimal(p, _) => match p {
                0..=9 => 4,
                10..=18 => 8,
                _ => 16,
            },
            Self::String | Self::Nullable(_) | Self::LowCardinality(_) | Self::Array(_) | Self::Map(..) => return None,
        })
    }

    /// A UUID type, possibly Nullable.
    pub fn is_uuid(&self) -> bool {
        match self.unwrapped() {
            Self::Uuid => true,
            Self::Nullable(inner) => inner.is_uuid(),
            _ => false,
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::String => f.write_str("String"),
            Self::FixedString(n) => write!(f, "FixedString({n})"),
            Self::UInt8 => f.write_str("UInt8"),
            Self::UInt16 => f.write_str("UInt16"),
            Self::UInt32 => f.write_str("UInt32"),
            Self::UInt64 => f.write_str("UInt64"),
            Self::Int8 => f.write_str("Int8"),
            Self::Int16 => f.write_str("Int16"),
            Self::Int32 => f.write_str("Int32"),
            Self::Int64 => f.write_str("Int64"),
            Self::Float32 => f.write_str("Float32"),
            Self::Float64 => f.write_str("Float64"),
            Self::Bool => f.write_str("Bool"),
            Self::Uuid => f.write_str("UUID"),
            Self::Date => f.write_str("Date"),
            Self::Date32 => f.write_str("Date32"),
            Self::DateTime => f.write_str("DateTime"),
            Self::DateTime64(p) => write!(f, "DateTime64({p})"),
            Self::Decimal(p, s) => write!(f, "Decimal({p}, {s})"),
            Self::Enum { wide, variants } => {
                f.write_str(if *wide { "Enum16(" } else { "Enum8(" })?;
                for (i, (name, value)) in variants.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "'{}' = {value}", name.replace('\\', "\\\\").replace('\'', "\\'"))?;
                }
                f.write_str(")")
            }
            Self::Ipv4 => f.write_str("IPv4"),
            Self::Ipv6 => f.write_str("IPv6"),
            Self::Nullable(inner) => write!(f, "Nullable({inner})"),
            Self::LowCardinality(inner) => write!(f, "LowCardinality({inner})"),
            Self::Array(inner) => write!(f, "Array({inner})"),
            Self::Map(key, value) => write!(f, "Map({key}, {value})"),
        }
    }
}

/// The time zone a time column's type names (`DateTime('Asia/Tokyo')`, `DateTime64(3, 'UTC')`,
/// also inside `Nullable` or `LowCardinality`), if it names one.
pub fn time_zone(type_text: &str) -> Option<&str> {
    let at = type_text.find("DateTime")?;
    let rest = &type_text[at..];
    let open = rest.find('\'')?;
    let close = rest[open + 1..].find('\'')?;
    Some(&rest[open + 1..open + 1 + close])
}

/// Whether a time zone name is UTC under another name.
pub fn is_utc(zone: &str) -> bool {
    matches!(
        zone,
        "UTC"
            | "Etc/UTC"
            | "Etc/Universal"
            | "Universal"
            | "Zulu"
            | "Etc/Zulu"
            | "GMT"
            | "Etc/GMT"
            | "UCT"
            | "Etc/UCT"
            | "GMT0"
            | "Etc/GMT0"
            | "Etc/GMT+0"
            | "Etc/GMT-0"
            | "Greenwich"
            | "Etc/Greenwich"
    )
}

/// Splits `a, B(c, d), 'e,f'` at top-level commas.
pub fn split_args(args: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start, mut quoted, mut escaped) = (0i32, 0usize, false, false);
    for (i, c) in args.char_indices() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '\'' => quoted = true,
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(args[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(args[start..].trim());
    parts
}

/// Parses `'a' = 1, 'b' = 2` (names may hold escaped quotes).
fn parse_enum(args: &str) -> Option<Vec<(String, i16)>> {
    split_args(args)
        .into_iter()
        .map(|item| {
            let (name, value) = item.rsplit_once('=')?;
            let name = name.trim().strip_prefix('\'')?.strip_suffix('\'')?;
            let mut unescaped = String::with_capacity(name.len());
            let mut chars = name.chars();
            while let Some(c) = chars.next() {
                unescaped.push(if c == '\\' { chars.next()? } else { c });
            }
            Some((unescaped, value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_system_columns_prints() {
        for text in [
            "String",
            "FixedString(16)",
            "LowCardinality(String)",
            "LowCardinality(Nullable(String))",
            "Nullable(Int32)",
            "Array(Array(UInt8))",
            "Map(String, Array(Nullable(Float64)))",
            "DateTime64(3)",
            "Decimal(10, 2)",
            "Enum8('a' = 1, 'b,c' = -2, 'it\\'s' = 3)",
            "UUID",
            "IPv6",
        ] {
            let ty = ColumnType::parse(text).unwrap();
            assert_eq!(ty.to_string(), text, "round trip of {text}");
        }
        assert_eq!(ColumnType::parse("DateTime('Europe/Moscow')").unwrap(), ColumnType::DateTime);
        assert_eq!(ColumnType::parse("DateTime64(6, 'UTC')").unwrap(), ColumnType::DateTime64(6));
        assert_eq!(ColumnType::parse("Decimal64(4)").unwrap(), ColumnType::Decimal(18, 4));
    }

    #[test]
    fn time_zones_of_time_columns() {
        assert_eq!(time_zone("DateTime('Asia/Tokyo')"), Some("Asia/Tokyo"));
        assert_eq!(time_zone("Nullable(DateTime64(3, 'UTC'))"), Some("UTC"));
        assert_eq!(time_zone("DateTime"), None);
        assert_eq!(time_zone("Enum8('a' = 1)"), None);
        assert!(is_utc("Etc/UTC") && !is_utc("Europe/Berlin"));
    }

    #[test]
    fn refuses_what_it_cannot_encode() {
        for text in ["Tuple(UInt8, String)", "Int128", "Object('json')", "Array(", "DateTime64(12)", "Nested(a UInt8)"]
        {
            assert!(ColumnType::parse(text).is_err(), "{text}");
        }
        // A size no server has: each value would be padded to it (the fuzzer found 3 TB).
        for text in ["FixedString(0)", "FixedString(16777216)", "FixedString(2999999990000 )"] {
            assert!(ColumnType::parse(text).is_err(), "{text}");
        }
        assert_eq!(ColumnType::parse("FixedString(16777215)").unwrap(), ColumnType::FixedString(0xFF_FFFF));
    }

    #[test]
    fn enum_names_unescape() {
        let ColumnType::Enum { variants, .. } = ColumnType::parse("Enum8('it\\'s' = 1, 'x = y' = 2)").unwrap() else {
            panic!("not an enum")
        };
        assert_eq!(variants, vec![("it's".to_string(), 1), ("x = y".to_string(), 2)]);
    }
}
