//! Events read straight from the request body in one pass, without building a value tree.
//!
//! [`Scanner`] is a strict JSON reader (RFC 8259: no comments, no trailing commas, no control
//! characters in strings, at most 128 levels of nesting) specialised for event bodies: for each
//! event object it validates the syntax and records the raw text of each field by column,
//! borrowed from the body. A field sent as a string is also unescaped as it is read (into
//! [`EventFields`]' scratch buffer, only when it has escapes), so the encoder copies or parses
//! its content without walking the literal again. Encoding reads the common forms (strings,
//! integers, timestamps, UUIDs) directly and hands anything else to the value-based encoder, so
//! both paths follow the same rules.
//!
//! The field expected next (producers send fields in table order) is recognised by comparing
//! its quoted name as two words ([`crate::schema::KeyPattern`]); other names are read and
//! looked up.

use std::borrow::Cow;

use super::swar;
use crate::config::UnknownFields;
use crate::schema::{Content, EventFields, Field, Reason, Rejection, Role, TableSchema, UNKNOWN_FIELD};

/// Deeper nesting is refused (serde_json's limit too): recursion stays bounded.
const MAX_DEPTH: usize = 128;

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
    /// Events are arrays of values, not objects (ClickHouse's `JSONCompactEachRow`): the
    /// column of each position.
    pub order: Option<&'s [usize]>,
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

    /// Where the cursor is, in bytes from the start of the text.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// After an event starting at `from` turned out not to parse: moves to the start of the
    /// next line, wherever the error was found (a line break is whitespace inside an object, so
    /// it may be lines later); returns where the event's line ends (its `\n`, or the end of the
    /// text). The event is cut there, and the lines after it are read as events of their own.
    pub fn skip_line(&mut self, from: usize) -> usize {
        let from = from.min(self.text.len());
        let end = self.bytes()[from..].iter().position(|&b| b == b'\n').map_or(self.text.len(), |i| from + i);
        self.pos = (end + 1).min(self.text.len());
        end
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

    /// After an event of an NDJSON body: spaces, tabs and carriage returns, then the end of
    /// the line (consumed) or of the text; anything else is trailing characters.
    pub fn line_end(&mut self) -> Result<(), SyntaxError> {
        while let Some(b' ' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
        match self.peek() {
            None => Ok(()),
            Some(b'\n') => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(self.error("trailing characters")),
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
        let EventSchema { schema, unknown, order } = schema;
        if let Some(order) = order {
            return self.row(schema, order, fields);
        }
        fields.reset(schema.columns().len());
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
            let expected = schema.columns().get(next_column).and_then(|column| column.key.as_ref());
            let (column, key) = match expected {
                Some(pattern) if pattern.matches(self.bytes(), self.pos) => {
                    self.pos += pattern.len;
                    self.colon()?;
                    (Some(next_column), None)
                }
                _ => {
                    let key = self.key()?;
                    (schema.column_index(&key), Some(key))
                }
            };
            if let Some(i) = column {
                next_column = i + 1;
            }
            match column {
                Some(i) => self.field_value(schema, i, fields)?,
                None => {
                    self.value(1)?;
                    if unknown == UnknownFields::Reject {
                        let field = key.unwrap_or_default().into_owned();
                        fields.problem.get_or_insert(Rejection::new(Reason::UnknownField, Some(field), UNKNOWN_FIELD));
                    }
                }
            }
            if !self.next_element(b'}')? {
                return Ok(());
            }
        }
    }

    /// Reads one JSON value as a row of values by position: an array's elements go to the
    /// columns of `order` in turn. Any other value, or an array of another length, leaves a
    /// problem in `fields`.
    fn row(&mut self, schema: &TableSchema, order: &[usize], fields: &mut EventFields<'a>) -> Result<(), SyntaxError> {
        fields.reset(schema.columns().len());
        fields.is_object = true;
        if self.peek() != Some(b'[') {
            fields.problem = Some(Rejection::new(Reason::NotAnEvent, None, "a row must be a JSON array of values"));
            return self.value(0);
        }
        self.pos += 1;
        self.ws();
        let mut count = 0usize;
        if self.peek() == Some(b']') {
            self.pos += 1;
        } else {
            loop {
                let column = order.get(count).copied();
                count += 1;
                match column {
                    Some(i) => self.field_value(schema, i, fields)?,
                    None => self.value(1)?,
                }
                if !self.next_element(b']')? {
                    break;
                }
            }
        }
        if count != order.len() {
            fields.problem.get_or_insert(Rejection::new(
                Reason::NotAnEvent,
                None,
                format!("the row has {count} values, the INSERT {} columns", order.len()),
            ));
        }
        Ok(())
    }

    /// Reads the value of column `i`'s field: kept for a written column (a string unescaped as
    /// it is read; of duplicate fields the last one wins, as with serde_json), refused for a
    /// column the gateway does not write.
    fn field_value(&mut self, schema: &TableSchema, i: usize, fields: &mut EventFields<'a>) -> Result<(), SyntaxError> {
        let column = &schema.columns()[i];
        let start = self.pos;
        let problem = match &column.role {
            Role::Written { .. } => {
                let content = if self.peek() == Some(b'"') {
                    self.string_content(&mut fields.unescaped)?
                } else {
                    self.value(1)?;
                    Content::Raw
                };
                fields.values[i] = Some(Field { raw: &self.text[start..self.pos], content });
                return Ok(());
            }
            Role::Computed(kind) => kind_problem(kind),
            Role::Unsupported(text) => format!("column type {text} is not supported by buffergate"),
        };
        self.value(1)?;
        fields.problem.get_or_insert(Rejection::new(Reason::UnwritableColumn, Some(column.name.clone()), problem));
        Ok(())
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
        self.colon()?;
        Ok(name)
    }

    /// The colon after a field name, and the whitespace around it.
    fn colon(&mut self) -> Result<(), SyntaxError> {
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.error(if self.at_end() { "EOF while parsing an object" } else { "expected `:`" }));
        }
        self.pos += 1;
        self.ws();
        Ok(())
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
            i = plain_run(b, i);
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
                        None => return Err(eof_in_string(b)),
                    };
                }
                Some(&c) if c < 0x20 => return Err(control_character(i)),
                Some(_) => i += 1,
                None => return Err(eof_in_string(b)),
            }
        }
    }

    /// Reads a string literal (at its opening quote) for a column, checking it as
    /// [`Self::string`] does. A string with escapes is unescaped into `into` in the same pass,
    /// so that the encoder reads its content instead of walking it a second time (JSON sent
    /// as text in a String column has an escape every few bytes). [`Content::Raw`] for a lone
    /// surrogate escape, which the encoder refuses with serde_json's message.
    fn string_content(&mut self, into: &mut Vec<u8>) -> Result<Content, SyntaxError> {
        let b = self.bytes();
        let first = self.pos + 1;
        let mut i = first;
        // Most strings have no escape: only look, up to the closing quote.
        loop {
            i = plain_run(b, i);
            match b.get(i) {
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(Content::Plain);
                }
                Some(b'\\') => break,
                Some(&c) if c < 0x20 => return Err(control_character(i)),
                Some(_) => i += 1,
                None => return Err(eof_in_string(b)),
            }
        }
        let start = into.len();
        into.extend_from_slice(&b[first..i]);
        let (end, lone_surrogate) = unescape_rest(b, i, into)?;
        self.pos = end;
        if lone_surrogate {
            into.truncate(start);
            return Ok(Content::Raw);
        }
        Ok(Content::Unescaped { start, end: into.len() })
    }
}

