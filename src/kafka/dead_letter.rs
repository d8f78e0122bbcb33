//! The dead-letter topic: a message that cannot be decoded, or some of whose events fail
//! validation, is produced there as it came (key, value, headers) with headers saying why and
//! where it came from. Its offset is committed only once the dead letter is acknowledged
//! (`acks=all`), so a crash in between produces it again: dead letters are at-least-once.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::KafkaError;
use super::incoming::Incoming;
use crate::decode::RejectedEvent;

pub const REASON: &str = "buffergate-reason";
pub const REJECTED: &str = "buffergate-rejected";
pub const TOPIC: &str = "buffergate-topic";
pub const PARTITION: &str = "buffergate-partition";
pub const OFFSET: &str = "buffergate-offset";

/// Why a message is dead-lettered.
#[derive(Debug)]
pub struct Reason {
    /// One line for people.
    pub summary: String,
    /// The events refused, by index in the message (empty when the message as a whole is).
    pub rejected: Vec<RejectedEvent>,
}

/// Where dead letters go; `None` topic: they are logged and dropped.
pub struct DeadLetters {
    producer: Option<(FutureProducer, String)>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").field("topic", &self.producer.as_ref().map(|(_, t)| t)).finish()
    }
}

impl DeadLetters {
    pub fn new(producer: Option<(FutureProducer, String)>) -> Self {
        Self { producer }
    }

    /// Sends `message` to the dead-letter topic; `Ok(false)` when there is none (dropped).
    pub async fn send(&self, message: &Incoming, reason: &Reason) -> Result<bool, KafkaError> {
        let Some((producer, topic)) = &self.producer else {
            tracing::warn!(
                topic = %message.topic, partition = message.partition, offset = message.offset,
                reason = %reason.summary, "message rejected and no dead-letter topic is configured: dropped"
            );
            return Ok(false);
        };
        let headers = headers(message, reason);
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = &message.key {
            record = record.key(key.as_slice());
        }
        record = record.payload(message.payload.as_ref());
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| true)
            .map_err(|(error, _)| KafkaError::DeadLetter(error.to_string()))
    }
}

/// The message's own headers, then where it came from and why it is here.
fn headers(message: &Incoming, reason: &Reason) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for (key, value) in &message.headers {
        headers = headers.insert(Header { key, value: value.as_deref() });
    }
    let (partition, offset) = (message.partition.to_string(), message.offset.to_string());
    let mut ours: Vec<(&str, String)> = vec![
        (REASON, reason.summary.clone()),
        (TOPIC, message.topic.clone()),
        (PARTITION, partition),
        (OFFSET, offset),
    ];
    if !reason.rejected.is_empty() {
        ours.push((REJECTED, serde_json::to_string(&reason.rejected).unwrap_or_default()));
    }
    for (key, value) in &ours {
        headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
    }
    headers
}
