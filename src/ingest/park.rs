//! Parking rejected events: each becomes a row of the stream's quarantine table
//! (`<destination>_quarantine`), sent through the quarantine's own pipeline (its Buffer,
//! journal, deduplication and confirmation), so a parked event is stored exactly once, as an
//! accepted one is. The answer still lists them; `buffergate replay` sends them again once they
//! fit.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::Serialize;

use super::{Answer, Delivery, IngestError, Pipeline, Reading, Request, Wait};
use crate::decode::{Encoding, Format, IdSeed, RejectedEvent, quarantine_id};
use crate::metrics;
use crate::schema::{Reason, Timestamp};

/// Where a request's rejected events came from, as their quarantine rows record it.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    pub received: Option<Timestamp>,
    /// The API key's name.
    pub owner: Option<Arc<str>>,
    /// Where the request's events without an id got theirs (a Kafka message).
    pub ids: Option<IdSeed>,
    pub wait: Wait,
    /// The request may have been parked before (a Kafka message read again).
    pub replayed: bool,
}

/// One row of the quarantine table, as its pipeline reads it. `received` is left to the
/// pipeline, which fills it with the request's receive time.
#[derive(Debug, Serialize)]
pub struct QuarantineRow<'a> {
    /// Derived from the event's own id (or its Kafka message), so that the same event sent
    /// again is parked once; absent, a fresh UUIDv7 is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_id: Option<String>,
    pub stream: &'a str,
    pub api_key: &'a str,
    pub producer_id: &'a str,
    pub event_index: u64,
    pub raw: &'a str,
    pub raw_bytes: u64,
    pub field: &'a str,
    pub reason: &'static str,
    pub error: &'a str,
    pub replayed: u8,
    /// The row's version (ms since the epoch): of the rows of one `quarantine_id`, the
    /// table keeps the latest (a replay writes a newer one).
    pub updated: u64,
}

impl Pipeline {
    /// Whether this request's rejected events are parked: the stream has a quarantine and the
    /// request is not all or nothing (then a rejected event refuses it, and nothing is kept).
    pub(super) fn parks(&self, reading: &Reading) -> bool {
        self.quarantine.is_some() && !reading.whole && !reading.from_quarantine
    }

    /// Refuses a request with rejected events to park while the quarantine cannot take them,
    /// before anything of it is written: its retry then stores every event once.
    pub(super) fn can_park(&self) -> Result<(), IngestError> {
        match &self.quarantine {
            Some(quarantine) if quarantine.schema().is_none() => Err(IngestError::QuarantineUnavailable(format!(
                "the quarantine table {}.{} is not loaded (run buffergate migrate)",
                quarantine.config.table.database, quarantine.config.table.destination_table
            ))),
            _ => Ok(()),
        }
    }

    /// Stores `rejected` in the quarantine table and counts them; waits as the request does.
    /// A boxed future of a declared `Send` type: it runs a pipeline inside another's run, and
    /// an `async fn` here would make `run`'s type contain itself.
    pub(super) fn park<'a>(
        &'a self,
        rejected: &'a [RejectedEvent],
        origin: &'a Origin,
        producer: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), IngestError>> {
        Box::pin(self.park_now(rejected, origin, producer))
    }

    async fn park_now(
        &self,
        rejected: &[RejectedEvent],
        origin: &Origin,
        producer: Option<&str>,
    ) -> Result<(), IngestError> {
        let Some(quarantine) = &self.quarantine else { return Ok(()) };
        if rejected.is_empty() {
            return Ok(());
        }
        let stream = self.config.stream.as_str();
        let updated = crate::journal::watermark::now_ms();
        let rows: Vec<QuarantineRow> = rejected
            .iter()
            .map(|event| {
                let raw = event.raw.as_ref();
                let id = match (&event.id, origin.ids) {
                    (Some(id), _) => Some(quarantine_id(stream, id)),
                    (None, Some(seed)) => Some(seed.id(event.index)),
                    (None, None) => None,
                };
                QuarantineRow {
                    quarantine_id: id.map(|id| id.to_string()),
                    stream,
                    api_key: origin.owner.as_deref().unwrap_or_default(),
                    producer_id: producer.unwrap_or_default(),
                    event_index: event.index as u64,
                    raw: raw.map_or("", |r| r.text.as_str()),
                    raw_bytes: raw.map_or(0, |r| r.bytes as u64),
                    field: event.field.as_deref().unwrap_or_default(),
                    reason: event.reason.as_str(),
                    error: &event.error,
                    replayed: 0,
                    updated,
                }
            })
            .collect();
        let body = Bytes::from(serde_json::to_vec(&rows).map_err(IngestError::internal)?);
        let request: Request<'_, IngestError> = Request {
            announced: body.len(),
            body: Box::pin(async move { Ok(body) }),
            format: Format::JsonArray,
            encoding: Encoding::Identity,
            ids: None,
            received: origin.received,
            key: None,
            owner: None,
            delivery: Delivery { wait: origin.wait, divert: false, producer: None },
            replayed: origin.replayed,
            before_write: None,
            reading: Reading::default(),
        };
        match quarantine.run(request).await.map_err(unavailable)? {
            Answer::Delivered(delivered) => {
                if let Some(refused) = delivered.response.rejected.first() {
                    return Err(IngestError::QuarantineUnavailable(format!(
                        "the quarantine table refused a row ({}): {}",
                        refused.field.as_deref().unwrap_or("the row"),
                        refused.error
                    )));
                }
            }
            Answer::Replayed { .. } => {}
        }
        for reason in Reason::ALL {
            let count = rejected.iter().filter(|e| e.reason == reason).count();
            if count > 0 {
                metrics::quarantined(&self.config.stream, reason.as_str(), count);
            }
        }
        Ok(())
    }
}

/// The quarantine's refusal as the request's: a refusal for lack of room or time keeps its
/// meaning (and its `Retry-After`); anything else means the quarantine cannot take the rows.
fn unavailable(error: IngestError) -> IngestError {
    match error {
        IngestError::NotReady(why) => IngestError::QuarantineUnavailable(format!("not ready: {why}")),
        error if error.is_shed() => error,
        error @ (IngestError::FlushFailed(_) | IngestError::StoreUnavailable(_) | IngestError::EventsInFlight) => error,
        error => IngestError::QuarantineUnavailable(error.to_string()),
    }
}
