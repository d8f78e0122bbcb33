//! The journal: where it lives, its bounds, and how often its blocks are confirmed.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// The data directory of a local run; the container image sets `/var/lib/buffergate`.
pub const DEFAULT_DATA_DIR: &str = "buffergate-data";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct JournalSettings {
    /// Where the gateway keeps its journal (a volume in a container).
    pub data_dir: String,
    /// Journal every block before it is acknowledged (see `docs/delivery-guarantees.md`);
    /// off: a 200 means the rows reached the Buffer's RAM, and an ambiguous INSERT is retried.
    pub journal: bool,
    /// Bound of the journal on disk; when full, requests get 503 `journal_full`.
    pub journal_max_bytes: u64,
    /// Size at which the journal starts a new segment file.
    pub journal_segment_bytes: u64,
    /// How often unconfirmed blocks are checked against ClickHouse.
    pub confirm_interval_ms: u64,
    /// Margin past the Buffer's `max_time` before a block is looked for in the destination.
    pub confirm_grace_ms: u64,
    /// At shutdown, how long to spend flushing the Buffer and confirming the journal.
    pub shutdown_confirm_ms: u64,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self {
            data_dir: DEFAULT_DATA_DIR.into(),
            journal: true,
            journal_max_bytes: 4 << 30,
            journal_segment_bytes: 64 << 20,
            confirm_interval_ms: 1_000,
            confirm_grace_ms: 5_000,
            shutdown_confirm_ms: 20_000,
        }
    }
}

impl JournalSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.journal_max_bytes < self.journal_segment_bytes.saturating_mul(2) {
            return Err(invalid("journal_max_bytes", "must be at least two segments (journal_segment_bytes)"));
        }
        if self.confirm_interval_ms < 10 {
            return Err(invalid("confirm_interval_ms", "must be at least 10"));
        }
        Ok(())
    }

    /// Whether blocks are journaled (and ambiguous INSERTs resolved rather than retried).
    pub fn enabled(&self) -> bool {
        self.journal && !self.data_dir.is_empty()
    }
}
