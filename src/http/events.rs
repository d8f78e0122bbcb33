//! `POST /v1/events` and `POST /v1/streams/{name}/events`: the HTTP half of ingestion. Turns the headers and the body (read within
//! its limits once admitted) into an [`ingest::Request`], runs it, and answers: 200 once the events are
//! written, 202 once queued (`wait=false`), a replayed answer for a repeated
//! `Idempotency-Key`, or the error.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::body;
use super::error::ApiError;
use super::shed::Divert;
use super::state::AppState;
use crate::auth::Caller;
use crate::ingest::{self, Answer, Delivery, ProducerOffset, Wait};
use crate::streams::Stream;

#[derive(Debug, Deserialize)]
pub struct IngestParams {
    #[serde(default)]
    wait: WaitParam,
}

/// `wait=true` (200 once written), `false` (202 once journaled), `visible` (200 once in the
/// destination table).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WaitParam {
    #[default]
    True,
    False,
    Visible,
}

impl From<WaitParam> for Wait {
    fn from(param: WaitParam) -> Self {
        match param {
            WaitParam::True => Wait::Written,
            WaitParam::False => Wait::Queued,
            WaitParam::Visible => Wait::Visible,
        }
    }
}

/// Runs one admitted ingestion request of `stream` (its caller and [`Divert`] are extensions the
/// front put on it) and answers.
pub async fn ingest(state: &AppState, stream: &Stream, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let owner = parts.extensions.get::<Caller>().map(|caller| Arc::clone(&caller.name));
    let divert = parts.extensions.get::<Divert>().is_some();
    let params = Query::<IngestParams>::try_from_uri(&parts.uri);
    // Boxed once here: the ingestion sequence's future is kilobytes, and inline it was copied
    // with each future that wraps it on the way to the connection (callgrind: ~12k
    // instructions of copies per request before, about 1k since, this box included).
    match Box::pin(handle(state, stream, owner, divert, params, &parts.headers, body)).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    stream: &Stream,
    owner: Option<Arc<str>>,
    divert: bool,
    params: Result<Query<IngestParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let key = idempotency_key(headers)?;
    let producer = producer_offset(headers)?;
    let (format, encoding) = (body::format_of(headers)?, body::encoding_of(headers)?);
    let limit = state.config.http.max_body_bytes;
    let timeout = Duration::from_millis(state.config.http.body_timeout_ms);
    let request = ingest::Request {
        body: Box::pin(body::read_limited(headers, body, limit, timeout)),
        announced: content_length(headers).unwrap_or(limit).min(limit),
        format,
        encoding,
        ids: None,
        received: None,
        key,
        owner,
        delivery: Delivery { wait: params.wait.into(), divert, producer },
        replayed: false,
        before_write: None,
        reading: ingest::Reading::default(),
    };
    match stream.ingest.run(request).await? {
        Answer::Delivered(delivered) => {
            let status = StatusCode::from_u16(delivered.status()).unwrap_or(StatusCode::OK);
            let body = serde_json::to_vec(&delivered.response).map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(json_response(status, body))
        }
        Answer::Replayed { status, body } => Ok(replayed(status, body)),
    }
}

fn replayed(status: u16, body: Vec<u8>) -> Response {
    let mut response = json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body);
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Header names looked up on every request, made once: a name given as text is parsed and
/// checked at each lookup.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const PRODUCER_ID: HeaderName = HeaderName::from_static("x-producer-id");
const PRODUCER_PARTITION: HeaderName = HeaderName::from_static("x-producer-partition");
const PRODUCER_OFFSET: HeaderName = HeaderName::from_static("x-producer-offset");

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) => Ok(Some(key.to_string())),
        _ => Err(ApiError::BadHeader("Idempotency-Key must be 1 to 255 visible ASCII characters".into())),
    }
}

/// `X-Producer-Id`, `X-Producer-Partition`, `X-Producer-Offset`.
fn producer_offset(headers: &HeaderMap) -> Result<Option<ProducerOffset>, ApiError> {
    let text = |name: HeaderName| -> Result<Option<&str>, ApiError> {
        headers
            .get(&name)
            .map(|v| v.to_str().map_err(|_| ApiError::BadHeader(format!("{name} is not visible ASCII"))))
            .transpose()
    };
    let (id, partition, offset) = (text(PRODUCER_ID)?, text(PRODUCER_PARTITION)?, text(PRODUCER_OFFSET)?);
    let Some(producer) = id else {
        if partition.is_some() || offset.is_some() {
            return Err(ApiError::BadHeader("X-Producer-Partition and X-Producer-Offset need X-Producer-Id".into()));
        }
        return Ok(None);
    };
    if let Some(problem) = ProducerOffset::refuse_id(producer) {
        return Err(ApiError::BadHeader(format!("X-Producer-Id {problem}")));
    }
    let offset = offset
        .ok_or_else(|| ApiError::BadHeader("X-Producer-Id needs X-Producer-Offset".into()))?
        .trim()
        .parse()
        .ok()
        .filter(|offset| *offset <= ProducerOffset::MAX_OFFSET)
        .ok_or_else(|| ApiError::BadHeader("X-Producer-Offset must be an integer from 0 to 2^63-1".into()))?;
    let partition = match partition {
        Some(p) => p
            .trim()
            .parse()
            .map_err(|_| ApiError::BadHeader("X-Producer-Partition must be an integer from 0 to 2^32-1".into()))?,
        None => 0,
    };
    Ok(Some(ProducerOffset { producer: producer.to_string(), partition, offset, owner: None }))
}
