//! Replay: quarantined events sent again through their stream's own pipeline (validation,
//! deduplication, journal) once they may fit, typically after the table gained the column they
//! carry. What gets in is marked replayed in the quarantine table; what is still refused stays,
//! with its new reason.
//!
//! Exactly once: each event goes with an id (its own, or its quarantine id written into the
//! table's id column) and as a request that may have been delivered before, so the events the
//! destination already holds (a replay cut short before its marks) are dropped, not written
//! again. A mark is a newer version of the event's row (the table is a ReplacingMergeTree by
//! `updated`): writing it twice changes nothing.

pub mod client;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clickhouse::drain::{self, DrainError};
use crate::clickhouse::{ClickHouse, ClickHouseError, quote_str};
use crate::config::{Config, redacted};
use crate::decode::{Encoding, Format};
use crate::ingest::{Answer, Delivery, IngestError, Pipeline, Reading, Request, Wait};
use crate::metrics;
use crate::schema::{Reason, TableSchema, quote_ident};

/// Which quarantined events to replay.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<Reason>,
    /// Only events received at or after this time (seconds since the epoch).
    pub since: Option<i64>,
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Now in the destination (written, or found there already).
    pub stored: usize,
    /// Refused again; their rows now give the new reason.
    pub rejected: usize,
    /// Kept truncated (longer than `quarantine_max_raw_bytes`): they cannot be sent again.
    pub truncated: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the stream {0} parks no events (quarantine = off)")]
    NoQuarantine(String),
    #[error("the table schema is not loaded")]
    NoSchema,
    #[error("the quarantine on {node}: {error}")]
    ClickHouse { node: String, error: ClickHouseError },
    #[error("the quarantine's Buffer on {node}: {error}")]
    Drain { node: String, error: DrainError },
    #[error("the events could not be sent again: {0}")]
    Ingest(#[from] IngestError),
}

/// The most bytes of raw events read and sent at once (less when the stream's limits are).
const PAGE_BYTES: usize = 8 * 1024 * 1024;
/// The most events sent at once.
const PAGE_EVENTS: usize = 1000;

/// A quarantined event as its row holds it (`received` as the server prints it, so that its
/// mark is written back into the same partition).
#[derive(Debug, Clone, Deserialize, Serialize)]
struct Parked {
    // Read under other names: an alias named as a column would stand for it in WHERE and
    // ORDER BY too.
    #[serde(alias = "id_text")]
    quarantine_id: String,
    #[serde(alias = "received_text")]
    received: String,
    #[serde(skip_serializing)]
    received_s: i64,
    #[serde(alias = "stream_text")]
    stream: String,
    api_key: String,
    producer_id: String,
    #[serde(alias = "index_number")]
    event_index: u64,
    raw: String,
    raw_bytes: u64,
    field: String,
    #[serde(alias = "reason_text")]
    reason: String,
    error: String,
    #[serde(default)]
    replayed: u8,
    #[serde(default)]
    updated: u64,
}

/// Replays the quarantined events of `stream` that `filter` selects, node by node (each node's
/// quarantine holds the events written to it).
pub async fn replay(stream: &Pipeline, filter: &Filter) -> Result<Replayed, ReplayError> {
    let quarantine =
        stream.quarantine().ok_or_else(|| ReplayError::NoQuarantine(stream.config().stream.to_string()))?;
    let config = quarantine.config();
    let schema = current_schema(stream).await?;
    let mut total = Replayed::default();
    for replica in quarantine.shards().replicas() {
        let (ch, node) = (&replica.ch, redacted(&replica.url));
        let on = |error| ReplayError::ClickHouse { node: node.clone(), error };
        // Parked rows still in the quarantine's Buffer are not read by FINAL: flushed first.
        drain::drain(ch, config).await.map_err(|error| ReplayError::Drain { node: node.clone(), error })?;
        let mut after = Uuid::nil();
        loop {
            let page = read_page(ch, config, filter, after).await.map_err(on)?;
            let Some(last) = page.last() else { break };
            after = Uuid::parse_str(&last.quarantine_id).unwrap_or(Uuid::max());
            let (done, marks) = replay_page(stream, &schema, page).await?;
            write_marks(ch, config, &marks).await.map_err(on)?;
            metrics::replayed(&stream.config().stream, "stored", done.stored);
            metrics::replayed(&stream.config().stream, "rejected", done.rejected);
            total.stored += done.stored;
            total.rejected += done.rejected;
            total.truncated += done.truncated;
            if after == Uuid::max() {
                break;
            }
        }
    }
    Ok(total)
}

