//! `GET /v1/streams`: the streams a producer may write (all of them, or those its key is
//! restricted to), each with its columns and types (what a producer may send) and its state,
//! including its completeness watermark.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use serde::Serialize;

use super::admin::{BufferStatus, rfc3339};
use super::state::AppState;
use crate::auth::Caller;
use crate::streams::Stream;

#[derive(Debug, Serialize)]
pub struct StreamList {
    pub streams: Vec<StreamInfo>,
}

#[derive(Debug, Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub path: String,
    pub database: String,
    pub buffer_table: String,
    pub destination_table: String,
    /// The table's columns: `null` until its schema is read.
    pub columns: Option<Vec<ColumnEntry>>,
    pub state: StreamState,
}

#[derive(Debug, Serialize)]
pub struct ColumnEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub type_text: String,
    /// `DEFAULT`, `MATERIALIZED`, `ALIAS`, or empty: computed columns are never sent.
    pub default_kind: String,
}

#[derive(Debug, Serialize)]
pub struct StreamState {
    pub ready: bool,
    pub not_ready_reason: Option<&'static str>,
    pub shedding: bool,
    pub buffer: BufferStatus,
    /// Every acknowledged event received before this time is confirmed in the destination;
    /// `null` without the journal.
    pub watermark: Option<String>,
    pub watermark_ms: Option<u64>,
}

impl StreamInfo {
    fn of(stream: &Stream) -> Self {
        let readiness = stream.readiness();
        let table = &stream.config.table;
        let watermark_ms = stream.ingest.watermark();
        let columns = stream.ingest.schema().map(|schema| {
            schema
                .column_infos()
                .iter()
                .map(|c| ColumnEntry {
                    name: c.name.clone(),
                    type_text: c.type_text.clone(),
                    default_kind: c.default_kind.clone(),
                })
                .collect()
        });
        Self {
            name: stream.name.to_string(),
            path: format!("/v1/streams/{}/events", stream.name),
            database: table.database.clone(),
            buffer_table: table.buffer_table.clone(),
            destination_table: table.destination_table.clone(),
            columns,
            state: StreamState {
                ready: readiness.is_ok(),
                not_ready_reason: readiness.err(),
                shedding: stream.shed.is_shedding(),
                buffer: BufferStatus::of(&stream.shed),
                watermark: watermark_ms.map(rfc3339),
                watermark_ms,
            },
        }
    }
}

pub async fn list(State(state): State<Arc<AppState>>, caller: Option<Extension<Caller>>) -> Json<StreamList> {
    let streams = state
        .streams
        .iter()
        .filter(|s| caller.as_ref().is_none_or(|Extension(c)| c.may_write(s.name.as_str())))
        .map(|s| StreamInfo::of(s))
        .collect();
    Json(StreamList { streams })
}
