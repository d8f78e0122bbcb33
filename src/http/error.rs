//! The HTTP boundary's error type: every failure of a request maps to one status and one JSON
//! body `{"error": "<code>", "message": "..."}` here, and nowhere else.

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::decode::DecodeError;
use crate::ingest::IngestError;

/// Seconds a producer is told to wait before retrying a 503 when nothing better is known.
const RETRY_AFTER_SECONDS: u32 = 1;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("Content-Type {0:?} is not accepted; send application/json (an array of events) or application/x-ndjson")]
    UnsupportedMediaType(String),
    #[error("Content-Encoding {0:?} is not accepted; send gzip, zstd or identity")]
    UnsupportedEncoding(String),
    #[error("the request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The body as a whole cannot be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("invalid query string: {0}")]
    BadQuery(String),
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("the request body was not received within {after_ms} ms")]
    BodyTimeout { after_ms: u64 },
    #[error("not ready: {0}")]
    NotReady(&'static str),
    #[error("{0}; retry later")]
    QueueFull(String),
    #[error("the events could not be written to ClickHouse ({0}); none of them is accepted, retry later")]
    FlushFailed(String),
    #[error("the gateway is shutting down; retry on another replica")]
    ShuttingDown,
    #[error("the ClickHouse Buffer table is saturated; retry in {retry_after_s} s")]
    BufferSaturated { retry_after_s: u32 },
    #[error("{}; nothing was written, retry in {retry_after_s} s", shard_text(*shard))]
    ShardSaturated { shard: Option<usize>, retry_after_s: u32 },
    #[error("the ClickHouse Buffer's fill is unknown (no answer from ClickHouse); retry in {retry_after_s} s")]
    BufferUnknown { retry_after_s: u32 },
    #[error("the gateway is overloaded ({0}); retry later")]
    Overloaded(&'static str),
    #[error("the request was not answered in time; its events may or may not be written")]
    RequestTimeout,
    #[error("ClickHouse INSERTs keep failing; the circuit is open, retry later")]
    CircuitOpen,
    #[error(
        "the gateway's journal is full (ClickHouse is not confirming rows fast enough); nothing was written, retry later"
    )]
    JournalFull,
    #[error(
        "the gateway's journal cannot write (its disk is full or failing); retry later or on another replica (events of this request already stored are then answered as duplicates)"
    )]
    JournalFailed,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    BadHeader(String),
    /// A path parameter out of its bounds.
    #[error("{0}")]
    BadPath(String),
    #[error("a request with this Idempotency-Key is still being processed; retry once it has been answered")]
    RequestInFlight,
    #[error("this Idempotency-Key was used for a request with a different body")]
    IdempotencyKeyReused,
    #[error("the idempotency store is unavailable ({0}); nothing was written, retry later")]
    StoreUnavailable(String),
    #[error("{0}; retry later")]
    QuarantineUnavailable(String),
    #[error("some of these events are being written by another request right now; nothing was written, retry later")]
    EventsInFlight,
    #[error("send an API key as `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("this API key is not accepted")]
    Forbidden,
    #[error("this API key is over its rate limit; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u32 },
    #[error("no such endpoint")]
    NotFound,
    #[error("no stream is named {0:?} (GET /v1/streams lists them)")]
    UnknownStream(String),
    #[error("this API key may not write to the stream {0:?}")]
    StreamForbidden(String),
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// Another replay of this gateway is running.
    #[error("a replay is already running on this gateway; wait for it to finish")]
    ReplayRunning,
    #[error("the replay stopped: {0}; what it marked replayed stays so, run it again")]
    ReplayFailed(String),
}

/// Bytes of a requested stream name echoed back in an error.
const ECHO_BYTES: usize = 64;

