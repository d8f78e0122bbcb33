//! The statements ClickHouse clients send, read far enough to act on them: an `INSERT INTO
//! [db.]table [(columns)] [SETTINGS …] FORMAT <name>` and where its data begins, or a
//! read-only query, kept as text for the connect-time answers. Nothing here executes SQL; a
//! statement that is neither is refused by the caller.

/// A statement that was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    Insert(Insert),
    /// A `SELECT` (or `SHOW`, `DESCRIBE`, `EXISTS`, `WITH`): its text without a trailing
    /// `FORMAT` clause, whitespace collapsed and lower-cased, and the format it asked for.
    Query {
        text: String,
        format: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub database: Option<String>,
    pub table: String,
    pub columns: Option<Vec<String>>,
    pub settings: Vec<(String, String)>,
    pub format: String,
}

/// Why a statement cannot be read; the message is ClickHouse's kind of syntax error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SyntaxError(pub String);

/// What [`read`] found at the start of a text.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The statement, and the offset in the text where an INSERT's data begins (the end of
    /// the text for a query).
    Complete(Statement, usize),
    /// The text ends inside the statement: more of the body is needed.
    Incomplete,
}

/// The longest statement read from a body: an INSERT's own text is short, whatever its data.
pub const MAX_STATEMENT_BYTES: usize = 256 * 1024;

/// Reads the statement at the start of `text`. `whole` says `text` is everything there is (an
/// INSERT without data, a query); otherwise a statement that reaches the end of `text` is
/// [`Read::Incomplete`].
pub fn read(text: &[u8], whole: bool) -> Result<Read, SyntaxError> {
    // A body read so far that ends in `-` or `/` may end inside the start of a comment.
    if !whole && matches!(text.last(), Some(b'-' | b'/')) {
        return Ok(Read::Incomplete);
    }
    let mut lexer = Lexer { text, pos: 0, whole };
    let first = match lexer.next() {
        Err(Problem::End) if !whole => return Ok(Read::Incomplete),
        Err(Problem::End) => return Err(SyntaxError("the query ends inside a quoted name".into())),
        Err(Problem::Syntax(e)) => return Err(e),
        Ok(Some(Token::Word(word))) => word,
        Ok(Some(_)) => return Err(SyntaxError("expected INSERT or SELECT at the start of the query".into())),
        Ok(None) if whole => return Err(SyntaxError("Empty query".into())),
        Ok(None) => return Ok(Read::Incomplete),
    };
    if first.eq_ignore_ascii_case("insert") {
        return match insert(&mut lexer, whole) {
            Ok(insert) => Ok(Read::Complete(Statement::Insert(insert), lexer.pos)),
            Err(Problem::End) if !whole => Ok(Read::Incomplete),
            Err(Problem::End) => Err(SyntaxError("the INSERT ends before its FORMAT clause".into())),
            Err(Problem::Syntax(e)) => Err(e),
        };
    }
    if !["select", "with", "show", "describe", "desc", "exists"].iter().any(|k| first.eq_ignore_ascii_case(k)) {
        let first = super::exception::shown(&first).to_ascii_uppercase();
        return Err(SyntaxError(format!("buffergate does not execute {first} statements")));
    }
    if !whole {
        return Ok(Read::Incomplete);
    }
    let text = std::str::from_utf8(text).map_err(|_| SyntaxError("the query is not UTF-8".into()))?;
    let (text, format) = split_format(text.trim().trim_end_matches(';').trim_end());
    let normal = text.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
    Ok(Read::Complete(Statement::Query { text: normal, format }, lexer.text.len()))
}

/// A query's text and the format its last clause names, if it ends in `FORMAT <name>`.
fn split_format(text: &str) -> (&str, Option<String>) {
    let mut words = text.rsplitn(3, char::is_whitespace);
    match (words.next(), words.next(), words.next()) {
        (Some(name), Some(keyword), Some(rest)) if keyword.eq_ignore_ascii_case("format") => {
            (rest.trim_end(), Some(name.to_string()))
        }
        _ => (text, None),
    }
}

enum Problem {
    /// The text ended.
    End,
    Syntax(SyntaxError),
}

impl From<SyntaxError> for Problem {
    fn from(error: SyntaxError) -> Self {
        Self::Syntax(error)
    }
}

fn syntax(message: impl Into<String>) -> Problem {
    Problem::Syntax(SyntaxError(message.into()))
}

