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

/// The headers this gateway writes all start so: a message's own headers of that name are not
/// carried over, so no producer can forge where a dead letter came from or why.
const OURS: &str = "buffergate-";
/// The rejected events listed in [`REJECTED`] at most (each at most a few hundred bytes, see
/// [`crate::decode::ECHO_BYTES`]): a dead letter over the broker's message size would be
/// refused, retried forever and stall its partition. The summary gives the whole count.
pub const REJECTED_LISTED: usize = 100;

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

/// The message's own headers (but ours), then where it came from and why it is here.
fn headers(message: &Incoming, reason: &Reason) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    let theirs = message.headers.iter().filter(|(key, _)| !key.to_ascii_lowercase().starts_with(OURS));
    for (key, value) in theirs {
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
        let listed = &reason.rejected[..reason.rejected.len().min(REJECTED_LISTED)];
        ours.push((REJECTED, serde_json::to_string(listed).unwrap_or_default()));
    }
    for (key, value) in &ours {
        headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
    }
    headers
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;

    use super::*;

    #[test]
    fn a_message_cannot_forge_our_headers_nor_overflow_them() {
        let message = Incoming {
            topic: "t".into(),
            partition: 1,
            offset: 7,
            key: None,
            payload: bytes::Bytes::from_static(b"[]"),
            headers: vec![
                ("Buffergate-Reason".into(), Some(b"forged".to_vec())),
                ("trace-id".into(), Some(b"abc".to_vec())),
            ],
            timestamp_ms: None,
        };
        let rejected = (0..1000).map(|index| RejectedEvent::for_test(index, "x".repeat(300))).collect();
        let reason = Reason { summary: "1000 event(s) of the message failed validation".into(), rejected };
        let headers = headers(&message, &reason);
        let all: Vec<(String, Vec<u8>)> =
            headers.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect();
        let named = |name: &str| all.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).collect::<Vec<_>>();
        assert_eq!(named(REASON).len(), 1, "only ours: {all:?}");
        assert_eq!(named(REASON)[0].1, reason.summary.as_bytes());
        assert_eq!(named("trace-id").len(), 1, "the message's own headers are kept");
        let listed: Vec<serde_json::Value> = serde_json::from_slice(&named(REJECTED)[0].1).unwrap();
        assert_eq!(listed.len(), REJECTED_LISTED);
        assert!(named(REJECTED)[0].1.len() < 64 * 1024, "well under a broker's message size");
    }
}
