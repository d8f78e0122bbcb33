//! Per-partition coalescers: each owns a bounded queue of encoded rows and turns what
//! accumulates into as few INSERTs as it can.
//!
//! Batching is by *group commit*: while a partition's INSERT is in flight, new rows queue;
//! when it returns, everything queued (up to the row and byte limits) leaves in the next one.
//! Under light load that is one small INSERT per request, answered quickly; under heavy load
//! batches grow by themselves, with no fixed linger capping throughput (with C producers waiting
//! for their answers, requests/s ≤ C ÷ latency). `flush_linger_ms` optionally holds a batch
//! while no INSERT is pending, trading latency for fewer INSERTs.

mod partition;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clickhouse::BodyPart;
use crate::clickhouse::writer::{WriteError, Writer};
use crate::config::Config;
use crate::idempotency::{Idempotency, Reservation};
use crate::metrics;
use crate::schema::TableSchema;
use crate::shed::budget::Lease;

/// Rows encoded for one INSERT column list: `omitted` is the mask of columns left to their
/// DEFAULT expression (see [`TableSchema::insert_sql`]).
#[derive(Debug, Default)]
pub struct Chunk {
    pub omitted: u64,
    pub rows: usize,
    pub data: Vec<u8>,
    /// The rows as their own part of an INSERT body (a compressed Native block), made once the
    /// request's rows are final ([`Writer::prepare`]); `data` stays for a retry.
    pub block: Option<BodyPart>,
}

/// The rows of one request bound for one partition.
#[derive(Debug, Default)]
pub struct PartitionRows {
    pub chunks: Vec<Chunk>,
    /// The chunk the last row went to: the next row most likely has the same column list.
    last: usize,
    /// Bytes to reserve for the first chunk: growing a large one by doubling copies it about
    /// once more.
    expected_bytes: usize,
}

impl PartitionRows {
    /// No rows yet; about `expected_bytes` of them to come.
    pub fn with_expected_bytes(expected_bytes: usize) -> Self {
        Self { expected_bytes, ..Self::default() }
    }

    /// Encodes a row straight into the chunk of its column list, which `encode` reports only
    /// once it is done (the mask of columns left to their DEFAULT): the row is written into the
    /// chunk of the previous row and moved in the rare case its column list differs. Saves
    /// copying every row out of a scratch buffer. Returns where the row went (chunk index,
    /// byte range); on error nothing is left behind.
    pub fn encode<E>(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<u64, E>,
    ) -> Result<(usize, std::ops::Range<usize>), E> {
        if self.chunks.is_empty() {
            self.chunks.push(Chunk { data: Vec::with_capacity(self.expected_bytes), ..Chunk::default() });
            self.last = 0;
        }
        let guess = self.last;
        let chunk = &mut self.chunks[guess];
        let start = chunk.data.len();
        let omitted = match encode(&mut chunk.data) {
            Ok(omitted) => omitted,
            Err(error) => {
                chunk.data.truncate(start);
                if chunk.rows == 0 {
                    // The chunk made for this row alone: never leave an empty one.
                    self.chunks.pop();
                }
                return Err(error);
            }
        };
        if chunk.rows == 0 || chunk.omitted == omitted {
            chunk.omitted = omitted;
            chunk.rows += 1;
            return Ok((guess, start..chunk.data.len()));
        }
        let row = chunk.data.split_off(start);
        let (index, range) = self.push(omitted, &row);
        self.last = index;
        Ok((index, range))
    }

    /// Appends an encoded row to the chunk of its column list; returns where it went
    /// (chunk index, byte range).
    pub fn push(&mut self, omitted: u64, row: &[u8]) -> (usize, std::ops::Range<usize>) {
        let index = match self.chunks.iter().position(|c| c.omitted == omitted) {
            Some(i) => i,
            None => {
                self.chunks.push(Chunk { omitted, ..Chunk::default() });
                self.chunks.len() - 1
            }
        };
        let chunk = &mut self.chunks[index];
        chunk.rows += 1;
        let start = chunk.data.len();
        chunk.data.extend_from_slice(row);
        (index, start..chunk.data.len())
    }

