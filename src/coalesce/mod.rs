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

use crate::cluster::{Replica, Shards};
use crate::config::Config;
use crate::flush::{Acks, Limits, Submission};
use crate::idempotency::Idempotency;
use crate::metrics;
use crate::rows::PartitionRows;
use crate::schema::TableSchema;

/// Why rows could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the coalescer queue stayed full for {0:?}")]
    QueueFull(Duration),
    #[error("the gateway is shutting down")]
    Closed,
}

/// The partitions and their queues.
#[derive(Debug)]
pub struct Coalescer {
    /// Shard `s` owns partitions `s × per_shard ..` of these.
    queues: Vec<mpsc::Sender<Submission>>,
    per_shard: usize,
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
    fn new(stream: &crate::config::StreamName, partition: usize) -> Self {
        Self { rows: AtomicUsize::new(0), gauge: metrics::queue_rows(stream, partition) }
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

/// The running partition tasks; [`CoalescerTasks::finish`] flushes what is queued and ends them.
#[derive(Debug)]
pub struct CoalescerTasks {
    tasks: JoinSet<()>,
    close: CancellationToken,
}

impl Coalescer {
    /// Starts `partition_count()` partitions per shard, each writing to its shard's replicas.
    pub fn start(config: &Config, shards: &Shards, idempotency: &Arc<Idempotency>) -> (Self, CoalescerTasks) {
        let limits = Limits {
            max_rows: config.batching.flush_max_rows,
            max_bytes: config.batching.flush_max_bytes,
            linger: Duration::from_millis(config.batching.flush_linger_ms),
        };
        let close = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let per_shard = config.partition_count();
        let replicas: Vec<Arc<[Arc<Replica>]>> = shards.shards.iter().map(|r| r.iter().cloned().collect()).collect();
        let count = per_shard * replicas.len();
        let queued: Arc<Vec<Waiting>> = Arc::new((0..count).map(|p| Waiting::new(&config.stream, p)).collect());
        let queues = (0..count)
            .map(|id| {
                let (tx, rx) = mpsc::channel(config.batching.queue_capacity);
                let partition = partition::Partition {
                    id,
                    replicas: Arc::clone(&replicas[id / per_shard]),
                    policy: shards.policy,
                    idempotency: Arc::clone(idempotency),
                    limits,
                    queued: Arc::clone(&queued),
                };
                tasks.spawn(partition.run(rx, close.clone()));
                tx
            })
            .collect();
        let coalescer =
            Self { queues, per_shard, queue_timeout: Duration::from_millis(config.batching.queue_timeout_ms), queued };
        (coalescer, CoalescerTasks { tasks, close })
    }

    /// Partitions over all shards.
    pub fn partitions(&self) -> usize {
        self.queues.len()
    }

    /// Partitions of each shard.
    pub fn per_shard(&self) -> usize {
        self.per_shard
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
                    acks: Acks { written: Some(tx), ..Acks::default() },
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
    pub async fn finish(mut self) {
        self.close.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "a coalescer partition ended abnormally");
            }
        }
    }
}
