//! Delivering a decoded batch: the producer's offset checked, its events deduplicated, its
//! rows handed to the coalescers (or the fallback table), the flushes waited for, the offset
//! advanced. Each step is its own function; [`Ingest::deliver`] runs them in order.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::oneshot;

use super::{Ingest, IngestError};
use crate::clickhouse::ClickHouseError;
use crate::clickhouse::writer::MIN_BLOCK_ROWS;
use crate::coalesce::{FlushResult, Submission, SubmitError};
use crate::config::DedupMode;
use crate::decode::{EncodedBatch, RejectedEvent};
use crate::idempotency::{Idempotency, Reservation};
use crate::metrics::{self, Outcome};
use crate::rows::PartitionRows;
use crate::schema::TableSchema;

/// A producer reading from a log: the batch is `offset` of `partition` of `producer`.
#[derive(Debug, Clone)]
pub struct ProducerOffset {
    pub producer: String,
    pub partition: u32,
    pub offset: u64,
}

/// How a batch is to be delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Answer once the rows are written (else once they are queued).
    pub wait: bool,
    /// The Buffer is saturated and the rows go to the fallback table.
    pub divert: bool,
    pub producer: Option<ProducerOffset>,
}

/// What happened to each event of a request.
#[derive(Debug, Serialize)]
pub struct IngestResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<RejectedEvent>,
}

/// The outcome of a delivered batch.
#[derive(Debug)]
pub struct Delivered {
    /// The rows are written (false: queued, to be written).
    pub written: bool,
    pub response: IngestResponse,
}

/// Where a batch's rows went, and what to wait for.
struct HandedOff {
    outcome: Outcome,
    acks: Vec<oneshot::Receiver<FlushResult>>,
}

impl Ingest {
    /// Delivers a decoded batch and says what happened to each of its events.
    pub async fn deliver(
        &self,
        schema: &Arc<TableSchema>,
        mut batch: EncodedBatch,
        how: Delivery,
    ) -> Result<Delivered, IngestError> {
        if let Some(p) = &how.producer
            && self.already_written(p).await?
        {
            // This batch was written before: every event is a duplicate, nothing is written.
            let all = batch.accepted + batch.rejected.len();
            metrics::events(Outcome::Duplicate, all);
            let response = IngestResponse { accepted: 0, duplicates: all, rejected: Vec::new() };
            return Ok(Delivered { written: true, response });
        }
        metrics::events(Outcome::Rejected, batch.rejected.len());
        let (reservations, duplicates) = self.dedupe(schema, &mut batch).await?;
        metrics::events(Outcome::Duplicate, duplicates);
        let accepted = batch.accepted;
        let handed = self.hand_off(schema, batch.partitions, reservations, &how).await.inspect_err(|error| {
            if error.is_shed() {
                metrics::events(Outcome::Shed, accepted);
            }
        })?;
        let written = how.wait || how.divert;
        self.settle(handed.acks, how).await?;
        metrics::events(handed.outcome, accepted);
        Ok(Delivered { written, response: IngestResponse { accepted, duplicates, rejected: batch.rejected } })
    }

    /// Whether the producer's committed offset already covers this batch.
    async fn already_written(&self, p: &ProducerOffset) -> Result<bool, IngestError> {
        match self.idempotency.offset(&p.producer, p.partition).await {
            Ok(committed) => Ok(committed.is_some_and(|committed| p.offset <= committed)),
            Err(error) => self.idempotency.tolerate(error).map(|()| false).map_err(IngestError::from),
        }
    }

    /// Reserves the events' keys and drops the duplicates from the batch (when events are
    /// deduplicated), then makes the blocks of the final rows. Returns the reservations, one
    /// per partition, and the number of duplicates.
    async fn dedupe(
        &self,
        schema: &Arc<TableSchema>,
        batch: &mut EncodedBatch,
    ) -> Result<(Vec<Option<Reservation>>, usize), IngestError> {
        if self.idempotency.mode != DedupMode::Event {
            return Ok(((0..batch.partitions.len()).map(|_| None).collect(), 0));
        }
        let keys = batch.events.iter_mut().map(|e| Some((e.partition, e.key.take()?))).collect();
        let reserved = self.idempotency.reserve_events(batch.partitions.len(), keys).await?;
        if reserved.duplicates > 0 {
            batch.retain(&reserved.keep);
        }
        // The rows are final now: their blocks are made here, off the async workers when
        // there may be enough rows for one (a block takes tens of µs to make).
        let (writer, schema) = (Arc::clone(&self.writer), Arc::clone(schema));
        let mut partitions = std::mem::take(&mut batch.partitions);
        let make = move || {
            writer.make_blocks(&schema, &mut partitions);
            partitions
        };
        batch.partitions = if batch.accepted >= MIN_BLOCK_ROWS {
            tokio::task::spawn_blocking(make).await.map_err(IngestError::internal)?
        } else {
            make()
        };
        Ok((reserved.by_partition, reserved.duplicates))
    }

