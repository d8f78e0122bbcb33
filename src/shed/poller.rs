//! Polls how full the Buffer table is, every `shed_poll_interval_ms`, and publishes the shed
//! decision to the request path through [`ShedState`].
//!
//! Bytes held: `system.tables.total_bytes` of the Buffer table where the server has it
//! (≈20.x+); otherwise `system.metrics.StorageBufferBytes`, a **server-wide** total over every
//! Buffer table. With several streams on such a server the server-wide total would let one
//! stream's Buffer shed every other: each stream then counts the smaller of that total and what
//! its journal holds as written to that node and not yet confirmed in the destination (both
//! are at least the rows this gateway put in the stream's Buffer that have not left it);
//! without the journal, the server-wide total, with a warning.
//! Capacity: `num_layers × max_bytes` from the Buffer's `engine_full`, unless
//! `buffer_capacity_bytes` is configured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ShedState, next_shedding, retry_after};
use crate::clickhouse::{ClickHouse, ClickHouseError, quote_str};
use crate::config::Config;
use crate::journal::Journal;
use crate::metrics;

/// Smoothing of the drain-rate estimate (weight of the newest sample).
const DRAIN_RATE_WEIGHT: f64 = 0.5;

#[derive(Debug)]
pub struct Poller {
    pub ch: ClickHouse,
    pub state: Arc<ShedState>,
    pub config: Arc<Config>,
    /// The stream's journal on this node, when it has one.
    pub journal: Option<Arc<Journal>>,
    /// Other streams share the server's Buffers.
    pub shared: bool,
}

/// Where a stream's Buffer fill is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillSource {
    /// `system.tables.total_bytes` of the stream's Buffer.
    Table,
    /// `StorageBufferBytes`: every Buffer table on the server.
    ServerWide,
    /// What the stream's journal holds as written to the node and not yet confirmed, or the
    /// server-wide total when that is smaller.
    Journal,
}

/// The one rule: the Buffer's own size where the server reports it (`per_table`); else the
/// server-wide total while this stream's Buffer is the only one (`shared` false), or when no
/// journal knows better; else the journal's count, so another stream's rows cannot shed this
/// one.
pub fn fill_source(per_table: bool, shared: bool, journaled: bool) -> FillSource {
    match (per_table, shared, journaled) {
        (true, _, _) => FillSource::Table,
        (false, true, true) => FillSource::Journal,
        (false, _, _) => FillSource::ServerWide,
    }
}

/// One reading of the Buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub bytes: u64,
    pub capacity: u64,
}

/// The arguments of `Buffer(database, table, num_layers, min_time, max_time, min_rows,
/// max_rows, min_bytes, max_bytes[, ...])` as `engine_full` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferParams {
    pub database: String,
    pub table: String,
    pub num_layers: u64,
    pub min_time: u64,
    pub max_time: u64,
    pub min_rows: u64,
    pub max_rows: u64,
    pub min_bytes: u64,
    pub max_bytes: u64,
}

impl BufferParams {
    pub fn parse(engine_full: &str) -> Option<Self> {
        let args = engine_full.trim().strip_prefix("Buffer(")?;
        let args = &args[..args.rfind(')')?];
        let parts = crate::schema::types::split_args(args);
        let name = |i: usize| parts.get(i).map(|p| p.trim().trim_matches(|c| c == '\'' || c == '`').to_string());
        let number = |i: usize| parts.get(i)?.trim().parse::<u64>().ok();
        Some(Self {
            database: name(0)?,
            table: name(1)?,
            num_layers: number(2)?,
            min_time: number(3)?,
            max_time: number(4)?,
            min_rows: number(5)?,
            max_rows: number(6)?,
            min_bytes: number(7)?,
            max_bytes: number(8)?,
        })
    }

    /// `num_layers × max_bytes`: thresholds apply per layer.
    pub fn capacity(&self) -> u64 {
        self.num_layers.saturating_mul(self.max_bytes)
    }
}

