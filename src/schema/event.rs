//! Events read straight from the request body in one pass, without building a value tree.
//!
//! [`Scanner`] is a strict JSON reader (RFC 8259: no comments, no trailing commas, no control
//! characters in strings, at most 128 levels of nesting) specialised for event bodies: for each
//! event object it validates the syntax and records the raw text of each field by column,
//! borrowed from the body. Encoding then reads the common forms (plain strings, integers,
//! timestamps, UUIDs) directly from that text and hands anything else to the value-based
//! encoder, so both paths follow the same rules.
//!
//! It replaces a serde visitor over `serde_json::value::RawValue`, which scanned every string
//! twice (once to find its end, once to encode it) and was a third of the gateway's CPU on
//! large batches.

use std::borrow::Cow;

use super::{Rejection, Role, TableSchema, swar};
use crate::config::UnknownFields;

/// Deeper nesting is refused (serde_json's limit too): recursion stays bounded.
const MAX_DEPTH: usize = 128;

/// The fields of one event, by column index. Reused from event to event of a request.
#[derive(Debug, Default)]
pub struct EventFields<'a> {
    pub(super) values: Vec<Option<&'a str>>,
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
        self.values.get(i).copied().flatten()
    }
}

/// Where the text stops being JSON, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Byte offset in the text given to the [`Scanner`].
    pub offset: usize,
    pub reason: &'static str,
}

impl SyntaxError {
    /// 1-based line and column (in bytes) of the error in `text`.
    pub fn position(&self, text: &[u8]) -> (usize, usize) {
        let before = &text[..self.offset.min(text.len())];
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        (line, before.len() - line_start + 1)
    }
}

/// What the reader needs to know to sort fields into columns.
#[derive(Debug, Clone, Copy)]
pub struct EventSchema<'s> {
    pub schema: &'s TableSchema,
    pub unknown: UnknownFields,
}

