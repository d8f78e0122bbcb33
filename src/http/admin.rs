//! The admin API, behind `admin_token` (404 when none is configured): `POST /admin/flush`
//! and `GET /v1/status`, both over every stream and every ClickHouse node, and
//! `POST /admin/replay`, which sends a stream's quarantined events again.

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
use crate::replay;
use crate::schema::Reason;
use crate::streams::Stream;

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
    /// Only this stream (default: every stream).
    stream: Option<String>,
}

/// Sends every queued row now (cutting any linger short) and waits until it is written; with
/// `?drain=true`, then drains the Buffer. Every stream, or the one `?stream=` names.
pub async fn flush(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<FlushParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let streams: Vec<&Arc<Stream>> = match &params.stream {
        Some(name) => vec![state.streams.get(name).ok_or_else(|| ApiError::unknown_stream(name))?],
        None => state.streams.iter().collect(),
    };
    for stream in &streams {
        if let Some(schema) = stream.ingest.schema() {
            stream.ingest.coalescer().flush(&schema).await.map_err(|_| ApiError::ShuttingDown)?;
        }
    }
    let drained = if params.drain {
        // Every node's Buffer: on a cluster, each replica holds rows of its own.
        let drains = streams
            .iter()
            .flat_map(|stream| stream.ingest.shards().replicas().map(|r| drain::drain(&r.ch, &stream.config)));
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

#[derive(Debug, Deserialize)]
pub struct ReplayParams {
    /// The stream (default: `default`).
    stream: Option<String>,
    /// Only events quarantined for this reason code.
    reason: Option<String>,
    /// Only events received at or after this time: RFC 3339, or seconds since the epoch.
    since: Option<String>,
}

/// One replay at a time per process: two would read the same events and send them both (the
/// look-ups keep the destination right, but the work is done twice).
static REPLAYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends the stream's quarantined events again through its pipeline; answers what became of
/// them once done (see [`crate::replay`]).
pub async fn replay(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<ReplayParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let name = params.stream.as_deref().unwrap_or(crate::config::DEFAULT_STREAM);
    let stream = state.streams.get(name).ok_or_else(|| ApiError::unknown_stream(name))?;
    let reason = match params.reason.as_deref() {
        None => None,
        Some(code) => Some(Reason::parse(code).ok_or_else(|| {
            let codes: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            ApiError::BadQuery(format!("reason must be one of {}", codes.join(", ")))
        })?),
    };
    let since = params.since.as_deref().map(parse_since).transpose()?;
    let Ok(_running) = REPLAYING.try_lock() else { return Err(ApiError::ReplayRunning) };
    let filter = replay::Filter { reason, since };
    let replayed = replay::replay(&stream.ingest, &filter).await.map_err(|error| match error {
        replay::ReplayError::NoQuarantine(_) => ApiError::BadQuery(error.to_string()),
        error => ApiError::ReplayFailed(error.to_string()),
    })?;
    tracing::info!(stream = %name, stored = replayed.stored, rejected = replayed.rejected, truncated = replayed.truncated, "replay done");
    Ok(Json(json!({
        "stream": name,
        "stored": replayed.stored,
        "rejected": replayed.rejected,
        "truncated": replayed.truncated,
    })))
}

/// `since`: seconds since the epoch, or an RFC 3339 time.
fn parse_since(text: &str) -> Result<i64, ApiError> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds);
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| ApiError::BadQuery("since must be seconds since the epoch or an RFC 3339 time".into()))
}

/// The gateway's state: the process's own, the `default` stream's at the top level (as before
/// streams existed), and every stream's under `streams`.
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
    /// The default stream's idempotency store: whether it is trusted.
    pub idempotency: IdempotencyStatus,
    /// The journal (every node's, summed); `null` when it is off.
    pub journal: Option<JournalStatus>,
    /// Each ClickHouse node: its shard and replica (from 1), its Buffer, breaker and journal.
    pub nodes: Vec<NodeStatus>,
    pub streams: Vec<StreamStatus>,
}

