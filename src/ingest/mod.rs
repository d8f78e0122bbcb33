//! The one ingestion sequence, whatever brought the events. A front (`http`, `kafka`) only
//! turns a request or a message into a [`Request`]; [`Pipeline::run`] takes it through every
//! step, in this order, and says what became of it:
//!
//! 1. admit (`admit`): draining, breaker, schema, journal room, in-flight budget;
//! 2. read the body (the front's own reader, within its limits) and decode it (`decode`);
//! 3. drop the events ClickHouse already holds, when the body may have been delivered before
//!    (`present`);
//! 4. claim a request-level idempotency key, or replay its recorded answer (`keys`);
//! 5. deliver (`deliver`): the producer's offset checked, the rejected events parked in the
//!    stream's quarantine table (`park`, through the quarantine's own pipeline), the events
//!    deduplicated, the rows handed to the coalescers (or the fallback table), the flushes
//!    waited for;
//! 6. record the answer for the key, or forget the key when nothing was accepted.
//!
//! Nothing here knows HTTP or Kafka.

mod admit;
mod decode;
mod deliver;
mod error;
mod keys;
mod park;
mod present;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

pub use deliver::{Delivered, Delivery, IngestResponse, ProducerOffset, Wait};
pub use error::IngestError;
pub use park::QuarantineRow;

use crate::clickhouse::writer::Writer;
use crate::cluster::Shards;
use crate::coalesce::Coalescer;
use crate::config::{Config, ShardingKey, UnknownFields};
use crate::decode::{Encoding, Format, IdSeed};
use crate::health::Health;
use crate::idempotency::Idempotency;
use crate::journal::{Receipts, watermark};
use crate::schema::{Dialect, SharedSchema, TableSchema, Timestamp, quote_ident};
use crate::shed::budget::Budget;
use keys::Claim;

/// Look-ups of events that may have been delivered before, sent to ClickHouse at once. After a
/// restart every Kafka message in flight (up to `kafka_max_in_flight`) is one: unbounded, their
/// SELECTs overflowed 18.16's HTTP queue, which then dropped connections.
const PRESENCE_LOOKUPS: usize = 16;

/// The parts of the gateway a batch passes through.
#[derive(Debug)]
pub struct Pipeline {
    config: Arc<Config>,
    schema: Arc<SharedSchema>,
    health: Arc<Health>,
    coalescer: Coalescer,
    /// The first node's writer: blocks made ahead, direct INSERTs (fallback mode, one node).
    writer: Arc<Writer>,
    /// Bytes of bodies being decoded and rows queued: shared by every stream.
    budget: Arc<Budget>,
    /// The ClickHouse nodes, each with its writer, breaker, journal and shed verdict.
    shards: Arc<Shards>,
    sharding: ShardingKey,
    idempotency: Arc<Idempotency>,
    /// Bounds the presence look-ups in flight ([`PRESENCE_LOOKUPS`]).
    lookups: tokio::sync::Semaphore,
    /// `` `db`.`buffer` ``: where replayed events are looked for.
    buffer: String,
    /// The receive times of the requests in flight (the completeness watermark).
    receipts: Arc<Receipts>,
    /// The pipeline of the stream's quarantine table, where its rejected events are parked.
    quarantine: Option<Arc<Pipeline>>,
    /// `buffergate_events_total` of this stream, by outcome.
    events: crate::metrics::EventCounters,
}

/// What a [`Pipeline`] is made of: one stream's parts, and the in-flight budget every stream
/// shares.
#[derive(Debug)]
pub struct Parts {
    pub config: Arc<Config>,
    pub schema: Arc<SharedSchema>,
    pub health: Arc<Health>,
    pub coalescer: Coalescer,
    pub shards: Arc<Shards>,
    pub idempotency: Arc<Idempotency>,
    pub budget: Arc<Budget>,
    pub receipts: Arc<Receipts>,
    pub quarantine: Option<Arc<Pipeline>>,
}