    /// Sends the rows on: to the fallback table while diverted, else into the coalescers.
    async fn hand_off(
        &self,
        schema: &Arc<TableSchema>,
        partitions: Vec<PartitionRows>,
        reservations: Vec<Option<Reservation>>,
        how: &Delivery,
    ) -> Result<HandedOff, IngestError> {
        if how.divert {
            self.write_fallback(schema, partitions, reservations).await?;
            return Ok(HandedOff { outcome: Outcome::Fallback, acks: Vec::new() });
        }
        // Offsets advance only after the write, so the producer's batch must be waited for.
        let acks = how.wait || how.producer.is_some();
        let acks = self.enqueue(schema, partitions, reservations, acks).await?;
        Ok(HandedOff { outcome: Outcome::Accepted, acks })
    }

    /// Waits for the flushes (when the answer waits) and advances the producer's offset once
    /// they succeeded; with `wait=false` and an offset, that happens after the answer.
    async fn settle(&self, acks: Vec<oneshot::Receiver<FlushResult>>, how: Delivery) -> Result<(), IngestError> {
        let idempotency = Arc::clone(&self.idempotency);
        let advance = async move {
            await_flushes(acks).await?;
            if let Some(p) = how.producer {
                advance_offset(&idempotency, &p).await;
            }
            Ok::<(), IngestError>(())
        };
        if how.wait || how.divert {
            advance.await
        } else {
            tokio::spawn(async move {
                let _ = advance.await;
            });
            Ok(())
        }
    }

    /// Queues the rows in their partitions; returns the flush outcomes to wait for (`acks`).
    async fn enqueue(
        &self,
        schema: &Arc<TableSchema>,
        partitions: Vec<PartitionRows>,
        mut reservations: Vec<Option<Reservation>>,
        acks: bool,
    ) -> Result<Vec<oneshot::Receiver<FlushResult>>, IngestError> {
        let encoded: usize = partitions.iter().map(PartitionRows::bytes).sum();
        // Kept to give back if the rows cannot be queued.
        let held: Vec<Reservation> = reservations.iter().flatten().cloned().collect();
        let Some(mut lease) = self.budget.try_take(encoded) else {
            let _ = self.idempotency.release(&held).await;
            return Err(IngestError::overloaded("in-flight bytes"));
        };
        let mut receivers = Vec::new();
        let mut submissions = Vec::new();
        for (partition, rows) in partitions.into_iter().enumerate() {
            if rows.chunks.is_empty() {
                continue;
            }
            let ack = acks.then(|| {
                let (tx, rx) = oneshot::channel();
                receivers.push(rx);
                tx
            });
            let lease = Some(lease.split(rows.bytes()));
            let reservation = reservations.get_mut(partition).and_then(Option::take);
            let schema = Arc::clone(schema);
            submissions.push((partition, Submission { schema, rows, ack, lease, reservation, urgent: false }));
        }
        if let Err(error) = self.coalescer.submit(submissions).await {
            let _ = self.idempotency.release(&held).await;
            return Err(match error {
                SubmitError::QueueFull(_) => IngestError::QueueFull(error.to_string()),
                SubmitError::Closed => IngestError::ShuttingDown,
            });
        }
        Ok(receivers)
    }
}

async fn await_flushes(acks: Vec<oneshot::Receiver<FlushResult>>) -> Result<(), IngestError> {
    for ack in acks {
        match ack.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if matches!(e.error, ClickHouseError::CircuitOpen) => return Err(IngestError::CircuitOpen),
            Ok(Err(e)) => return Err(IngestError::FlushFailed(e.to_string())),
            Err(_) => return Err(IngestError::FlushFailed("the coalescer stopped before flushing".into())),
        }
    }
    Ok(())
}

async fn advance_offset(idempotency: &Idempotency, p: &ProducerOffset) {
    if let Err(error) = idempotency.advance_offset(&p.producer, p.partition, p.offset).await {
        tracing::warn!(%error, producer = %p.producer, "written, but the producer offset could not be advanced");
    }
}
