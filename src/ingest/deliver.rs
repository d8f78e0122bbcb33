//! Delivering a decoded batch: the producer's offset checked, its events deduplicated, its
//! rows handed to the coalescers (or the fallback table), the flushes waited for, the offset
//! advanced. Each step is its own function; [`Pipeline::deliver`] runs them in order.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::oneshot;

use super::park::Origin;
use super::{IngestError, Pipeline};
use crate::clickhouse::writer::MIN_BLOCK_ROWS;
use crate::coalesce::SubmitError;
use crate::config::DedupMode;
use crate::decode::{EncodedBatch, RejectedEvent};
use crate::flush::{Acks, Submission, fallback};
use crate::idempotency::{Committed, Idempotency, Reservation};
use crate::journal::watermark::Receipt;
use crate::journal::{FlushError, FlushResult};
use crate::metrics::Outcome;
use crate::rows::PartitionRows;
use crate::schema::{TableSchema, quote_ident};

/// A producer reading from a log: the batch is `offset` of `partition` of `producer`.
#[derive(Debug, Clone)]
pub struct ProducerOffset {
    pub producer: String,
    pub partition: u32,
    pub offset: u64,
    /// The API key the producer writes with: its offsets are that key's
    /// ([`Idempotency::scoped`]).
    pub owner: Option<Arc<str>>,
}

impl ProducerOffset {
    /// Producer ids under this prefix are the gateway's own (the Kafka front's replay marks,
    /// `buffergate-kafka/<group>/<topic>`): no producer may write or read them, or it could
    /// switch another's replay look-ups off.
    pub const RESERVED_PREFIX: &str = "buffergate-kafka/";
    /// The largest offset taken: what every store holds and compares exactly, and what a Kafka
    /// offset (signed 64-bit) can be.
    pub const MAX_OFFSET: u64 = i64::MAX as u64;

    /// Why a producer may not use `id`, if it may not.
    pub fn refuse_id(id: &str) -> Option<&'static str> {
        if id.is_empty() || id.len() > 200 {
            Some("must be 1 to 200 characters")
        } else if id.starts_with(Self::RESERVED_PREFIX) {
            Some("must not start with buffergate-kafka/, which the gateway keeps for itself")
        } else {
            None
        }
    }
}

/// When a batch is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Once the rows are journaled (queued, when there is no journal): 202.
    Queued,
    /// Once their INSERT into the Buffer succeeded: 200.
    Written,
    /// Once they are confirmed in the destination table: 200.
    Visible,
}

/// How a batch is to be delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub wait: Wait,
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

impl Delivered {
    /// The HTTP status of the answer: 200 once written, 202 once queued.
    pub fn status(&self) -> u16 {
        if self.written { 200 } else { 202 }
    }
}

/// Where a batch's rows went, and what to wait for: before the answer, and before the
/// producer's offset moves.
struct HandedOff {
    outcome: Outcome,
    answer: Vec<oneshot::Receiver<FlushResult>>,
    /// What is waited for after the answer ([`Wants::after`]).
    after: Vec<oneshot::Receiver<FlushResult>>,
}

impl Pipeline {
    /// Delivers a decoded batch and says what happened to each of its events.
    pub(super) async fn deliver(
        &self,
        schema: &Arc<TableSchema>,
        mut batch: EncodedBatch,
        how: Delivery,
        receipt: Receipt,
        park: Option<&Origin>,
    ) -> Result<Delivered, IngestError> {
        if let Some(p) = &how.producer
            && self.already_written(p).await?
        {
            // This batch was written before: every event is a duplicate, nothing is written.
            let all = batch.accepted + batch.rejected.len();
            self.events.add(Outcome::Duplicate, all);
            let response = IngestResponse { accepted: 0, duplicates: all, rejected: Vec::new() };
            return Ok(Delivered { written: true, response });
        }
        self.events.add(Outcome::Rejected, batch.rejected.len());
        if !how.divert {
            self.check_shards(&batch).inspect_err(|_| self.events.add(Outcome::Shed, batch.accepted))?;
        }
        // Parked before anything of the request is written: when the quarantine cannot take
        // them, the request is refused whole and its retry stores every event once. Only when
        // there is something to park: the parking future is boxed, and large.
        if let Some(origin) = park
            && !batch.rejected.is_empty()
        {
            let producer = how.producer.as_ref().map(|p| p.producer.as_str());
            self.park(&batch.rejected, origin, producer).await?;
        }
        let (reservations, duplicates) = self.dedupe(schema, &mut batch).await?;
        self.events.add(Outcome::Duplicate, duplicates);
        let accepted = batch.accepted;
        let handed = self.hand_off(schema, batch.partitions, reservations, &how).await.inspect_err(|error| {
            if error.is_shed() {
                self.events.add(Outcome::Shed, accepted);
            }
        })?;
        let written = how.wait != Wait::Queued || how.divert;
        let outcome = handed.outcome;
        self.await_writes(handed, how, receipt).await?;
        self.events.add(outcome, accepted);
        Ok(Delivered { written, response: IngestResponse { accepted, duplicates, rejected: batch.rejected } })
    }

