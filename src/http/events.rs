//! `POST /v1/events`: read the body, validate and encode each event against the live schema,
//! drop what was already written (idempotency), queue the rows in their partitions, and answer
//! once they are written (or queued, with `wait=false`).

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::body::{self, Format};
use super::error::ApiError;
use crate::clickhouse::writer::MIN_BLOCK_ROWS;
use crate::coalesce::{Groups, PartitionRows, Submission, SubmitError};
use crate::idempotency::{DedupMode, Idempotency, KeyState, OnStoreError, RequestState, Reservation, StoreError};
use crate::metrics::{self, Outcome};
use crate::schema::{EncodeContext, EventFields, EventSchema, Instant, Scanner, SyntaxError, TableSchema, quote_ident};
use crate::server::AppState;
use crate::shed::layer::Divert;

/// Bodies larger than this are parsed on the blocking pool, off the async workers.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
pub struct IngestParams {
    /// `false`: answer 202 once the events are validated and queued, before they are written.
    #[serde(default = "default_wait")]
    wait: bool,
}

fn default_wait() -> bool {
    true
}

#[derive(Debug, Serialize)]
pub struct IngestResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<RejectedEvent>,
}

#[derive(Debug, Serialize)]
pub struct RejectedEvent {
    /// Position of the event in the request (0-based).
    pub index: usize,
    /// The offending field; `null` when the event as a whole is wrong.
    pub field: Option<String>,
    pub error: String,
}

/// Where an accepted event's row went, to filter duplicates out afterwards.
#[derive(Debug)]
pub struct EventRow {
    /// The idempotency key of the event's own id (`id_column`), when it sent one
    /// ([`Idempotency::event_key`]); taken by the reservation.
    pub key: Option<Vec<u8>>,
    pub partition: usize,
    pub chunk: usize,
    pub range: std::ops::Range<usize>,
}

/// A request's events, encoded and split by partition.
#[derive(Debug)]
pub struct EncodedBatch {
    pub partitions: Vec<PartitionRows>,
    /// One per accepted event, in order (kept only when events are deduplicated).
    pub events: Vec<EventRow>,
    pub accepted: usize,
    pub rejected: Vec<RejectedEvent>,
    /// SHA-256 of the (decompressed) body, hex: what `Idempotency-Key` compares (empty when the
    /// request has no such key).
    pub body_hash: String,
}

impl EncodedBatch {
    /// Keeps only the accepted events for which `keep` is true.
    pub fn retain(&mut self, keep: &[bool]) {
        let fresh = (0..self.partitions.len()).map(|_| PartitionRows::default()).collect();
        let old = std::mem::replace(&mut self.partitions, fresh);
        let mut events = Vec::new();
        for (event, &kept) in std::mem::take(&mut self.events).into_iter().zip(keep) {
            if !kept {
                continue;
            }
            let chunk = &old[event.partition].chunks[event.chunk];
            let (index, range) = self.partitions[event.partition].push(chunk.omitted, &chunk.data[event.range]);
            events.push(EventRow { key: event.key, partition: event.partition, chunk: index, range });
        }
        self.accepted = events.len();
        self.events = events;
    }
}

/// A producer reading from a log: `X-Producer-Id`, `X-Producer-Partition`, `X-Producer-Offset`.
#[derive(Debug, Clone)]
struct ProducerOffset {
    producer: String,
    partition: u32,
    offset: u64,
}

