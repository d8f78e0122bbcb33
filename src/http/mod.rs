//! The HTTP surface: the router and its layers in one place, the state handlers share,
//! handlers one file per concern (HTTP only: the work is `ingest`'s), the shed gate, and the
//! boundary's error type.

pub mod admin;
pub mod body;
pub mod conn;
pub mod drain;
pub mod error;
pub mod events;
pub mod health;
pub mod offsets;
pub mod shed;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::{BoxError, ServiceBuilder};
use tower_http::trace::TraceLayer;

use crate::auth::Denied;
use crate::metrics;
use error::ApiError;
use shed::Gate;
use state::AppState;

const EVENTS: &str = "/v1/events";
const OFFSETS: &str = "/v1/offsets/{producer_id}";
const ADMIN_FLUSH: &str = "/admin/flush";
const STATUS: &str = "/v1/status";
const HEALTHZ: &str = "/healthz";
const READYZ: &str = "/readyz";
const METRICS: &str = "/metrics";
/// Every route, for metric labels.
const ROUTES: [&str; 7] = [EVENTS, OFFSETS, ADMIN_FLUSH, STATUS, HEALTHZ, READYZ, METRICS];

pub fn router(state: Arc<AppState>) -> Router {
    let config = &state.config;
    // Only the ingestion route is shed, limited and timed out; health, readiness and metrics
    // must keep answering while it is.
    let ingest_layers = ServiceBuilder::new()
        .layer(middleware::from_fn_with_state(
            Gate { state: Arc::clone(&state.shed), policy: crate::shed::Policy::of(config) },
            shed::gate,
        ))
        .layer(HandleErrorLayer::new(limit_error))
        .load_shed()
        .concurrency_limit(config.http.max_concurrent_requests)
        .timeout(Duration::from_millis(config.http.request_timeout_ms));
    // Producer routes need an API key when keys are configured.
    let producer = middleware::from_fn_with_state(Arc::clone(&state), require_api_key);
    // Outermost, so that whatever refuses a request (auth, shedding, limits, the handler) leaves
    // its body to be drained before the answer goes out.
    let bound = drain::Bound {
        max_bytes: config.http.body_drain_max_bytes,
        timeout: Duration::from_millis(config.http.body_drain_timeout_ms),
    };
    let drain = middleware::from_fn_with_state(bound, drain::drain_unread);
    Router::new()
        .route(EVENTS, post(events::ingest).layer(ingest_layers).layer(producer.clone()).layer(drain))
        .route(OFFSETS, get(offsets::get_offsets).layer(producer))
        .route(ADMIN_FLUSH, post(admin::flush))
        .route(STATUS, get(admin::status))
        .route(HEALTHZ, get(health::healthz))
        .route(READYZ, get(health::readyz))
        .route(METRICS, get(render_metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(track))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let token = crate::auth::bearer(request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    match state.api_keys.check(token) {
        Ok(_) => next.run(request).await,
        Err(Denied::Missing) => ApiError::Unauthorized.into_response(),
        Err(Denied::Unknown) => ApiError::Forbidden.into_response(),
        Err(Denied::RateLimited(retry_after_s)) => ApiError::RateLimited { retry_after_s }.into_response(),
    }
}

/// Turns the tower limits' errors into the JSON 503s producers get.
async fn limit_error(error: BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::shed_request("overloaded");
        ApiError::Overloaded("concurrent requests")
    } else if error.is::<tower::timeout::error::Elapsed>() {
        metrics::shed_request("timeout");
        ApiError::RequestTimeout
    } else {
        ApiError::Internal(error.to_string())
    }
}

/// The route template as a static label (no allocation per request; bounded label values).
fn route_label(matched: Option<&str>) -> &'static str {
    matched.and_then(|path| ROUTES.into_iter().find(|r| *r == path)).unwrap_or("unmatched")
}

/// Counts and times every request by route template (not raw path: bounded label values).
async fn track(request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>().map(MatchedPath::as_str));
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::http_request(route, response.status().as_u16(), started.elapsed());
    response
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
