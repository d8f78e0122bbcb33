//! The table events go to: its database, its Buffer and the MergeTree behind it, the Buffer's
//! engine arguments `migrate` uses, and the columns the gateway fills or routes by.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// What to do with an event field that names no column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFields {
    /// Reject the event, naming the field: nothing a producer sends is dropped silently.
    Reject,
    /// Store the known fields and drop the others.
    Ignore,
}

/// The quarantine table's id column: what its rows are deduplicated and confirmed by.
pub const QUARANTINE_ID_COLUMN: &str = "quarantine_id";
/// The quarantine table's time column: when the event was received.
pub const QUARANTINE_TIME_COLUMN: &str = "received";

/// Where rejected events go besides the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quarantine {
    /// Only into the answer's `rejected` list.
    Off,
    /// Also into the stream's quarantine table, `<destination_table>_quarantine`, stored
    /// exactly once like accepted rows, to be replayed (`buffergate replay`).
    Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TableSettings {
    pub database: String,
    pub buffer_table: String,
    pub destination_table: String,
    /// `Buffer(...)` engine arguments used by `migrate` (thresholds are per layer).
    pub buffer_num_layers: u32,
    pub buffer_min_time: u64,
    pub buffer_max_time: u64,
    pub buffer_min_rows: u64,
    pub buffer_max_rows: u64,
    pub buffer_min_bytes: u64,
    pub buffer_max_bytes: u64,
    pub unknown_fields: UnknownFields,
    /// UUID column filled with a generated UUIDv7 when an event omits it.
    pub id_column: String,
    /// Time column filled with the receive time when an event omits it.
    pub timestamp_column: String,
    /// Event field whose value picks the coalescer partition.
    pub partition_key: String,
    /// An event whose timestamp is more than this many seconds before its receive time is
    /// rejected (0: no bound).
    pub timestamp_max_age_s: u64,
    /// ...or more than this many seconds after it (0: no bound).
    pub timestamp_max_ahead_s: u64,
    /// Where rejected events are parked.
    pub quarantine: Quarantine,
    /// The most of a rejected event's text the quarantine keeps (its full length is kept too).
    pub quarantine_max_raw_bytes: usize,
}

impl Default for TableSettings {
    fn default() -> Self {
        Self {
            database: "analytics".into(),
            buffer_table: "events_buffer".into(),
            destination_table: "events_raw".into(),
            buffer_num_layers: 16,
            buffer_min_time: 10,
            buffer_max_time: 60,
            buffer_min_rows: 100_000,
            buffer_max_rows: 1_000_000,
            buffer_min_bytes: 10 * 1024 * 1024,
            // The seed's 10 GiB per layer would let 16 layers hold 160 GiB of RAM; 128 MiB per
            // layer caps the Buffer at 2 GiB, above what 1M seed-shaped rows occupy per layer.
            buffer_max_bytes: 128 * 1024 * 1024,
            unknown_fields: UnknownFields::Reject,
            id_column: "event_id".into(),
            timestamp_column: "event_ts".into(),
            partition_key: "user_id".into(),
            // Old events are a backfill as often as a bug: unbounded unless configured. Events
            // a day or more ahead are clock or unit mistakes (microseconds sent as
            // milliseconds land in year 50,000) and would open partitions no one reads.
            timestamp_max_age_s: 0,
            timestamp_max_ahead_s: 86_400,
            // Producers that never read the answer (most fire-and-forget clients) would lose
            // every rejected event without a trace; parking them costs nothing while events fit.
            quarantine: Quarantine::Table,
            quarantine_max_raw_bytes: 64 * 1024,
        }
    }
}

impl TableSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("database", &self.database),
            ("buffer_table", &self.buffer_table),
            ("destination_table", &self.destination_table),
        ] {
            if value.is_empty() || value.contains('`') || value.contains('\0') {
                return Err(invalid(key, "must be a non-empty identifier without backticks"));
            }
        }
        if self.buffer_table == self.destination_table {
            return Err(invalid("buffer_table", "must differ from destination_table"));
        }
        if self.quarantine_max_raw_bytes < 64 || self.quarantine_max_raw_bytes > 16 * 1024 * 1024 {
            return Err(invalid("quarantine_max_raw_bytes", "must be between 64 and 16777216"));
        }
        if self.buffer_num_layers == 0 || self.buffer_num_layers > 256 {
            return Err(invalid("buffer_num_layers", "must be between 1 and 256"));
        }
        if self.buffer_min_time > self.buffer_max_time
            || self.buffer_min_rows > self.buffer_max_rows
            || self.buffer_min_bytes > self.buffer_max_bytes
        {
            return Err(invalid("buffer_min_*", "each minimum must not exceed its maximum"));
        }
        Ok(())
    }

    /// The quarantine table beside the destination.
    pub fn quarantine_table(&self) -> String {
        format!("{}_quarantine", self.destination_table)
    }

    /// The Buffer in front of the quarantine table.
    pub fn quarantine_buffer(&self) -> String {
        format!("{}_quarantine_buffer", self.destination_table)
    }

    /// The time column rows are looked up by, when the table has one.
    pub fn time_column(&self) -> Option<&str> {
        (!self.timestamp_column.is_empty()).then_some(self.timestamp_column.as_str())
    }
}