fn producer_offset(headers: &HeaderMap) -> Result<Option<ProducerOffset>, ApiError> {
    let text = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| ApiError::BadHeader(format!("{name} is not visible ASCII"))))
            .transpose()
    };
    let (id, partition, offset) = (text("x-producer-id")?, text("x-producer-partition")?, text("x-producer-offset")?);
    let Some(producer) = id else {
        if partition.is_some() || offset.is_some() {
            return Err(ApiError::BadHeader("X-Producer-Partition and X-Producer-Offset need X-Producer-Id".into()));
        }
        return Ok(None);
    };
    if producer.is_empty() || producer.len() > 200 {
        return Err(ApiError::BadHeader("X-Producer-Id must be 1 to 200 characters".into()));
    }
    let offset = offset
        .ok_or_else(|| ApiError::BadHeader("X-Producer-Id needs X-Producer-Offset".into()))?
        .trim()
        .parse()
        .map_err(|_| ApiError::BadHeader("X-Producer-Offset must be an integer from 0 to 2^64-1".into()))?;
    let partition = match partition {
        Some(p) => p
            .trim()
            .parse()
            .map_err(|_| ApiError::BadHeader("X-Producer-Partition must be an integer from 0 to 2^32-1".into()))?,
        None => 0,
    };
    Ok(Some(ProducerOffset { producer: producer.to_string(), partition, offset }))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) => Ok(Some(key.to_string())),
        _ => Err(ApiError::BadHeader("Idempotency-Key must be 1 to 255 visible ASCII characters".into())),
    }
}

/// A store failure on the request path, under the configured policy: `Ok(())` means carry on
/// without the store.
fn tolerate(idempotency: &Idempotency, error: &StoreError) -> Result<(), ApiError> {
    match idempotency.on_error {
        OnStoreError::Reject => Err(ApiError::StoreUnavailable(error.to_string())),
        OnStoreError::Accept => Ok(()),
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    divert: Option<Extension<Divert>>,
    params: Result<Query<IngestParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(&state, divert.is_some(), params, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    divert: bool,
    params: Result<Query<IngestParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let request_key = idempotency_key(headers)?;
    let producer = producer_offset(headers)?;
    let (schema, batch) = prepare(state, headers, body).await?;
    let idempotency = &state.idempotency;
    let body_hash = batch.body_hash.clone();

    let claimed = match &request_key {
        None => false,
        Some(key) => match idempotency.begin_request(key, &body_hash).await {
            Ok(RequestState::New) => true,
            Ok(RequestState::InFlight { same_body: true }) => return Err(ApiError::RequestInFlight),
            Ok(RequestState::InFlight { same_body: false } | RequestState::Done { same_body: false, .. }) => {
                return Err(ApiError::IdempotencyKeyReused);
            }
            Ok(RequestState::Done { status, body, .. }) => {
                let mut response = json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body);
                response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(response);
            }
            Err(error) => {
                tolerate(idempotency, &error)?;
                false
            }
        },
    };

    let result = deliver(state, &schema, batch, params.wait, divert, producer).await;
    let key = request_key.filter(|_| claimed);
    match result {
        Ok((status, answer)) => {
            let body = serde_json::to_vec(&answer).map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Some(key) = key {
                // If this fails the answer is simply not replayable; the events are written.
                let _ = idempotency.finish_request(&key, &body_hash, status.as_u16(), &body).await;
            }
            Ok(json_response(status, body))
        }
        Err(error) => {
            if let Some(key) = key {
                // Nothing was accepted: a retry with this key must run again.
                let _ = idempotency.abandon_request(&key, &body_hash).await;
            }
            Err(error)
        }
    }
}

/// Reads, decompresses and encodes the body, holding its bytes against the in-flight budget.
async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<TableSchema>, EncodedBatch), ApiError> {
    if state.health.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    if state.breaker.is_open() {
        metrics::shed_request("circuit_open");
        return Err(ApiError::CircuitOpen);
    }
    let schema = state.schema.get().ok_or(ApiError::NotReady("the table schema is not loaded yet"))?;
    let format = body::format_of(headers)?;
    let encoding = body::encoding_of(headers)?;
    let config = &state.config;

    // The body counts against the in-flight budget from before it is read until it is encoded.
    let announced = content_length(headers).unwrap_or(config.max_body_bytes).min(config.max_body_bytes);
    let body_lease = state.budget.try_take(announced).ok_or_else(|| overloaded("in-flight bytes"))?;
    let raw = body::read_limited(headers, body, config.max_body_bytes).await?;

    let ctx = EncodeContext { now: Instant::now(), unknown_fields: config.unknown_fields };
    let limits = BatchShape {
        partitions: state.coalescer.partitions(),
        max_events: config.max_events_per_request,
        keep_ids: state.idempotency.mode == DedupMode::Event,
    };
    let max_decompressed = config.max_decompressed_bytes;
    // Only an Idempotency-Key compares bodies.
    let hash_body = headers.contains_key("idempotency-key");
    let work = {
        let schema = Arc::clone(&schema);
        let budget = Arc::clone(&state.budget);
        let writer = Arc::clone(&state.writer);
        move || {
            let text = body::decompress(raw, encoding, max_decompressed)?;
            let _text_lease = match encoding {
                body::Encoding::Identity => None,
                _ => Some(budget.try_take(text.len()).ok_or_else(|| overloaded("in-flight bytes"))?),
            };
            let mut batch = encode_batch(&text, format, &schema, &ctx, &limits)?;
            if !limits.keep_ids {
                // The rows are final (nothing to deduplicate): their blocks can be made now.
                writer.prepare(&schema, &mut batch.partitions);
            }
            if hash_body {
                batch.body_hash = hex(&Sha256::digest(&text));
            }
            Ok::<_, ApiError>(batch)
        }
    };
    let batch = if announced > INLINE_PARSE_BYTES || encoding != body::Encoding::Identity {
        tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(e.to_string()))??
    } else {
        work()?
    };
    drop(body_lease);
    Ok((schema, batch))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deduplicates, writes (through the coalescers, or to the fallback table), advances the
