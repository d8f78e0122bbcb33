//! Polls how full the Buffer table is, every `shed_poll_interval_ms`, and publishes the shed
//! decision to the request path through [`ShedState`].
//!
//! Bytes held: `system.tables.total_bytes` of the Buffer table where the server has it
//! (≈20.x+); otherwise `system.metrics.StorageBufferBytes`, a **server-wide** total over every
//! Buffer table. Capacity: `num_layers × max_bytes` from the Buffer's `engine_full`, unless
//! `buffer_capacity_bytes` is configured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ShedState, next_shedding, retry_after};
use crate::clickhouse::{ClickHouse, ClickHouseError, quote_str};
use crate::config::Config;
use crate::metrics;

/// Smoothing of the drain-rate estimate (weight of the newest sample).
const DRAIN_RATE_WEIGHT: f64 = 0.5;

#[derive(Debug)]
pub struct Poller {
    pub ch: ClickHouse,
    pub state: Arc<ShedState>,
    pub config: Arc<Config>,
}

/// One reading of the Buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub bytes: u64,
    pub capacity: u64,
}

/// `num_layers × max_bytes` from `Buffer(db, table, num_layers, min_time, max_time, min_rows,
/// max_rows, min_bytes, max_bytes[, ...])`.
pub fn capacity_from_engine(engine_full: &str) -> Option<u64> {
    let args = engine_full.trim().strip_prefix("Buffer(")?;
    let args = &args[..args.rfind(')')?];
    let parts = crate::schema::types::split_args(args);
    let layers: u64 = parts.get(2)?.trim().parse().ok()?;
    let max_bytes: u64 = parts.get(8)?.trim().parse().ok()?;
    layers.checked_mul(max_bytes)
}

impl Poller {
    async fn read(&self, per_table: bool) -> Result<Reading, ClickHouseError> {
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
            quote_str(&self.config.database),
            quote_str(&self.config.buffer_table)
        );
        let row = self
            .ch
            .fetch_json::<Row>(&sql)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ClickHouseError::Protocol("the Buffer table does not exist".into()))?;
        let capacity = if self.config.buffer_capacity_bytes > 0 {
            self.config.buffer_capacity_bytes
        } else {
            capacity_from_engine(&row.engine_full).ok_or_else(|| {
                ClickHouseError::Protocol(format!("cannot read the Buffer capacity from {:?}", row.engine_full))
            })?
        };
        let bytes = row.bytes.parse().map_err(|_| ClickHouseError::Protocol(format!("bytes {:?}", row.bytes)))?;
        Ok(Reading { bytes, capacity })
    }

    pub async fn run(self, stop: CancellationToken) {
        let config = Arc::clone(&self.config);
        let interval = Duration::from_millis(config.shed_poll_interval_ms);
        let mut per_table: Option<bool> = None;
        let mut previous: Option<(Instant, u64)> = None;
        let mut drain_rate: Option<f64> = None;
        let mut shedding = false;
        let mut failing = false;
        loop {
            let reading = match per_table {
                Some(per_table) => self.read(per_table).await,
                None => match self.ch.capabilities().await {
                    Ok(caps) => {
                        if !caps.tables_total_bytes {
                            tracing::warn!(
                                version = %caps.version,
                                "system.tables.total_bytes is missing on this server: the Buffer's fill is read from \
                                 system.metrics StorageBufferBytes, which sums every Buffer table on the server"
                            );
                        }
                        per_table = Some(caps.tables_total_bytes);
                        self.read(caps.tables_total_bytes).await
                    }
                    Err(e) => Err(e),
                },
            };
            match reading {
                Ok(Reading { bytes, capacity }) => {
                    if failing {
                        tracing::info!("Buffer poll answered again");
                        failing = false;
                    }
                    let now = Instant::now();
                    if let Some((at, before)) = previous {
                        let seconds = now.duration_since(at).as_secs_f64();
                        if seconds > 0.0 {
                            let sample = (before as f64 - bytes as f64) / seconds;
                            drain_rate = Some(match drain_rate {
                                Some(rate) => rate + DRAIN_RATE_WEIGHT * (sample - rate),
                                None => sample,
                            });
                        }
                    }
                    previous = Some((now, bytes));
                    let fill = if capacity > 0 { bytes as f64 / capacity as f64 } else { 0.0 };
                    let next = next_shedding(shedding, fill, config.shed_threshold, config.shed_resume);
                    if next != shedding {
                        if next {
                            tracing::warn!(fill, bytes, capacity, "Buffer saturated: shedding ingestion");
                        } else {
                            tracing::info!(
                                fill,
                                bytes,
                                capacity,
                                "Buffer below the resume threshold: ingestion resumes"
                            );
                        }
                    }
                    shedding = next;
                    let wait = retry_after(
                        bytes,
                        capacity,
                        config.shed_resume,
                        drain_rate.unwrap_or(0.0),
                        config.shed_retry_after_max_s,
                    );
                    self.state.publish(bytes, capacity, shedding, wait);
                    metrics::buffer(bytes, capacity, fill);
                    metrics::shed_active(shedding);
                }
                Err(error) => {
                    metrics::poll_error();
                    if !failing {
                        tracing::warn!(%error, on_stale = ?config.shed_on_stale, "cannot read the Buffer's fill");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_of_old_and_new_engine_spellings() {
        assert_eq!(
            capacity_from_engine("Buffer(analytics, events_raw, 16, 10, 60, 100000, 1000000, 10485760, 134217728)"),
            Some(16 * 134217728)
        );
        assert_eq!(capacity_from_engine("Buffer('db', 'raw', 1, 10, 60, 1, 2, 3, 4096, 5, 6, 7)"), Some(4096));
        assert_eq!(capacity_from_engine("MergeTree ORDER BY x"), None);
        assert_eq!(capacity_from_engine("Buffer(db, raw, 16)"), None);
    }
}