/// Unescapes a string literal's content from the backslash at `b[i]` to its closing quote
/// into `into`, checking it as [`Scanner::string`] does. Returns the position after the
/// closing quote and whether a lone surrogate escape was met.
///
/// Output goes through a small buffer on the stack, flushed when nearly full: the loop then
/// keeps its cursor in a register instead of updating the vector's length at every escape.
#[inline(never)]
fn unescape_rest(b: &[u8], mut i: usize, into: &mut Vec<u8>) -> Result<(usize, bool), SyntaxError> {
    const ROOM: usize = 64;
    let mut buf = [0u8; ROOM];
    let mut k = 0;
    let mut lone_surrogate = false;
    // At a backslash: one escape, then the text up to the next special byte.
    loop {
        // An escape writes at most four bytes.
        if k > ROOM - 4 {
            into.extend_from_slice(&buf[..k]);
            k = 0;
        }
        let simple = match b.get(i + 1) {
            Some(&c @ (b'"' | b'\\' | b'/')) => Some(c),
            Some(b'b') => Some(0x08),
            Some(b'f') => Some(0x0c),
            Some(b'n') => Some(b'\n'),
            Some(b'r') => Some(b'\r'),
            Some(b't') => Some(b'\t'),
            Some(b'u') => {
                let (written, lone) = unicode_escape(b, &mut i, &mut buf[k..k + 4])?;
                k += written;
                lone_surrogate |= lone;
                None
            }
            Some(_) => return Err(SyntaxError { offset: i + 1, reason: "invalid escape" }),
            None => return Err(eof_in_string(b)),
        };
        if let Some(byte) = simple {
            buf[k] = byte;
            k += 1;
            i += 2;
        }
        // A whole word is copied and the excess cut off: a fixed-size copy is cheaper than a
        // short variable one.
        while let Some(word) = swar::word_at(b, i) {
            if k > ROOM - 8 {
                into.extend_from_slice(&buf[..k]);
                k = 0;
            }
            buf[k..k + 8].copy_from_slice(&word.to_le_bytes());
            let special = swar::string_special_bytes(word);
            if special != 0 {
                let j = swar::first_byte(special);
                k += j;
                i += j;
                break;
            }
            k += 8;
            i += 8;
        }
        loop {
            match b.get(i) {
                Some(b'"') => {
                    into.extend_from_slice(&buf[..k]);
                    return Ok((i + 1, lone_surrogate));
                }
                Some(b'\\') => break,
                Some(&c) if c < 0x20 => return Err(control_character(i)),
                // Only in the last eight bytes of the text.
                Some(&c) => {
                    if k == ROOM {
                        into.extend_from_slice(&buf[..k]);
                        k = 0;
                    }
                    buf[k] = c;
                    k += 1;
                    i += 1;
                }
                None => return Err(eof_in_string(b)),
            }
        }
    }
}

