//! The ClickHouse protocol's error type: every refusal as a ClickHouse server words it
//! (`Code: N. DB::Exception: <message>. (NAME) (version V)`, the code also in
//! `X-ClickHouse-Exception-Code`, the HTTP status ClickHouse gives that code), so that a
//! client shows it as it shows a server's own. The gateway's own refusals map here, each to
//! the ClickHouse code that means the same to a client: retry (503 with `Retry-After`), fix
//! the request (4xx), or give up.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::VERSION;
use crate::decode::DecodeError;
use crate::http::error::ApiError;
use crate::ingest::IngestError;
use crate::schema::{UNKNOWN_FIELD, UNLISTED_FIELD};

/// Seconds a client is told to wait before retrying when nothing better is known.
const RETRY_AFTER_SECONDS: u32 = 1;

/// Bytes of a name from a request (a table, a format, a setting) echoed in a refusal.
const ECHO_BYTES: usize = 64;

/// `text` cut to [`ECHO_BYTES`] on a character boundary.
pub fn shown(text: &str) -> &str {
    let mut end = text.len().min(ECHO_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A refusal in ClickHouse's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    pub code: u16,
    /// ClickHouse's name for the code (`UNKNOWN_TABLE`).
    pub name: &'static str,
    pub message: String,
    pub status: StatusCode,
    pub retry_after_s: Option<u32>,
}

impl Exception {
    fn new(code: u16, name: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Self { code, name, message: message.into(), status, retry_after_s: None }
    }

    pub fn syntax(message: impl Into<String>) -> Self {
        Self::new(62, "SYNTAX_ERROR", StatusCode::BAD_REQUEST, message)
    }

    pub fn unknown_table(table: &str) -> Self {
        Self::new(
            60,
            "UNKNOWN_TABLE",
            StatusCode::NOT_FOUND,
            format!(
                "Table {} is not a stream of this gateway (buffergate writes only its streams' tables)",
                shown(table)
            ),
        )
    }

    pub fn readonly(message: impl Into<String>) -> Self {
        Self::new(164, "READONLY", StatusCode::FORBIDDEN, message)
    }

    pub fn unknown_format(format: &str) -> Self {
        Self::new(
            73,
            "UNKNOWN_FORMAT",
            StatusCode::NOT_FOUND,
            format!(
                "buffergate reads the rows of an INSERT in JSONEachRow or JSONCompactEachRow, not {}",
                shown(format)
            ),
        )
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(48, "NOT_IMPLEMENTED", StatusCode::NOT_IMPLEMENTED, message)
    }

    pub fn bad_arguments(message: impl Into<String>) -> Self {
        Self::new(36, "BAD_ARGUMENTS", StatusCode::BAD_REQUEST, message)
    }

    /// A refusal to retry once the server's time zone is known.
    pub fn timezone_unknown() -> Self {
        Self::retry(
            210,
            "NETWORK_ERROR",
            "the ClickHouse server's time zone is not known yet (it has not answered); retry later".into(),
            RETRY_AFTER_SECONDS,
        )
    }

    fn retry(code: u16, name: &'static str, message: String, retry_after_s: u32) -> Self {
        Self { retry_after_s: Some(retry_after_s), ..Self::new(code, name, StatusCode::SERVICE_UNAVAILABLE, message) }
    }

    /// The body ClickHouse would send.
    pub fn text(&self) -> String {
        // The message is one line: clients match the whole text with a pattern.
        let message = self.message.replace(['\n', '\r'], " ");
        format!("Code: {}. DB::Exception: {}. ({}) (version {VERSION})\n", self.code, message, self.name)
    }
}

impl From<ApiError> for Exception {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        let retry_after = error.retry_after_s().unwrap_or(RETRY_AFTER_SECONDS);
        let retry = |code, name| Self::retry(code, name, message.clone(), retry_after);
        match error {
            ApiError::Decode(error) => IngestError::Decode(error).into(),
            ApiError::UnsupportedMediaType(_) | ApiError::UnsupportedEncoding(_) | ApiError::BadHeader(_) => {
                Self::bad_arguments(message)
            }
            ApiError::BadQuery(_) | ApiError::BadPath(_) => Self::bad_arguments(message),
            ApiError::BodyTooLarge { .. } => Self::new(307, "TOO_MANY_BYTES", StatusCode::PAYLOAD_TOO_LARGE, message),
            ApiError::BodyRead(_) => Self::new(33, "CANNOT_READ_ALL_DATA", StatusCode::BAD_REQUEST, message),
            // 408, as on `/v1/events`: a client too slow to send is not waited for again.
            ApiError::BodyTimeout { .. } => Self::new(33, "CANNOT_READ_ALL_DATA", StatusCode::REQUEST_TIMEOUT, message),
            // ClickHouse's own "inserting faster than it can merge": what clients and operators
            // already read as "slow down".
            ApiError::BufferSaturated { .. } | ApiError::ShardSaturated { .. } => retry(252, "TOO_MANY_PARTS"),
            ApiError::Overloaded(_) | ApiError::QueueFull(_) | ApiError::RequestInFlight | ApiError::EventsInFlight => {
                retry(202, "TOO_MANY_SIMULTANEOUS_QUERIES")
            }
            ApiError::NotReady(_)
            | ApiError::BufferUnknown { .. }
            | ApiError::FlushFailed(_)
            | ApiError::CircuitOpen
            | ApiError::StoreUnavailable(_)
            | ApiError::QuarantineUnavailable(_) => retry(210, "NETWORK_ERROR"),
            ApiError::ShuttingDown => retry(394, "QUERY_WAS_CANCELLED"),
            ApiError::JournalFull | ApiError::JournalFailed => retry(243, "NOT_ENOUGH_SPACE"),
            // The INSERT's fate is not known: ClickHouse's own code for exactly that.
            ApiError::RequestTimeout => retry(319, "UNKNOWN_STATUS_OF_INSERT"),
            ApiError::IdempotencyKeyReused => Self::bad_arguments(
                "this insert_deduplication_token was used for an INSERT with different rows".to_string(),
            ),
            ApiError::Unauthorized | ApiError::Forbidden => Self::new(
                516,
                "AUTHENTICATION_FAILED",
                StatusCode::UNAUTHORIZED,
                "Authentication failed: send an API key of this gateway as the password (or X-ClickHouse-Key)",
            ),
            ApiError::RateLimited { retry_after_s } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(201, "QUOTA_EXCEEDED", StatusCode::TOO_MANY_REQUESTS, message)
            },
            ApiError::StreamForbidden(stream) => Self::new(
                497,
                "ACCESS_DENIED",
                StatusCode::FORBIDDEN,
                format!("this API key may not write to the stream {stream:?}"),
            ),
            ApiError::UnknownStream(_) | ApiError::NotFound => Self::unknown_table("(none)"),
            // Admin answers: never reached through the ClickHouse protocol.
            ApiError::MethodNotAllowed | ApiError::ReplayRunning | ApiError::ReplayFailed(_) => {
                Self::not_implemented(message)
            }
            ApiError::Internal(_) => Self::new(1002, "UNKNOWN_EXCEPTION", StatusCode::INTERNAL_SERVER_ERROR, message),
        }
    }
}