/// One request or message, as a front hands it over.
pub struct Request<'a, E> {
    /// The body, read once the request is admitted: its announced size is held against the
    /// in-flight budget from before it is read until it is decoded.
    pub body: BoxFuture<'a, Result<Bytes, E>>,
    pub announced: usize,
    pub format: Format,
    pub encoding: Encoding,
    /// Where events without an id get one: derived from the body's origin (a Kafka message),
    /// or `None` for a fresh UUIDv7 each.
    pub ids: Option<IdSeed>,
    /// The time given to events without a timestamp; `None`: now. A Kafka message's own
    /// timestamp makes a message read again encode to the same rows.
    pub received: Option<Timestamp>,
    /// A request-level idempotency key (`Idempotency-Key`).
    pub key: Option<String>,
    /// The name of the API key the request came with: its `Idempotency-Key` and producer
    /// offsets live in that key's own namespace (see [`Idempotency::scoped`]).
    pub owner: Option<Arc<str>>,
    pub delivery: Delivery,
    /// The events may have been delivered before (a message read again after a crash or a
    /// rebalance): those ClickHouse holds are dropped before anything is written.
    pub replayed: bool,
    /// Awaited right before the rows are handed on; its failure fails the request (the Kafka
    /// front marks a message as possibly written here).
    pub before_write: Option<BoxFuture<'a, Result<(), IngestError>>>,
    /// How its events are read.
    pub reading: Reading,
}

/// How a request's events are read: as the gateway's own API reads them by default, or as
/// ClickHouse reads an `INSERT … FORMAT JSONEachRow`.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub dialect: Dialect,
    /// The columns an INSERT lists (`None`: every column).
    pub columns: Option<Vec<String>>,
    /// Overrides the stream's `unknown_fields`.
    pub unknown_fields: Option<UnknownFields>,
    /// One event refused refuses the request, nothing of it written: for clients that cannot
    /// read which events were refused.
    pub whole: bool,
    /// The events come from the quarantine (`buffergate replay`): those refused again are not
    /// parked again, the replay updates their rows.
    pub from_quarantine: bool,
}

impl<E> std::fmt::Debug for Request<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("announced", &self.announced)
            .field("format", &self.format)
            .field("encoding", &self.encoding)
            .field("key", &self.key)
            .field("delivery", &self.delivery)
            .field("replayed", &self.replayed)
            .finish_non_exhaustive()
    }
}

/// What became of a request.
#[derive(Debug)]
pub enum Answer {
    Delivered(Delivered),
    /// Its idempotency key was answered before: this status and body again.
    Replayed {
        status: u16,
        body: Vec<u8>,
    },
}

/// A body as received: its bytes and how to read them.
#[derive(Debug)]
struct Body {
    raw: Bytes,
    reading: Reading,
    format: Format,
    encoding: Encoding,
    /// Hash the decompressed body (a request-level idempotency key compares bodies).
    hash: bool,
    ids: Option<IdSeed>,
    received: Option<Timestamp>,
    /// Looked up before it is written: its events' ids are kept.
    replayed: bool,
}

impl Pipeline {
    pub fn new(parts: Parts) -> Self {
        let Parts { config, schema, health, coalescer, shards, idempotency, budget, receipts, quarantine } = parts;
        Self {
            events: crate::metrics::EventCounters::new(&config.stream),
            writer: Arc::clone(&shards.shards[0][0].writer),
            budget,
            sharding: config.sharding(),
            lookups: tokio::sync::Semaphore::new(PRESENCE_LOOKUPS),
            buffer: format!("{}.{}", quote_ident(&config.table.database), quote_ident(&config.table.buffer_table)),
            receipts,
            quarantine,
            config,
            schema,
            health,
            coalescer,
            shards,
            idempotency,
        }
    }

