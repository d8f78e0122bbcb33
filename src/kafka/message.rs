//! One Kafka message through the shared ingestion path, as `http::events` drives it for a
//! request: admit, decode (ids derived from the message's place in the log), deduplicate,
//! coalesce, wait for what the commit policy asks. What cannot be decoded or validated goes to
//! the dead-letter topic; what failed for lack of room or time is retried, never skipped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::dead_letter::{DeadLetters, Reason};
use super::incoming::Incoming;
use super::replay::Marks;
use crate::clickhouse::presence::Lookup;
use crate::config::Config;
use crate::decode::{DecodeError, EncodedBatch, Encoding, Format, IdSeed, RejectedEvent};
use crate::ingest::{self, Delivery, Ingest, IngestError, Wait};
use crate::metrics::kafka as metrics;
use crate::schema::Timestamp;
use crate::shed::{Policy, ShedState};

/// What became of a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// Its events are delivered (those refused, if any, dead-lettered).
    Stored,
    /// Refused whole and dead-lettered (or dropped, with no dead-letter topic).
    DeadLettered,
    /// Given up unfinished (revoked, shutting down): its offset must not be committed.
    Abandoned,
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The message itself is at fault: dead-letter it, with this reason.
    DeadLetter(String),
    /// The gateway could not take it now: try again (`reason` labels the retry).
    Retry(&'static str),
    /// The gateway is stopping: leave it for the next owner of the partition.
    Stop,
}

/// The policy: a message's own faults dead-letter it, the gateway's make it wait.
pub fn disposition(error: &IngestError) -> Disposition {
    match error {
        IngestError::Decode(_) => Disposition::DeadLetter(error.to_string()),
        IngestError::ShuttingDown | IngestError::VisibleNeedsJournal => Disposition::Stop,
        IngestError::JournalFull => Disposition::Retry("journal_full"),
        IngestError::CircuitOpen => Disposition::Retry("circuit_open"),
        IngestError::ShardUnavailable { .. } => Disposition::Retry("shard_saturated"),
        IngestError::Overloaded(_) | IngestError::QueueFull(_) => Disposition::Retry("overloaded"),
        IngestError::EventsInFlight => Disposition::Retry("events_in_flight"),
        IngestError::StoreUnavailable(_) => Disposition::Retry("idempotency_unavailable"),
        IngestError::NotReady(_) => Disposition::Retry("not_ready"),
        _ => Disposition::Retry("flush_failed"),
    }
}

/// The body format of a message: a `content-type` header naming NDJSON, else JSON (an array
/// of events or one event), read as NDJSON when that fails and the message has several lines.
fn format_of(message: &Incoming) -> Format {
    let ndjson = message.headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("content-type") && v.as_deref().is_some_and(|v| v.windows(6).any(|w| w == b"ndjson"))
    });
    if ndjson { Format::Ndjson } else { Format::JsonArray }
}

fn several_lines(payload: &[u8]) -> bool {
    payload.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).nth(1).is_some()
}

/// Look-ups of replayed messages sent to ClickHouse at once. After a restart every message in
/// flight (up to `kafka_max_in_flight`) is a suspect: unbounded, their SELECTs overflowed
/// 18.16's HTTP queue, which then dropped connections (the tests' own queries among them).
pub const REPLAY_LOOKUPS: usize = 16;

/// Everything one message's delivery needs.
#[derive(Debug)]
pub struct Worker {
    pub ingest: Arc<Ingest>,
    pub config: Arc<Config>,
    pub shed: Arc<ShedState>,
    pub dead: DeadLetters,
    pub marks: Marks,
    pub wait: Wait,
    /// `` `db`.`buffer` ``: where replayed events are looked for.
    pub buffer: String,
    /// Bounds the look-ups in flight ([`REPLAY_LOOKUPS`]).
    pub lookups: tokio::sync::Semaphore,
}

/// The outcome of one attempt that did not fail.
enum Attempt {
    Stored { rejected: Vec<RejectedEvent> },
    Refused(String),
}

impl Worker {
    /// Delivers `message` until done or `cancel`; `suspect`: it may have been delivered before
    /// (read again after a crash or a rebalance), so its events are looked for first.
    pub async fn handle(&self, message: &Incoming, suspect: bool, cancel: &CancellationToken) -> Handled {
        let Some(attempt) = self.deliver(message, suspect, cancel).await else { return Handled::Abandoned };
        let (handled, reason) = match attempt {
            Attempt::Stored { rejected } if rejected.is_empty() => {
                metrics::message("stored");
                return Handled::Stored;
            }
            Attempt::Stored { rejected } => {
                metrics::message("stored");
                let summary = format!("{} event(s) of the message failed validation", rejected.len());
                (Handled::Stored, Reason { summary, rejected })
            }
            Attempt::Refused(summary) => (Handled::DeadLettered, Reason { summary, rejected: Vec::new() }),
        };
        metrics::message("rejected");
        if self.dead_letter(message, &reason, cancel).await { handled } else { Handled::Abandoned }
    }

