//! The path of one batch of events, whatever brought it: admit it (draining, breaker, schema,
//! in-flight budget), decode it, deduplicate it, check the producer's offset, hand its rows to
//! the coalescers (or the fallback table), wait for the flush, advance the offset. The HTTP
//! handler calls these steps in turn and turns their outcome into a response; nothing here
//! knows HTTP.

mod deliver;
mod error;
mod fallback;

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use deliver::{Delivered, Delivery, IngestResponse, ProducerOffset, Wait};
pub use error::IngestError;

use crate::clickhouse::writer::Writer;
use crate::cluster::Shards;
use crate::coalesce::Coalescer;
use crate::config::ShardingKey;
use crate::config::{Config, DedupMode};
use crate::decode::{self, BatchShape, EncodedBatch, Encoding, Format, IdSeed, Placing};
use crate::health::Health;
use crate::idempotency::{Idempotency, RequestState};
use crate::journal::{Durable, DurableStatus};
use crate::metrics;
use crate::schema::{EncodeContext, SharedSchema, TableSchema, Timestamp};
use crate::shed::Verdict;
use crate::shed::budget::{Budget, Lease};

/// Bodies larger than this are decoded on the blocking pool, off the async workers.
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// The parts of the gateway a batch passes through.
#[derive(Debug)]
pub struct Ingest {
    pub config: Arc<Config>,
    pub schema: Arc<SharedSchema>,
    pub health: Arc<Health>,
    pub coalescer: Coalescer,
    /// The first node's writer: blocks made ahead, direct INSERTs (fallback mode, one node).
    pub writer: Arc<Writer>,
    pub budget: Arc<Budget>,
    /// The ClickHouse nodes, each with its writer, breaker, journal and shed verdict.
    pub shards: Arc<Shards>,
    pub sharding: ShardingKey,
    pub idempotency: Arc<Idempotency>,
}

/// A body as received: its bytes and how to read them.
#[derive(Debug)]
pub struct Body {
    pub raw: Bytes,
    pub format: Format,
    pub encoding: Encoding,
    /// Hash the decompressed body (a request-level idempotency key compares bodies).
    pub hash: bool,
    /// Where events without an id get one: derived from the body's origin (a Kafka message),
    /// or `None` for a fresh UUIDv7 each.
    pub ids: Option<IdSeed>,
    /// The time given to events without a timestamp; `None`: now. A Kafka message's own
    /// timestamp makes a message read again encode to the same rows.
    pub received: Option<Timestamp>,
}

/// What the store said of a request-level idempotency key.
#[derive(Debug)]
pub enum Claim {
    /// Ours: deliver, then record the answer (or forget the key on failure).
    Claimed,
    /// Answered before, with this status and body.
    Replay { status: u16, body: Vec<u8> },
    /// The store is down and the policy is to go on without it.
    Bypassed,
}

impl Ingest {
    /// Whether a batch of about `announced` bytes may come in now; the lease holds its bytes
    /// against the in-flight budget until it is decoded.
    pub fn admit(&self, announced: usize) -> Result<(Arc<TableSchema>, Lease), IngestError> {
        if self.health.is_draining() {
            return Err(IngestError::ShuttingDown);
        }
        if self.circuit_open() {
            metrics::shed_request("circuit_open");
            return Err(IngestError::CircuitOpen);
        }
        let schema = self.schema.get().ok_or(IngestError::NotReady("the table schema is not loaded yet"))?;
        if !self.journal_has_room(announced as u64) {
            metrics::shed_request("journal_full");
            return Err(IngestError::JournalFull);
        }
        let lease = self.budget.try_take(announced).ok_or_else(|| IngestError::overloaded("in-flight bytes"))?;
        Ok((schema, lease))
    }

    /// Decompresses and encodes a body, off the async workers when it is large or compressed.
    pub async fn decode(&self, schema: &Arc<TableSchema>, body: Body) -> Result<EncodedBatch, IngestError> {
        let inline = body.raw.len() <= INLINE_DECODE_BYTES && body.encoding == Encoding::Identity;
        let work = {
            let (schema, budget, writer) = (Arc::clone(schema), Arc::clone(&self.budget), Arc::clone(&self.writer));
            let shape = BatchShape {
                partitions: self.coalescer.per_shard(),
                placing: self.placing()?,
                max_events: self.config.max_events_per_request,
                keep_ids: self.idempotency.mode == DedupMode::Event,
                ids: body.ids,
            };
            let now = body.received.unwrap_or_else(Timestamp::now);
            let ctx = EncodeContext { now, unknown_fields: self.config.unknown_fields };
            let max_decompressed = self.config.max_decompressed_bytes;
            move || decode_body(body, &schema, &ctx, &shape, max_decompressed, &budget, &writer)
        };
        if inline { work() } else { tokio::task::spawn_blocking(work).await.map_err(IngestError::internal)? }
    }

