//! One event read straight from the request body, without building a value tree: the raw JSON
//! text of each field, found by column and borrowed from the body. Encoding then reads the
//! common forms (plain strings, integers, timestamps, UUIDs) directly from that text and hands
//! anything else to the value-based encoder, so both paths follow the same rules.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{Rejection, Role, TableSchema};
use crate::config::UnknownFields;

/// The fields of one event, by column index. Reused from event to event of a request.
#[derive(Debug, Default)]
pub struct EventFields<'a> {
    pub(super) values: Vec<Option<&'a RawValue>>,
    /// The first field that cannot be written (unknown, computed, unsupported).
    pub(super) problem: Option<Rejection>,
    /// False when the event is not a JSON object at all.
    pub(super) is_object: bool,
}

impl<'a> EventFields<'a> {
    fn reset(&mut self, columns: usize) {
        self.values.clear();
        self.values.resize(columns, None);
        self.problem = None;
        self.is_object = false;
    }

    /// The raw text of column `i`'s field, when the event has it.
    pub(super) fn get(&self, i: usize) -> Option<&'a str> {
        self.values.get(i).copied().flatten().map(RawValue::get)
    }
}

/// Reads one event (any JSON value; only objects are events) into `fields`.
#[derive(Debug)]
pub struct EventSeed<'s, 'f, 'a> {
    pub schema: &'s TableSchema,
    pub fields: &'f mut EventFields<'a>,
    pub unknown: UnknownFields,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.fields.reset(self.schema.columns.len());
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.fields.is_object = true;
        while let Some(key) = map.next_key_seed(KeySeed { schema: self.schema })? {
            let problem = match key {
                Key::Column(i) => match &self.schema.columns[i].role {
                    Role::Written { .. } => {
                        self.fields.values[i] = Some(map.next_value::<&'de RawValue>()?);
                        continue;
                    }
                    Role::Computed(kind) => (self.schema.columns[i].name.clone(), kind_problem(kind)),
                    Role::Unsupported(text) => (
                        self.schema.columns[i].name.clone(),
                        format!("column type {text} is not supported by buffergate"),
                    ),
                },
                Key::Unknown(_) if self.unknown == UnknownFields::Ignore => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                Key::Unknown(name) => (name.into_owned(), "no such column in the table".to_string()),
            };
            map.next_value::<IgnoredAny>()?;
            if self.fields.problem.is_none() {
                self.fields.problem = Some(Rejection { field: Some(problem.0), error: problem.1 });
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

fn kind_problem(kind: &str) -> String {
    format!("the column is {kind}; ClickHouse computes it")
}

enum Key<'de> {
    Column(usize),
    Unknown(Cow<'de, str>),
}

/// A field name, looked up without copying it when the body spells it without escapes.
struct KeySeed<'s> {
    schema: &'s TableSchema,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key<'de>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Key<'de>, E> {
        Ok(self.schema.by_name.get(name).map_or(Key::Unknown(Cow::Borrowed(name)), |&i| Key::Column(i)))
    }

    fn visit_str<E>(self, name: &str) -> Result<Key<'de>, E> {
        Ok(self
            .schema
            .by_name
            .get(name)
            .map_or_else(|| Key::Unknown(Cow::Owned(name.to_string())), |&i| Key::Column(i)))
    }
}

/// The content of a JSON string literal, borrowed when it has no escapes; `None` when `raw`
/// is not a string.
pub fn string_content(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}