/// Reads how full the Buffer is: per table where `per_table` (the server has
/// `system.tables.total_bytes`), else the server-wide `StorageBufferBytes`.
pub async fn read_fill(ch: &ClickHouse, config: &Config, per_table: bool) -> Result<Reading, ClickHouseError> {
    #[derive(serde::Deserialize)]
    struct Row {
        bytes: String,
        engine_full: String,
    }
    let bytes = if per_table {
        "toString(ifNull(total_bytes, 0))"
    } else {
        "toString((SELECT value FROM system.metrics WHERE metric = 'StorageBufferBytes'))"
    };
    let sql = format!(
        "SELECT {bytes} AS bytes, engine_full FROM system.tables WHERE database = {} AND name = {}",
        quote_str(&config.table.database),
        quote_str(&config.table.buffer_table)
    );
    let row = ch
        .fetch_json::<Row>(&sql)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ClickHouseError::Protocol("the Buffer table does not exist".into()))?;
    let capacity = if config.shed.buffer_capacity_bytes > 0 {
        config.shed.buffer_capacity_bytes
    } else {
        BufferParams::parse(&row.engine_full).map(|p| p.capacity()).ok_or_else(|| {
            ClickHouseError::Protocol(format!("cannot read the Buffer capacity from {:?}", row.engine_full))
        })?
    };
    Ok(Reading { bytes: buffer_bytes(&row.bytes)?, capacity })
}

/// The bytes a Buffer holds, from ClickHouse's text. 18.16's server-wide `StorageBufferBytes`
/// was seen at -20 with every Buffer empty (its accounting drifts): a count below zero is an
/// empty Buffer, not an unreadable answer, which would leave the stream shed for good.
fn buffer_bytes(text: &str) -> Result<u64, ClickHouseError> {
    let bytes: i64 = text.trim().parse().map_err(|_| ClickHouseError::Protocol(format!("bytes {text:?}")))?;
    Ok(u64::try_from(bytes).unwrap_or(0))
}

/// What the poller remembers from one poll to the next.
#[derive(Debug, Default)]
struct Track {
    /// Whether the server has per-table Buffer sizes; probed once.
    per_table: Option<bool>,
    previous: Option<(Instant, u64)>,
    /// Bytes per second leaving the Buffer, smoothed.
    drain_rate: Option<f64>,
    shedding: bool,
    failing: bool,
}

impl Track {
    /// Folds a new reading into the smoothed drain rate.
    fn observe_drain(&mut self, bytes: u64) {
        let now = Instant::now();
        if let Some((at, before)) = self.previous {
            let seconds = now.duration_since(at).as_secs_f64();
            if seconds > 0.0 {
                let sample = (before as f64 - bytes as f64) / seconds;
                self.drain_rate = Some(match self.drain_rate {
                    Some(rate) => rate + DRAIN_RATE_WEIGHT * (sample - rate),
                    None => sample,
                });
            }
        }
        self.previous = Some((now, bytes));
    }
}