/// A cursor over one JSON text.
#[derive(Debug)]
pub struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text, pos: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    pub fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    pub fn bump(&mut self) {
        self.pos += 1;
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    pub fn error(&self, reason: &'static str) -> SyntaxError {
        SyntaxError { offset: self.pos, reason }
    }

    /// Skips JSON whitespace.
    pub fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// After the opening `[` or `{` and an element: `Ok(true)` for another element (the comma
    /// and whitespace consumed), `Ok(false)` at the closing bracket (consumed).
    pub fn next_element(&mut self, close: u8) -> Result<bool, SyntaxError> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.ws();
                if self.peek() == Some(close) {
                    return Err(self.error("trailing comma"));
                }
                Ok(true)
            }
            Some(c) if c == close => {
                self.pos += 1;
                Ok(false)
            }
            None => Err(self.error("EOF while parsing a list or object")),
            Some(_) if close == b']' => Err(self.error("expected `,` or `]`")),
            Some(_) => Err(self.error("expected `,` or `}`")),
        }
    }

    /// Reads one JSON value as an event into `fields`: an object's fields by column; any other
    /// value is read (and checked) but leaves `fields.is_object` false.
    pub fn event(&mut self, schema: EventSchema<'_>, fields: &mut EventFields<'a>) -> Result<(), SyntaxError> {
        let EventSchema { schema, unknown } = schema;
        fields.reset(schema.columns.len());
        if self.peek() != Some(b'{') {
            return self.value(0);
        }
        fields.is_object = true;
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        // Producers mostly send fields in the table's order: try the column after the previous
        // field's before hashing the name.
        let mut next_column = 0;
        loop {
            let key = self.key()?;
            let start = self.pos;
            self.value(1)?;
            let column = match schema.columns.get(next_column) {
                Some(column) if column.name == *key => Some(next_column),
                _ => schema.by_name.get(&*key).copied(),
            };
            if let Some(i) = column {
                next_column = i + 1;
            }
            let problem = match column {
                Some(i) => match &schema.columns[i].role {
                    Role::Written { .. } => {
                        // Duplicate fields: the last one wins, as with serde_json.
                        fields.values[i] = Some(&self.text[start..self.pos]);
                        None
                    }
                    Role::Computed(kind) => Some((schema.columns[i].name.clone(), kind_problem(kind))),
                    Role::Unsupported(text) => Some((
                        schema.columns[i].name.clone(),
                        format!("column type {text} is not supported by buffergate"),
                    )),
                },
                None if unknown == UnknownFields::Ignore => None,
                None => Some((key.into_owned(), "no such column in the table".to_string())),
            };
            if let Some((field, error)) = problem {
                fields.problem.get_or_insert(Rejection { field: Some(field), error });
            }
            if !self.next_element(b'}')? {
                return Ok(());
            }
        }
    }

    /// A field name and its colon, the whitespace around them consumed; borrowed when the
    /// name has no escapes.
    fn key(&mut self) -> Result<Cow<'a, str>, SyntaxError> {
        if self.peek() != Some(b'"') {
            return Err(self.error(if self.at_end() { "EOF while parsing an object" } else { "key must be a string" }));
        }
        let start = self.pos;
        let escaped = self.string()?;
        let literal = &self.text[start..self.pos];
        let name = if escaped {
            Cow::Owned(
                serde_json::from_str::<String>(literal)
                    .map_err(|_| SyntaxError { offset: start, reason: "invalid escape in a field name" })?,
            )
        } else {
            Cow::Borrowed(&literal[1..literal.len() - 1])
        };
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.error(if self.at_end() { "EOF while parsing an object" } else { "expected `:`" }));
        }
        self.pos += 1;
        self.ws();
        Ok(name)
    }

    /// Reads (and checks) any JSON value.
    fn value(&mut self, depth: usize) -> Result<(), SyntaxError> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(open @ (b'{' | b'[')) => {
                if depth >= MAX_DEPTH {
                    return Err(self.error("recursion limit exceeded"));
                }
                let close = if open == b'{' { b'}' } else { b']' };
                self.pos += 1;
                self.ws();
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        self.key()?;
                    }
                    self.value(depth + 1)?;
                    if !self.next_element(close)? {
                        return Ok(());
                    }
                }
            }
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(_) => Err(self.error("expected value")),
            None => Err(self.error("EOF while parsing a value")),
        }
    }

    fn literal(&mut self, word: &'static str) -> Result<(), SyntaxError> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.error("expected value"))
        }
    }

    fn number(&mut self) -> Result<(), SyntaxError> {
        let b = self.bytes();
        let digits = |mut i: usize| {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            i
        };
        let mut i = self.pos + usize::from(b.get(self.pos) == Some(&b'-'));
        i = match b.get(i) {
            Some(b'0') => i + 1,
            Some(b'1'..=b'9') => digits(i + 1),
            _ => return Err(SyntaxError { offset: i, reason: "invalid number" }),
        };
        if b.get(i) == Some(&b'.') {
            if !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                return Err(SyntaxError { offset: i + 1, reason: "invalid number" });
            }
            i = digits(i + 1);
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if !b.get(i).is_some_and(u8::is_ascii_digit) {
                return Err(SyntaxError { offset: i, reason: "invalid number" });
            }
            i = digits(i);
        }
        self.pos = i;
        Ok(())
    }

    /// Reads a string literal (at its opening quote); `true` when it contains escapes.
    fn string(&mut self) -> Result<bool, SyntaxError> {
        let b = self.bytes();
        let mut i = self.pos + 1;
        let mut escaped = false;
        loop {
            // Eight bytes at a time up to the next quote, backslash or control character.
            while let Some(word) = swar::word_at(b, i) {
                let special = swar::string_special_bytes(word);
                if special != 0 {
                    i += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            match b.get(i) {
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    i += match b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 2,
                        Some(b'u') if b.get(i + 2..i + 6).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => 6,
                        Some(_) => return Err(SyntaxError { offset: i + 1, reason: "invalid escape" }),
                        None => return Err(SyntaxError { offset: b.len(), reason: "EOF while parsing a string" }),
                    };
                }
                Some(&c) if c < 0x20 => {
                    return Err(SyntaxError {
                        offset: i,
                        reason: "control character (\\u0000-\\u001F) found while parsing a string",
                    });
                }
                Some(_) => i += 1,
                None => return Err(SyntaxError { offset: b.len(), reason: "EOF while parsing a string" }),
            }
        }
    }
}