    pub fn rows(&self) -> usize {
        self.chunks.iter().map(|c| c.rows).sum()
    }

    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }
}

/// The rows of several requests for one INSERT column list, kept as the requests' own buffers:
/// the INSERT reads them in turn (transposing them into one Native block, or sending them
/// back to back), so merging requests copies nothing.
#[derive(Debug, Default)]
pub struct Pieces {
    pub omitted: u64,
    pub rows: usize,
    pub pieces: Vec<Vec<u8>>,
    /// Pieces whose block was made ahead: the INSERT's first attempt sends those as they are.
    pub built: Vec<Built>,
}

/// A piece's block made ahead of the INSERT.
#[derive(Debug)]
pub struct Built {
    /// Index of the piece in [`Pieces::pieces`].
    pub piece: usize,
    pub rows: usize,
    pub part: BodyPart,
}

/// Chunks grouped by column list, in order of first appearance.
#[derive(Debug, Default)]
pub struct Groups(pub Vec<Pieces>);

impl Groups {
    pub fn add(&mut self, chunk: Chunk) {
        let index = match self.0.iter().position(|g| g.omitted == chunk.omitted) {
            Some(i) => i,
            None => {
                self.0.push(Pieces { omitted: chunk.omitted, ..Pieces::default() });
                self.0.len() - 1
            }
        };
        let group = &mut self.0[index];
        group.rows += chunk.rows;
        if let Some(part) = chunk.block {
            group.built.push(Built { piece: group.pieces.len(), rows: chunk.rows, part });
        }
        group.pieces.push(chunk.data);
    }
}

/// What a waiting request learns about the flush holding its rows.
pub type FlushResult = Result<(), WriteError>;

/// One request's rows for one partition, and where to report the flush.
#[derive(Debug)]
pub struct Submission {
    pub schema: Arc<TableSchema>,
    pub rows: PartitionRows,
    pub ack: Option<oneshot::Sender<FlushResult>>,
    /// The rows' share of the in-flight budget, released once they are written.
    pub lease: Option<Lease>,
    /// Idempotency keys of these rows' events: committed after the write, released if it fails.
    pub reservation: Option<Reservation>,
    /// Send the batch holding this without lingering (an admin flush).
    pub urgent: bool,
}

/// Why rows could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the coalescer queue stayed full for {0:?}")]
    QueueFull(Duration),
    #[error("the gateway is shutting down")]
    Closed,
}

/// Limits a partition applies to each batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

/// The partitions and their queues.
#[derive(Debug)]
pub struct Coalescer {
    queues: Vec<mpsc::Sender<Submission>>,
    queue_timeout: Duration,
    /// Rows waiting in each partition: queued, or in a batch not yet written.
    queued: Arc<Vec<Waiting>>,
}

/// Rows waiting in one partition, and the gauge that shows them.
#[derive(Debug)]
pub(crate) struct Waiting {
    rows: AtomicUsize,
    gauge: ::metrics::Gauge,
}

impl Waiting {
    fn new(partition: usize) -> Self {
        Self { rows: AtomicUsize::new(0), gauge: metrics::queue_rows(partition) }
    }

    fn add(&self, rows: usize) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.gauge.increment(rows as f64);
    }

    pub(super) fn sub(&self, rows: usize) {
        self.rows.fetch_sub(rows, Ordering::Relaxed);
        self.gauge.decrement(rows as f64);
    }
}

/// The running partition tasks; [`CoalescerTasks::drain`] flushes what is queued and ends them.
#[derive(Debug)]
pub struct CoalescerTasks {
    tasks: JoinSet<()>,
    close: CancellationToken,
}

impl Coalescer {
    pub fn start(config: &Config, writer: &Arc<Writer>, idempotency: &Arc<Idempotency>) -> (Self, CoalescerTasks) {
        let limits = BatchLimits {
            max_rows: config.flush_max_rows,
            max_bytes: config.flush_max_bytes,
            linger: Duration::from_millis(config.flush_linger_ms),
        };
        let close = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let count = config.partition_count();
        let queued: Arc<Vec<Waiting>> = Arc::new((0..count).map(Waiting::new).collect());
        let queues = (0..count)
            .map(|id| {
                let (tx, rx) = mpsc::channel(config.queue_capacity);
                let partition = partition::Partition {
                    id,
                    writer: Arc::clone(writer),
                    idempotency: Arc::clone(idempotency),
                    limits,
                    queued: Arc::clone(&queued),
                };
                tasks.spawn(partition.run(rx, close.clone()));
                tx
            })
            .collect();
        let coalescer = Self { queues, queue_timeout: Duration::from_millis(config.queue_timeout_ms), queued };
        (coalescer, CoalescerTasks { tasks, close })
    }

