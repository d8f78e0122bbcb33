//! The HTTP surface: the router and its layers in one place, the state handlers share,
//! handlers one file per concern (HTTP only: the work is `ingest`'s), the shed gate, and the
//! boundary's error type.

pub mod admin;
pub mod body;
pub mod compat;
pub mod conn;
pub mod drain;
pub mod error;
pub mod events;
pub mod health;
pub mod offsets;
pub mod shed;
pub mod state;
pub mod streams;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on, post};
use tracing::Instrument;

use crate::auth::{Caller, Denied};
use crate::metrics;
use crate::streams::Stream;
use error::{ApiError, Refused};
use state::AppState;

const EVENTS: &str = "/v1/events";
const STREAM_EVENTS: &str = "/v1/streams/{name}/events";
const STREAMS: &str = "/v1/streams";
const OFFSETS: &str = "/v1/offsets/{producer_id}";
const STREAM_OFFSETS: &str = "/v1/streams/{name}/offsets/{producer_id}";
const ADMIN_FLUSH: &str = "/admin/flush";
const ADMIN_REPLAY: &str = "/admin/replay";
const STATUS: &str = "/v1/status";
const HEALTHZ: &str = "/healthz";
const READYZ: &str = "/readyz";
const METRICS: &str = "/metrics";
/// ClickHouse's HTTP interface: queries (INSERTs) at the root, and its liveness probe.
const CLICKHOUSE: &str = "/";
const PING: &str = "/ping";
/// Every route, for metric labels.
const ROUTES: [&str; 13] = [
    EVENTS,
    STREAM_EVENTS,
    STREAMS,
    OFFSETS,
    STREAM_OFFSETS,
    ADMIN_FLUSH,
    ADMIN_REPLAY,
    STATUS,
    HEALTHZ,
    READYZ,
    METRICS,
    CLICKHOUSE,
    PING,
];

pub fn router(state: Arc<AppState>) -> Router {
    let config = &state.config;
    // Only the ingestion routes are shed, limited and timed out; health, readiness and metrics
    // must keep answering while they are. One limit for both routes and every stream: it
    // bounds the process.
    let guard = Arc::new(shed::Guard {
        admission: shed::Admission::new(
            config.http.max_concurrent_requests,
            Duration::from_millis(config.http.admission_wait_ms),
        ),
        timeout: Duration::from_millis(config.http.request_timeout_ms),
    });
    // Outermost, so that whatever refuses a request (auth, shedding, limits, the handler) leaves
    // its body to be drained before the answer goes out.
    let bound = drain::Bound {
        max_bytes: config.http.body_drain_max_bytes,
        timeout: Duration::from_millis(config.http.body_drain_timeout_ms),
    };
    let front = Front { state: Arc::clone(&state), bound, guard };
    // The ClickHouse protocol: the same guard, its own credentials and statement routing, and
    // every refusal worded as ClickHouse would word it.
    let clickhouse = on(MethodFilter::GET.or(MethodFilter::POST), clickhouse_front).with_state(front.clone());
    let ingest = post(ingest_front).with_state(front);
    // Producer routes need an API key when keys are configured; then the stream they name.
    let producer = middleware::from_fn_with_state(Arc::clone(&state), require_api_key);
    let stream = middleware::from_fn_with_state(Arc::clone(&state), pick_stream);
    let offsets = get(offsets::get_offsets).layer(stream).layer(producer.clone());
    Router::new()
        .route(EVENTS, ingest.clone())
        .route(STREAM_EVENTS, ingest)
        .route(STREAMS, get(streams::list).layer(producer))
        .route(OFFSETS, offsets.clone())
        .route(STREAM_OFFSETS, offsets)
        .route(ADMIN_FLUSH, post(admin::flush))
        .route(ADMIN_REPLAY, post(admin::replay))
        .route(STATUS, get(admin::status))
        .route(HEALTHZ, get(health::healthz))
        .route(READYZ, get(health::readyz))
        .route(METRICS, get(render_metrics))
        .route(CLICKHOUSE, clickhouse)
        .route(PING, get(compat::ping))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(Arc::new(metrics::HttpRequests::new(&ROUTES)), track))
        .with_state(state)
}

/// What the ingestion and ClickHouse-protocol handlers need before their work: the state,
/// the drain's bounds and the guard.
#[derive(Clone)]
struct Front {
    state: Arc<AppState>,
    bound: drain::Bound,
    guard: Arc<shed::Guard>,
}

