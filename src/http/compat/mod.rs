//! ClickHouse's HTTP interface, as far as producers use it, so that a ClickHouse client or a
//! clickhouse-bulk user switches to the gateway by changing a URL: `INSERT INTO <table> …
//! FORMAT JSONEachRow` (the statement in the `query` parameter or at the start of the body),
//! `GET /ping`, and the read-only queries clients send when they connect (`answers`).
//!
//! A request goes, inside the body drain, to [`handle`], which decodes the URL's parameters
//! once, then through [`restated`], which words any refusal made within as ClickHouse would;
//! [`resolve`], which checks the key (as ClickHouse clients send a password), reads the
//! statement, answers a query, or resolves the INSERT's table to its stream; then the same
//! shed gate, limits and timeout as `/v1/events`; then [`insert`], which hands the rows to the
//! stream's ingestion path read as ClickHouse reads them, all or nothing.

pub mod answers;
pub mod exception;
pub mod statement;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;

use super::body;
use super::error::Refused;
use super::shed::{self, Divert, Guard};
use super::state::AppState;
use crate::auth::{Caller, Denied};
use crate::config::UnknownFields;
use crate::decode::Format;
use crate::ingest::{self, Answer, Delivery, Wait};
use crate::schema::Dialect;
use crate::schema::types::is_utc;
use crate::streams::{Stream, Streams};
use exception::Exception;
use statement::{Insert, Read, Statement};

/// The ClickHouse version the gateway reports (`SELECT version()`, error texts). Clients turn
/// features on by the server's version; the gateway answers as this release's HTTP interface
/// does (error text and code header, `X-ClickHouse-Summary` with values as strings,
/// `system.settings` with a `readonly` column), whatever release its own ClickHouse runs.
pub const VERSION: &str = "24.8.1.1";

/// The request's URL parameters, in order.
type Params = Vec<(String, String)>;

/// URL parameters that are part of the HTTP interface rather than settings.
const TRANSPORT: [&str; 16] = [
    "query",
    "database",
    "user",
    "password",
    "query_id",
    "session_id",
    "session_timeout",
    "session_check",
    "default_format",
    "compress",
    "decompress",
    "buffer_size",
    "wait_end_of_query",
    "client_protocol_version",
    "quota_key",
    "role",
];

/// An INSERT [`resolve`] resolved, for [`insert`].
#[derive(Debug)]
struct Resolved {
    insert: Insert,
    params: Arc<Params>,
}

fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn params_of(request: &Request) -> Params {
    Query::<Params>::try_from_uri(request.uri()).map(|Query(p)| p).unwrap_or_default()
}

/// The ClickHouse protocol's requests, once the drain holds their body: [`restated`],
/// [`resolve`], the guard ([`shed::guarded`]) and [`insert`], in that order. One function
/// rather than a layer each: a `from_fn` layer costs a boxed future and a cloned service per
/// request.
pub async fn handle(state: &AppState, guard: &Guard, request: Request) -> Response {
    let params = Arc::new(params_of(&request));
    let query_id = param(&params, "query_id").and_then(|id| HeaderValue::from_str(exception::shown(id)).ok());
    restated(query_id, async move {
        match resolve(state, params, request).await {
            Ok(Routed::Answer(response)) => response,
            Ok(Routed::Insert { request, stream, resolved }) => {
                shed::guarded(guard, &stream, request, |request| insert(state, &stream, &resolved, request)).await
            }
            Err(exception) => exception.into_response(),
        }
    })
    .await
}

/// Words a refusal made within (`ApiError`) as ClickHouse would, and echoes the request's
/// `query_id` on every answer, as ClickHouse does.
async fn restated(query_id: Option<HeaderValue>, within: impl Future<Output = Response>) -> Response {
    let response = within.await;
    let mut response = match response.extensions().get::<Refused>() {
        Some(Refused(error)) => Exception::from((**error).clone()).into_response(),
        None => response,
    };
    if let Some(id) = query_id {
        response.headers_mut().insert("x-clickhouse-query-id", id);
    }
    response
}