impl From<IngestError> for Exception {
    fn from(error: IngestError) -> Self {
        let message = error.to_string();
        match error {
            IngestError::Decode(DecodeError::MalformedJson { line, column, reason }) => Self::new(
                117,
                "INCORRECT_DATA",
                StatusCode::BAD_REQUEST,
                format!("Cannot parse JSON object here: {reason} (at row {line}, column {column})"),
            ),
            IngestError::Decode(DecodeError::TooManyEvents { limit }) => Self::new(
                158,
                "TOO_MANY_ROWS",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than {limit} rows in one INSERT"),
            ),
            IngestError::Decode(DecodeError::DecompressedTooLarge { .. }) => {
                Self::new(307, "TOO_MANY_BYTES", StatusCode::PAYLOAD_TOO_LARGE, message)
            }
            IngestError::Decode(DecodeError::BadEncoding(_)) => {
                Self::new(354, "CANNOT_DECOMPRESS", StatusCode::BAD_REQUEST, message)
            }
            // ClickHouse counts rows from 1.
            IngestError::Refused { index, field, error }
                if field.is_some() && (error == UNKNOWN_FIELD || error == UNLISTED_FIELD) =>
            {
                Self::new(
                    117,
                    "INCORRECT_DATA",
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Unknown field found while parsing JSONEachRow format: {} (at row {}); nothing of this INSERT was written",
                        field.unwrap_or_default(),
                        index + 1
                    ),
                )
            }
            IngestError::Refused { index, field, error } => Self::new(
                27,
                "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
                StatusCode::BAD_REQUEST,
                format!(
                    "{error}{}: (at row {}); nothing of this INSERT was written",
                    field.map(|f| format!(": (while reading the value of key {f})")).unwrap_or_default(),
                    index + 1
                ),
            ),
            IngestError::NoSuchColumn(column) => Self::new(
                16,
                "NO_SUCH_COLUMN_IN_TABLE",
                StatusCode::BAD_REQUEST,
                format!("No such column {} in table", shown(&column)),
            ),
            IngestError::DuplicateColumn(column) => Self::new(
                15,
                "DUPLICATE_COLUMN",
                StatusCode::BAD_REQUEST,
                format!("Column {} specified more than once", shown(&column)),
            ),
            IngestError::VisibleNeedsJournal => Self::bad_arguments(message),
            other => ApiError::from(other).into(),
        }
    }
}

impl IntoResponse for Exception {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.text()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=UTF-8"));
        headers.insert("x-clickhouse-exception-code", HeaderValue::from(self.code));
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern `@clickhouse/client` reads a server's error with (its `parseError`).
    fn client_parses(text: &str) -> Option<(String, String)> {
        let rest = text.strip_prefix("Code: ")?;
        let (code, rest) = rest.split_once(". DB::Exception: ")?;
        let open = rest.rfind(". (")?;
        let name = rest[open + 3..].split_once(')')?.0;
        Some((code.to_string(), name.to_string()))
    }

    #[test]
    fn refusals_read_as_clickhouse_errors() {
        let e = Exception::unknown_table("default.nope");
        assert_eq!(client_parses(&e.text()), Some(("60".into(), "UNKNOWN_TABLE".into())));
        let e: Exception = ApiError::BufferSaturated { retry_after_s: 3 }.into();
        assert_eq!((e.code, e.status, e.retry_after_s), (252, StatusCode::SERVICE_UNAVAILABLE, Some(3)));
        let e: Exception =
            IngestError::Refused { index: 2, field: Some("ts".into()), error: "bad\ntime".into() }.into();
        assert_eq!(e.code, 27);
        assert!(e.text().contains("(at row 3)") && !e.text().trim_end().contains('\n'), "{}", e.text());
    }
}