    /// Whether the producer's committed offset already covers this batch: the key's own, or,
    /// until it has one, what the producer committed before offsets were kept per key. A
    /// partition beyond the producer's `producer_max_partitions` is refused.
    async fn already_written(&self, p: &ProducerOffset) -> Result<bool, IngestError> {
        let scoped = Idempotency::scoped(p.owner.as_deref(), p.producer.clone());
        let committed = match self.idempotency.offset(&scoped, p.partition).await {
            Ok(own) if own.offset.is_none() && p.owner.is_some() => {
                let legacy = self.idempotency.offset(&p.producer, p.partition).await;
                legacy.map(|legacy| Committed { offset: legacy.offset, partitions: own.partitions })
            }
            other => other,
        };
        match committed {
            Ok(committed) => {
                self.idempotency
                    .partition_allowed(&committed)
                    .map_err(|limit| IngestError::TooManyPartitions { limit })?;
                Ok(committed.offset.is_some_and(|committed| p.offset <= committed))
            }
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
        let keys: Vec<_> = batch.events.iter_mut().map(|e| Some((e.partition, e.key.take()?))).collect();
        // Only events with an id of their own (or derived from their message) can have been
        // sent before: an id made up here is new.
        let keyed: Vec<bool> = keys.iter().map(Option::is_some).collect();
        let reserved = self.idempotency.reserve_events(batch.partitions.len(), keys).await?;
        let (mut keep, mut duplicates, mut by_partition) = (reserved.keep, reserved.duplicates, reserved.by_partition);
        let mut held = 0;
        if self.idempotency.unsure() {
            let mut looked: Vec<bool> = keep.iter().zip(&keyed).map(|(keep, keyed)| *keep && *keyed).collect();
            // Within half the lease: a look-up that outlived the reservations would let a
            // resend take them over and write the events beside these.
            let bound = std::time::Duration::from_millis(self.config.idempotency.dedup_lease_ms / 2);
            let looked_up =
                tokio::time::timeout(bound, self.drop_held(batch, &mut looked)).await.unwrap_or_else(|_| {
                    Err(IngestError::FlushFailed("looking up whether ClickHouse holds the events timed out".into()))
                });
            held = match looked_up {
                Ok(held) => {
                    // What was looked up and is no longer kept was found.
                    for ((keep, keyed), looked) in keep.iter_mut().zip(&keyed).zip(&looked) {
                        if *keep && *keyed && !*looked {
                            *keep = false;
                        }
                    }
                    held
                }
                Err(error) => {
                    let ours: Vec<Reservation> = by_partition.iter().flatten().cloned().collect();
                    let _ = self.idempotency.release(&ours).await;
                    return Err(error);
                }
            };
            duplicates += held;
        }
        if duplicates > 0 {
            batch.retain(&keep);
        }
        if held > 0 {
            // A partition left with no rows is never flushed, so nothing would commit its
            // reservation: its ids, which ClickHouse holds, are committed here, or a resend
            // would wait for them until the lease ends.
            let emptied: Vec<Reservation> = by_partition
                .iter_mut()
                .zip(&batch.partitions)
                .filter(|(_, rows)| rows.chunks.is_empty())
                .filter_map(|(reservation, _)| reservation.take())
                .collect();
            if let Err(error) = self.idempotency.commit_with_retries(&emptied).await {
                tracing::warn!(%error, "ids found in ClickHouse stay reserved until their lease ends");
            }
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
        Ok((by_partition, duplicates))
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
            // Boxed, as is the offset's advance below: paths most requests never take would
            // otherwise size every request's future, which is copied into a box per request.
            Box::pin(self.write_fallback(schema, partitions, reservations)).await?;
            return Ok(HandedOff { outcome: Outcome::Fallback, answer: Vec::new(), after: Vec::new() });
        }
        let wants = Wants::of(how, self.journaled())?;
        self.enqueue(schema, partitions, reservations, wants).await
    }

    /// Waits for what the answer waits for; once the rows are written (after the answer, when
    /// it does not wait for that), advances the producer's offset and lets go of the request's
    /// receipt.
    async fn await_writes(&self, handed: HandedOff, how: Delivery, receipt: Receipt) -> Result<(), IngestError> {
        await_flushes(handed.answer).await?;
        if handed.after.is_empty() && how.producer.is_none() {
            return Ok(());
        }
        let idempotency = Arc::clone(&self.idempotency);
        let producer = how.producer;
        let after = async move {
            let written = await_flushes(handed.after).await.is_ok();
            if written && let Some(producer) = producer {
                Box::pin(advance_offset(&idempotency, &producer)).await;
            }
            drop(receipt);
        };
        if how.wait == Wait::Queued && !how.divert {
            tokio::spawn(after);
        } else {
            after.await;
        }
        Ok(())
    }

    /// Writes the rows straight into the fallback table (see [`fallback`]).
    async fn write_fallback(
        &self,
        schema: &TableSchema,
        partitions: Vec<PartitionRows>,
        reservations: Vec<Option<Reservation>>,
    ) -> Result<(), IngestError> {
        let config = &self.config;
        let name = format!("{}.{}", quote_ident(&config.table.database), quote_ident(&config.shed.fallback_table));
        let time_column = config.table.time_column();
        let table = fallback::Table { name: &name, id_column: &config.table.id_column, time_column };
        match fallback::write(&self.writer, table, schema, partitions, reservations, &self.idempotency).await {
            fallback::Outcome::Written => Ok(()),
            fallback::Outcome::NotWritten(error) => Err(IngestError::FlushFailed(error.to_string())),
            fallback::Outcome::Unsettled(error) => Err(IngestError::FlushFailed(format!(
                "{error}; whether its rows were stored could not be settled, so its events' \
                 idempotency keys stay reserved until their lease ends"
            ))),
        }
    }

    /// Queues the rows in their partitions; returns the flush outcomes to wait for (`acks`).
    async fn enqueue(
        &self,
        schema: &Arc<TableSchema>,
        partitions: Vec<PartitionRows>,
        mut reservations: Vec<Option<Reservation>>,
        wants: Wants,
    ) -> Result<HandedOff, IngestError> {
        let encoded: usize = partitions.iter().map(PartitionRows::bytes).sum();
        // Kept to give back if the rows cannot be queued.
        let held: Vec<Reservation> = reservations.iter().flatten().cloned().collect();
        let Some(mut lease) = self.budget.try_take(encoded) else {
            let _ = self.idempotency.release(&held).await;
            return Err(IngestError::overloaded(&self.config.stream, "in-flight bytes"));
        };
        let mut handed = HandedOff { outcome: Outcome::Accepted, answer: Vec::new(), after: Vec::new() };
        let mut submissions = Vec::new();
        for (partition, rows) in partitions.into_iter().enumerate() {
            if rows.chunks.is_empty() {
                continue;
            }
            let acks = wants.acks(&mut handed);
            let lease = Some(lease.split(rows.bytes()));
            let reservation = reservations.get_mut(partition).and_then(Option::take);
            let schema = Arc::clone(schema);
            submissions.push((partition, Submission { schema, rows, acks, lease, reservation, urgent: false }));
        }
        if let Err(error) = self.coalescer.submit(submissions).await {
            let _ = self.idempotency.release(&held).await;
            return Err(match error {
                SubmitError::QueueFull(_) => IngestError::QueueFull(error.to_string()),
                SubmitError::Closed => IngestError::ShuttingDown,
            });
        }
        Ok(handed)
    }
}

/// Which moments of its rows' way a request waits for.
#[derive(Debug, Clone, Copy)]
struct Wants {
    answer: Stage,
    /// Something waits for the rows' write after the answer: the producer offset moves then,
    /// and a journaled request's receipt holds the watermark until then.
    after: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    None,
    Journaled,
    Written,
    Visible,
}

impl Wants {
    fn of(how: &Delivery, journal: bool) -> Result<Self, IngestError> {
        let answer = match (how.wait, journal) {
            (Wait::Queued, true) => Stage::Journaled,
            (Wait::Queued, false) => Stage::None,
            (Wait::Written, _) => Stage::Written,
            (Wait::Visible, true) => Stage::Visible,
            (Wait::Visible, false) => return Err(IngestError::VisibleNeedsJournal),
        };
        Ok(Self { answer, after: how.producer.is_some() || (how.wait == Wait::Queued && journal) })
    }