/// A `\uXXXX` escape at `b[*i]` (and its low surrogate when one follows), written as UTF-8
/// into `out`; returns the bytes written and whether a lone surrogate was met (read as what
/// it is, and reported). Advances `*i` past the escape(s).
#[inline(always)]
fn unicode_escape(b: &[u8], i: &mut usize, out: &mut [u8]) -> Result<(usize, bool), SyntaxError> {
    let Some(mut code) = hex4(b, *i + 2) else {
        return Err(SyntaxError { offset: *i + 1, reason: "invalid escape" });
    };
    *i += 6;
    let mut lone = false;
    if (0xD800..0xDC00).contains(&code) {
        // A high surrogate counts only with the low one escaped right after it; anything else
        // is read (and checked) as what it is.
        match (b.get(*i..*i + 2), hex4(b, *i + 2)) {
            (Some([b'\\', b'u']), Some(low)) if (0xDC00..0xE000).contains(&low) => {
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                *i += 6;
            }
            _ => lone = true,
        }
    }
    match char::from_u32(code) {
        Some(c) => Ok((c.encode_utf8(out).len(), lone)),
        None => Ok((0, true)),
    }
}

/// The end of the run of bytes from `i` that need no attention inside a string: the first
/// quote, backslash or control character at or after `i`, or a position in the last eight
/// bytes of `b` from which they have to be looked at one by one.
#[inline]
fn plain_run(b: &[u8], mut i: usize) -> usize {
    while let Some(word) = swar::word_at(b, i) {
        let special = swar::string_special_bytes(word);
        if special != 0 {
            return i + swar::first_byte(special);
        }
        i += 8;
    }
    i
}

fn control_character(offset: usize) -> SyntaxError {
    SyntaxError { offset, reason: "control character (\\u0000-\\u001F) found while parsing a string" }
}

fn eof_in_string(b: &[u8]) -> SyntaxError {
    SyntaxError { offset: b.len(), reason: "EOF while parsing a string" }
}