/// The caller, from the API key as ClickHouse clients send a password (see
/// [`presented_key`]). The user name is not checked: a key alone says who the caller is.
fn caller(state: &AppState, headers: &HeaderMap, params: &Params) -> Result<Option<Caller>, Exception> {
    let key = presented_key(headers, params);
    state.api_keys.check(key.as_deref()).map_err(|denied| match denied {
        Denied::Missing | Denied::Unknown => super::error::ApiError::Unauthorized.into(),
        Denied::RateLimited(retry_after_s) => super::error::ApiError::RateLimited { retry_after_s }.into(),
    })
}

/// `X-ClickHouse-Key`, else a key in `Authorization` (bearer, or basic's password), else the
/// `password` parameter.
fn presented_key(headers: &HeaderMap, params: &Params) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    if let Some(key) = header("x-clickhouse-key") {
        return Some(key.to_string());
    }
    if let Some(key) = header(header::AUTHORIZATION.as_str()).and_then(authorization_key) {
        return Some(key);
    }
    param(params, "password").filter(|p| !p.is_empty()).map(str::to_string)
}

/// The key in an `Authorization` header: a bearer token, or the password of basic
/// authentication.
fn authorization_key(authorization: &str) -> Option<String> {
    if let Some(token) = crate::auth::bearer(Some(authorization)) {
        return Some(token.to_string());
    }
    let (scheme, encoded) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_user, password) = text.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// `GET /ping`, as ClickHouse answers it.
pub async fn ping() -> &'static str {
    "Ok.\n"
}

/// What [`resolve`] made of a request.
enum Routed {
    Answer(Response),
    /// An INSERT into `stream`, the request's body past its statement.
    Insert {
        request: Request,
        stream: Arc<Stream>,
        resolved: Box<Resolved>,
    },
}

/// Checks the caller's key, then reads the request's statement: answers a query, or resolves
/// an INSERT's table to its stream, with the statement taken off the request's body.
async fn resolve(state: &AppState, params: Arc<Params>, request: Request) -> Result<Routed, Exception> {
    let (mut parts, body) = request.into_parts();
    if let Some(caller) = caller(state, &parts.headers, &params)? {
        parts.extensions.insert(caller);
    }
    let timeout = Duration::from_millis(state.config.http.body_timeout_ms);
    let (statement, body) = match param(&params, "query").filter(|q| !q.trim().is_empty()) {
        Some(query) => match statement::read(query.as_bytes(), true).map_err(|e| Exception::syntax(e.0))? {
            Read::Complete(statement, data_at) => {
                // Rows in the parameter come before the body's, a line apart, as ClickHouse
                // joins them.
                let rows = &query.as_bytes()[data_at..];
                let rest = if rows.iter().all(u8::is_ascii_whitespace) {
                    Bytes::new()
                } else if body::encoding_of(&parts.headers).is_ok_and(|e| e != crate::decode::Encoding::Identity) {
                    return Err(Exception::bad_arguments(
                        "rows in the query parameter cannot precede a compressed body: send them all in the body",
                    ));
                } else {
                    Bytes::from([rows, b"\n"].concat())
                };
                (statement, Prefixed::new(rest, body))
            }
            Read::Incomplete => return Err(Exception::syntax("the query ends before its FORMAT clause")),
        },
        None if parts.method == axum::http::Method::GET => {
            return Ok(Routed::Answer((StatusCode::OK, "Ok.\n").into_response()));
        }
        None => {
            if body::encoding_of(&parts.headers).is_ok_and(|e| e != crate::decode::Encoding::Identity) {
                return Err(Exception::bad_arguments(
                    "a compressed body cannot carry the statement: send it in the query parameter",
                ));
            }
            statement_from_body(body, timeout).await?
        }
    };
    let insert = match statement {
        Statement::Query { text, format } => {
            let format = format.or_else(|| param(&params, "default_format").map(str::to_string));
            let timezone = state.streams.default_stream().ingest.health().clickhouse_timezone();
            let timezone = timezone.as_deref().unwrap_or("UTC");
            return answers::answer(&text, format.as_deref().unwrap_or("TabSeparated"), timezone).map(Routed::Answer);
        }
        Statement::Insert(_) if parts.method == axum::http::Method::GET => {
            return Err(Exception::readonly("an INSERT is sent with POST: GET is read-only, as in ClickHouse"));
        }
        Statement::Insert(insert) => insert,
    };
    if format_of(&insert.format).is_none() {
        return Err(Exception::unknown_format(&insert.format));
    }
    if param(&params, "decompress").is_some_and(|v| v == "1") {
        return Err(Exception::not_implemented(
            "bodies in ClickHouse's own compression (decompress=1) are not read: send gzip or zstd with Content-Encoding",
        ));
    }
    let database = insert
        .database
        .as_deref()
        .or_else(|| param(&params, "database"))
        .or_else(|| parts.headers.get("x-clickhouse-database").and_then(|v| v.to_str().ok()));
    let stream = stream_of(&state.streams, database, &insert.table)?;
    if let Some(caller) = parts.extensions.get::<Caller>()
        && !caller.may_write(stream.name.as_str())
    {
        return Err(super::error::ApiError::StreamForbidden(stream.name.to_string()).into());
    }
    let request = Request::from_parts(parts, Body::new(body));
    Ok(Routed::Insert { request, stream: Arc::clone(stream), resolved: Box::new(Resolved { insert, params }) })
}

