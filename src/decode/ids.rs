//! Ids for events that bring none, derived from where they came from rather than drawn at
//! random: the same message read again (a consumer restarted from its committed offset) gets
//! the same ids, so deduplication recognises it. The Kafka front seeds them from (topic,
//! partition, offset); the event's index in its message tells its ids apart.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The seed of one message's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdSeed([u8; 16]);

impl IdSeed {
    /// The seed of the message at `offset` of `partition` of `topic`.
    pub fn for_message(topic: &str, partition: i32, offset: i64) -> Self {
        let mut hash = Sha256::new();
        // A tag and a separator that no topic name holds: seeds of other sources cannot collide.
        hash.update(b"buffergate/kafka\0");
        hash.update(topic.as_bytes());
        hash.update([0]);
        hash.update(partition.to_be_bytes());
        hash.update(offset.to_be_bytes());
        Self(first_16(&hash.finalize()))
    }

    /// The id of the `index`-th event of the message: a UUID of version 8 (custom), so it can
    /// be told from the UUIDv7 the gateway gives events of other sources.
    pub fn id(self, index: usize) -> Uuid {
        let mut hash = Sha256::new();
        hash.update(self.0);
        hash.update((index as u64).to_be_bytes());
        uuid::Builder::from_custom_bytes(first_16(&hash.finalize())).into_uuid()
    }
}

/// The quarantine id of a rejected event that sent `id` as its own, in `stream`: the same
/// event sent again is parked once.
pub fn quarantine_id(stream: &str, id: &str) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"buffergate/quarantine\0");
    hash.update(stream.as_bytes());
    hash.update([0]);
    hash.update(id.as_bytes());
    uuid::Builder::from_custom_bytes(first_16(&hash.finalize())).into_uuid()
}

fn first_16(digest: &[u8]) -> [u8; 16] {
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_distinct() {
        let seed = IdSeed::for_message("events", 2, 41);
        assert_eq!(seed.id(0), IdSeed::for_message("events", 2, 41).id(0), "the same message, the same ids");
        assert_ne!(seed.id(0), seed.id(1), "events of a message differ");
        assert_ne!(seed.id(0), IdSeed::for_message("events", 2, 42).id(0), "offsets differ");
        assert_ne!(seed.id(0), IdSeed::for_message("events", 3, 41).id(0), "partitions differ");
        assert_ne!(seed.id(0), IdSeed::for_message("event", 2, 41).id(0), "topics differ");
        assert_eq!(seed.id(0).get_version_num(), 8);
    }
}
