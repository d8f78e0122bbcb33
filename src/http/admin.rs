//! The admin API, behind `admin_token` (404 when none is configured): `POST /admin/flush`
//! and `GET /v1/status`, both over every ClickHouse node.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::ApiError;
use super::state::AppState;
use crate::auth::bearer;
use crate::clickhouse::drain;
use crate::journal::JournalStatus;

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if !state.admin.enabled() {
        return Err(ApiError::NotFound);
    }
    let token = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    if state.admin.allows(token) { Ok(()) } else { Err(ApiError::Unauthorized) }
}

#[derive(Debug, Deserialize)]
pub struct FlushParams {
    /// Also drain the Buffer into its destination.
    #[serde(default)]
    drain: bool,
}

/// Sends every queued row now (cutting any linger short) and waits until it is written; with
/// `?drain=true`, then drains the Buffer.
pub async fn flush(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<FlushParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    if let Some(schema) = state.ingest.schema() {
        state.ingest.coalescer().flush(&schema).await.map_err(|_| ApiError::ShuttingDown)?;
    }
    let drained = if params.drain {
        // Every node's Buffer: on a cluster, each replica holds rows of its own.
        let drains = state.ingest.shards().replicas().map(|r| drain::drain(&r.ch, &state.config));
        let mut rows = 0;
        for drained in futures_util::future::join_all(drains).await {
            rows += drained.map_err(|e| ApiError::FlushFailed(e.to_string()))?;
        }
        Some(rows)
    } else {
        None
    };
    Ok(Json(json!({"flushed": true, "drained_rows": drained})))
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub ready: bool,
    pub not_ready_reason: Option<&'static str>,
    pub draining: bool,
    pub clickhouse_version: Option<String>,
    pub schema_version: Option<u64>,
    pub buffer: BufferStatus,
    pub shedding: bool,
    pub circuit_open: bool,
    pub queue_rows: Vec<usize>,
    pub inflight_bytes: usize,
    pub inflight_limit_bytes: usize,
    pub idempotency_store: &'static str,
    /// The journal (every node's, summed); `null` when it is off.
    pub journal: Option<JournalStatus>,
    /// Each ClickHouse node: its shard and replica (from 1), its Buffer, breaker and journal.
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub url: String,
    pub shard: usize,
    pub replica: usize,
    pub buffer: BufferStatus,
    pub shedding: bool,
    pub circuit_open: bool,
    pub journal: Option<JournalStatus>,
}

impl BufferStatus {
    fn of(shed: &crate::shed::ShedState) -> Self {
        let (bytes, capacity) = (shed.bytes(), shed.capacity());
        Self {
            bytes,
            capacity_bytes: capacity,
            fill_ratio: if capacity > 0 { bytes as f64 / capacity as f64 } else { 0.0 },
        }
    }
}

fn nodes(shards: &crate::cluster::Shards) -> Vec<NodeStatus> {
    let mut nodes = Vec::new();
    for (shard, replicas) in shards.shards.iter().enumerate() {
        for (replica, node) in replicas.iter().enumerate() {
            nodes.push(NodeStatus {
                url: crate::config::redacted(&node.url),
                shard: shard + 1,
                replica: replica + 1,
                buffer: BufferStatus::of(&node.shed),
                shedding: node.shed.is_shedding(),
                circuit_open: node.breaker.is_open(),
                journal: node.journal.as_ref().map(|d| d.status()),
            });
        }
    }
    nodes
}

#[derive(Debug, Serialize)]
pub struct BufferStatus {
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub fill_ratio: f64,
}

pub async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Status>, ApiError> {
    authorize(&state, &headers)?;
    let schema = state.ingest.schema();
    let readiness = state.ingest.health().readiness(schema.is_some());
    Ok(Json(Status {
        ready: readiness.is_ok() && !(state.config.shed.shed_readiness && state.shed.is_shedding()),
        not_ready_reason: readiness.err(),
        draining: state.ingest.health().is_stopping(),
        clickhouse_version: state.ingest.health().clickhouse_version(),
        schema_version: schema.map(|s| s.version),
        buffer: BufferStatus::of(&state.shed),
        shedding: state.shed.is_shedding(),
        circuit_open: state.ingest.circuit_open(),
        queue_rows: state.ingest.coalescer().queue_depths(),
        inflight_bytes: state.ingest.budget().used(),
        inflight_limit_bytes: state.ingest.budget().limit(),
        idempotency_store: if state.ingest.idempotency().is_embedded() { "embedded" } else { "redis" },
        journal: state.ingest.journal_status(),
        nodes: nodes(state.ingest.shards()),
    }))
}