/// The rest of an INSERT after its first word; leaves the lexer where the data begins.
fn insert(lexer: &mut Lexer<'_>, whole: bool) -> Result<Insert, Problem> {
    lexer.keyword("INTO")?;
    let mut name = lexer.name()?;
    if name.eq_ignore_ascii_case("table") && lexer.peek_name()? {
        name = lexer.name()?;
    } else if name.eq_ignore_ascii_case("function") {
        return Err(syntax("INSERT INTO FUNCTION is not accepted: write into a table"));
    }
    let (database, table) = if lexer.eat(&Token::Dot)? { (Some(name), lexer.name()?) } else { (None, name) };
    let mut columns = None;
    let mut settings = Vec::new();
    let mut token = lexer.next()?.ok_or(Problem::End)?;
    if token == Token::Open {
        let mut list = Vec::new();
        loop {
            list.push(lexer.name()?);
            match lexer.next()?.ok_or(Problem::End)? {
                Token::Comma => {}
                Token::Close => break,
                _ => return Err(syntax("expected `,` or `)` in the column list")),
            }
        }
        columns = Some(list);
        token = lexer.next()?.ok_or(Problem::End)?;
    }
    if matches!(&token, Token::Word(w) if w.eq_ignore_ascii_case("settings")) {
        loop {
            let key = lexer.name()?;
            if lexer.next()?.ok_or(Problem::End)? != Token::Equals {
                return Err(syntax(format!("expected `=` after the setting {}", super::exception::shown(&key))));
            }
            let value = match lexer.next()?.ok_or(Problem::End)? {
                Token::Word(w) | Token::Literal(w) => w,
                _ => return Err(syntax(format!("expected a value for the setting {}", super::exception::shown(&key)))),
            };
            settings.push((key, value));
            token = lexer.next()?.ok_or(Problem::End)?;
            if token != Token::Comma {
                break;
            }
        }
    }
    match token {
        Token::Word(w) if w.eq_ignore_ascii_case("format") => {
            // A name that reaches the end of what was read may go on (see `more_may_follow`).
            let format = lexer.name()?;
            // ClickHouse starts the data after the whitespace that follows the format's name;
            // whitespace or a comment up to the end of what was read may go on.
            lexer.skip_blank();
            if lexer.pos == lexer.text.len() && !whole {
                return Err(Problem::End);
            }
            Ok(Insert { database, table, columns, settings, format })
        }
        Token::Word(w) if w.eq_ignore_ascii_case("values") => {
            Err(syntax("INSERT … VALUES is not accepted: send the rows with FORMAT JSONEachRow"))
        }
        Token::Word(w) if w.eq_ignore_ascii_case("select") || w.eq_ignore_ascii_case("with") => {
            Err(syntax("INSERT … SELECT is not accepted: buffergate writes the rows it is sent"))
        }
        _ => Err(syntax("expected FORMAT <name> after the table (send the rows with FORMAT JSONEachRow)")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A bare, back-quoted or double-quoted identifier or keyword, unquoted.
    Word(String),
    /// A number or a single-quoted string, unquoted.
    Literal(String),
    Dot,
    Comma,
    Open,
    Close,
    Equals,
}

struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
    /// The text is all there is: a word that reaches its end is complete.
    whole: bool,
}

impl Lexer<'_> {
    /// Skips whitespace and comments.
    fn skip_blank(&mut self) {
        loop {
            while self.pos < self.text.len() && self.text[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.text[self.pos..].starts_with(b"--") {
                while self.pos < self.text.len() && self.text[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if self.text[self.pos..].starts_with(b"/*") {
                match self.text[self.pos + 2..].windows(2).position(|w| w == b"*/") {
                    Some(end) => self.pos += 2 + end + 2,
                    None => self.pos = self.text.len(),
                }
            } else {
                return;
            }
        }
    }

    /// The next token; `None` at the end of the text.
    fn next(&mut self) -> Result<Option<Token>, Problem> {
        self.skip_blank();
        let Some(&c) = self.text.get(self.pos) else { return Ok(None) };
        let single = match c {
            b'.' => Some(Token::Dot),
            b',' => Some(Token::Comma),
            b'(' => Some(Token::Open),
            b')' => Some(Token::Close),
            b'=' => Some(Token::Equals),
            _ => None,
        };
        if let Some(token) = single {
            self.pos += 1;
            return Ok(Some(token));
        }
        match c {
            b'`' | b'"' => self.quoted(c).map(|w| Some(Token::Word(w))),
            b'\'' => self.quoted(c).map(|w| Some(Token::Literal(w))),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self.text.get(self.pos).is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_') {
                    self.pos += 1;
                }
                self.more_may_follow()?;
                Ok(Some(Token::Word(String::from_utf8_lossy(&self.text[start..self.pos]).into_owned())))
            }
            c if c.is_ascii_digit() || c == b'-' || c == b'+' => {
                let start = self.pos;
                self.pos += 1;
                while self.text.get(self.pos).is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'.') {
                    self.pos += 1;
                }
                self.more_may_follow()?;
                Ok(Some(Token::Literal(String::from_utf8_lossy(&self.text[start..self.pos]).into_owned())))
            }
            other => Err(syntax(format!("unexpected character {:?} in the query", char::from(other)))),
        }
    }

    /// A word or number that reaches the end of a text that is not whole may go on.
    fn more_may_follow(&self) -> Result<(), Problem> {
        if self.pos == self.text.len() && !self.whole { Err(Problem::End) } else { Ok(()) }
    }

    /// A quoted token's content, its escapes (`\x`, doubled quote) resolved.
    fn quoted(&mut self, quote: u8) -> Result<String, Problem> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.text.get(self.pos) {
                None => return Err(Problem::End),
                Some(b'\\') => {
                    let escaped = *self.text.get(self.pos + 1).ok_or(Problem::End)?;
                    out.push(match escaped {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'0' => 0,
                        other => other,
                    });
                    self.pos += 2;
                }
                Some(&c) if c == quote => {
                    if self.text.get(self.pos + 1) == Some(&quote) {
                        out.push(quote);
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                        return String::from_utf8(out).map_err(|_| syntax("a quoted name is not UTF-8"));
                    }
                }
                Some(&c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn name(&mut self) -> Result<String, Problem> {
        match self.next()?.ok_or(Problem::End)? {
            Token::Word(w) => Ok(w),
            _ => Err(syntax("expected a name")),
        }
    }

    /// Whether a name comes next (without taking it).
    fn peek_name(&mut self) -> Result<bool, Problem> {
        let at = self.pos;
        let next = self.next()?;
        self.pos = at;
        Ok(matches!(next, Some(Token::Word(_))))
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), Problem> {
        match self.next()?.ok_or(Problem::End)? {
            Token::Word(w) if w.eq_ignore_ascii_case(keyword) => Ok(()),
            _ => Err(syntax(format!("expected {keyword}"))),
        }
    }

    /// Takes `token` if it comes next.
    fn eat(&mut self, token: &Token) -> Result<bool, Problem> {
        let at = self.pos;
        match self.next()? {
            Some(t) if &t == token => Ok(true),
            _ => {
                self.pos = at;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(text: &str) -> (Insert, usize) {
        match read(text.as_bytes(), true).unwrap() {
            Read::Complete(Statement::Insert(insert), at) => (insert, at),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inserts_as_clients_send_them() {
        let (i, at) = insert("INSERT INTO events FORMAT JSONEachRow\n{\"a\":1}\n");
        assert_eq!((i.database, i.table.as_str(), i.format.as_str(), i.columns), (None, "events", "JSONEachRow", None));
        assert_eq!(at, "INSERT INTO events FORMAT JSONEachRow\n".len());
        let (i, _) = insert(
            "insert into table `analytics`.\"events\" (`a`, b) SETTINGS async_insert=1, x = 'y' format JSONEachRow ",
        );
        assert_eq!(i.database.as_deref(), Some("analytics"));
        assert_eq!(i.table, "events");
        assert_eq!(i.columns, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(i.settings, vec![("async_insert".into(), "1".into()), ("x".into(), "y".into())]);
        let (i, _) = insert("INSERT INTO `we``ird` -- comment\n FORMAT JSONEachRow");
        assert_eq!(i.table, "we`ird");
    }

    #[test]
    fn a_statement_cut_short_asks_for_more() {
        for cut in ["INSERT INTO t FORMAT JSONEach", "INSERT INTO t (a, ", "INSERT INTO `t", "INS", "  "] {
            assert_eq!(read(cut.as_bytes(), false), Ok(Read::Incomplete), "{cut}");
        }
        assert!(read(b"INSERT INTO t", true).is_err());
    }

    /// However the body is cut into frames, the statement and the data start are the same.
    #[test]
    fn any_cut_of_the_body_reads_alike() {
        let body = "INSERT INTO t -- a comment\n (a) /* another */ FORMAT JSONEachRow -- rows follow\n{\"a\":1}\n";
        let expected = read(body.as_bytes(), true).unwrap();
        for cut in 0..body.len() {
            match read(&body.as_bytes()[..cut], false).unwrap() {
                Read::Incomplete => {}
                complete => assert_eq!(complete, expected, "cut at {cut}: {:?}", &body[..cut]),
            }
        }
        let Read::Complete(_, at) = expected else { panic!() };
        assert_eq!(&body[at..], "{\"a\":1}\n");
    }

    #[test]
    fn what_is_refused() {
        for text in [
            "INSERT INTO t VALUES (1)",
            "INSERT INTO t SELECT 1",
            "INSERT INTO t",
            "INSERT INTO FUNCTION file('x') FORMAT CSV",
            "DROP TABLE t",
            "ALTER TABLE t DELETE WHERE 1",
            "",
        ] {
            assert!(read(text.as_bytes(), true).is_err(), "{text}");
        }
    }

    #[test]
    fn queries_are_normalised() {
        let read = |text: &str| match read(text.as_bytes(), true).unwrap() {
            Read::Complete(Statement::Query { text, format }, _) => (text, format),
            other => panic!("{other:?}"),
        };
        assert_eq!(read("SELECT version(), timezone()"), ("select version(), timezone()".into(), None));
        assert_eq!(
            read("SELECT name, value, readonly FROM system.settings LIMIT 10000\n FORMAT Native"),
            ("select name, value, readonly from system.settings limit 10000".into(), Some("Native".into()))
        );
        assert_eq!(read("select  1;"), ("select 1".into(), None));
    }
}