/// producer's offset, and says what happened to each event.
async fn deliver(
    state: &AppState,
    schema: &Arc<TableSchema>,
    mut batch: EncodedBatch,
    wait: bool,
    divert: bool,
    producer: Option<ProducerOffset>,
) -> Result<(StatusCode, IngestResponse), ApiError> {
    let idempotency = &state.idempotency;
    if let Some(p) = &producer {
        match idempotency.offset(&p.producer, p.partition).await {
            Ok(Some(committed)) if p.offset <= committed => {
                // This batch was written before: every event is a duplicate, nothing is written.
                let all = batch.accepted + batch.rejected.len();
                metrics::events(Outcome::Duplicate, all);
                return Ok((StatusCode::OK, IngestResponse { accepted: 0, duplicates: all, rejected: Vec::new() }));
            }
            Ok(_) => {}
            Err(error) => tolerate(idempotency, &error)?,
        }
    }
    metrics::events(Outcome::Rejected, batch.rejected.len());

    let (reservations, duplicates) = if idempotency.mode == DedupMode::Event {
        let reserved = reserve(idempotency, &mut batch).await?;
        // The rows are final now: their blocks are made here, off the async workers when
        // there may be enough rows for one (a block takes tens of µs to make).
        let (writer, schema) = (Arc::clone(&state.writer), Arc::clone(schema));
        let mut partitions = std::mem::take(&mut batch.partitions);
        let prepare = move || {
            writer.prepare(&schema, &mut partitions);
            partitions
        };
        batch.partitions = if batch.accepted >= MIN_BLOCK_ROWS {
            tokio::task::spawn_blocking(prepare).await.map_err(|e| ApiError::Internal(e.to_string()))?
        } else {
            prepare()
        };
        reserved
    } else {
        ((0..batch.partitions.len()).map(|_| None).collect(), 0)
    };
    metrics::events(Outcome::Duplicate, duplicates);
    let accepted = batch.accepted;

    let written = if divert {
        write_fallback(state, schema, batch.partitions, reservations)
            .await
            .map(|()| (StatusCode::OK, Outcome::Fallback, Vec::new()))
    } else {
        // Offsets advance only after the write, so the producer's batch must be waited for.
        let acks = wait || producer.is_some();
        enqueue(state, schema, batch.partitions, reservations, acks).await.map(|acks| {
            let status = if wait { StatusCode::OK } else { StatusCode::ACCEPTED };
            (status, Outcome::Accepted, acks)
        })
    };
    let (status, outcome, acks) = match written {
        Ok(written) => written,
        Err(error) => {
            if matches!(
                error,
                ApiError::Overloaded(_) | ApiError::QueueFull(_) | ApiError::ShuttingDown | ApiError::CircuitOpen
            ) {
                metrics::events(Outcome::Shed, accepted);
            }
            return Err(error);
        }
    };
    let tracked = producer.is_some();
    let advance = {
        let state_idempotency = Arc::clone(&state.idempotency);
        async move {
            await_flushes(acks).await?;
            if let Some(p) = producer
                && let Err(error) = state_idempotency.advance_offset(&p.producer, p.partition, p.offset).await
            {
                tracing::warn!(%error, producer = %p.producer, "written, but the producer offset could not be advanced");
            }
            Ok::<(), ApiError>(())
        }
    };
    if wait || divert {
        advance.await?;
    } else if tracked {
        // wait=false with producer offsets: the offset moves once the flush succeeded.
        tokio::spawn(async move {
            let _ = advance.await;
        });
    }
    metrics::events(outcome, accepted);
    Ok((status, IngestResponse { accepted, duplicates, rejected: batch.rejected }))
}

