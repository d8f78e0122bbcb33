//! `POST /v1/events`: the HTTP half of ingestion. Reads the headers and the body within their
//! limits, runs the batch through [`crate::ingest`], and answers: 200 once the events are
//! written, 202 once queued (`wait=false`), a replayed answer for a repeated
//! `Idempotency-Key`, or the error.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::body;
use super::error::ApiError;
use super::shed::Divert;
use super::state::AppState;
use crate::ingest::{self, Claim, Delivery, ProducerOffset, Wait};

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

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    divert: Option<Extension<Divert>>,
    params: Result<Query<IngestParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(&state, divert.is_some(), params, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    divert: bool,
    params: Result<Query<IngestParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let request_key = idempotency_key(headers)?;
    let producer = producer_offset(headers)?;
    let ingest = &state.ingest;
    let (schema, batch) = {
        let (format, encoding) = (body::format_of(headers)?, body::encoding_of(headers)?);
        let limit = state.config.max_body_bytes;
        // The body counts against the in-flight budget from before it is read until it is encoded.
        let (schema, _lease) = ingest.admit(content_length(headers).unwrap_or(limit).min(limit))?;
        let timeout = Duration::from_millis(state.config.body_timeout_ms);
        let raw = body::read_limited(headers, body, limit, timeout).await?;
        let body = ingest::Body { raw, format, encoding, hash: request_key.is_some(), ids: None, received: None };
        let batch = ingest.decode(&schema, body).await?;
        (schema, batch)
    };
    let body_hash = batch.body_hash.clone();
    let claimed = match &request_key {
        None => None,
        Some(key) => match ingest.claim_request(key, &body_hash).await? {
            Claim::Claimed => Some(key.as_str()),
            Claim::Bypassed => None,
            Claim::Replay { status, body } => return Ok(replayed(status, body)),
        },
    };
    match ingest.deliver(&schema, batch, Delivery { wait: params.wait.into(), divert, producer }).await {
        Ok(delivered) => {
            let status = if delivered.written { StatusCode::OK } else { StatusCode::ACCEPTED };
            let body = serde_json::to_vec(&delivered.response).map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Some(key) = claimed {
                ingest.finish_request(key, &body_hash, status.as_u16(), &body).await;
            }
            Ok(json_response(status, body))
        }
        Err(error) => {
            if let Some(key) = claimed {
                ingest.abandon_request(key, &body_hash).await;
            }
            Err(error.into())
        }
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

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) => Ok(Some(key.to_string())),
        _ => Err(ApiError::BadHeader("Idempotency-Key must be 1 to 255 visible ASCII characters".into())),
    }
}

/// `X-Producer-Id`, `X-Producer-Partition`, `X-Producer-Offset`.
fn producer_offset(headers: &HeaderMap) -> Result<Option<ProducerOffset>, ApiError> {
    let text = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| ApiError::BadHeader(format!("{name} is not visible ASCII"))))
            .transpose()
    };
    let (id, partition, offset) = (text("x-producer-id")?, text("x-producer-partition")?, text("x-producer-offset")?);
    let Some(producer) = id else {
        if partition.is_some() || offset.is_some() {
            return Err(ApiError::BadHeader("X-Producer-Partition and X-Producer-Offset need X-Producer-Id".into()));
        }
        return Ok(None);
    };
    if producer.is_empty() || producer.len() > 200 {
        return Err(ApiError::BadHeader("X-Producer-Id must be 1 to 200 characters".into()));
    }
    let offset = offset
        .ok_or_else(|| ApiError::BadHeader("X-Producer-Id needs X-Producer-Offset".into()))?
        .trim()
        .parse()
        .map_err(|_| ApiError::BadHeader("X-Producer-Offset must be an integer from 0 to 2^64-1".into()))?;
    let partition = match partition {
        Some(p) => p
            .trim()
            .parse()
            .map_err(|_| ApiError::BadHeader("X-Producer-Partition must be an integer from 0 to 2^32-1".into()))?,
        None => 0,
    };
    Ok(Some(ProducerOffset { producer: producer.to_string(), partition, offset }))
}
