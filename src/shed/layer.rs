//! The tower middleware on the ingestion route: while the Buffer is saturated, answer 503
//! `buffer_saturated` with a `Retry-After` computed from the drain rate, without reading the
//! body; or, in fallback mode, let the request through marked [`Divert`] so its rows go to the
//! fallback table. Health, readiness and metrics routes never pass through it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::{OnStale, ShedMode, ShedState, Verdict};
use crate::http::error::ApiError;
use crate::metrics;

/// Request extension: the Buffer is saturated and this request's rows go to the fallback table.
#[derive(Debug, Clone, Copy)]
pub struct Divert;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub mode: ShedMode,
    pub stale_after: Duration,
    pub on_stale: OnStale,
}

#[derive(Debug, Clone)]
pub struct ShedLayer {
    state: Arc<ShedState>,
    policy: Policy,
}

impl ShedLayer {
    pub fn new(state: Arc<ShedState>, policy: Policy) -> Self {
        Self { state, policy }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed { inner, state: Arc::clone(&self.state), policy: self.policy }
    }
}

#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    state: Arc<ShedState>,
    policy: Policy,
}

impl<S> Service<Request> for Shed<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        // Before the first poll has had time to answer, do not count the state as stale.
        let grace = self.state.age() < self.policy.stale_after;
        match self.state.verdict(self.policy.stale_after, self.policy.on_stale, grace) {
            Verdict::Pass => Box::pin(self.inner.call(request)),
            Verdict::Shed { stale: false, .. } if self.policy.mode == ShedMode::Fallback => {
                request.extensions_mut().insert(Divert);
                Box::pin(self.inner.call(request))
            }
            Verdict::Shed { retry_after_s, stale } => {
                metrics::shed_request(if stale { "stale" } else { "buffer_saturated" });
                let error = if stale {
                    ApiError::BufferUnknown { retry_after_s }
                } else {
                    ApiError::BufferSaturated { retry_after_s }
                };
                Box::pin(std::future::ready(Ok(error.into_response())))
            }
        }
    }
}
