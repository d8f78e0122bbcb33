//! Admission, before a body is read: the gateway is not draining, some node takes INSERTs,
//! the schema is loaded, the journals have room, the in-flight budget has room; then where the
//! request's events may go on a cluster, and whether every shard they go to takes rows now.

use std::sync::Arc;

use super::{IngestError, Pipeline};
use crate::config::ShardingKey;
use crate::decode::{EncodedBatch, Placing};
use crate::journal::{Journal, JournalStatus};
use crate::metrics;
use crate::schema::TableSchema;
use crate::shed::Verdict;
use crate::shed::budget::Lease;

impl Pipeline {
    /// Whether a batch of about `announced` bytes may come in now; the lease holds its bytes
    /// against the in-flight budget until it is decoded.
    pub(super) fn admit(&self, announced: usize) -> Result<(Arc<TableSchema>, Lease), IngestError> {
        if self.health.is_stopping() {
            return Err(IngestError::ShuttingDown);
        }
        if self.circuit_open() {
            metrics::shed_request(&self.config.stream, "circuit_open");
            return Err(IngestError::CircuitOpen);
        }
        let schema = self.schema.get().ok_or(IngestError::NotReady("the table schema is not loaded yet"))?;
        if self.journal_failed() {
            metrics::shed_request(&self.config.stream, "journal_failed");
            return Err(IngestError::JournalFailed);
        }
        if !self.journal_has_room(announced as u64) {
            metrics::shed_request(&self.config.stream, "journal_full");
            return Err(IngestError::JournalFull);
        }
        let lease = self
            .budget
            .try_take(announced)
            .ok_or_else(|| IngestError::overloaded(&self.config.stream, "in-flight bytes"))?;
        Ok((schema, lease))
    }

    /// Where the events of the next request go: by key, or all to one shard with room.
    pub(super) fn placing(&self) -> Result<Placing, IngestError> {
        let shards = &self.shards;
        if shards.shards.len() == 1 {
            return Ok(Placing::Shard(0));
        }
        if matches!(self.sharding, ShardingKey::Column { .. }) {
            return Ok(Placing::ByKey(shards.placement.clone()));
        }
        match shards.pick_random(rand::random()) {
            Some(shard) => Ok(Placing::Shard(shard)),
            None => {
                metrics::shed_request(&self.config.stream, "shard_saturated");
                let retry_after_s = (0..shards.shards.len()).map(|s| retry_after(shards.verdict(s))).min().unwrap_or(1);
                Err(IngestError::ShardUnavailable { shard: None, retry_after_s })
            }
        }
    }

    /// Refuses a batch with rows for a shard that takes none now: all of it, so that the
    /// answer stays all or nothing (the producer's retry finds the shard back, or keeps
    /// hearing 503 with the shard's `Retry-After`).
    pub(super) fn check_shards(&self, batch: &EncodedBatch) -> Result<(), IngestError> {
        if self.shards.shards.len() == 1 {
            return Ok(());
        }
        let per_shard = self.coalescer.per_shard();
        for (shard, rows) in batch.partitions.chunks(per_shard).enumerate() {
            if rows.iter().all(|p| p.chunks.is_empty()) {
                continue;
            }
            if let verdict @ Verdict::Shed { .. } = self.shards.verdict(shard) {
                metrics::shed_request(&self.config.stream, "shard_saturated");
                return Err(IngestError::ShardUnavailable { shard: Some(shard), retry_after_s: retry_after(verdict) });
            }
        }
        Ok(())
    }

    /// The journals of every node (none when the journal is off).
    pub fn journals(&self) -> impl Iterator<Item = &Arc<Journal>> {
        self.shards.replicas().filter_map(|r| r.journal.as_ref())
    }

    /// Whether rows are journaled.
    pub fn journaled(&self) -> bool {
        self.journals().next().is_some()
    }

    /// Whether a node's journal cannot write (its disk full or failing): nothing is
    /// acknowledged until it reopens.
    pub fn journal_failed(&self) -> bool {
        self.journals().any(|j| j.is_broken())
    }

    /// Whether every node's journal has room for `bytes` more.
    pub fn journal_has_room(&self, bytes: u64) -> bool {
        self.journals().all(|d| d.has_room(bytes))
    }

    /// The journals' state summed over the nodes; `None` when the journal is off.
    pub fn journal_status(&self) -> Option<JournalStatus> {
        self.journals().map(|d| d.status()).reduce(JournalStatus::combine)
    }

    /// Whether no node takes INSERTs (every circuit breaker open).
    pub fn circuit_open(&self) -> bool {
        self.shards.replicas().all(|r| r.breaker.is_open())
    }
}

fn retry_after(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Shed { retry_after_s, .. } => retry_after_s,
        Verdict::Pass => 1,
    }
}