impl ApiError {
    /// No stream has this name: the name echoed, cut to [`ECHO_BYTES`].
    pub fn unknown_stream(name: &str) -> Self {
        let mut end = name.len().min(ECHO_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        Self::UnknownStream(name[..end].to_string())
    }
}

/// The shard a refusal is about, as the message names it (shards count from 1, as in
/// `system.clusters`).
fn shard_text(shard: Option<usize>) -> String {
    match shard {
        Some(shard) => format!(
            "shard {} of the ClickHouse cluster, which some of these events belong to, is saturated or unavailable",
            shard + 1
        ),
        None => "every shard of the ClickHouse cluster is saturated or unavailable".into(),
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Decode(error) => Self::Decode(error),
            IngestError::NotReady(why) => Self::NotReady(why),
            IngestError::ShuttingDown => Self::ShuttingDown,
            IngestError::CircuitOpen => Self::CircuitOpen,
            IngestError::Overloaded(what) => Self::Overloaded(what),
            IngestError::QueueFull(why) => Self::QueueFull(why),
            IngestError::FlushFailed(why) => Self::FlushFailed(why),
            IngestError::StoreUnavailable(why) => Self::StoreUnavailable(why),
            IngestError::QuarantineUnavailable(_) => Self::QuarantineUnavailable(error.to_string()),
            IngestError::EventsInFlight => Self::EventsInFlight,
            IngestError::RequestInFlight => Self::RequestInFlight,
            IngestError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            IngestError::JournalFull => Self::JournalFull,
            IngestError::JournalFailed => Self::JournalFailed,
            IngestError::ShardUnavailable { shard, retry_after_s } => Self::ShardSaturated { shard, retry_after_s },
            IngestError::TooManyPartitions { .. } => Self::BadHeader(format!("X-Producer-Partition: {error}")),
            IngestError::VisibleNeedsJournal
            | IngestError::Refused { .. }
            | IngestError::NoSuchColumn(_)
            | IngestError::DuplicateColumn(_) => Self::BadQuery(error.to_string()),
            IngestError::Internal(why) => Self::Internal(why),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<usize>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnsupportedMediaType(_) | Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge { .. }
            | Self::Decode(DecodeError::DecompressedTooLarge { .. } | DecodeError::TooManyEvents { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::Decode(DecodeError::MalformedJson { .. } | DecodeError::BadEncoding(_))
            | Self::BadQuery(_)
            | Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::NotReady(_)
            | Self::QueueFull(_)
            | Self::FlushFailed(_)
            | Self::ShuttingDown
            | Self::BufferSaturated { .. }
            | Self::ShardSaturated { .. }
            | Self::BufferUnknown { .. }
            | Self::Overloaded(_)
            | Self::RequestTimeout
            | Self::CircuitOpen
            | Self::JournalFull
            | Self::JournalFailed => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BadHeader(_) | Self::BadPath(_) => StatusCode::BAD_REQUEST,
            Self::RequestInFlight => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::StoreUnavailable(_) | Self::EventsInFlight | Self::QuarantineUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound | Self::UnknownStream(_) => StatusCode::NOT_FOUND,
            Self::StreamForbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ReplayRunning => StatusCode::CONFLICT,
            Self::ReplayFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UnsupportedEncoding(_) => "unsupported_encoding",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Decode(DecodeError::DecompressedTooLarge { .. }) => "decompressed_body_too_large",
            Self::Decode(DecodeError::TooManyEvents { .. }) => "too_many_events",
            Self::Decode(DecodeError::MalformedJson { .. }) => "malformed_json",
            Self::Decode(DecodeError::BadEncoding(_)) => "bad_encoding",
            Self::BadQuery(_) => "bad_query",
            Self::BodyRead(_) => "body_read_failed",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::NotReady(_) => "not_ready",
            Self::QueueFull(_) => "queue_full",
            Self::FlushFailed(_) => "flush_failed",
            Self::ShuttingDown => "shutting_down",
            Self::BufferSaturated { .. } => "buffer_saturated",
            Self::ShardSaturated { .. } => "shard_saturated",
            Self::BufferUnknown { .. } => "buffer_unknown",
            Self::Overloaded(_) => "overloaded",
            Self::RequestTimeout => "request_timeout",
            Self::CircuitOpen => "circuit_open",
            Self::JournalFull => "journal_full",
            Self::JournalFailed => "journal_failed",
            Self::Internal(_) => "internal",
            Self::BadHeader(_) => "bad_header",
            Self::BadPath(_) => "bad_path",
            Self::RequestInFlight => "request_in_flight",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::StoreUnavailable(_) => "idempotency_unavailable",
            Self::QuarantineUnavailable(_) => "quarantine_unavailable",
            Self::EventsInFlight => "events_in_flight",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::NotFound => "not_found",
            Self::UnknownStream(_) => "unknown_stream",
            Self::StreamForbidden(_) => "stream_forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::ReplayRunning => "replay_running",
            Self::ReplayFailed(_) => "replay_failed",
        }
    }
}

impl ApiError {
    /// When a refusal knows how long the client should wait.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            Self::BufferSaturated { retry_after_s }
            | Self::ShardSaturated { retry_after_s, .. }
            | Self::BufferUnknown { retry_after_s }
            | Self::RateLimited { retry_after_s } => Some(*retry_after_s),
            _ => None,
        }
    }
}

/// The error a response was made from, kept with it so that a front speaking another
/// protocol (`compat`) can restate it in that protocol's words.
#[derive(Debug, Clone)]
pub struct Refused(pub Arc<ApiError>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = self.retry_after_s();
        let (line, column) = match &self {
            Self::Decode(DecodeError::MalformedJson { line, column, .. }) => (Some(*line), Some(*column)),
            _ => (None, None),
        };
        let body = ErrorBody { error: self.code(), message: self.to_string(), line, column };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            let seconds = retry_after.unwrap_or(RETRY_AFTER_SECONDS);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(Refused(Arc::new(self)));
        response
    }
}
