//! `POST /v1/events`: read the body, validate and encode each event against the live schema,
//! queue the rows in their partitions, and answer once they are written (or queued, with
//! `wait=false`).

use std::fmt;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use super::body::{self, Format};
use super::error::ApiError;
use bytes::Bytes;

use crate::coalesce::{PartitionRows, Submission, SubmitError};
use crate::metrics::{self, Outcome};
use crate::schema::{EncodeContext, Instant, TableSchema, quote_ident};
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

/// A request's events, encoded and split by partition.
#[derive(Debug)]
pub struct EncodedBatch {
    pub partitions: Vec<PartitionRows>,
    pub accepted: usize,
    pub rejected: Vec<RejectedEvent>,
}

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    divert: Option<Extension<Divert>>,
    params: Result<Query<IngestParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<IngestResponse>), ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    if state.health.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    if state.breaker.is_open() {
        metrics::shed_request("circuit_open");
        return Err(ApiError::CircuitOpen);
    }
    let schema = state.schema.get().ok_or(ApiError::NotReady("the table schema is not loaded yet"))?;
    let format = body::format_of(&headers)?;
    let encoding = body::encoding_of(&headers)?;
    let config = &state.config;

    // The body counts against the in-flight budget from before it is read until it is encoded.
    let announced = content_length(&headers).unwrap_or(config.max_body_bytes).min(config.max_body_bytes);
    let body_lease = state.budget.try_take(announced).ok_or_else(|| overloaded("in-flight bytes"))?;
    let raw = body::read_limited(&headers, body, config.max_body_bytes).await?;

    let ctx = EncodeContext { now: Instant::now(), unknown_fields: config.unknown_fields };
    let (partitions, max_events, max_decompressed) =
        (state.coalescer.partitions(), config.max_events_per_request, config.max_decompressed_bytes);
    let prepare = {
        let schema = Arc::clone(&schema);
        let budget = Arc::clone(&state.budget);
        move || {
            let text = body::decompress(raw, encoding, max_decompressed)?;
            let _text_lease = match encoding {
                body::Encoding::Identity => None,
                _ => Some(budget.try_take(text.len()).ok_or_else(|| overloaded("in-flight bytes"))?),
            };
            encode_batch(&text, format, &schema, &ctx, partitions, max_events)
        }
    };
    let batch = if announced > INLINE_PARSE_BYTES || encoding != body::Encoding::Identity {
        tokio::task::spawn_blocking(prepare).await.map_err(|e| ApiError::Internal(e.to_string()))??
    } else {
        prepare()?
    };
    drop(body_lease);
    metrics::events(Outcome::Rejected, batch.rejected.len());

    let outcome = if divert.is_some() {
        write_fallback(&state, &schema, batch.partitions).await.map(|()| (StatusCode::OK, Outcome::Fallback))
    } else {
        enqueue(&state, &schema, batch.partitions, params.wait).await.map(|status| (status, Outcome::Accepted))
    };
    match outcome {
        Ok((status, outcome)) => {
            metrics::events(outcome, batch.accepted);
            Ok((status, Json(IngestResponse { accepted: batch.accepted, duplicates: 0, rejected: batch.rejected })))
        }
        Err(error) => {
            if matches!(
                error,
                ApiError::Overloaded(_) | ApiError::QueueFull(_) | ApiError::ShuttingDown | ApiError::CircuitOpen
            ) {
                metrics::events(Outcome::Shed, batch.accepted);
            }
            Err(error)
        }
    }
}

fn overloaded(what: &'static str) -> ApiError {
    metrics::shed_request("overloaded");
    ApiError::Overloaded(what)
}

/// Queues the rows in their partitions; with `wait`, returns once every flush holding them
/// succeeded.
async fn enqueue(
    state: &AppState,
    schema: &Arc<TableSchema>,
    partitions: Vec<PartitionRows>,
    wait: bool,
) -> Result<StatusCode, ApiError> {
    let encoded: usize = partitions.iter().map(PartitionRows::bytes).sum();
    let mut lease = state.budget.try_take(encoded).ok_or_else(|| overloaded("in-flight bytes"))?;
    let mut acks = Vec::new();
    let mut submissions = Vec::new();
    for (partition, rows) in partitions.into_iter().enumerate() {
        if rows.chunks.is_empty() {
            continue;
        }
        let ack = wait.then(|| {
            let (tx, rx) = oneshot::channel();
            acks.push(rx);
            tx
        });
        let lease = Some(lease.split(rows.bytes()));
        submissions.push((partition, Submission { schema: Arc::clone(schema), rows, ack, lease }));
    }
    state.coalescer.submit(submissions).await.map_err(|e| match e {
        SubmitError::QueueFull(_) => ApiError::QueueFull(e.to_string()),
        SubmitError::Closed => ApiError::ShuttingDown,
    })?;
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
    Ok(if wait { StatusCode::OK } else { StatusCode::ACCEPTED })
}

