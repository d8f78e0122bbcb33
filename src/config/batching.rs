//! Coalescing: the partitions, their queues, and the limits of one batch.

use serde::{Deserialize, Serialize};

use super::{ConfigError, positive};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchingSettings {
    /// Coalescer partitions (per shard on a cluster); 0 means one per [`super::CPUS_PER_PARTITION`] CPUs, at least one.
    pub partitions: usize,
    /// Submissions (one per request and partition) a partition queues before producers wait.
    pub queue_capacity: usize,
    /// How long a request waits for room in a full queue before it gets 503.
    pub queue_timeout_ms: u64,
    /// A batch is sent once it holds this many rows...
    pub flush_max_rows: usize,
    /// ...or this many encoded bytes...
    pub flush_max_bytes: usize,
    /// ...or its first row has waited this long while no INSERT was pending (0: send at once).
    pub flush_linger_ms: u64,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self {
            partitions: 0,
            queue_capacity: 1024,
            queue_timeout_ms: 1_000,
            flush_max_rows: 100_000,
            flush_max_bytes: 16 * 1024 * 1024,
            flush_linger_ms: 0,
        }
    }
}

impl BatchingSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("queue_capacity", self.queue_capacity as u64)?;
        positive("flush_max_rows", self.flush_max_rows as u64)?;
        positive("flush_max_bytes", self.flush_max_bytes as u64)
    }
}
