//! `sharding_key`: the Distributed table's sharding key, parsed once with the configuration.
//! How a key's value is computed from a row is [`crate::schema::sharding`]'s.

/// How a row's sharding-key value is computed from one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFunction {
    /// The unsigned integer itself.
    Identity,
    /// `intHash64` (MurmurHash3's 64-bit finaliser, see [`crate::schema::sharding::int_hash64`]).
    IntHash64,
    /// `cityHash64` of a string's bytes (CityHash 1.0.2, as ClickHouse has it).
    CityHash64,
}

/// A Distributed table's sharding key, as configured (`sharding_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardingKey {
    /// `rand()`: rows are not placed by value; any shard may take a request.
    Random,
    Column {
        function: KeyFunction,
        column: String,
    },
}

impl ShardingKey {
    /// Parses the supported forms: `rand()`, `col`, `intHash64(col)`, `cityHash64(col)`
    /// (a column name may be quoted with backticks).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("rand()") {
            return Ok(Self::Random);
        }
        let (function, inner) = match text.split_once('(') {
            None => (KeyFunction::Identity, text),
            Some((name, rest)) => {
                let inner = rest.strip_suffix(')').ok_or_else(|| format!("{text:?}: unbalanced parentheses"))?;
                let function = match name.trim() {
                    "intHash64" => KeyFunction::IntHash64,
                    "cityHash64" => KeyFunction::CityHash64,
                    other => {
                        return Err(format!(
                            "{other}(): not a supported sharding function (rand(), intHash64(col), cityHash64(col), col)"
                        ));
                    }
                };
                (function, inner)
            }
        };
        let column = inner.trim().trim_matches('`');
        let plain = !column.is_empty() && column.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain {
            return Err(format!("{text:?}: the sharding key must name one column"));
        }
        Ok(Self::Column { function, column: column.to_string() })
    }

    /// The key as a Distributed table's engine argument.
    pub fn to_sql(&self) -> String {
        match self {
            Self::Random => "rand()".into(),
            Self::Column { function: KeyFunction::Identity, column } => format!("`{column}`"),
            Self::Column { function: KeyFunction::IntHash64, column } => format!("intHash64(`{column}`)"),
            Self::Column { function: KeyFunction::CityHash64, column } => format!("cityHash64(`{column}`)"),
        }
    }

    pub fn column(&self) -> Option<&str> {
        match self {
            Self::Random => None,
            Self::Column { column, .. } => Some(column),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_keys_parse() {
        assert_eq!(ShardingKey::parse("rand()"), Ok(ShardingKey::Random));
        let city = ShardingKey::parse("cityHash64(`user_id`)").unwrap();
        assert_eq!(city, ShardingKey::Column { function: KeyFunction::CityHash64, column: "user_id".into() });
        assert_eq!(city.to_sql(), "cityHash64(`user_id`)");
        assert_eq!(ShardingKey::parse(" n ").unwrap().to_sql(), "`n`");
        assert!(ShardingKey::parse("sipHash64(x)").is_err());
        assert!(ShardingKey::parse("cityHash64(a, b)").is_err());
        assert!(ShardingKey::parse("cityHash64(x").is_err());
    }
}