/// The ingestion routes' handler: in order, the drain of what the request leaves unread
/// ([`drain::drained`]), the API key ([`authorize`]), the stream ([`stream_named`]), the guard
/// ([`shed::guarded`]), and then [`events::ingest`]. One function rather than a layer each: a
/// `from_fn` layer costs a boxed future and a cloned service per request.
async fn ingest_front(
    State(front): State<Front>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    request: Request,
) -> Response {
    let Front { state, bound, guard } = front;
    drain::drained(bound, request, |mut request| async move {
        if let Err(refused) = authorize(&state, &mut request) {
            return refused.into_response();
        }
        let stream = match stream_named(&state, matched.as_ref(), params.ok().as_ref(), &request) {
            Ok(stream) => stream,
            Err(refused) => return refused.into_response(),
        };
        shed::guarded(&guard, &stream, request, |request| events::ingest(&state, &stream, request)).await
    })
    .await
}

/// The ClickHouse protocol's handler: [`compat::handle`] within the drain of what the request
/// leaves unread ([`drain::drained`]).
async fn clickhouse_front(State(front): State<Front>, request: Request) -> Response {
    let Front { state, bound, guard } = front;
    drain::drained(bound, request, |request| async move { compat::handle(&state, &guard, request).await }).await
}

/// Checks the request's API key when keys are configured, and hands the caller on as an
/// extension: 401 without a key, 403 with an unknown one, 429 past its rate.
fn authorize(state: &AppState, request: &mut Request) -> Result<(), ApiError> {
    let token = crate::auth::bearer(request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    match state.api_keys.check(token) {
        Ok(caller) => {
            if let Some(caller) = caller {
                request.extensions_mut().insert(caller);
            }
            Ok(())
        }
        Err(Denied::Missing) => Err(ApiError::Unauthorized),
        Err(Denied::Unknown) => Err(ApiError::Forbidden),
        Err(Denied::RateLimited(retry_after_s)) => Err(ApiError::RateLimited { retry_after_s }),
    }
}

/// [`authorize`] as a middleware.
async fn require_api_key(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    match authorize(&state, &mut request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// The stream a request names (`{name}` in its path; none: `default`): 404 `unknown_stream`
/// when no stream has that name, 403 `stream_forbidden` when the caller's key is restricted
/// to other streams.
fn stream_named(
    state: &AppState,
    matched: Option<&MatchedPath>,
    params: Option<&RawPathParams>,
    request: &Request,
) -> Result<Arc<Stream>, ApiError> {
    let named = params.and_then(|params| params.iter().find(|(k, _)| *k == "name").map(|(_, v)| v));
    let stream: Arc<Stream> = match named {
        Some(name) => match state.streams.get(name) {
            Some(stream) => Arc::clone(stream),
            None => return Err(ApiError::unknown_stream(name)),
        },
        // A route that names a stream whose name could not be read (not UTF-8) names no
        // stream: never the default one.
        None if matched.is_some_and(|m| m.as_str().contains("{name}")) => {
            return Err(ApiError::UnknownStream(String::new()));
        }
        None => Arc::clone(state.streams.default_stream()),
    };
    if let Some(caller) = request.extensions().get::<Caller>()
        && !caller.may_write(stream.name.as_str())
    {
        return Err(ApiError::StreamForbidden(stream.name.to_string()));
    }
    Ok(stream)
}

/// [`stream_named`] as a middleware: the stream goes on as an extension.
async fn pick_stream(
    State(state): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    match stream_named(&state, matched.as_ref(), params.ok().as_ref(), &request) {
        Ok(stream) => {
            request.extensions_mut().insert(stream);
            next.run(request).await
        }
        Err(refused) => refused.into_response(),
    }
}

/// Counts and times every request by route template (not raw path: bounded label values), in
/// a span that names the method and the path. One layer for both: each layer on the router
/// costs every request a boxed future and a cloned service stack.
async fn track(State(requests): State<Arc<metrics::HttpRequests>>, request: Request, next: Next) -> Response {
    // The path, never the query string: a ClickHouse client's key can be its `password`
    // parameter, and a statement in `query` can hold rows.
    let span = tracing::debug_span!("request", method = %request.method(), path = %request.uri().path());
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    requests.record(matched.as_ref().map(MatchedPath::as_str), status.as_u16(), started.elapsed());
    // An internal error is something to look into. The other 5xx answers are deliberate
    // refusals (503 shedding, 501 an unsupported protocol feature) that the counters show:
    // logged, they would flood the log exactly when the gateway is busiest.
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        let reason = response.extensions().get::<Refused>().map(|Refused(error)| error.to_string());
        span.in_scope(|| tracing::error!(status = status.as_u16(), reason, "answered with a server error"));
    }
    response
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