    /// Where the events of the next request go: by key, or all to one shard with room.
    fn placing(&self) -> Result<Placing, IngestError> {
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
                metrics::shed_request("shard_saturated");
                let retry_after_s = (0..shards.shards.len()).map(|s| retry_after(shards.verdict(s))).min().unwrap_or(1);
                Err(IngestError::ShardUnavailable { shard: None, retry_after_s })
            }
        }
    }

    /// Refuses a batch with rows for a shard that takes none now: all of it, so that the
    /// answer stays all or nothing (the producer's retry finds the shard back, or keeps
    /// hearing 503 with the shard's `Retry-After`).
    pub fn check_shards(&self, batch: &EncodedBatch) -> Result<(), IngestError> {
        if self.shards.shards.len() == 1 {
            return Ok(());
        }
        let per_shard = self.coalescer.per_shard();
        for (shard, rows) in batch.partitions.chunks(per_shard).enumerate() {
            if rows.iter().all(|p| p.chunks.is_empty()) {
                continue;
            }
            if let verdict @ Verdict::Shed { .. } = self.shards.verdict(shard) {
                metrics::shed_request("shard_saturated");
                return Err(IngestError::ShardUnavailable { shard: Some(shard), retry_after_s: retry_after(verdict) });
            }
        }
        Ok(())
    }

    /// The journals of every node (none when the journal is off).
    pub fn durables(&self) -> impl Iterator<Item = &Arc<Durable>> {
        self.shards.replicas().filter_map(|r| r.durable.as_ref())
    }

    /// Whether rows are journaled.
    pub fn journaled(&self) -> bool {
        self.durables().next().is_some()
    }

    /// Whether every node's journal has room for `bytes` more.
    pub fn journal_has_room(&self, bytes: u64) -> bool {
        self.durables().all(|d| d.has_room(bytes))
    }

    /// The journals' state summed over the nodes; `None` when the journal is off.
    pub fn journal_status(&self) -> Option<DurableStatus> {
        self.durables().map(|d| d.status()).reduce(DurableStatus::combine)
    }

    /// Whether no node takes INSERTs (every circuit breaker open).
    pub fn circuit_open(&self) -> bool {
        self.shards.replicas().all(|r| r.breaker.is_open())
    }

    /// Claims a request-level idempotency key for a body, or says how it was answered before.
    pub async fn claim_request(&self, key: &str, body_hash: &str) -> Result<Claim, IngestError> {
        match self.idempotency.begin_request(key, body_hash).await {
            Ok(RequestState::New) => Ok(Claim::Claimed),
            Ok(RequestState::InFlight { same_body: true }) => Err(IngestError::RequestInFlight),
            Ok(RequestState::InFlight { same_body: false } | RequestState::Done { same_body: false, .. }) => {
                Err(IngestError::IdempotencyKeyReused)
            }
            Ok(RequestState::Done { status, body, .. }) => Ok(Claim::Replay { status, body }),
            Err(error) => self.idempotency.tolerate(error).map(|()| Claim::Bypassed).map_err(IngestError::from),
        }
    }

    /// Records the answer to replay for a claimed key; on failure the answer is simply not
    /// replayable (the events are written).
    pub async fn finish_request(&self, key: &str, body_hash: &str, status: u16, body: &[u8]) {
        let _ = self.idempotency.finish_request(key, body_hash, status, body).await;
    }

    /// Forgets a claimed key whose request failed: nothing was accepted, so a retry must run.
    pub async fn abandon_request(&self, key: &str, body_hash: &str) {
        let _ = self.idempotency.abandon_request(key, body_hash).await;
    }
}

fn retry_after(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Shed { retry_after_s, .. } => retry_after_s,
        Verdict::Pass => 1,
    }
}

/// The decoding itself, on whichever thread: decompress (its output counts against the
/// budget), encode, make the blocks when the rows are final, hash when asked.
fn decode_body(
    body: Body,
    schema: &TableSchema,
    ctx: &EncodeContext,
    shape: &BatchShape,
    max_decompressed: usize,
    budget: &Arc<Budget>,
    writer: &Writer,
) -> Result<EncodedBatch, IngestError> {
    let text = decode::decompress(body.raw, body.encoding, max_decompressed)?;
    let _text_lease = match body.encoding {
        Encoding::Identity => None,
        _ => Some(budget.try_take(text.len()).ok_or_else(|| IngestError::overloaded("in-flight bytes"))?),
    };
    let mut batch = decode::encode_batch(&text, body.format, schema, ctx, shape)?;
    if !shape.keep_ids {
        // The rows are final (nothing to deduplicate): their blocks can be made now.
        writer.make_blocks(schema, &mut batch.partitions);
    }
    if body.hash {
        batch.body_hash = hex::encode(Sha256::digest(&text));
    }
    Ok(batch)
}
