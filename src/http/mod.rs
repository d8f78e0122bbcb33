//! The HTTP surface: the router and its layers in one place, handlers one file per concern,
//! and the boundary's error type.

pub mod body;
pub mod error;
pub mod events;
pub mod health;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

use crate::server::AppState;
use error::ApiError;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", post(events::ingest))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
