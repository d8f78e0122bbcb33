//! One event's fields by column, as the decoder found them in the body: the interface
//! between the JSON scanner (`decode`) and the encoders here. Values are borrowed from the
//! body; only strings with escapes are copied, once, into a scratch buffer.

use std::borrow::Cow;

use super::Rejection;

/// How much of a field's value the scanner has already decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Content {
    /// Only checked: the encoder reads the raw text.
    Raw,
    /// A string literal without escapes: its content is the raw text inside the quotes.
    Plain,
    /// A string literal with escapes, unescaped into [`EventFields::unescaped`].
    Unescaped { start: usize, end: usize },
}

/// One field's value as found in the body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field<'a> {
    pub raw: &'a str,
    pub content: Content,
}

/// The fields of one event, by column index. Reused from event to event of a request.
#[derive(Debug, Default)]
pub struct EventFields<'a> {
    pub(crate) values: Vec<Option<Field<'a>>>,
    /// The unescaped content of the event's String fields that had escapes.
    pub(crate) unescaped: Vec<u8>,
    /// The first field that cannot be written (unknown, computed, unsupported).
    pub(crate) problem: Option<Rejection>,
    /// False when the event is not a JSON object at all.
    pub(crate) is_object: bool,
}

impl<'a> EventFields<'a> {
    pub(crate) fn reset(&mut self, columns: usize) {
        self.values.clear();
        self.values.resize(columns, None);
        self.unescaped.clear();
        self.problem = None;
        self.is_object = false;
    }

    /// Column `i`'s field, when the event has it.
    pub(crate) fn field(&self, i: usize) -> Option<Field<'a>> {
        self.values.get(i).copied().flatten()
    }

    /// The content of column `i`'s field when it was sent as a string, as text: borrowed from
    /// the body when it had no escapes.
    pub(crate) fn text(&self, i: usize) -> Option<Cow<'a, str>> {
        let field = self.field(i)?;
        match field.content {
            Content::Raw => None,
            Content::Plain => field.raw.get(1..field.raw.len().saturating_sub(1)).map(Cow::Borrowed),
            Content::Unescaped { .. } => {
                std::str::from_utf8(self.string(field)?).ok().map(|text| Cow::Owned(text.to_owned()))
            }
        }
    }

    /// The content of a field sent as a string: borrowed from the body, or from what the
    /// scanner unescaped. `None` for any other value.
    pub(crate) fn string(&self, field: Field<'a>) -> Option<&[u8]> {
        match field.content {
            Content::Raw => None,
            Content::Plain => field.raw.as_bytes().get(1..field.raw.len().saturating_sub(1)),
            Content::Unescaped { start, end } => self.unescaped.get(start..end),
        }
    }
}
