//! The middleware on the ingestion route: while the Buffer is saturated, answer 503
//! `buffer_saturated` with a `Retry-After` computed from the drain rate, without reading the
//! body; or, in fallback mode, let the request through marked [`Divert`] so its rows go to the
//! fallback table. Health, readiness and metrics routes never pass through it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::metrics;
use crate::shed::{Policy, ShedState, Verdict};

/// Request extension: the Buffer is saturated and this request's rows go to the fallback table.
#[derive(Debug, Clone, Copy)]
pub struct Divert;

/// What the gate needs: the poller's verdict and the policy to apply to it.
#[derive(Debug, Clone)]
pub struct Gate {
    pub state: Arc<ShedState>,
    pub policy: Policy,
}

/// The middleware (`axum::middleware::from_fn_with_state`): it sits in front of the route's
/// concurrency limit, so a shed request never takes a slot, and answers without reading the body.
pub async fn gate(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let Gate { state, policy } = gate;
    match policy.verdict(&state) {
        Verdict::Pass => next.run(request).await,
        verdict if policy.diverts(verdict) => {
            request.extensions_mut().insert(Divert);
            next.run(request).await
        }
        Verdict::Shed { retry_after_s, stale } => {
            metrics::shed_request(if stale { "stale" } else { "buffer_saturated" });
            let error = if stale {
                ApiError::BufferUnknown { retry_after_s }
            } else {
                ApiError::BufferSaturated { retry_after_s }
            };
            error.into_response()
        }
    }
}