    pub fn partitions(&self) -> usize {
        self.queues.len()
    }

    /// Queues one request's rows, all partitions or none: room is reserved in every queue
    /// first, so a full queue cannot leave part of a request written and the rest refused.
    pub async fn submit(&self, submissions: Vec<(usize, Submission)>) -> Result<(), SubmitError> {
        let mut permits = Vec::with_capacity(submissions.len());
        for (partition, _) in &submissions {
            let queue = self.queues.get(*partition).ok_or(SubmitError::Closed)?;
            let permit = tokio::time::timeout(self.queue_timeout, queue.reserve())
                .await
                .map_err(|_| SubmitError::QueueFull(self.queue_timeout))?
                .map_err(|_| SubmitError::Closed)?;
            permits.push(permit);
        }
        for (permit, (partition, submission)) in permits.into_iter().zip(submissions) {
            let rows = submission.rows.rows();
            self.queued[partition].add(rows);
            permit.send(submission);
        }
        Ok(())
    }

    /// Rows waiting in each partition (queued, or in a batch not yet written).
    pub fn queue_depths(&self) -> Vec<usize> {
        self.queued.iter().map(|q| q.rows.load(Ordering::Relaxed)).collect()
    }

    /// Sends everything queued now, without lingering, and waits until it is written.
    pub async fn flush(&self, schema: &Arc<TableSchema>) -> Result<(), SubmitError> {
        let mut acks = Vec::new();
        let barriers = (0..self.partitions())
            .map(|partition| {
                let (tx, rx) = oneshot::channel();
                acks.push(rx);
                let barrier = Submission {
                    schema: Arc::clone(schema),
                    rows: PartitionRows::default(),
                    ack: Some(tx),
                    lease: None,
                    reservation: None,
                    urgent: true,
                };
                (partition, barrier)
            })
            .collect();
        self.submit(barriers).await?;
        for ack in acks {
            // A barrier's own outcome does not matter: it only marks how far the queue went.
            let _ = ack.await;
        }
        Ok(())
    }
}

impl CoalescerTasks {
    /// Stops taking rows, flushes everything queued, and waits for the partitions to finish.
    pub async fn drain(mut self) {
        self.close.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "a coalescer partition ended abnormally");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rows: &mut PartitionRows, bytes: &[u8], omitted: u64) -> Result<(usize, std::ops::Range<usize>), ()> {
        rows.encode(|out| {
            out.extend_from_slice(bytes);
            if omitted == u64::MAX { Err(()) } else { Ok(omitted) }
        })
    }

    #[test]
    fn encoded_rows_land_in_the_chunk_of_their_column_list() {
        let mut rows = PartitionRows::default();
        assert_eq!(row(&mut rows, b"bad", u64::MAX), Err(()));
        assert!(rows.chunks.is_empty(), "a rejected first row leaves no empty chunk");
        assert_eq!(row(&mut rows, b"aa", 0), Ok((0, 0..2)));
        assert_eq!(row(&mut rows, b"bbb", 0b10), Ok((1, 0..3)));
        assert_eq!(row(&mut rows, b"cc", 0b10), Ok((1, 3..5)));
        assert_eq!(row(&mut rows, b"x", u64::MAX), Err(()));
        assert_eq!(row(&mut rows, b"dd", 0), Ok((0, 2..4)));
        let chunks: Vec<_> = rows.chunks.iter().map(|c| (c.omitted, c.rows, c.data.as_slice())).collect();
        assert_eq!(chunks, vec![(0, 2, &b"aadd"[..]), (0b10, 2, &b"bbbcc"[..])]);
    }
}
