//! Events that may have been delivered before: the ones ClickHouse already holds are dropped
//! before anything is written. All the events of a Kafka message read again after a crash or
//! a rebalance ([`Pipeline::drop_present`]); the ones the idempotency store calls fresh while
//! it may have forgotten ids it once committed ([`Pipeline::drop_held`]).
//!
//! They are looked up by id through each node's Buffer table, which answers for its own rows
//! and its destination's; twice, a pause apart, for those missing the first time (rows the
//! Buffer is flushing are in neither for a moment). Every node answers for the rows written to
//! it (a replica's Buffer holds rows the others have not seen): present anywhere is present,
//! and every node must answer.

use std::collections::HashSet;

use uuid::Uuid;

use super::{IngestError, Pipeline};
use crate::clickhouse::presence::Lookup;
use crate::decode::EncodedBatch;
use crate::metrics;

impl Pipeline {
    pub(super) async fn drop_present(&self, batch: &mut EncodedBatch) -> Result<(), IngestError> {
        let ids: Vec<Uuid> = batch.events.iter().filter_map(|e| e.encoded.id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let seconds = batch.events.iter().filter_map(|e| e.encoded.seconds);
        let span = seconds.clone().min().zip(seconds.max());
        let present = self.present(&ids, span).await?;
        let keep: Vec<bool> =
            batch.events.iter().map(|e| e.encoded.id.is_none_or(|id| !present.contains(&id))).collect();
        let found = keep.iter().filter(|k| !**k).count();
        if found > 0 {
            batch.retain(&keep);
            metrics::kafka::replayed_duplicates(found);
        }
        Ok(())
    }

    /// Drops, from the events still kept (`keep`), those ClickHouse already holds: asked while
    /// the idempotency store may have forgotten ids (its `unsure`). Returns how many.
    pub(super) async fn drop_held(&self, batch: &EncodedBatch, keep: &mut [bool]) -> Result<usize, IngestError> {
        let kept = || batch.events.iter().zip(keep.iter()).filter(|(_, k)| **k).map(|(e, _)| &e.encoded);
        let ids: Vec<Uuid> = kept().filter_map(|e| e.id).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        // A resend's rows carry the times of the first send when the producer set them, and a
        // new receive time when the gateway did: the first send was within the dedup window.
        let now = i64::try_from(crate::journal::watermark::now_ms() / 1000).unwrap_or(i64::MAX);
        let window = i64::try_from(self.config.idempotency.dedup_window_ms / 1000).unwrap_or(i64::MAX);
        // A minute past now: a first send stamped by a gateway whose clock runs ahead.
        let seconds = kept().filter_map(|e| e.seconds).chain([now.saturating_sub(window), now.saturating_add(60)]);
        let span = seconds.clone().min().zip(seconds.max());
        let present = self.present(&ids, span).await?;
        let mut found = 0;
        for (event, keep) in batch.events.iter().zip(keep.iter_mut()) {
            if *keep && event.encoded.id.is_some_and(|id| present.contains(&id)) {
                *keep = false;
                found += 1;
            }
        }
        metrics::looked_up(&self.config.stream, found, ids.len() - found);
        Ok(found)
    }

    async fn present(&self, ids: &[Uuid], span: Option<(i64, i64)>) -> Result<HashSet<Uuid>, IngestError> {
        let table = &self.config.table;
        let lookup = Lookup { table: &self.buffer, id_column: &table.id_column, time_column: table.time_column() };
        let looks = self.shards.replicas().map(|r| r.ch.present_twice(lookup, ids, span, &self.lookups));
        let mut present = HashSet::new();
        for found in futures_util::future::join_all(looks).await {
            let found = found.map_err(|e| {
                IngestError::FlushFailed(format!("looking up whether ClickHouse holds the events: {e}"))
            })?;
            present.extend(found);
        }
        Ok(present)
    }
}
