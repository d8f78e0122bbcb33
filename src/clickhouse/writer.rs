//! Sends encoded blocks to ClickHouse: a semaphore caps concurrent INSERTs, retryable failures
//! are retried with backoff, and failures that hint at a changed table wake the schema watcher.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};

use super::breaker::Breaker;
use super::retry::{Backoff, is_ambiguous, is_retryable, is_schema_change, is_unreachable};
use super::{ClickHouse, ClickHouseError};
use crate::config::{Config, InsertFormat};
use crate::metrics;
use crate::rows::{BodyPart, Built, PartitionRows, Pieces};
use crate::schema::TableSchema;

/// Chunks of at least this many rows get their block made ahead of the INSERT. A block costs
/// ClickHouse its header (names and types read and parsed per column), which 256 rows make
/// negligible.
pub const MIN_BLOCK_ROWS: usize = 256;

/// The body of an INSERT's first attempt: one block of the pieces not built ahead, then the
/// built ones; `None` (send everything as one block) if the rest cannot be transcoded.
fn ahead(
    schema: &TableSchema,
    omitted: u64,
    rows: usize,
    pieces: &[Bytes],
    built: Vec<Built>,
) -> Option<Vec<BodyPart>> {
    let mut done = vec![false; pieces.len()];
    let mut rest_rows = rows;
    for b in &built {
        *done.get_mut(b.piece)? = true;
        rest_rows = rest_rows.checked_sub(b.rows)?;
    }
    let mut parts = Vec::with_capacity(built.len() + 1);
    if rest_rows > 0 {
        let rest: Vec<&[u8]> = pieces.iter().zip(&done).filter(|(_, d)| !**d).map(|(p, _)| p.as_ref()).collect();
        parts.push(BodyPart::plain(Bytes::from(schema.native_block(omitted, rest_rows, &rest)?)));
    }
    parts.extend(built.into_iter().map(|b| b.part));
    Some(parts)
}

/// An INSERT that failed for good: after its last attempt, or at once when not retryable, or
/// (`ambiguous`) at once when it may have landed and the journal resolves it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("INSERT failed after {attempts} attempt(s): {error}")]
pub struct WriteError {
    pub attempts: u32,
    pub error: ClickHouseError,
    /// The rows may be in ClickHouse: ask which, never send them again blindly.
    pub ambiguous: bool,
}

impl WriteError {
    /// Nothing was sent: no replica would take the INSERT (every breaker open).
    pub fn not_sent() -> Self {
        Self { attempts: 0, error: ClickHouseError::CircuitOpen, ambiguous: false }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Retry,
    Fail,
    /// The attempt may have landed: stop and let the caller find out which rows did.
    Resolve,
}

/// The retry policy. With `resolve` (a journal knows the rows), an attempt that may have
/// landed is never sent again; without it the old at-least-once retry applies. With
/// `siblings` (other replicas of the shard), a node that cannot be reached is given up at
/// once: the batch fails over instead of waiting out the backoff.
pub fn next_step(error: &ClickHouseError, attempt: u32, retries: u32, resolve: bool, siblings: bool) -> Next {
    if resolve && is_ambiguous(error) {
        Next::Resolve
    } else if siblings && is_unreachable(error) {
        Next::Fail
    } else if is_retryable(error) && attempt < retries {
        Next::Retry
    } else {
        Next::Fail
    }
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
    /// Stop at an ambiguous failure instead of retrying (the journal resolves it).
    resolve_ambiguous: bool,
    /// The node has sibling replicas: when it cannot be reached, give up at once (fail over).
    siblings: bool,
    /// The stream it writes for, as the metrics name it.
    stream: crate::config::StreamName,
}

impl Writer {
    pub fn new(ch: ClickHouse, config: &Config, schema_changed: Arc<Notify>, breaker: Arc<Breaker>) -> Self {
        Self {
            ch,
            permits: Semaphore::new(config.insert_concurrency()),
            retries: config.clickhouse.insert_retries,
            backoff: Backoff::of(&config.clickhouse),
            schema_changed,
            breaker,
            format: config.clickhouse.insert_format,
            resolve_ambiguous: config.journal_enabled(),
            siblings: false,
            stream: config.stream.clone(),
        }
    }

    /// The client of the node it writes to.
    pub fn client(&self) -> &ClickHouse {
        &self.ch
    }

    /// The writer of a node whose shard has other replicas to fail over to.
    pub fn with_siblings(self, siblings: bool) -> Self {
        Self { siblings, ..self }
    }