impl Poller {
    pub async fn run(self, stop: CancellationToken) {
        let interval = Duration::from_millis(self.config.shed.shed_poll_interval_ms);
        let mut track = Track::default();
        loop {
            match self.read(&mut track).await {
                Ok(reading) => self.publish(&mut track, reading),
                Err(error) => {
                    metrics::poll_error();
                    if !track.failing {
                        tracing::warn!(%error, on_stale = ?self.config.shed.shed_on_stale, "cannot read the Buffer's fill");
                        track.failing = true;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Reads the fill, probing once for per-table sizes first.
    async fn read(&self, track: &mut Track) -> Result<Reading, ClickHouseError> {
        let per_table = match track.per_table {
            Some(per_table) => per_table,
            None => {
                let caps = self.ch.capabilities().await?;
                if fill_source(caps.tables_total_bytes, self.shared, self.journal.is_some()) == FillSource::ServerWide
                    && self.shared
                {
                    tracing::warn!(
                        stream = %self.config.stream,
                        "several streams share this server, which has no system.tables.total_bytes, and the journal is \
                         off: each stream sheds on the total of every Buffer on the server"
                    );
                } else if !caps.tables_total_bytes && !self.shared {
                    tracing::warn!(
                        version = %caps.version,
                        "system.tables.total_bytes is missing on this server: the Buffer's fill is read from \
                         system.metrics StorageBufferBytes, which sums every Buffer table on the server"
                    );
                }
                *track.per_table.insert(caps.tables_total_bytes)
            }
        };
        let reading = read_fill(&self.ch, &self.config, per_table).await?;
        match (fill_source(per_table, self.shared, self.journal.is_some()), &self.journal) {
            // Both bound the stream's own bytes from above (every Buffer's total; what is not yet
            // confirmed in the destination, flushed or not): the smaller is the closer. The
            // journal's alone overstates under load, as it confirms blocks only once the
            // Buffer must have flushed them.
            (FillSource::Journal, Some(journal)) => {
                Ok(Reading { bytes: reading.bytes.min(journal.unconfirmed_bytes()), ..reading })
            }
            _ => Ok(reading),
        }
    }

    /// Decides (with hysteresis) whether to shed and publishes the verdict to the request path.
    fn publish(&self, track: &mut Track, Reading { bytes, capacity }: Reading) {
        let config = &self.config;
        if track.failing {
            tracing::info!("Buffer poll answered again");
            track.failing = false;
        }
        track.observe_drain(bytes);
        let fill = if capacity > 0 { bytes as f64 / capacity as f64 } else { 0.0 };
        let next = next_shedding(track.shedding, fill, config.shed.shed_threshold, config.shed.shed_resume);
        match (track.shedding, next) {
            (false, true) => {
                tracing::warn!(node = %crate::config::redacted(&config.clickhouse.clickhouse_url), fill, bytes, capacity, "Buffer saturated: shedding ingestion");
            }
            (true, false) => {
                tracing::info!(node = %crate::config::redacted(&config.clickhouse.clickhouse_url), fill, bytes, capacity, "Buffer below the resume threshold: ingestion resumes");
            }
            _ => {}
        }
        track.shedding = next;
        let drain_rate = track.drain_rate.unwrap_or(0.0);
        let wait =
            retry_after(bytes, capacity, config.shed.shed_resume, drain_rate, config.shed.shed_retry_after_max_s);
        self.state.publish(bytes, capacity, next, wait);
        metrics::buffer(&self.config.stream, &self.config.clickhouse.clickhouse_url, bytes, capacity, fill);
        metrics::shed_active(&self.config.stream, &self.config.clickhouse.clickhouse_url, next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_below_zero_is_an_empty_buffer() {
        assert_eq!(buffer_bytes("-20").unwrap(), 0);
        assert_eq!(buffer_bytes("1048576").unwrap(), 1_048_576);
        assert!(buffer_bytes("").is_err());
    }

    #[test]
    fn a_stream_s_fill_is_its_own_where_anything_can_tell() {
        assert_eq!(fill_source(true, true, true), FillSource::Table, "modern servers: the table's own size");
        assert_eq!(fill_source(true, false, false), FillSource::Table);
        assert_eq!(
            fill_source(false, false, true),
            FillSource::ServerWide,
            "one stream: the server's total is its own"
        );
        assert_eq!(fill_source(false, true, true), FillSource::Journal, "shared: what its journal holds");
        assert_eq!(fill_source(false, true, false), FillSource::ServerWide, "nothing knows better");
    }

    #[test]
    fn engine_arguments_of_old_and_new_spellings() {
        let old =
            BufferParams::parse("Buffer(analytics, events_raw, 16, 10, 60, 100000, 1000000, 10485760, 134217728)")
                .unwrap();
        assert_eq!(
            (old.database.as_str(), old.table.as_str(), old.capacity()),
            ("analytics", "events_raw", 16 * 134217728)
        );
        let new = BufferParams::parse("Buffer('db', 'raw', 1, 10, 60, 1, 2, 3, 4096, 5, 6, 7)").unwrap();
        assert_eq!((new.database.as_str(), new.min_bytes, new.capacity()), ("db", 3, 4096));
        assert_eq!(BufferParams::parse("MergeTree ORDER BY x"), None);
        assert_eq!(BufferParams::parse("Buffer(db, raw, 16)"), None);
    }
}
