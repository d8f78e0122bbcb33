//! Why a batch was not taken, as the ingestion path sees it; the HTTP boundary maps each to a
//! status and a code (`http::error`), the Kafka front to pause, retry or dead-letter.

use crate::decode::DecodeError;
use crate::idempotency::{ReserveError, StoreError};
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("not ready: {0}")]
    NotReady(&'static str),
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("ClickHouse INSERTs keep failing; the circuit is open")]
    CircuitOpen,
    #[error("the gateway is overloaded ({0})")]
    Overloaded(&'static str),
    #[error("{0}")]
    QueueFull(String),
    #[error("the events could not be written to ClickHouse: {0}")]
    FlushFailed(String),
    #[error("the idempotency store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("some of these events are being written by another request right now")]
    EventsInFlight,
    #[error("a request with this idempotency key is still being processed")]
    RequestInFlight,
    #[error("this idempotency key was used for a request with a different body")]
    IdempotencyKeyReused,
    #[error("the journal is full")]
    JournalFull,
    /// A journal write or sync failed (the disk is full or failing) and the journal has not
    /// reopened yet.
    #[error("the journal cannot write")]
    JournalFailed,
    /// A shard the batch's events belong to takes no rows now (its replicas saturated, shed or
    /// failing); `None`: no shard can take a request that any shard may take.
    #[error("shard {shard:?} cannot take rows now")]
    ShardUnavailable { shard: Option<usize>, retry_after_s: u32 },
    /// An event was refused and the request is all or nothing ([`super::Reading::whole`]).
    #[error("event {index} is refused{}: {error}", field.as_deref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Refused { index: usize, field: Option<String>, error: String },
    /// An INSERT lists a column the table does not have.
    #[error("the table has no column {0:?}")]
    NoSuchColumn(String),
    /// An INSERT lists a column twice.
    #[error("the column {0:?} is listed twice")]
    DuplicateColumn(String),
    /// A producer id has offsets for `producer_max_partitions` partitions; this is another.
    #[error("this producer id already has offsets for {limit} partitions (producer_max_partitions)")]
    TooManyPartitions { limit: u32 },
    /// The stream parks rejected events and its quarantine table cannot take them now.
    #[error("the rejected events cannot be parked: {0}")]
    QuarantineUnavailable(String),
    #[error("wait=visible needs the journal, which is off")]
    VisibleNeedsJournal,
    #[error("internal error: {0}")]
    Internal(String),
}

impl IngestError {
    /// The in-flight bounds refused the batch (counted as shed).
    pub(crate) fn overloaded(stream: &crate::config::StreamName, what: &'static str) -> Self {
        metrics::shed_request(stream, "overloaded");
        Self::Overloaded(what)
    }

    pub(crate) fn internal(error: impl std::fmt::Display) -> Self {
        Self::Internal(error.to_string())
    }

    /// Refused for lack of room or time, not for what it holds: its events count as shed.
    pub fn is_shed(&self) -> bool {
        matches!(
            self,
            Self::Overloaded(_)
                | Self::QueueFull(_)
                | Self::ShuttingDown
                | Self::CircuitOpen
                | Self::JournalFull
                | Self::JournalFailed
                | Self::ShardUnavailable { .. }
        )
    }
}

impl From<StoreError> for IngestError {
    fn from(error: StoreError) -> Self {
        Self::StoreUnavailable(error.to_string())
    }
}

impl From<ReserveError> for IngestError {
    fn from(error: ReserveError) -> Self {
        match error {
            ReserveError::Store(error) => error.into(),
            ReserveError::InFlight => Self::EventsInFlight,
        }
    }
}
