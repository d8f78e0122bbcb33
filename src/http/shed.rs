//! The guard of the ingestion routes ([`guarded`]): while the Buffer is saturated, answer 503
//! `buffer_saturated` with a `Retry-After` computed from the drain rate, without reading the
//! body, or, in fallback mode, let the request through marked [`Divert`] so its rows go to the
//! fallback table; then a slot of `max_concurrent_requests`, waited for a bounded time; then
//! the request timeout. Health, readiness and metrics routes never pass through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::metrics;
use crate::shed::Verdict;
use crate::streams::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots of the ingestion routes (`max_concurrent_requests`, shared by every stream: they
/// bound the process), and how long a request waits for one (`admission_wait_ms`).
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    wait: Duration,
    /// Requests waiting now, at most as many as there are slots: waiting connections must not
    /// take all of `max_connections`, or health probes could not connect.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

/// One waiter counted for as long as it waits (dropped also when the request is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(slots: usize, wait: Duration) -> Self {
        Self { slots: Arc::new(Semaphore::new(slots)), wait, waiting: Arc::default(), max_waiting: slots }
    }

    /// The policy: a free slot at once, else the first one freed within `wait`, in arrival
    /// order (the semaphore is fair), unless as many requests as there are slots wait already;
    /// `None` when none was had. Measured under overload: clients that resend a 503 at once
    /// spent most of the gateway on refusals (38–61% of its throughput at 30 times the
    /// connections), where a waiting request costs an idle connection and no CPU.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(slot);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _waiting = Waiting(&self.waiting);
        tokio::time::timeout(self.wait, Arc::clone(&self.slots).acquire_owned()).await.ok()?.ok()
    }
}

/// What stands between a picked stream and an ingestion handler: the shed gate, a slot, and
/// the request timeout ([`guarded`]).
#[derive(Debug, Clone)]
pub struct Guard {
    pub admission: Admission,
    /// How long a handler may take once admitted (`request_timeout_ms`).
    pub timeout: Duration,
}

/// Request extension: the Buffer is saturated and this request's rows go to the fallback table.
#[derive(Debug, Clone, Copy)]
pub struct Divert;

/// Runs `handler` behind the guard, after the stream is picked (the stream named by the path,
/// or the ClickHouse protocol's statement routing):
///
/// 1. the shed gate, in front of the slots, so a shed request never takes one and is answered
///    without its body read. Each stream has its own verdict: one saturated Buffer sheds its
///    own producers only. In fallback mode the request goes on marked [`Divert`], its rows for
///    the fallback table;
/// 2. a slot of `max_concurrent_requests`, held until the handler answers; without one, 503
///    `overloaded`, the body unread;
/// 3. the handler, within `request_timeout_ms`: 503 `request_timeout` past it.
///
/// One function rather than a layer each: every `from_fn` layer costs a boxed future and a
/// cloned service per request, which on 10-event requests was measured in the gateway's CPU
/// (docs/performance-history.md).
pub async fn guarded<F>(
    guard: &Guard,
    stream: &Stream,
    mut request: Request,
    handler: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    let policy = stream.policy;
    match policy.verdict(&stream.shed) {
        Verdict::Pass => {}
        verdict if policy.diverts(verdict) => {
            request.extensions_mut().insert(Divert);
        }
        Verdict::Shed { retry_after_s, stale } => {
            metrics::shed_request(&stream.name, if stale { "stale" } else { "buffer_saturated" });
            let error = if stale {
                ApiError::BufferUnknown { retry_after_s }
            } else {
                ApiError::BufferSaturated { retry_after_s }
            };
            return error.into_response();
        }
    }
    let Some(_slot) = guard.admission.slot().await else {
        metrics::shed_request(&stream.name, "overloaded");
        return ApiError::Overloaded("concurrent requests").into_response();
    };
    match tokio::time::timeout(guard.timeout, handler(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::shed_request(&stream.name, "timeout");
            ApiError::RequestTimeout.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_slot_within_its_bound_in_arrival_order() {
        let admission = Admission::new(2, Duration::from_millis(500));
        let held = admission.slot().await.expect("a free slot at once");
        let _other = admission.slot().await.expect("the second free slot");
        let started = tokio::time::Instant::now();
        assert!(admission.slot().await.is_none(), "none freed within the wait");
        assert_eq!(started.elapsed(), Duration::from_millis(500));

        let first = tokio::spawn({
            let admission = admission.clone();
            async move { admission.slot().await.map(|_| tokio::time::Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = tokio::spawn({
            let admission = admission.clone();
            async move { admission.slot().await.map(|_| tokio::time::Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
        let first = first.await.unwrap().expect("the first waiter got the freed slot");
        let second = second.await.unwrap().expect("the second got it once the first let go");
        assert!(first <= second);

        // As many waiters as slots; one more is refused at once.
        let bounded = Admission::new(1, Duration::from_secs(10));
        let _held = bounded.slot().await.expect("a free slot");
        let waiter = tokio::spawn({
            let bounded = bounded.clone();
            async move { bounded.slot().await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = tokio::time::Instant::now();
        assert!(bounded.slot().await.is_none(), "the waiting room is full");
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
        waiter.abort();
        let _ = waiter.await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(bounded.waiting.load(Ordering::Acquire), 0, "a cancelled waiter is no longer counted");

        let at_once = Admission::new(1, Duration::ZERO);
        let _held = at_once.slot().await.expect("a free slot");
        assert!(at_once.slot().await.is_none(), "no wait: refused at once");
    }
}