/// One stream's state.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub ready: bool,
    pub not_ready_reason: Option<&'static str>,
    pub database: String,
    pub buffer_table: String,
    pub destination_table: String,
    pub schema_version: Option<u64>,
    pub buffer: BufferStatus,
    pub shedding: bool,
    pub circuit_open: bool,
    pub queue_rows: Vec<usize>,
    /// Every acknowledged event received before this time is confirmed in the destination;
    /// `null` without the journal.
    pub watermark: Option<String>,
    pub watermark_ms: Option<u64>,
    pub idempotency: IdempotencyStatus,
    pub journal: Option<JournalStatus>,
    pub nodes: Vec<NodeStatus>,
}

/// Whether a stream's idempotency store is trusted, or ids it calls fresh are looked up in
/// ClickHouse before they are written (it may have lost keys).
#[derive(Debug, Serialize)]
pub struct IdempotencyStatus {
    /// `redis` or `embedded`.
    pub store: &'static str,
    /// Ids are looked up now: during a look-up period, or while the store is suspect.
    pub looking_up: bool,
    /// A store call failed, or a reservation found an epoch gone, since the last check passed.
    pub suspect: bool,
    /// The end of the look-up period a loss opened; `null` when none is on.
    pub lookup_until: Option<String>,
    pub last_loss: Option<LossStatus>,
}

#[derive(Debug, Serialize)]
pub struct LossStatus {
    pub at: String,
    /// `epoch_gone`, `restarted`, `failover` or `evicted`.
    pub sign: crate::idempotency::trust::Sign,
}

impl IdempotencyStatus {
    pub fn of(idempotency: &crate::idempotency::Idempotency) -> Self {
        let trust = idempotency.trust();
        let now = crate::journal::watermark::now_ms();
        Self {
            store: if idempotency.is_embedded() { "embedded" } else { "redis" },
            looking_up: idempotency.unsure(),
            suspect: trust.suspect(),
            lookup_until: trust.lookup_until(now).map(rfc3339),
            last_loss: trust.last_loss().map(|loss| LossStatus { at: rfc3339(loss.at_ms), sign: loss.sign }),
        }
    }
}

impl StreamStatus {
    pub fn of(stream: &Stream) -> Self {
        let readiness = stream.readiness();
        let config = &stream.config;
        let watermark_ms = stream.ingest.watermark();
        Self {
            name: stream.name.to_string(),
            ready: readiness.is_ok(),
            not_ready_reason: readiness.err(),
            database: config.table.database.clone(),
            buffer_table: config.table.buffer_table.clone(),
            destination_table: config.table.destination_table.clone(),
            schema_version: stream.ingest.schema().map(|s| s.version),
            buffer: BufferStatus::of(&stream.shed),
            shedding: stream.shed.is_shedding(),
            circuit_open: stream.ingest.circuit_open(),
            queue_rows: stream.ingest.coalescer().queue_depths(),
            watermark: watermark_ms.map(rfc3339),
            watermark_ms,
            idempotency: IdempotencyStatus::of(stream.ingest.idempotency()),
            journal: stream.ingest.journal_status(),
            nodes: nodes(stream.ingest.shards()),
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC, to the millisecond.
pub fn rfc3339(ms: u64) -> String {
    let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX));
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    at.format(&format).unwrap_or_default()
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
    pub fn of(shed: &crate::shed::ShedState) -> Self {
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
    let streams: Vec<StreamStatus> = state.streams.iter().map(|s| StreamStatus::of(s)).collect();
    let default = state.streams.default_stream();
    let readiness = state.streams.readiness();
    let every_stream_shedding = state.streams.iter().all(|s| s.shed.is_shedding());
    let idempotency = IdempotencyStatus::of(default.ingest.idempotency());
    Ok(Json(Status {
        ready: readiness.is_ok() && !(state.config.shed.shed_readiness && every_stream_shedding),
        not_ready_reason: readiness.err(),
        draining: default.ingest.health().is_stopping(),
        clickhouse_version: state.streams.iter().find_map(|s| s.ingest.health().clickhouse_version()),
        schema_version: default.ingest.schema().map(|s| s.version),
        buffer: BufferStatus::of(&default.shed),
        shedding: default.shed.is_shedding(),
        circuit_open: default.ingest.circuit_open(),
        queue_rows: default.ingest.coalescer().queue_depths(),
        inflight_bytes: default.ingest.budget().used(),
        inflight_limit_bytes: default.ingest.budget().limit(),
        idempotency_store: idempotency.store,
        idempotency,
        journal: default.ingest.journal_status(),
        nodes: nodes(default.ingest.shards()),
        streams,
    }))
}