    /// One submission's acks, their receivers added to `handed`.
    fn acks(self, handed: &mut HandedOff) -> Acks {
        let mut acks = Acks::default();
        let mut make = |to_answer: bool| {
            let (tx, rx) = oneshot::channel();
            if to_answer {
                handed.answer.push(rx);
            } else {
                handed.after.push(rx);
            }
            Some(tx)
        };
        match self.answer {
            Stage::None => {}
            Stage::Journaled => acks.journaled = make(true),
            Stage::Written => acks.written = make(true),
            Stage::Visible => acks.visible = make(true),
        }
        // Written or later answers already imply the write waited for after them.
        if self.after && matches!(self.answer, Stage::None | Stage::Journaled) {
            acks.written = make(false);
        }
        acks
    }
}

async fn await_flushes(acks: Vec<oneshot::Receiver<FlushResult>>) -> Result<(), IngestError> {
    for ack in acks {
        match ack.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_circuit_open() => return Err(IngestError::CircuitOpen),
            Ok(Err(FlushError::JournalFull)) => return Err(IngestError::JournalFull),
            // The journal broke under the batch (its path and OS error stay in the logs).
            Ok(Err(FlushError::Journal(_))) => return Err(IngestError::JournalFailed),
            Ok(Err(e)) => return Err(IngestError::FlushFailed(e.to_string())),
            Err(_) => return Err(IngestError::FlushFailed("the coalescer stopped before flushing".into())),
        }
    }
    Ok(())
}

async fn advance_offset(idempotency: &Idempotency, p: &ProducerOffset) {
    let scoped = Idempotency::scoped(p.owner.as_deref(), p.producer.clone());
    if let Err(error) = idempotency.advance_offset(&scoped, p.partition, p.offset).await {
        tracing::warn!(%error, producer = %p.producer, "written, but the producer offset could not be advanced");
    }
}