/// How the rows of an INSERT in `format` are read, if the gateway reads that format.
fn format_of(format: &str) -> Option<Format> {
    if format.eq_ignore_ascii_case("JSONEachRow") {
        Some(Format::JsonEachRow)
    } else if format.eq_ignore_ascii_case("JSONCompactEachRow") {
        Some(Format::JsonCompactEachRow)
    } else {
        None
    }
}

/// The stream whose destination or Buffer table an INSERT names. Without a database, the one
/// stream that has a table of that name (several: the database must be named).
fn stream_of<'s>(streams: &'s Streams, database: Option<&str>, table: &str) -> Result<&'s Arc<Stream>, Exception> {
    let names = |s: &Stream| s.config.table.destination_table == table || s.config.table.buffer_table == table;
    let mut found = streams.iter().filter(|s| names(s) && database.is_none_or(|db| s.config.table.database == db));
    let shown = match database {
        Some(db) => format!("{db}.{table}"),
        None => table.to_string(),
    };
    let first = found.next().ok_or_else(|| Exception::unknown_table(&shown))?;
    if found.next().is_some() {
        return Err(Exception::bad_arguments(format!(
            "several streams have a table named {table}: name its database (`database` or db.{table})"
        )));
    }
    Ok(first)
}

/// Reads a body until the statement at its start is complete: the statement, and a body that
/// holds what follows it.
async fn statement_from_body(mut body: Body, timeout: Duration) -> Result<(Statement, Prefixed), Exception> {
    let mut head = BytesMut::new();
    let read = async {
        // The statement is read again from its start only when a frame brings a line break or
        // the text has doubled since the last reading: a body sent a byte at a time costs
        // linear time, not quadratic.
        let mut read_at = 0usize;
        loop {
            let frame = body.frame().await;
            let (ended, line) = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        head.extend_from_slice(&data);
                        (false, data.contains(&b'\n'))
                    }
                    Err(_) => (false, false),
                },
                Some(Err(e)) => return Err(Exception::from(super::error::ApiError::BodyRead(e.to_string()))),
                None => (true, false),
            };
            let full = head.len() >= statement::MAX_STATEMENT_BYTES;
            if !(ended || line || full || head.len() >= read_at * 2) {
                continue;
            }
            read_at = head.len();
            let window = &head[..head.len().min(statement::MAX_STATEMENT_BYTES)];
            match statement::read(window, ended).map_err(|e| Exception::syntax(e.0))? {
                Read::Complete(statement, data_at) => return Ok((statement, data_at)),
                Read::Incomplete if ended || full => {
                    return Err(Exception::syntax(format!(
                        "no complete statement in the first {} bytes of the body",
                        statement::MAX_STATEMENT_BYTES
                    )));
                }
                Read::Incomplete => {}
            }
        }
    };
    let after_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let (statement, data_at) = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Exception::from(super::error::ApiError::BodyTimeout { after_ms }))??;
    let rest = head.freeze().slice(data_at..);
    Ok((statement, Prefixed::new(rest, body)))
}