/// The stream's schema once it holds every column the Buffer has now: a replay run right after
/// `migrate` must not meet the schema from before the new column.
async fn current_schema(stream: &Pipeline) -> Result<std::sync::Arc<TableSchema>, ReplayError> {
    let table = &stream.config().table;
    let Some(replica) = stream.shards().replicas().next() else { return Err(ReplayError::NoSchema) };
    let columns = replica
        .ch
        .columns(&table.database, &table.buffer_table)
        .await
        .map_err(|error| ReplayError::ClickHouse { node: redacted(&replica.url), error })?;
    let refresh = Duration::from_millis(stream.config().clickhouse.schema_refresh_interval_ms);
    let deadline = tokio::time::Instant::now() + refresh * 2 + Duration::from_secs(5);
    loop {
        let schema = stream.schema();
        if let Some(schema) = &schema
            && columns.iter().all(|c| schema.column_index(&c.name).is_some())
        {
            return Ok(std::sync::Arc::clone(schema));
        }
        if tokio::time::Instant::now() >= deadline {
            return schema.ok_or(ReplayError::NoSchema);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next events not yet replayed, in quarantine-id order after `after`.
async fn read_page(
    ch: &ClickHouse,
    config: &Config,
    filter: &Filter,
    after: Uuid,
) -> Result<Vec<Parked>, ClickHouseError> {
    let table = format!("{}.{}", quote_ident(&config.table.database), quote_ident(&config.table.destination_table));
    let mut conditions = vec![format!("replayed = 0 AND quarantine_id > toUUID({})", quote_str(&after.to_string()))];
    if let Some(reason) = filter.reason {
        conditions.push(format!("reason = {}", quote_str(reason.as_str())));
    }
    if let Some(since) = filter.since {
        conditions.push(format!("received >= toDateTime({since})"));
    }
    // A page is one request of the stream's: within its limits on events and bytes.
    let bytes = PAGE_BYTES.min(config.http.max_body_bytes).min(config.http.max_inflight_bytes / 4);
    let limit = (bytes / config.table.quarantine_max_raw_bytes.max(1))
        .min(config.http.max_events_per_request)
        .clamp(1, PAGE_EVENTS);
    let sql = format!(
        "SELECT toString(quarantine_id) AS id_text, toString(received) AS received_text, \
         toInt64(toUnixTimestamp(received)) AS received_s, toString(stream) AS stream_text, api_key, producer_id, \
         toUInt64(event_index) AS index_number, raw, raw_bytes, field, toString(reason) AS reason_text, error \
         FROM {table} FINAL WHERE {} ORDER BY quarantine_id LIMIT {limit}",
        conditions.join(" AND ")
    );
    ch.with_setting("output_format_json_quote_64bit_integers", "0").fetch_json(&sql).await
}

/// Sends one page's events again; returns what became of them and the marks to write.
async fn replay_page(
    stream: &Pipeline,
    schema: &TableSchema,
    page: Vec<Parked>,
) -> Result<(Replayed, Vec<Parked>), ReplayError> {
    let mut done = Replayed::default();
    let table = &stream.config().table;
    let id_column = schema.id_column();
    let time_column = table.time_column().filter(|c| schema.column_index(c).is_some());
    let mut sent = Vec::new();
    let mut body = String::from("[");
    for parked in page {
        if parked.raw_bytes != parked.raw.len() as u64 {
            done.truncated += 1;
            continue;
        }
        // Not JSON: it would be refused again as it was (and would break the array).
        let Some(event) = prepared(&parked, id_column, time_column) else {
            done.rejected += 1;
            continue;
        };
        if !sent.is_empty() {
            body.push(',');
        }
        body.push_str(&event);
        sent.push(parked);
    }
    body.push(']');
    if sent.is_empty() {
        return Ok((done, Vec::new()));
    }
    let body = Bytes::from(body);
    let request: Request<'_, IngestError> = Request {
        announced: body.len(),
        body: Box::pin(std::future::ready(Ok(body))),
        format: Format::JsonArray,
        encoding: Encoding::Identity,
        ids: None,
        received: None,
        key: None,
        owner: None,
        // Written (into the Buffer, and journaled when the journal is on) before it is marked.
        delivery: Delivery { wait: Wait::Written, divert: false, producer: None },
        replayed: true,
        before_write: None,
        reading: Reading { from_quarantine: true, ..Reading::default() },
    };
    let rejected = match stream.run(request).await? {
        Answer::Delivered(delivered) => delivered.response.rejected,
        Answer::Replayed { .. } => Vec::new(),
    };
    let now = crate::journal::watermark::now_ms();
    let refused: HashSet<usize> = rejected.iter().map(|r| r.index).collect();
    let mut marks = Vec::new();
    for again in &rejected {
        let Some(parked) = sent.get(again.index) else { continue };
        let field = again.field.clone().unwrap_or_default();
        // Refused for the same reason: its row is left as it is.
        if again.reason.as_str() != parked.reason || again.error != parked.error || field != parked.field {
            let reason = again.reason.as_str().to_string();
            marks.push(Parked { reason, error: again.error.clone(), field, updated: now, ..parked.clone() });
        }
    }
    done.rejected += rejected.len();
    for (index, parked) in sent.into_iter().enumerate() {
        if !refused.contains(&index) {
            done.stored += 1;
            marks.push(Parked { replayed: 1, updated: now, ..parked });
        }
    }
    Ok((done, marks))
}

/// The event as it is sent again: with the table's id (its quarantine id) and its receive time
/// when it has neither, as it would have had them had it been accepted when it came. `None`
/// when it is not JSON.
fn prepared(parked: &Parked, id_column: Option<&str>, time_column: Option<&str>) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(&parked.raw).ok()?;
    let serde_json::Value::Object(fields) = value else { return Some(parked.raw.clone()) };
    let mut extra = Vec::new();
    let mut add = |name: &str, value: String| {
        if !fields.contains_key(name) {
            extra.push(format!("{}:{}", serde_json::Value::from(name), serde_json::Value::from(value)));
        }
    };
    if let Some(id) = id_column {
        add(id, parked.quarantine_id.clone());
    }
    if let Some(time) = time_column
        && let Ok(at) = time::OffsetDateTime::from_unix_timestamp(parked.received_s)
        && let Ok(text) = at.format(&time::format_description::well_known::Rfc3339)
    {
        add(time, text);
    }
    if extra.is_empty() {
        return Some(parked.raw.clone());
    }
    // Text inserted after the opening brace: the event's own values stay exactly as sent.
    let open = parked.raw.find('{')?;
    let separator = if fields.is_empty() { "" } else { "," };
    Some(format!("{{{}{separator}{}", extra.join(","), &parked.raw[open + 1..]))
}

/// Writes the marks straight into the node's quarantine table (not through its Buffer: they
/// are few, and must be read by the next page and the next replay at once).
async fn write_marks(ch: &ClickHouse, config: &Config, marks: &[Parked]) -> Result<(), ClickHouseError> {
    if marks.is_empty() {
        return Ok(());
    }
    let mut body = Vec::new();
    for mark in marks {
        serde_json::to_writer(&mut body, mark).map_err(|e| ClickHouseError::Protocol(e.to_string()))?;
        body.push(b'\n');
    }
    let sql = format!(
        "INSERT INTO {}.{} FORMAT JSONEachRow",
        quote_ident(&config.table.database),
        quote_ident(&config.table.destination_table)
    );
    ch.insert(&sql, vec![ch.body_part(body)]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(raw: &str) -> Parked {
        Parked {
            quarantine_id: "0190a3c4-0000-7000-8000-000000000001".into(),
            received: "2026-12-07 10:00:00".into(),
            received_s: 1_796_637_600,
            stream: "default".into(),
            api_key: String::new(),
            producer_id: String::new(),
            event_index: 3,
            raw: raw.into(),
            raw_bytes: raw.len() as u64,
            field: "color".into(),
            reason: "unknown_field".into(),
            error: "no such column in the table".into(),
            replayed: 0,
            updated: 1,
        }
    }

    #[test]
    fn an_event_is_sent_again_with_its_id_and_receive_time_and_its_own_values_untouched() {
        let sent = prepared(
            &parked(r#"{"user_id": 18446744073709551615, "color": "red"}"#),
            Some("event_id"),
            Some("event_ts"),
        )
        .unwrap();
        assert_eq!(
            sent,
            r#"{"event_id":"0190a3c4-0000-7000-8000-000000000001","event_ts":"2026-12-07T10:00:00Z","user_id": 18446744073709551615, "color": "red"}"#
        );
        let own = prepared(&parked(r#"{"event_id": "x", "event_ts": 5}"#), Some("event_id"), Some("event_ts")).unwrap();
        assert_eq!(own, r#"{"event_id": "x", "event_ts": 5}"#, "what it sent is kept");
        assert_eq!(
            prepared(&parked("{}"), Some("id"), None).unwrap(),
            r#"{"id":"0190a3c4-0000-7000-8000-000000000001"}"#
        );
        assert_eq!(
            prepared(&parked("[1]"), Some("id"), None).unwrap(),
            "[1]",
            "not an object: refused again as it was"
        );
        assert_eq!(prepared(&parked("{oops"), Some("id"), None), None, "not JSON");
    }
}