    /// Makes the blocks of a request's large chunks ahead of their INSERT (Native only): done
    /// by the request, in parallel with others, it leaves the partition's INSERT, one at a time,
    /// only bytes to send. Small chunks are better merged into one block at the INSERT, as
    /// ClickHouse reads each block's header (column names and types) anew.
    pub fn make_blocks(&self, schema: &TableSchema, partitions: &mut [PartitionRows]) {
        if self.format != InsertFormat::Native {
            return;
        }
        for chunk in partitions.iter_mut().flat_map(|p| &mut p.chunks) {
            if chunk.rows >= MIN_BLOCK_ROWS && chunk.block.is_none() {
                chunk.block =
                    schema.native_block(chunk.omitted, chunk.rows, &[&chunk.data]).map(|b| self.ch.body_part(b));
            }
        }
    }

    /// Inserts rows encoded by `schema` for one column list into `table`, in the configured
    /// format: the first attempt sends the blocks made ahead plus one block of the other
    /// pieces; a retry sends everything as one block made again from the rows.
    pub async fn write_rows(
        &self,
        schema: &TableSchema,
        table: &str,
        rows: Pieces,
        query_id: Option<&str>,
    ) -> Result<(), WriteError> {
        let Pieces { omitted, rows: count, pieces, built, .. } = rows;
        let mut built = Some(built).filter(|b| !b.is_empty());
        let mut whole: Option<(String, Bytes)> = None;
        let mut pieces = Some(pieces);
        self.write_with(count, query_id, || {
            if let (Some(built), Some(pieces)) = (built.take(), &pieces)
                && let Some(parts) = ahead(schema, omitted, count, pieces, built)
            {
                return (schema.native_insert_sql(table, omitted), parts);
            }
            let (sql, body) = whole.get_or_insert_with(|| {
                schema.insert(table, omitted, count, &pieces.take().unwrap_or_default(), self.format)
            });
            (sql.clone(), vec![BodyPart::plain(body.clone())])
        })
        .await
    }

    /// Inserts one block of `rows` rows, retrying what may heal; `body` makes each attempt's
    /// statement and body.
    /// Sends one group of a journaled block again (RowBinary, as it was journaled), under
    /// `query_id`; the same policy as every INSERT.
    pub async fn write_group(
        &self,
        statement: &str,
        body: Bytes,
        rows: usize,
        query_id: &str,
    ) -> Result<(), WriteError> {
        self.write_with(rows, Some(query_id), || (statement.to_string(), vec![BodyPart::plain(body.clone())])).await
    }

