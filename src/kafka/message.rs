//! One Kafka message through the shared ingestion path: turned into a [`Request`]
//! (ids derived from the message's place in the log, its own timestamp, looked for in
//! ClickHouse first when it may have been delivered before, its replay mark written before its
//! rows go on) and run as `http::events` runs a request, waiting for what the commit policy
//! asks. What cannot be decoded or validated goes to the dead-letter topic; what failed for lack
//! of room or time is retried, never skipped.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::dead_letter::{DeadLetters, Reason};
use super::incoming::Incoming;
use super::replay::Marks;
use crate::clickhouse::retry::Backoff;
use crate::config::{Config, Quarantine};
use crate::decode::{Encoding, Format, IdSeed, RejectedEvent};
use crate::ingest::{Answer, Delivery, IngestError, Pipeline, Request, Wait};
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
        IngestError::JournalFailed => Disposition::Retry("journal_failed"),
        IngestError::CircuitOpen => Disposition::Retry("circuit_open"),
        IngestError::ShardUnavailable { .. } => Disposition::Retry("shard_saturated"),
        IngestError::Overloaded(_) | IngestError::QueueFull(_) => Disposition::Retry("overloaded"),
        IngestError::EventsInFlight => Disposition::Retry("events_in_flight"),
        IngestError::StoreUnavailable(_) => Disposition::Retry("idempotency_unavailable"),
        IngestError::QuarantineUnavailable(_) => Disposition::Retry("quarantine_unavailable"),
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
    if ndjson { Format::Ndjson } else { Format::JsonOrLines }
}

/// Everything one message's delivery needs.
#[derive(Debug)]
pub struct Worker {
    pub ingest: Arc<Pipeline>,
    pub config: Arc<Config>,
    pub shed: Arc<ShedState>,
    pub dead: DeadLetters,
    pub marks: Marks,
    pub wait: Wait,
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
            // With a quarantine table, rejected events are parked there (the pipeline did it,
            // exactly once): the dead-letter topic keeps what the table cannot, whole messages.
            Attempt::Stored { rejected }
                if rejected.is_empty() || self.config.table.quarantine == Quarantine::Table =>
            {
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
        let backoff = Backoff::of(&self.config.clickhouse);
        let mut attempt = 0;
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
                    if !pause(backoff.delay(attempt), cancel).await {
                        return None;
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, message: &Incoming, suspect: bool) -> Result<Attempt, IngestError> {
        if message.payload.len() > self.config.http.max_body_bytes {
            let limit = self.config.http.max_body_bytes;
            return Ok(Attempt::Refused(format!("the message exceeds max_body_bytes ({limit} bytes)")));
        }
        let request: Request<'_, IngestError> = Request {
            body: Box::pin(std::future::ready(Ok(message.payload.clone()))),
            announced: message.payload.len(),
            format: format_of(message),
            encoding: Encoding::Identity,
            ids: Some(IdSeed::for_message(&message.topic, message.partition, message.offset)),
            received: message.timestamp_ms.map(Timestamp::from_epoch_millis),
            key: None,
            owner: None,
            delivery: Delivery { wait: self.wait, divert: self.divert(), producer: None },
            replayed: suspect,
            before_write: Some(Box::pin(self.marks.cover(&message.topic, message.partition, message.offset))),
            reading: crate::ingest::Reading::default(),
        };
        match self.ingest.run(request).await? {
            Answer::Delivered(delivered) => Ok(Attempt::Stored { rejected: delivered.response.rejected }),
            // Messages carry no request-level key: nothing is ever replayed.
            Answer::Replayed { .. } => Ok(Attempt::Stored { rejected: Vec::new() }),
        }
    }

    /// Whether rows go to the fallback table now (`shed_mode = fallback` and the Buffer
    /// saturated), as the HTTP gate decides for a request.
    fn divert(&self) -> bool {
        let policy = Policy::of(&self.config);
        policy.diverts(policy.verdict(&self.shed))
    }

    /// Dead-letters until acknowledged or `cancel`; `false`: given up.
    async fn dead_letter(&self, message: &Incoming, reason: &Reason, cancel: &CancellationToken) -> bool {
        let backoff = Backoff::of(&self.config.clickhouse);
        let mut attempt = 0;
        loop {
            match self.dead.send(message, reason).await {
                Ok(sent) => {
                    metrics::message(if sent { "dead_lettered" } else { "dropped" });
                    return true;
                }
                Err(error) => {
                    metrics::retry("dead_letter");
                    tracing::warn!(%error, offset = message.offset, "dead letter not acknowledged; retrying");
                    if !pause(backoff.delay(attempt), cancel).await {
                        return false;
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// Waits `delay`; `false` if cancelled meanwhile.
async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_s_faults_dead_letter_it_the_gateway_s_make_it_wait() {
        let bad = IngestError::Decode(crate::decode::DecodeError::TooManyEvents { limit: 1 });
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
        assert_eq!(format_of(&message("{}", None)), Format::JsonOrLines);
        assert_eq!(format_of(&message("{}", Some("application/x-ndjson"))), Format::Ndjson);
    }
}