fn kind_problem(kind: &str) -> String {
    format!("the column is {kind}; ClickHouse computes it")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `text` as one JSON value, nothing after it.
    fn check(text: &str) -> Result<(), SyntaxError> {
        let mut scanner = Scanner::new(text);
        scanner.ws();
        scanner.value(0)?;
        scanner.ws();
        if scanner.at_end() { Ok(()) } else { Err(scanner.error("trailing characters")) }
    }

    #[test]
    fn accepts_what_serde_json_accepts() {
        let long = format!("\"{}\\n{}\"", "a".repeat(37), "é".repeat(20));
        for text in [
            "0",
            "-0",
            "12.5e-3",
            "1E+2",
            "true",
            "null",
            r#""""#,
            r#""\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00""#,
            &long,
            "[]",
            "{}",
            r#" [1, {"a": [null, false, {"b": "c"}]}, "x"] "#,
            r#"{"k": {"nested": [1, 2.0, -3e4]}, "s": "has \"quotes\" in it"}"#,
        ] {
            assert_eq!(check(text), Ok(()), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        for (text, offset) in [
            ("01", 1),
            ("-", 1),
            ("1.", 2),
            ("1e", 2),
            (".5", 0),
            ("[1,]", 3),
            ("{\"a\":1,}", 7),
            ("{\"a\" 1}", 5),
            ("{a: 1}", 1),
            ("[1 2]", 3),
            ("\"tab\there\"", 4),
            ("\"bad \\x escape\"", 6),
            ("\"\\u12g4\"", 2),
            ("\"open", 5),
            ("\"abcdefghij\\x\"", 12),
            ("\"abcdefghijkl\tm\"", 13),
            ("\"abcdefghijklmnop", 17),
            ("tru", 0),
            ("nul", 0),
            ("[", 1),
            ("{\"a\":", 5),
            ("1 2", 2),
            ("", 0),
        ] {
            let err = check(text).unwrap_err();
            assert_eq!(err.offset, offset, "{text}: {err:?}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err(), "{text}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(check(&deep).unwrap_err().reason, "recursion limit exceeded");
    }

    /// Random one-byte edits of a valid body: never a panic, and valid exactly when serde_json
    /// says so (but for lone surrogate escapes, which the encoder refuses per field instead).
    #[test]
    fn agrees_with_serde_json_on_mutations() {
        // Short strings (read byte by byte) and long ones with escapes on and across word
        // boundaries (read eight bytes at a time).
        let bases = [
            r#"[{"id": "a\"b", "n": -12.5e3, "ok": true, "x": null, "o": {"k": [1, "\u00e9"]}}, 7]"#,
            r#"{"payload": "{\"page\":\"/p/12\",\"ref\":\"campaign-3\",\"ms\":45}", "t": "abcdefg\u00e9hijklmnop\\q"}"#,
        ];
        let alphabet = b" \t\n\"\\/:,[]{}0123456789-+.eEutrfalsn\x01x";
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..40_000 {
            let mut bytes = bases[round % 2].as_bytes().to_vec();
            for _ in 0..1 + next(3) {
                let at = next(bytes.len());
                match next(3) {
                    0 => bytes[at] = alphabet[next(alphabet.len())],
                    1 => drop(bytes.remove(at)),
                    _ => bytes.insert(at, alphabet[next(alphabet.len())]),
                }
            }
            let text = String::from_utf8(bytes).unwrap();
            let ours = check(&text);
            let theirs = serde_json::from_str::<serde_json::Value>(&text);
            if let Err(e) = &theirs {
                if e.to_string().contains("surrogate") {
                    continue;
                }
            }
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{text}: {ours:?} vs {theirs:?}");
        }
    }

    #[test]
    fn positions_are_one_based() {
        let err = SyntaxError { offset: 8, reason: "x" };
        assert_eq!(err.position(b"[1,\n {\"k\": }]"), (2, 5));
        assert_eq!(SyntaxError { offset: 0, reason: "x" }.position(b"oops"), (1, 1));
    }
}
