//! `GET /healthz` (the process answers) and `GET /readyz` (it should get traffic).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::ApiError;
use super::state::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    state.streams.readiness().map_err(ApiError::NotReady)?;
    // Out of the load balancer only when no stream's Buffer takes rows.
    if state.config.shed.shed_readiness && state.streams.iter().all(|s| s.shed.is_shedding()) {
        return Err(ApiError::NotReady("the ClickHouse Buffer table is saturated"));
    }
    let schema = state.streams.default_stream().ingest.schema();
    let mut body = json!({"status": "ready", "schema_version": schema.map(|s| s.version)});
    // A consumer paused for back-pressure is ready: pausing is how it sheds.
    for (_, kafka) in &state.kafka {
        kafka.readiness().map_err(ApiError::NotReady)?;
    }
    match state.kafka.as_slice() {
        [] => {}
        // The default stream's consumer alone: its report as it always was.
        [(name, kafka)] if name.is_default() => body["kafka"] = kafka.report(),
        consumers => {
            body["kafka"] = consumers.iter().map(|(name, kafka)| (name.to_string(), kafka.report())).collect();
        }
    }
    Ok(Json(body))
}
