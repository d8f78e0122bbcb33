//! Deduplication: the store of idempotency keys and producer offsets (Redis or in-process), and how
//! events are deduplicated.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid, positive};

/// Per-event deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupMode {
    /// By the event's id column.
    Event,
    Off,
}

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// 503 + Retry-After, nothing written: the producer's retry loses nothing.
    Reject,
    /// Write without deduplication, and count it.
    Accept,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdempotencySettings {
    /// Redis for idempotency keys and producer offsets; empty: the in-process store (one
    /// replica only).
    /// `redis+cluster://h1:6379,h2:6379` for a Redis Cluster (the nodes are seeds).
    pub redis_url: String,
    pub redis_timeout_ms: u64,
    /// Replicas each store write must reach (`WAIT`) before it counts; 0: Redis's asynchronous
    /// replication alone.
    pub redis_wait_replicas: u32,
    /// How long a write waits for those replicas before it is reported failed.
    pub redis_wait_timeout_ms: u64,
    /// Groups the event ids are spread over (one hash tag, so one cluster slot, each); fixed
    /// for the life of the remembered ids. 0: 1 on one primary, 16 on a cluster.
    pub redis_key_groups: u16,
    /// Per-event deduplication by `id_column`.
    pub dedup: DedupMode,
    pub dedup_on_store_error: OnStoreError,
    pub dedup_key_prefix: String,
    /// How long a reservation holds before it expires (a crashed gateway's events become
    /// writable again after this); must outlast a flush with its retries.
    pub dedup_lease_ms: u64,
    /// How long a written event's key (and a request's answer) is remembered.
    pub dedup_window_ms: u64,
    /// How long a request waits for events another request is writing before it gets 503.
    pub dedup_pending_wait_ms: u64,
    /// After the store lost keys, how long the ids it calls fresh are looked up in ClickHouse
    /// before they are written (at most `dedup_window_ms`); 0: never, the store is trusted.
    pub dedup_lookup_after_loss_ms: u64,
    /// How long a producer's committed offsets are kept after its last write: a producer id
    /// that stops writing is forgotten, so ids made up at will do not fill the store.
    pub producer_offset_ttl_s: u64,
    /// The most partitions one producer id may commit offsets for; a batch for one more is
    /// refused (400), so one id cannot grow without bound either.
    pub producer_max_partitions: u32,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_timeout_ms: 1_000,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 100,
            redis_key_groups: 0,
            dedup: DedupMode::Event,
            dedup_on_store_error: OnStoreError::Reject,
            dedup_key_prefix: "bg:".into(),
            dedup_lease_ms: 60_000,
            dedup_window_ms: 24 * 3600 * 1000,
            dedup_pending_wait_ms: 10_000,
            dedup_lookup_after_loss_ms: 24 * 3600 * 1000,
            producer_offset_ttl_s: 30 * 24 * 3600,
            producer_max_partitions: 1024,
        }
    }
}

impl IdempotencySettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("redis_timeout_ms", self.redis_timeout_ms),
            ("redis_wait_timeout_ms", self.redis_wait_timeout_ms),
            ("dedup_lease_ms", self.dedup_lease_ms),
            ("dedup_window_ms", self.dedup_window_ms),
            ("producer_offset_ttl_s", self.producer_offset_ttl_s),
            ("producer_max_partitions", u64::from(self.producer_max_partitions)),
        ] {
            positive(key, value)?;
        }
        if self.dedup_key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "dedup_key_prefix",
                "must not contain { or }: the gateway's keys carry their own hash tags",
            ));
        }
        if self.redis_key_groups > 16384 {
            return Err(invalid("redis_key_groups", "must be at most 16384 (Redis Cluster's slots)"));
        }
        if self.dedup_window_ms < self.dedup_lease_ms {
            return Err(invalid("dedup_window_ms", "must be at least dedup_lease_ms"));
        }
        Ok(())
    }
}
