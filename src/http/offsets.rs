//! `GET /v1/offsets/{producer_id}`: the committed offset of each partition of a producer, so a
//! restarted ETL worker resumes from its last checkpoint (committed + 1).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

use super::error::ApiError;
use super::state::AppState;
use crate::ingest::ProducerOffset;

#[derive(Debug, Serialize)]
pub struct Offsets {
    pub producer_id: String,
    pub partitions: BTreeMap<String, u64>,
}

pub async fn get_offsets(
    State(state): State<Arc<AppState>>,
    Path(producer_id): Path<String>,
) -> Result<Json<Offsets>, ApiError> {
    if let Some(problem) = ProducerOffset::refuse_id(&producer_id) {
        return Err(ApiError::BadPath(format!("the producer id {problem}")));
    }
    let partitions = state
        .ingest
        .idempotency()
        .offsets(&producer_id)
        .await
        .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
    Ok(Json(Offsets { producer_id, partitions }))
}
