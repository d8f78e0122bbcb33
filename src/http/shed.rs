//! The middleware on the ingestion route: while the Buffer is saturated, answer 503
//! `buffer_saturated` with a `Retry-After` computed from the drain rate, without reading the
//! body; or, in fallback mode, let the request through marked [`Divert`] so its rows go to the
//! fallback table. Health, readiness and metrics routes never pass through it.

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::metrics;
use crate::shed::Verdict;
use crate::streams::Stream;

/// Request extension: the Buffer is saturated and this request's rows go to the fallback table.
#[derive(Debug, Clone, Copy)]
pub struct Divert;

/// The middleware (`axum::middleware::from_fn`), after the stream is picked
/// ([`super::pick_stream`]): it sits in front of the route's concurrency limit, so a shed
/// request never takes a slot, and answers without reading the body. Each stream has its own
/// verdict: one saturated Buffer sheds its own producers only.
pub async fn gate(mut request: Request, next: Next) -> Response {
    let Some(stream) = request.extensions().get::<Arc<Stream>>().cloned() else {
        return ApiError::Internal("no stream picked before the shed gate".into()).into_response();
    };
    let policy = stream.policy;
    match policy.verdict(&stream.shed) {
        Verdict::Pass => next.run(request).await,
        verdict if policy.diverts(verdict) => {
            request.extensions_mut().insert(Divert);
            next.run(request).await
        }
        Verdict::Shed { retry_after_s, stale } => {
            metrics::shed_request(&stream.name, if stale { "stale" } else { "buffer_saturated" });
            let error = if stale {
                ApiError::BufferUnknown { retry_after_s }
            } else {
                ApiError::BufferSaturated { retry_after_s }
            };
            error.into_response()
        }
    }
}