/// Reserves the events' keys. Events already written, or sent twice in this request, are
/// dropped from the batch and counted as duplicates; events another request is writing right
/// now are waited for (up to `dedup_pending_wait_ms`), then decided the same way.
/// Returns the reservations, one per partition the request's events went to, and the number
/// of duplicates.
async fn reserve(
    idempotency: &Idempotency,
    batch: &mut EncodedBatch,
) -> Result<(Vec<Option<Reservation>>, usize), ApiError> {
    let partitions = batch.partitions.len();
    let mut by_partition: Vec<Option<Reservation>> = (0..partitions).map(|_| None).collect();
    let mut keep = vec![true; batch.events.len()];
    let mut duplicates = 0;
    // (event index, (token index = partition, key)) of the keys still to decide.
    let mut todo: Vec<(usize, (usize, Vec<u8>))> = batch
        .events
        .iter_mut()
        .enumerate()
        .filter_map(|(i, event)| Some((i, (event.partition, event.key.take()?))))
        .collect();
    // Ids sent twice in the request: the first one stands for all.
    let mut seen = std::collections::HashSet::with_capacity(todo.len());
    let first: Vec<bool> = todo.iter().map(|(_, (_, key))| seen.insert(key.as_slice())).collect();
    drop(seen);
    let mut first = first.into_iter();
    todo.retain(|(i, _)| {
        let fresh = first.next().unwrap_or(true);
        if !fresh {
            keep[*i] = false;
            duplicates += 1;
        }
        fresh
    });
    if todo.is_empty() && duplicates == 0 {
        return Ok((by_partition, 0));
    }
    let tokens = Idempotency::new_tokens(partitions);
    let mut held = vec![false; partitions];
    let deadline = tokio::time::Instant::now() + idempotency.pending_wait;
    let mut pause = Duration::from_millis(10);
    while !todo.is_empty() {
        let (events, keys): (Vec<usize>, Vec<(usize, Vec<u8>)>) = todo.into_iter().unzip();
        let states = match idempotency.reserve(&tokens, &keys).await {
            Ok(states) => states,
            Err(error) => {
                if let Err(refusal) = tolerate(idempotency, &error) {
                    release(idempotency, &tokens, &held).await;
                    return Err(refusal);
                }
                metrics::dedup_bypassed(keys.len());
                break;
            }
        };
        let mut pending = Vec::new();
        for ((i, key), state) in events.into_iter().zip(keys).zip(states) {
            match state {
                KeyState::Reserved => held[key.0] = true,
                KeyState::Committed => {
                    keep[i] = false;
                    duplicates += 1;
                }
                KeyState::Pending => pending.push((i, key)),
            }
        }
        todo = pending;
        if todo.is_empty() {
            break;
        }
        if tokio::time::Instant::now() + pause > deadline {
            release(idempotency, &tokens, &held).await;
            return Err(ApiError::EventsInFlight);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    for (partition, token) in tokens.into_iter().enumerate() {
        if held[partition] {
            by_partition[partition] = Some(Reservation { token });
        }
    }
    if keep.iter().any(|k| !k) {
        batch.retain(&keep);
    }
    Ok((by_partition, duplicates))
}

/// Gives reservations back before answering 503, so the producer's retry need not wait for
/// the lease (best effort: they expire with it anyway).
async fn release(idempotency: &Idempotency, tokens: &[Vec<u8>], held: &[bool]) {
    let reservations: Vec<Reservation> =
        tokens.iter().zip(held).filter(|(_, h)| **h).map(|(t, _)| Reservation { token: t.clone() }).collect();
    let _ = idempotency.release(&reservations).await;
}

fn overloaded(what: &'static str) -> ApiError {
    metrics::shed_request("overloaded");
    ApiError::Overloaded(what)
}

/// Queues the rows in their partitions; returns the flush outcomes to wait for (`acks`).
async fn enqueue(
    state: &AppState,
    schema: &Arc<TableSchema>,
    partitions: Vec<PartitionRows>,
    mut reservations: Vec<Option<Reservation>>,
    acks: bool,
) -> Result<Vec<oneshot::Receiver<crate::coalesce::FlushResult>>, ApiError> {
    let encoded: usize = partitions.iter().map(PartitionRows::bytes).sum();
    // Kept to give back if the rows cannot be queued.
    let held: Vec<Reservation> = reservations.iter().flatten().cloned().collect();
    let release_held = |held: Vec<Reservation>| async move {
        let _ = state.idempotency.release(&held).await;
    };
    let Some(mut lease) = state.budget.try_take(encoded) else {
        release_held(held).await;
        return Err(overloaded("in-flight bytes"));
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
        submissions
            .push((partition, Submission { schema: Arc::clone(schema), rows, ack, lease, reservation, urgent: false }));
    }
    if let Err(error) = state.coalescer.submit(submissions).await {
        release_held(held).await;
        return Err(match error {
            SubmitError::QueueFull(_) => ApiError::QueueFull(error.to_string()),
            SubmitError::Closed => ApiError::ShuttingDown,
        });
    }
    Ok(receivers)
}

async fn await_flushes(acks: Vec<oneshot::Receiver<crate::coalesce::FlushResult>>) -> Result<(), ApiError> {
    for ack in acks {
        match ack.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if matches!(e.error, crate::clickhouse::ClickHouseError::CircuitOpen) => {
                return Err(ApiError::CircuitOpen);
            }
            Ok(Err(e)) => return Err(ApiError::FlushFailed(e.to_string())),
            Err(_) => return Err(ApiError::FlushFailed("the coalescer stopped before flushing".into())),
        }
    }
    Ok(())
}

/// Fallback mode while the Buffer is saturated: the request's rows go straight into the
/// fallback MergeTree table, one INSERT per column list, bypassing the coalescers.
async fn write_fallback(
    state: &AppState,
    schema: &TableSchema,
    partitions: Vec<PartitionRows>,
    reservations: Vec<Option<Reservation>>,
) -> Result<(), ApiError> {
    let table = format!("{}.{}", quote_ident(&state.config.database), quote_ident(&state.config.fallback_table));
    let mut groups = Groups::default();
    for chunk in partitions.into_iter().flat_map(|p| p.chunks) {
        groups.add(chunk);
    }
    let mut result = Ok(());
    for group in groups.0 {
        result = state.writer.write_rows(schema, &table, group).await;
        if result.is_err() {
            break;
        }
    }
    let reservations: Vec<Reservation> = reservations.into_iter().flatten().collect();
    match result {
        Ok(()) => {
            let _ = state.idempotency.commit(&reservations).await;
            Ok(())
        }
        Err(error) => {
            let _ = state.idempotency.release(&reservations).await;
            Err(ApiError::FlushFailed(error.to_string()))
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// What `encode_batch` needs to know besides the schema.
#[derive(Debug, Clone, Copy)]
pub struct BatchShape {
    pub partitions: usize,
    pub max_events: usize,
    /// Remember each event's id and row position, for deduplication.
    pub keep_ids: bool,
}

/// Parses the body event by event and encodes each straight into its partition's rows; no
/// event outlives its own encoding, so memory stays proportional to the encoded output.
pub fn encode_batch(
    text: &[u8],
    format: Format,
    schema: &TableSchema,
    ctx: &EncodeContext,
    shape: &BatchShape,
) -> Result<EncodedBatch, ApiError> {
    let partitions = shape.partitions.max(1);
    let mut batch = EncodedBatch {
        // RowBinary is usually well under half the size of the JSON it came from: an
        // underestimate costs one doubling, an overestimate would hold memory not accounted for.
        partitions: (0..partitions).map(|_| PartitionRows::with_expected_bytes(text.len() / 3 / partitions)).collect(),
        events: Vec::new(),
        accepted: 0,
        rejected: Vec::new(),
        body_hash: String::new(),
    };
    let mut index = 0usize;
    let mut take = |fields: &EventFields| {
        // One partition (the default on small hosts) needs no key hashed.
        let partition = if partitions == 1 {
            0
        } else {
            (schema.partition_hash(fields, index as u64) % partitions as u64) as usize
        };
        match batch.partitions[partition].encode(|out| schema.encode_fields(fields, ctx, out)) {
            Ok((chunk, range)) => {
                batch.accepted += 1;
                if shape.keep_ids {
                    let key = schema.event_id(fields).map(|id| Idempotency::event_key(&id));
                    batch.events.push(EventRow { key, partition, chunk, range });
                }
            }
            Err(rejection) => {
                batch.rejected.push(RejectedEvent { index, field: rejection.field, error: rejection.error });
            }
        }
        index += 1;
    };
    let reader = Reader { schema: EventSchema { schema, unknown: ctx.unknown_fields }, max_events: shape.max_events };
    match format {
        Format::JsonArray => reader.array(text, &mut take)?,
        Format::Ndjson => reader.ndjson(text, &mut take)?,
    }
    Ok(batch)
}

/// Reads a body's events one at a time, each straight into its fields (no value tree), and
/// hands each to `take` before reading the next.
struct Reader<'s> {
    schema: EventSchema<'s>,
    max_events: usize,
}

impl Reader<'_> {
    /// A JSON array of events, or a single event object.
    fn array<'a>(&self, text: &'a [u8], take: &mut dyn FnMut(&EventFields<'a>)) -> Result<(), ApiError> {
        let at = |e: SyntaxError| {
            let (line, column) = e.position(text);
            ApiError::MalformedJson { line, column, reason: e.reason.to_string() }
        };
        let text = utf8(text).map_err(at)?;
        let mut scanner = Scanner::new(text);
        let mut fields = EventFields::default();
        scanner.ws();
        match scanner.peek() {
            Some(b'[') => {
                scanner.bump();
                scanner.ws();
                let mut more = scanner.peek() != Some(b']');
                if !more {
                    scanner.bump();
                }
                let mut count = 0usize;
                while more {
                    count += 1;
                    if count > self.max_events {
                        return Err(ApiError::TooManyEvents { limit: self.max_events });
                    }
                    scanner.event(self.schema, &mut fields).map_err(at)?;
                    take(&fields);
                    more = scanner.next_element(b']').map_err(at)?;
                }
            }
            Some(b'{') => {
                scanner.event(self.schema, &mut fields).map_err(at)?;
                take(&fields);
            }
            None => return Err(at(scanner.error("EOF while parsing a value"))),
            Some(_) => return Err(at(scanner.error("expected an array of event objects"))),
        }
        scanner.ws();
        if scanner.at_end() { Ok(()) } else { Err(at(scanner.error("trailing characters"))) }
    }

    /// One event per line; blank lines are skipped.
    fn ndjson<'a>(&self, text: &'a [u8], take: &mut dyn FnMut(&EventFields<'a>)) -> Result<(), ApiError> {
        let mut count = 0usize;
        let mut fields = EventFields::default();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            count += 1;
            if count > self.max_events {
                return Err(ApiError::TooManyEvents { limit: self.max_events });
            }
            let at = |e: SyntaxError| ApiError::MalformedJson {
                line: i + 1,
                column: e.position(line).1,
                reason: e.reason.to_string(),
            };
            let mut scanner = Scanner::new(utf8(line).map_err(at)?);
            scanner.ws();
            scanner.event(self.schema, &mut fields).map_err(at)?;
            scanner.ws();
            if !scanner.at_end() {
                return Err(at(scanner.error("trailing characters")));
            }
            take(&fields);
        }
        Ok(())
    }
}

/// The body as text: UTF-8 is checked once, up front, rather than string by string.
fn utf8(text: &[u8]) -> Result<&str, SyntaxError> {
    std::str::from_utf8(text)
        .map_err(|e| SyntaxError { offset: e.valid_up_to(), reason: "invalid UTF-8 (bodies are UTF-8 JSON)" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UnknownFields;
    use crate::schema::{ColumnInfo, SpecialColumns};

    fn schema() -> TableSchema {
        let special = SpecialColumns { id: "id".into(), timestamp: "ts".into(), partition_key: "k".into() };
        let info = |n: &str, t: &str| ColumnInfo { name: n.into(), type_text: t.into(), default_kind: String::new() };
        TableSchema::new(1, "d", "t", vec![info("k", "UInt32"), info("s", "String")], &special)
    }

    fn run(text: &str, format: Format, max: usize) -> Result<EncodedBatch, ApiError> {
        let ctx = EncodeContext { now: Instant::now(), unknown_fields: UnknownFields::Reject };
        encode_batch(
            text.as_bytes(),
            format,
            &schema(),
            &ctx,
            &BatchShape { partitions: 4, max_events: max, keep_ids: true },
        )
    }

    #[test]
    fn partial_rejection_keeps_the_rest() {
        let batch = run(r#"[{"k": 1, "s": "a"}, {"k": -1}, 7, {"k": 2}]"#, Format::JsonArray, 10).unwrap();
        assert_eq!(batch.accepted, 2);
        let rejected: Vec<_> = batch.rejected.iter().map(|r| (r.index, r.field.clone())).collect();
        assert_eq!(rejected, vec![(1, Some("k".to_string())), (2, None)]);
        assert_eq!(batch.partitions.iter().map(PartitionRows::rows).sum::<usize>(), 2);
    }

    #[test]
    fn same_key_same_partition() {
        let batch = run(r#"[{"k": 9}, {"k": 9}, {"k": 9}]"#, Format::JsonArray, 10).unwrap();
        assert_eq!(batch.partitions.iter().filter(|p| p.rows() > 0).count(), 1);
    }

    #[test]
    fn malformed_json_reports_position() {
        let Err(ApiError::MalformedJson { line, column, .. }) = run("[{\"k\": 1},\n {\"k\": }]", Format::JsonArray, 10)
        else {
            panic!("expected malformed_json")
        };
        assert_eq!((line, column), (2, 8));
        let Err(ApiError::MalformedJson { line, .. }) = run("{\"k\": 1}\n\n{oops}\n", Format::Ndjson, 10) else {
            panic!("expected malformed_json")
        };
        assert_eq!(line, 3);
    }

    #[test]
    fn limits_and_shapes() {
        assert!(matches!(run("[{}, {}, {}]", Format::JsonArray, 2), Err(ApiError::TooManyEvents { limit: 2 })));
        assert!(matches!(run("{}\n{}\n{}\n", Format::Ndjson, 2), Err(ApiError::TooManyEvents { .. })));
        assert_eq!(run(r#"{"k": 3}"#, Format::JsonArray, 1).unwrap().accepted, 1);
        assert!(matches!(run(r#""text""#, Format::JsonArray, 1), Err(ApiError::MalformedJson { .. })));
        assert_eq!(run("[]", Format::JsonArray, 1).unwrap().accepted, 0);
    }
}
