//! The Kafka front (`buffergate consume`): a consumer group member that reads JSON events from
//! Kafka topics and writes them through the same ingestion path as `POST /v1/events`
//! ([`crate::ingest`]: decode → idempotency → coalesce → journal → ClickHouse), committing each
//! partition's offsets in order and only once every row before them is safe (docs/kafka.md).
//!
//! - [`consumer`]: the poll loop on its own thread, rebalances, commits, pause/resume, lag;
//! - [`message`]: one message through `ingest`, retried or dead-lettered by [`message::disposition`];
//! - [`offsets`]: which offset of a partition may be committed (the done prefix);
//! - [`flow`]: when to pause and resume (the shed threshold's hysteresis, the journal's bound);
//! - [`replay`]: which messages read again may have been delivered before;
//! - [`dead_letter`], [`settings`] (librdkafka properties), [`status`]; `incoming`:
//!   a message as read, which delivery and dead-lettering share.
//!
//! Its checks for `buffergate check` are in [`crate::check`], its metrics in [`crate::metrics`].

mod consumer;
pub mod dead_letter;
pub mod flow;
mod incoming;
pub mod message;
pub mod offsets;
pub mod replay;
pub mod settings;
pub mod status;

pub use consumer::Front;
pub use incoming::Incoming;
pub use status::Status;

/// Why the Kafka front cannot run or a dead letter was not sent.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka configuration: {0}")]
    Config(String),
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("the dead-letter topic did not acknowledge: {0}")]
    DeadLetter(String),
}