/// A body whose first bytes were already read: those bytes, then the rest.
struct Prefixed {
    head: Option<Bytes>,
    rest: Body,
}

impl Prefixed {
    fn new(head: Bytes, rest: Body) -> Self {
        Self { head: (!head.is_empty()).then_some(head), rest }
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// What an INSERT's settings (URL parameters and its SETTINGS clause) ask of the gateway.
#[derive(Debug, PartialEq, Eq)]
struct Asked {
    wait: Wait,
    unknown_fields: Option<UnknownFields>,
    /// `insert_deduplication_token`: the request's idempotency key.
    token: Option<String>,
}

/// Reads the honoured settings; every other one is accepted and ignored.
fn asked(params: &Params, insert: &Insert) -> Result<Asked, Exception> {
    let settings = params
        .iter()
        .filter(|(k, _)| !TRANSPORT.contains(&k.as_str()))
        .chain(insert.settings.iter())
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let flag = |name: &str, value: &str| match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(Exception::bad_arguments(format!("the setting {name} takes 0 or 1, not {value:?}"))),
    };
    let (mut async_insert, mut wait_async, mut unknown_fields, mut token) = (false, true, None, None);
    for (name, value) in settings {
        match name {
            "async_insert" => async_insert = flag(name, value)?,
            "wait_for_async_insert" => wait_async = flag(name, value)?,
            "input_format_skip_unknown_fields" => {
                unknown_fields = Some(if flag(name, value)? { UnknownFields::Ignore } else { UnknownFields::Reject });
            }
            "insert_deduplication_token" if (1..=255).contains(&value.len()) => token = Some(value.to_string()),
            "insert_deduplication_token" if value.is_empty() => token = None,
            "insert_deduplication_token" => {
                return Err(Exception::bad_arguments("insert_deduplication_token must be 1 to 255 bytes"));
            }
            _ => {}
        }
    }
    let wait = if async_insert && !wait_async { Wait::Queued } else { Wait::Written };
    Ok(Asked { wait, unknown_fields, token })
}

/// The INSERT itself: its rows through the stream's ingestion path, read as ClickHouse reads
/// them, all or nothing.
async fn insert(state: &AppState, stream: &Stream, resolved: &Resolved, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let owner = parts.extensions.get::<Caller>().map(|caller| Arc::clone(&caller.name));
    let divert = parts.extensions.get::<Divert>().is_some();
    // Boxed for the reason `events::ingest` boxes its own: the futures that wrap it would copy it.
    match Box::pin(run(state, stream, resolved, owner, divert, &parts.headers, body)).await {
        Ok(written) => summary(written, started),
        Err(exception) => exception.into_response(),
    }
}

async fn run(
    state: &AppState,
    stream: &Stream,
    resolved: &Resolved,
    owner: Option<Arc<str>>,
    divert: bool,
    headers: &HeaderMap,
    body: Body,
) -> Result<usize, Exception> {
    let Resolved { insert, params } = resolved;
    let asked = asked(params, insert)?;
    let encoding = body::encoding_of(headers).map_err(Exception::from)?;
    let limit = state.config.http.max_body_bytes;
    let timeout = Duration::from_millis(state.config.http.body_timeout_ms);
    // Until the server said its time zone, a time without an offset cannot be read as it would.
    let timezone = stream.ingest.health().clickhouse_timezone().ok_or_else(Exception::timezone_unknown)?;
    let naive_utc = is_utc(&timezone);
    let request = ingest::Request {
        body: Box::pin(async move { body::read_limited(headers, body, limit, timeout).await.map_err(Exception::from) }),
        announced: content_length(headers).unwrap_or(limit).min(limit),
        format: format_of(&insert.format).unwrap_or(Format::JsonEachRow),
        encoding,
        ids: None,
        received: None,
        key: asked.token,
        owner,
        delivery: Delivery { wait: asked.wait, divert, producer: None },
        replayed: false,
        before_write: None,
        reading: ingest::Reading {
            dialect: Dialect::ClickHouse { naive_utc },
            columns: insert.columns.clone(),
            // ClickHouse skips fields its table lacks (`input_format_skip_unknown_fields`,
            // on by default since 23.x): producers switching from it must not start failing.
            unknown_fields: Some(asked.unknown_fields.unwrap_or(UnknownFields::Ignore)),
            whole: true,
            from_quarantine: false,
        },
    };
    match stream.ingest.run::<Exception>(request).await? {
        Answer::Delivered(delivered) => Ok(delivered.response.accepted),
        // The rows of an earlier INSERT with this token: as many as that one wrote.
        Answer::Replayed { body, .. } => Ok(serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("accepted").and_then(serde_json::Value::as_u64))
            .map_or(0, |n| usize::try_from(n).unwrap_or(0))),
    }
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// 200 with an empty body and `X-ClickHouse-Summary`, as ClickHouse answers an INSERT.
fn summary(written: usize, started: Instant) -> Response {
    let summary = format!(
        r#"{{"read_rows":"0","read_bytes":"0","written_rows":"{written}","written_bytes":"0","total_rows_to_read":"0","result_rows":"{written}","result_bytes":"0","elapsed_ns":"{}"}}"#,
        started.elapsed().as_nanos()
    );
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=UTF-8"));
    if let Ok(value) = HeaderValue::try_from(summary) {
        headers.insert("x-clickhouse-summary", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_with(settings: &[(&str, &str)]) -> Insert {
        Insert {
            database: None,
            table: "t".into(),
            columns: None,
            settings: settings.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
            format: "JSONEachRow".into(),
        }
    }

    #[test]
    fn settings_that_are_honoured() {
        let params: Params = vec![("async_insert".into(), "1".into()), ("query_id".into(), "q".into())];
        let plain = asked(&vec![], &insert_with(&[])).unwrap();
        assert_eq!(plain, Asked { wait: Wait::Written, unknown_fields: None, token: None });
        let fire = asked(&params, &insert_with(&[("wait_for_async_insert", "0")])).unwrap();
        assert_eq!(fire.wait, Wait::Queued);
        let strict = asked(&vec![], &insert_with(&[("input_format_skip_unknown_fields", "0")])).unwrap();
        assert_eq!(strict.unknown_fields, Some(UnknownFields::Reject));
        let token = asked(&vec![("insert_deduplication_token".into(), "abc".into())], &insert_with(&[])).unwrap();
        assert_eq!(token.token.as_deref(), Some("abc"));
        assert_eq!(asked(&vec![], &insert_with(&[("async_insert", "maybe")])).unwrap_err().code, 36);
        // Unknown settings are accepted and ignored.
        assert!(asked(&vec![("max_threads".into(), "8".into())], &insert_with(&[("x", "y")])).is_ok());
    }

    #[test]
    fn keys_as_clickhouse_clients_send_them() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_key(&headers, &vec![("password".into(), "p".into())]).as_deref(), Some("p"));
        headers.insert(header::AUTHORIZATION, "Basic Ym9iOmsx".parse().unwrap());
        assert_eq!(presented_key(&headers, &vec![]).as_deref(), Some("k1"));
        headers.insert("x-clickhouse-key", "k2".parse().unwrap());
        assert_eq!(presented_key(&headers, &vec![]).as_deref(), Some("k2"));
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(presented_key(&bearer, &vec![]).as_deref(), Some("tok"));
    }
}