/// Fallback mode while the Buffer is saturated: the request's rows go straight into the
/// fallback MergeTree table, one INSERT per column list, bypassing the coalescers.
async fn write_fallback(
    state: &AppState,
    schema: &TableSchema,
    partitions: Vec<PartitionRows>,
) -> Result<(), ApiError> {
    let table = format!("{}.{}", quote_ident(&state.config.database), quote_ident(&state.config.fallback_table));
    let mut merged = PartitionRows::default();
    for chunk in partitions.into_iter().flat_map(|p| p.chunks) {
        merged.append(chunk);
    }
    for chunk in merged.chunks {
        state
            .writer
            .write(&schema.insert_sql_into(&table, chunk.omitted), Bytes::from(chunk.data), chunk.rows)
            .await
            .map_err(|e| ApiError::FlushFailed(e.to_string()))?;
    }
    Ok(())
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Parses the body event by event and encodes each straight into its partition's rows; no
/// event outlives its own encoding, so memory stays proportional to the encoded output.
pub fn encode_batch(
    text: &[u8],
    format: Format,
    schema: &TableSchema,
    ctx: &EncodeContext,
    partitions: usize,
    max_events: usize,
) -> Result<EncodedBatch, ApiError> {
    let mut batch = EncodedBatch {
        partitions: (0..partitions.max(1)).map(|_| PartitionRows::default()).collect(),
        accepted: 0,
        rejected: Vec::new(),
    };
    let mut row = Vec::with_capacity(256);
    let mut index = 0usize;
    let mut take = |event: Value| {
        row.clear();
        match schema.encode_event(&event, ctx, &mut row) {
            Ok(omitted) => {
                let partition = (schema.partition_hash(&event, index as u64) % batch.partitions.len() as u64) as usize;
                batch.partitions[partition].push(omitted, &row);
                batch.accepted += 1;
            }
            Err(rejection) => {
                batch.rejected.push(RejectedEvent { index, field: rejection.field, error: rejection.error });
            }
        }
        index += 1;
    };
    match format {
        Format::JsonArray => parse_array(text, max_events, &mut take)?,
        Format::Ndjson => parse_ndjson(text, max_events, &mut take)?,
    }
    Ok(batch)
}

/// serde_json's message without its " at line L column C" suffix (the fields carry those).
fn json_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    text.rsplit_once(" at line ").map_or(text.as_str(), |(head, _)| head).to_string()
}

fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::MalformedJson { line: e.line(), column: e.column(), reason: json_reason(e) }
}

fn parse_array(text: &[u8], max_events: usize, take: &mut dyn FnMut(Value)) -> Result<(), ApiError> {
    let mut too_many = false;
    let mut de = serde_json::Deserializer::from_slice(text);
    let seed = Events { take, max_events, too_many: &mut too_many };
    let result = seed.deserialize(&mut de).and_then(|()| de.end());
    match result {
        Ok(()) => Ok(()),
        Err(_) if too_many => Err(ApiError::TooManyEvents { limit: max_events }),
        Err(e) => Err(malformed(&e)),
    }
}

fn parse_ndjson(text: &[u8], max_events: usize, take: &mut dyn FnMut(Value)) -> Result<(), ApiError> {
    let mut count = 0usize;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        count += 1;
        if count > max_events {
            return Err(ApiError::TooManyEvents { limit: max_events });
        }
        let event: Value = serde_json::from_slice(line).map_err(|e| ApiError::MalformedJson {
            line: i + 1,
            column: e.column(),
            reason: json_reason(&e),
        })?;
        take(event);
    }
    Ok(())
}

/// Visits a top-level array (or a single object) and hands each event over as it is parsed.
struct Events<'a> {
    take: &'a mut dyn FnMut(Value),
    max_events: usize,
    too_many: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for Events<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Events<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of event objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0usize;
        while let Some(event) = seq.next_element::<Value>()? {
            count += 1;
            if count > self.max_events {
                *self.too_many = true;
                return Err(A::Error::custom("too many events"));
            }
            (self.take)(event);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let event = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        (self.take)(event);
        Ok(())
    }
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
        encode_batch(text.as_bytes(), format, &schema(), &ctx, 4, max)
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
