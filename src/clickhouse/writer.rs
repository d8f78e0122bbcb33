//! Sends encoded blocks to ClickHouse: a semaphore caps concurrent INSERTs, retryable failures
//! are retried with backoff, and failures that hint at a changed table wake the schema watcher.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};

use super::retry::{Backoff, is_retryable, is_schema_change};
use super::{ClickHouse, ClickHouseError};
use crate::coalesce::Pieces;
use crate::config::{Config, InsertFormat};
use crate::metrics;
use crate::schema::TableSchema;
use crate::shed::breaker::Breaker;

/// An INSERT that failed for good: after its last attempt, or at once when not retryable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("INSERT failed after {attempts} attempt(s): {error}")]
pub struct WriteError {
    pub attempts: u32,
    pub error: ClickHouseError,
}

/// The INSERT path into the Buffer table.
#[derive(Debug)]
pub struct Writer {
    ch: ClickHouse,
    permits: Semaphore,
    retries: u32,
    backoff: Backoff,
    schema_changed: Arc<Notify>,
    breaker: Arc<Breaker>,
    format: InsertFormat,
}

impl Writer {
    pub fn new(ch: ClickHouse, config: &Config, schema_changed: Arc<Notify>, breaker: Arc<Breaker>) -> Self {
        Self {
            ch,
            permits: Semaphore::new(config.insert_concurrency()),
            retries: config.insert_retries,
            backoff: Backoff {
                initial: std::time::Duration::from_millis(config.retry_initial_backoff_ms),
                max: std::time::Duration::from_millis(config.retry_max_backoff_ms),
            },
            schema_changed,
            breaker,
            format: config.insert_format,
        }
    }

    /// Inserts rows encoded by `schema` for one column list into `table`, in the configured
    /// format.
    pub async fn write_rows(&self, schema: &TableSchema, table: &str, rows: Pieces) -> Result<(), WriteError> {
        let count = rows.rows;
        let (sql, body) = schema.insert(table, rows.omitted, count, rows.pieces, self.format);
        self.write(&sql, Bytes::from(body), count).await
    }

    /// Inserts one block of `rows` rows, retrying what may heal.
    pub async fn write(&self, sql: &str, data: Bytes, rows: usize) -> Result<(), WriteError> {
        let mut attempt = 0;
        loop {
            if !self.breaker.allow() {
                return Err(WriteError { attempts: attempt, error: ClickHouseError::CircuitOpen });
            }
            let started = std::time::Instant::now();
            let result = match self.permits.acquire().await {
                Ok(_permit) => self.ch.insert(sql, data.clone()).await,
                Err(_) => Err(ClickHouseError::Protocol("the INSERT semaphore is closed".into())),
            };
            metrics::flush_attempt(result.is_ok(), rows, data.len(), started.elapsed());
            self.breaker.record(result.is_ok());
            let error = match result {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if is_schema_change(&error) {
                self.schema_changed.notify_one();
            }
            if !is_retryable(&error) || attempt >= self.retries {
                tracing::warn!(%error, attempts = attempt + 1, bytes = data.len(), "INSERT failed");
                return Err(WriteError { attempts: attempt + 1, error });
            }
            let delay = self.backoff.delay(attempt);
            tracing::info!(%error, attempt = attempt + 1, ?delay, "INSERT failed, retrying");
            metrics::flush_retry();
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}