    async fn write_with(
        &self,
        rows: usize,
        query_id: Option<&str>,
        mut body: impl FnMut() -> (String, Vec<BodyPart>),
    ) -> Result<(), WriteError> {
        let mut attempt = 0;
        loop {
            if !self.breaker.allow() {
                return Err(WriteError { attempts: attempt, error: ClickHouseError::CircuitOpen, ambiguous: false });
            }
            let (sql, parts) = body();
            let bytes: usize = parts.iter().map(|p| p.bytes).sum();
            let started = std::time::Instant::now();
            // Each attempt its own id under the caller's: all of them can be stopped at once.
            let id = query_id.map(|base| format!("{base}-{attempt}"));
            let result = match self.permits.acquire().await {
                Ok(_permit) => self.ch.insert_as(&sql, parts, id.as_deref()).await,
                Err(_) => Err(ClickHouseError::Protocol("the INSERT semaphore is closed".into())),
            };
            metrics::flush_attempt(&self.stream, result.is_ok(), rows, bytes, started.elapsed());
            self.breaker.record(result.is_ok());
            let error = match result {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if is_schema_change(&error) {
                self.schema_changed.notify_one();
            }
            match next_step(&error, attempt, self.retries, self.resolve_ambiguous, self.siblings) {
                Next::Retry => {}
                Next::Resolve => {
                    tracing::warn!(%error, attempts = attempt + 1, bytes, "INSERT may have landed; resolving");
                    return Err(WriteError { attempts: attempt + 1, error, ambiguous: true });
                }
                Next::Fail => {
                    tracing::warn!(%error, attempts = attempt + 1, bytes, "INSERT failed");
                    return Err(WriteError { attempts: attempt + 1, error, ambiguous: false });
                }
            }
            let delay = self.backoff.delay(attempt);
            tracing::info!(%error, attempt = attempt + 1, ?delay, "INSERT failed, retrying");
            metrics::flush_retry();
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Chunk;
    use crate::schema::{ColumnInfo, SpecialColumns};

    fn schema() -> TableSchema {
        let info =
            |name: &str, ty: &str| ColumnInfo { name: name.into(), type_text: ty.into(), default_kind: String::new() };
        let special =
            SpecialColumns { id: "id".into(), timestamp: "ts".into(), partition_key: "n".into(), sharding: None };
        TableSchema::new(1, "db", "t", vec![info("n", "UInt64"), info("s", "String")], &special)
    }

    /// RowBinary rows `from..to` of (n UInt64, s String).
    fn rows(from: u64, to: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for n in from..to {
            out.extend_from_slice(&n.to_le_bytes());
            let s = format!("row {n}");
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn writer(format: InsertFormat) -> Writer {
        let config = {
            let mut config = Config::default();
            config.clickhouse.insert_format = format;
            config
        };
        let breaker = Arc::new(Breaker::new(0, std::time::Duration::from_secs(1)));
        Writer::new(ClickHouse::new(&config), &config, Arc::new(Notify::new()), breaker)
    }

    #[test]
    fn an_insert_that_may_have_landed_is_resolved_not_retried() {
        let timeout = ClickHouseError::Timeout(std::time::Duration::from_secs(1));
        let busy = ClickHouseError::Server { code: 202, message: String::new() };
        assert_eq!(next_step(&timeout, 0, 3, true, false), Next::Resolve);
        assert_eq!(next_step(&timeout, 0, 3, false, false), Next::Retry, "without a journal: at-least-once");
        assert_eq!(next_step(&busy, 0, 3, true, false), Next::Retry, "answered: nothing was written");
        assert_eq!(next_step(&busy, 3, 3, true, false), Next::Fail);
        let refused = ClickHouseError::Network("client error (Connect): connection refused".into());
        assert_eq!(next_step(&refused, 0, 3, true, false), Next::Retry, "the only replica: wait for it");
        assert_eq!(next_step(&refused, 0, 3, true, true), Next::Fail, "another replica takes it at once");
        assert_eq!(next_step(&timeout, 0, 3, true, true), Next::Resolve, "may have landed: stays with its node");
        let syntax = ClickHouseError::Server { code: 62, message: String::new() };
        assert_eq!(next_step(&syntax, 0, 3, true, false), Next::Fail);
    }

    #[test]
    fn large_chunks_get_their_block_made_ahead_and_small_ones_do_not() {
        let schema = schema();
        let mut partition = PartitionRows::default();
        partition.chunks.push(Chunk { rows: 256, data: rows(0, 256), ..Chunk::default() });
        partition.chunks.push(Chunk { omitted: 1, rows: 255, data: rows(0, 255), ..Chunk::default() });
        writer(InsertFormat::Native).make_blocks(&schema, std::slice::from_mut(&mut partition));
        let block = schema.native_block(0, 256, &[rows(0, 256)]).unwrap();
        assert_eq!(partition.chunks[0].block.as_ref().map(|b| b.bytes), Some(block.len()));
        assert!(partition.chunks[1].block.is_none(), "below the floor");

        let mut partition = PartitionRows::default();
        partition.chunks.push(Chunk { rows: 300, data: rows(0, 300), ..Chunk::default() });
        writer(InsertFormat::RowBinary).make_blocks(&schema, std::slice::from_mut(&mut partition));
        assert!(partition.chunks[0].block.is_none(), "RowBinary is sent as encoded");
    }

    #[test]
    fn the_first_attempt_sends_one_block_of_the_rest_then_the_built_ones() {
        let schema = schema();
        let pieces: Vec<Bytes> = [rows(0, 2), rows(2, 302), rows(302, 305)].map(Bytes::from).into();
        let built = schema.native_block(0, 300, &[&pieces[1]]).unwrap();
        let made = |rows| vec![Built { piece: 1, rows, part: BodyPart::plain(Bytes::from(built.clone())) }];
        let parts = ahead(&schema, 0, 305, &pieces, made(300)).unwrap();
        let rest = schema.native_block(0, 5, &[&pieces[0], &pieces[2]]).unwrap();
        assert_eq!(parts.iter().map(|p| p.bytes).collect::<Vec<_>>(), [rest.len(), built.len()]);
        // Only built pieces: no empty block in front.
        let parts = ahead(
            &schema,
            0,
            300,
            &pieces[1..2],
            vec![Built { piece: 0, rows: 300, part: BodyPart::plain(Bytes::from(built.clone())) }],
        )
        .unwrap();
        assert_eq!(parts.len(), 1);
        // Counts that do not add up: everything goes as one block made anew.
        assert!(ahead(&schema, 0, 299, &pieces, made(300)).is_none());
    }
}