/// The value of the four hex digits at `b[at..at + 4]`.
fn hex4(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)?.iter().try_fold(0u32, |n, &d| Some(n << 4 | (d as char).to_digit(16)?))
}

fn kind_problem(kind: &str) -> String {
    format!("the column is {kind}; ClickHouse computes it")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Checks `text` as one JSON value, nothing after it.
    pub(crate) fn check(text: &str) -> Result<(), SyntaxError> {
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

    /// A seeded generator of indexes below `n` (xorshift64).
    fn xorshift(mut seed: u64) -> impl FnMut(usize) -> usize {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        }
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
        let mut next = xorshift(0x2545_f491_4f6c_dd1d_u64);
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
            if let Err(e) = &theirs
                && e.to_string().contains("surrogate")
            {
                continue;
            }
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{text}: {ours:?} vs {theirs:?}");
        }
    }

    /// The String reader checks exactly as the plain one does and unescapes as serde_json
    /// does, across word boundaries and in the last eight bytes of the text.
    #[test]
    fn string_content_agrees_with_string_and_serde_json() {
        let bases = [
            r#""{\"page\":\"/p/12\",\"ref\":\"campaign-3\",\"ms\":45}""#,
            r#""plain text that is longer than a word""#,
            r#""\u00e9t\u00e9 \ud83d\ude00 \b\f\n\r\t\/ \\ end""#,
            r#""\ud83d\u0041 lone""#,
            r#""é""#,
            // Longer than the unescaping buffer, escapes on every side of its flushes.
            &format!(r#""{}""#, r#"x\"{\"key\":\"valu\u00e9\",\"n\":12345}\\\ud83d\ude00/"#.repeat(9)),
            &format!(r#""a\n{}""#, "0123456789abcdefghij".repeat(8)),
        ];
        let alphabet = b"\"\\/bfnrtu0123456789abcdefABCDEF\x01 dD8e";
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15_u64);
        for round in 0..40_000 {
            let mut bytes = bases[round % bases.len()].as_bytes().to_vec();
            let mutations = if bytes.len() > 100 { 1 + next(8) } else { 1 + next(3) };
            if round >= bases.len() {
                for _ in 0..mutations {
                    let at = 1 + next(bytes.len() - 1);
                    match next(3) {
                        0 if bytes[at].is_ascii() => bytes[at] = alphabet[next(alphabet.len())],
                        1 if bytes[at].is_ascii() => drop(bytes.remove(at)),
                        _ => bytes.insert(at, alphabet[next(alphabet.len())]),
                    }
                }
            }
            // Followed by more text (the usual case) and at the very end of it.
            for suffix in ["", ", \"next\": 1}"] {
                let Ok(text) = String::from_utf8([&bytes[..], suffix.as_bytes()].concat()) else { continue };
                let mut plain = Scanner::new(&text);
                let checked = plain.string().map(|_| plain.pos);
                let mut fused = Scanner::new(&text);
                let mut into = b"kept".to_vec();
                let read = fused.string_content(&mut into);
                match (&checked, &read) {
                    (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
                    (Ok(end), Ok(content)) => {
                        assert_eq!(*end, fused.pos, "{text}");
                        let literal = &text[..*end];
                        let fields = EventFields { unescaped: into.clone(), ..EventFields::default() };
                        let decoded = fields.string(Field { raw: literal, content: *content });
                        match serde_json::from_str::<String>(literal) {
                            Ok(s) => assert_eq!(decoded, Some(s.as_bytes()), "{text}"),
                            Err(_) => assert_eq!(*content, Content::Raw, "{text}"),
                        }
                        if *content == Content::Raw {
                            assert_eq!(into, b"kept", "{text}");
                        }
                    }
                    _ => panic!("{text}: {checked:?} vs {read:?}"),
                }
            }
        }
    }

    #[test]
    fn positions_are_one_based() {
        let err = SyntaxError { offset: 8, reason: "x" };
        assert_eq!(err.position(b"[1,\n {\"k\": }]"), (2, 5));
        assert_eq!(SyntaxError { offset: 0, reason: "x" }.position(b"oops"), (1, 1));
    }
}