    /// Runs a request through every step, in order (see the module's documentation).
    pub async fn run<E: From<IngestError>>(&self, request: Request<'_, E>) -> Result<Answer, E> {
        let Request {
            body,
            announced,
            format,
            encoding,
            ids,
            received,
            key,
            owner,
            mut delivery,
            replayed,
            before_write,
            reading,
        } = request;
        let key = key.map(|key| Idempotency::scoped(owner.as_deref(), key));
        let parks = self.parks(&reading);
        let origin = park::Origin {
            received,
            owner: owner.clone(),
            ids,
            // Rows diverted to the fallback table are written before the answer.
            wait: if delivery.divert { Wait::Written } else { delivery.wait },
            replayed,
        };
        if let Some(p) = &mut delivery.producer {
            p.owner = owner.clone();
        }
        // Held until the rows are written and in the journal's ledger (past the answer of a
        // `wait=false` request: `deliver` keeps it then).
        // A Kafka message's own time when earlier: its rows carry that time.
        let now = watermark::now_ms();
        let at = received.and_then(|at| at.ticks(3)).map_or(now, |ms| u64::try_from(ms).unwrap_or(0).min(now));
        let receipt = self.receipts.hold(at);
        let (schema, mut batch) = {
            let (schema, _lease) = self.admit(announced)?;
            let raw = body.await?;
            let whole = reading.whole;
            let body = Body { raw, reading, format, encoding, hash: key.is_some(), ids, received, replayed };
            let batch = self.decode(&schema, body).await?;
            if whole && let Some(first) = batch.rejected.first() {
                return Err(IngestError::Refused {
                    index: first.index,
                    field: first.field.clone(),
                    error: first.error.clone(),
                }
                .into());
            }
            if parks && !batch.rejected.is_empty() {
                self.can_park()?;
            }
            (schema, batch)
        };
        if replayed {
            self.drop_present(&mut batch).await?;
        }
        let body_hash = batch.body_hash.clone();
        let claimed = match &key {
            None => None,
            Some(key) => match self.claim_request(key, &body_hash).await? {
                Claim::Claimed => Some(key.as_str()),
                Claim::Bypassed => None,
                Claim::Replay { status, body } => return Ok(Answer::Replayed { status, body }),
            },
        };
        let delivered = async {
            if let Some(mark) = before_write {
                mark.await?;
            }
            let park = parks.then_some(&origin);
            self.deliver(&schema, batch, delivery, receipt, park).await
        }
        .await;
        if let Some(key) = claimed {
            match &delivered {
                Ok(delivered) => {
                    let body = keys::kept_answer(&delivered.response)?;
                    self.finish_request(key, &body_hash, delivered.status(), &body).await;
                }
                Err(_) => self.abandon_request(key, &body_hash).await,
            }
        }
        Ok(Answer::Delivered(delivered?))
    }

    /// The loaded schema, `None` before the first read.
    pub fn schema(&self) -> Option<Arc<TableSchema>> {
        self.schema.get()
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn coalescer(&self) -> &Coalescer {
        &self.coalescer
    }

    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    pub fn idempotency(&self) -> &Arc<Idempotency> {
        &self.idempotency
    }

    /// The pipeline of the stream's quarantine table, when the stream parks rejected events.
    pub fn quarantine(&self) -> Option<&Arc<Pipeline>> {
        self.quarantine.as_ref()
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The completeness watermark (ms since the epoch): every event acknowledged and received
    /// before it is confirmed in the destination. `None` without the journal, which is what
    /// knows, and for a table without an id column, whose blocks the journal cannot find row by
    /// row.
    pub fn watermark(&self) -> Option<u64> {
        if !self.journaled() || self.schema().is_some_and(|s| s.id_column().is_none()) {
            return None;
        }
        let floors = self.shards.replicas().filter_map(|r| r.journal.as_ref()).flat_map(|j| j.floors());
        Some(watermark::watermark(floors, self.receipts.oldest(), watermark::now_ms()))
    }
}
