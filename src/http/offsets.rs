//! `GET /v1/offsets/{producer_id}` (the `default` stream) and
//! `GET /v1/streams/{name}/offsets/{producer_id}`: the committed offset of each partition of a
//! producer in that stream, so a restarted ETL worker resumes from its last checkpoint
//! (committed + 1).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::Path;
use axum::{Extension, Json};
use serde::Serialize;

use super::error::ApiError;
use crate::auth::Caller;
use crate::idempotency::Idempotency;
use crate::ingest::ProducerOffset;
use crate::streams::Stream;

#[derive(Debug, Serialize)]
pub struct Offsets {
    pub producer_id: String,
    pub partitions: BTreeMap<String, u64>,
}

#[derive(Debug, serde::Deserialize)]
pub struct OffsetsPath {
    producer_id: String,
}

pub async fn get_offsets(
    Extension(stream): Extension<Arc<Stream>>,
    caller: Option<Extension<Caller>>,
    Path(OffsetsPath { producer_id }): Path<OffsetsPath>,
) -> Result<Json<Offsets>, ApiError> {
    if let Some(problem) = ProducerOffset::refuse_id(&producer_id) {
        return Err(ApiError::BadPath(format!("the producer id {problem}")));
    }
    let owner = caller.map(|Extension(c)| c.name);
    let store = stream.ingest.idempotency();
    let unavailable = |e: crate::idempotency::StoreError| ApiError::StoreUnavailable(e.to_string());
    let mut partitions =
        store.offsets(&Idempotency::scoped(owner.as_deref(), producer_id.clone())).await.map_err(unavailable)?;
    // A partition the key has no offset of its own for: what the producer committed before
    // offsets were kept per key (the pipeline reads them the same way).
    if owner.is_some() {
        for (partition, offset) in store.offsets(&producer_id).await.map_err(unavailable)? {
            partitions.entry(partition).or_insert(offset);
        }
    }
    Ok(Json(Offsets { producer_id, partitions }))
}