    /// Attempts until one does not fail for a reason worth retrying; `None`: given up.
    async fn deliver(&self, message: &Incoming, suspect: bool, cancel: &CancellationToken) -> Option<Attempt> {
        let mut backoff = Backoff::new(&self.config);
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            let error = match self.attempt(message, suspect).await {
                Ok(attempt) => return Some(attempt),
                Err(error) => error,
            };
            match disposition(&error) {
                Disposition::DeadLetter(reason) => return Some(Attempt::Refused(reason)),
                Disposition::Stop => return None,
                Disposition::Retry(reason) => {
                    metrics::retry(reason);
                    tracing::debug!(%error, offset = message.offset, "delivery of a Kafka message retried");
                    if !backoff.wait(cancel).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn attempt(&self, message: &Incoming, suspect: bool) -> Result<Attempt, IngestError> {
        if message.payload.len() > self.config.max_body_bytes {
            let limit = self.config.max_body_bytes;
            return Ok(Attempt::Refused(format!("the message exceeds max_body_bytes ({limit} bytes)")));
        }
        let ingest = &self.ingest;
        let (schema, batch) = {
            let (schema, _lease) = ingest.admit(message.payload.len())?;
            let batch = self.decode(&schema, message).await?;
            (schema, batch)
        };
        let mut batch = batch;
        if suspect {
            self.drop_present(&mut batch).await?;
        }
        let rejected = std::mem::take(&mut batch.rejected);
        self.marks.cover(&message.topic, message.partition, message.offset).await?;
        let divert = self.divert();
        ingest.deliver(&schema, batch, Delivery { wait: self.wait, divert, producer: None }).await?;
        Ok(Attempt::Stored { rejected })
    }

    /// Decodes as JSON, then as NDJSON when JSON fails on a message of several lines.
    async fn decode(
        &self,
        schema: &Arc<crate::schema::TableSchema>,
        message: &Incoming,
    ) -> Result<EncodedBatch, IngestError> {
        let body = |format| ingest::Body {
            raw: message.payload.clone(),
            format,
            encoding: Encoding::Identity,
            hash: false,
            ids: Some(IdSeed::for_message(&message.topic, message.partition, message.offset)),
            received: message.timestamp_ms.map(Timestamp::from_epoch_millis),
        };
        let format = format_of(message);
        match self.ingest.decode(schema, body(format)).await {
            Err(IngestError::Decode(DecodeError::MalformedJson { .. }))
                if format == Format::JsonArray && several_lines(&message.payload) =>
            {
                self.ingest.decode(schema, body(Format::Ndjson)).await
            }
            other => other,
        }
    }

    /// Drops the events ClickHouse already holds (looked up by id through the Buffer table,
    /// which answers for its own rows and the destination's). Looked for twice, a second
    /// apart, when some are missing: rows the Buffer is flushing are in neither for a moment.
    async fn drop_present(&self, batch: &mut EncodedBatch) -> Result<(), IngestError> {
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
            metrics::replayed_duplicates(found);
        }
        Ok(())
    }

    async fn present(&self, ids: &[Uuid], span: Option<(i64, i64)>) -> Result<HashSet<Uuid>, IngestError> {
        let time = (!self.config.timestamp_column.is_empty()).then_some(self.config.timestamp_column.as_str());
        let lookup = Lookup { table: &self.buffer, id_column: &self.config.id_column, time_column: time };
        // Every node answers for the rows written to it (a replica's Buffer holds rows the
        // others have not seen): present anywhere is present, and every node must answer.
        let looks = self.ingest.shards.replicas().map(|r| r.ch.present_twice(lookup, ids, span, &self.lookups));
        let mut present = HashSet::new();
        for found in futures_util::future::join_all(looks).await {
            let found = found
                .map_err(|e| IngestError::FlushFailed(format!("looking up the events of a message read again: {e}")))?;
            present.extend(found);
        }
        Ok(present)
    }

    /// Whether rows go to the fallback table now (`shed_mode = fallback` and the Buffer
    /// saturated), as the HTTP gate decides for a request.
    fn divert(&self) -> bool {
        let policy = Policy::of(&self.config);
        policy.diverts(policy.verdict(&self.shed))
    }

    /// Dead-letters until acknowledged or `cancel`; `false`: given up.
    async fn dead_letter(&self, message: &Incoming, reason: &Reason, cancel: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(&self.config);
        loop {
            match self.dead.send(message, reason).await {
                Ok(sent) => {
                    metrics::message(if sent { "dead_lettered" } else { "dropped" });
                    return true;
                }
                Err(error) => {
                    metrics::retry("dead_letter");
                    tracing::warn!(%error, offset = message.offset, "dead letter not acknowledged; retrying");
                    if !backoff.wait(cancel).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// Exponential backoff between the configured INSERT retry bounds.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &Config) -> Self {
        let max = Duration::from_millis(config.retry_max_backoff_ms);
        Self { next: Duration::from_millis(config.retry_initial_backoff_ms).min(max), max }
    }

    /// Sleeps; `false` if cancelled meanwhile.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let sleep = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = tokio::time::sleep(sleep) => true,
            () = cancel.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_s_faults_dead_letter_it_the_gateway_s_make_it_wait() {
        let bad = IngestError::Decode(DecodeError::TooManyEvents { limit: 1 });
        assert!(matches!(disposition(&bad), Disposition::DeadLetter(_)));
        assert_eq!(disposition(&IngestError::JournalFull), Disposition::Retry("journal_full"));
        assert_eq!(disposition(&IngestError::EventsInFlight), Disposition::Retry("events_in_flight"));
        assert_eq!(disposition(&IngestError::FlushFailed("x".into())), Disposition::Retry("flush_failed"));
        assert_eq!(disposition(&IngestError::ShuttingDown), Disposition::Stop);
    }

    #[test]
    fn formats() {
        let message = |payload: &str, ct: Option<&str>| Incoming {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            headers: ct.map(|c| vec![("Content-Type".to_string(), Some(c.as_bytes().to_vec()))]).unwrap_or_default(),
            timestamp_ms: None,
        };
        assert_eq!(format_of(&message("{}", None)), Format::JsonArray);
        assert_eq!(format_of(&message("{}", Some("application/x-ndjson"))), Format::Ndjson);
        assert!(several_lines(b"{}\n{}\n"));
        assert!(!several_lines(b"{}\n\n"));
    }
}
