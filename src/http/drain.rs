//! Reading the rest of a refused request's body before answering. Many clients (Python's
//! urllib, most SDKs) send the whole body before they read anything; if the gateway answers
//! 413 (or 415, 401…) and closes with unread bytes in its socket, the kernel resets the
//! connection and the client sees `Broken pipe` or `Connection reset`, never the answer. So
//! what the handler left unread is read and thrown away, within a byte and a time bound, and
//! only then is the answer sent.
//!
//! A client that sent `Expect: 100-continue` is not drained unless the handler started reading:
//! hyper sends `100 Continue` only when the body is first polled, so such a client has sent
//! nothing and reads the refusal straight away.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// How much of a refused body is read, at most.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub max_bytes: u64,
    pub timeout: Duration,
}

/// What is known of a request once its handler has answered.
#[derive(Debug, Clone, Copy)]
struct Left {
    expects_continue: bool,
    /// The handler polled the body (so a `100 Continue` went out).
    polled: bool,
    announced: Option<u64>,
    status: StatusCode,
}

/// What is read at most after a refused key (401, 403): enough that a client sending a small
/// body before reading hears its answer, not `body_drain_max_bytes` for anyone without a key.
pub const REFUSED_KEY_DRAIN_BYTES: u64 = 64 * 1024;

/// The bound for an answer of `status`: [`REFUSED_KEY_DRAIN_BYTES`] after a refused key.
fn bound_for(status: StatusCode, bound: Bound) -> Bound {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Bound { max_bytes: bound.max_bytes.min(REFUSED_KEY_DRAIN_BYTES), ..bound }
        }
        _ => bound,
    }
}

/// Whether to read the rest of the body: not when the client was never asked for it, not when
/// more is announced than the bound (it would be cut off anyway), not after a 408 (the client
/// is too slow to wait for twice).
fn should_drain(left: Left, bound: Bound) -> bool {
    let asked_for = left.polled || !left.expects_continue;
    asked_for
        && left.announced.is_none_or(|n| n <= bound.max_bytes)
        && left.status != StatusCode::REQUEST_TIMEOUT
        && bound.max_bytes > 0
}

/// Runs `handler` on a body it shares with this function, then drains what it left.
pub async fn drained<F>(bound: Bound, request: Request, handler: impl FnOnce(Request) -> F) -> Response
where
    F: Future<Output = Response>,
{
    let expects_continue = expects_continue(request.headers());
    let announced = content_length(request.headers());
    let (parts, body) = request.into_parts();
    let shared = Shared(Arc::new(Mutex::new(Inner { body, polled: false })));
    let response = handler(Request::from_parts(parts, Body::new(shared.clone()))).await;
    let (rest, polled) = shared.take();
    if !http_body::Body::is_end_stream(&rest) {
        let left = Left { expects_continue, polled, announced, status: response.status() };
        let bound = bound_for(left.status, bound);
        if should_drain(left, bound) {
            discard(rest, bound).await;
        }
    }
    response
}

/// Reads and drops frames until the body ends, fails, or a bound is reached.
async fn discard(mut body: Body, bound: Bound) {
    let read = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |data| data.len() as u64);
            if seen > bound.max_bytes {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(bound.timeout, read).await;
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

struct Inner {
    body: Body,
    polled: bool,
}

/// The request body, shared between the handler and [`drained`].
#[derive(Clone)]
struct Shared(Arc<Mutex<Inner>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the handler left of the body, and whether it read any.
    fn take(&self) -> (Body, bool) {
        let mut inner = self.lock();
        (std::mem::replace(&mut inner.body, Body::empty()), inner.polled)
    }
}

impl http_body::Body for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut inner = self.lock();
        inner.polled = true;
        Pin::new(&mut inner.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.lock().body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.lock().body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_only_what_the_client_was_asked_for_and_fits() {
        let bound = Bound { max_bytes: 100, timeout: Duration::from_secs(1) };
        let left = Left { expects_continue: false, polled: false, announced: Some(50), status: StatusCode::FORBIDDEN };
        assert!(should_drain(left, bound));
        assert!(should_drain(Left { announced: None, ..left }, bound), "chunked");
        assert!(!should_drain(Left { announced: Some(101), ..left }, bound), "more than the bound");
        assert!(!should_drain(Left { expects_continue: true, ..left }, bound), "no 100 Continue was sent");
        assert!(should_drain(Left { expects_continue: true, polled: true, ..left }, bound), "100 was sent");
        assert!(!should_drain(Left { status: StatusCode::REQUEST_TIMEOUT, ..left }, bound), "too slow");
        assert!(!should_drain(left, Bound { max_bytes: 0, ..bound }), "draining off");
    }

    #[test]
    fn a_refused_key_is_drained_only_a_little() {
        let bound = Bound { max_bytes: 64 << 20, timeout: Duration::from_secs(10) };
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            assert_eq!(bound_for(status, bound).max_bytes, REFUSED_KEY_DRAIN_BYTES);
            let left = Left { expects_continue: false, polled: false, announced: Some(1 << 20), status };
            assert!(!should_drain(left, bound_for(status, bound)), "a megabyte is not read for {status}");
        }
        assert_eq!(bound_for(StatusCode::PAYLOAD_TOO_LARGE, bound).max_bytes, 64 << 20);
        let small = Bound { max_bytes: 10, ..bound };
        assert_eq!(bound_for(StatusCode::UNAUTHORIZED, small).max_bytes, 10, "never more than configured");
    }
}
