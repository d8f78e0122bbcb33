//! A Kafka message as read, detached from the consumer: what the delivery of a message and its
//! dead letter both work on.

use bytes::Bytes;

/// A message as read, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Bytes,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The message's timestamp in milliseconds, when it has one.
    pub timestamp_ms: Option<i64>,
}
