//! Load shedding on the Buffer's fill: how it is polled, the thresholds, what a stale poll means,
//! and where rows go while shed.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid, positive};

/// What to do when the poller has had no answer from ClickHouse for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// Keep taking traffic as if the Buffer had room.
    FailOpen,
    /// Shed, as if the Buffer were saturated.
    FailClosed,
}

/// What to do while the Buffer is saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShedMode {
    /// Answer 503 `buffer_saturated` with `Retry-After`.
    Reject,
    /// Write batches straight into `fallback_table` (a MergeTree), bypassing the Buffer.
    Fallback,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ShedSettings {
    /// How often the Buffer's fill is polled.
    pub shed_poll_interval_ms: u64,
    /// Fill ratio at which ingestion is shed...
    pub shed_threshold: f64,
    /// ...and below which it resumes (hysteresis).
    pub shed_resume: f64,
    /// Buffer capacity in bytes; 0 reads `num_layers × max_bytes` from the table's engine.
    pub buffer_capacity_bytes: u64,
    /// With no poll answer for this long, the fill is unknown: apply `shed_on_stale`.
    pub shed_stale_after_ms: u64,
    pub shed_on_stale: OnStale,
    pub shed_mode: ShedMode,
    /// MergeTree table (same columns as the Buffer) that takes batches in fallback mode.
    pub fallback_table: String,
    /// Report not-ready while shedding, so load balancers route around this replica.
    pub shed_readiness: bool,
    /// Upper bound of the `Retry-After` given to shed producers.
    pub shed_retry_after_max_s: u32,
}

impl Default for ShedSettings {
    fn default() -> Self {
        Self {
            shed_poll_interval_ms: 1_000,
            shed_threshold: 0.8,
            shed_resume: 0.7,
            buffer_capacity_bytes: 0,
            shed_stale_after_ms: 10_000,
            shed_on_stale: OnStale::FailClosed,
            shed_mode: ShedMode::Reject,
            fallback_table: String::new(),
            shed_readiness: true,
            shed_retry_after_max_s: 30,
        }
    }
}

impl ShedSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("shed_poll_interval_ms", self.shed_poll_interval_ms)?;
        positive("shed_stale_after_ms", self.shed_stale_after_ms)?;
        positive("shed_retry_after_max_s", u64::from(self.shed_retry_after_max_s))?;
        if !(0.0 < self.shed_resume && self.shed_resume <= self.shed_threshold && self.shed_threshold <= 1.0) {
            return Err(invalid("shed_threshold", "needs 0 < shed_resume <= shed_threshold <= 1"));
        }
        Ok(())
    }
}
