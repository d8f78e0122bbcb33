//! One partition's loop: take what is queued, send it as one batch, report to every request
//! whose rows it held, repeat.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BatchLimits, FlushResult, Submission, Waiting};
use crate::clickhouse::writer::Writer;
use crate::idempotency::{Idempotency, Reservation};
use crate::rows::Groups;
use crate::schema::TableSchema;
use crate::shed::budget::Lease;

/// Rows of several submissions that share a schema, grouped by INSERT column list.
struct Batch {
    schema: Arc<TableSchema>,
    groups: Groups,
    rows: usize,
    bytes: usize,
    acks: Vec<tokio::sync::oneshot::Sender<FlushResult>>,
    /// In-flight budget held by the rows until they are written.
    leases: Vec<Lease>,
    reservations: Vec<Reservation>,
    urgent: bool,
}

impl Batch {
    fn new(first: Submission) -> Self {
        let mut batch = Self {
            schema: Arc::clone(&first.schema),
            groups: Groups::default(),
            rows: 0,
            bytes: 0,
            acks: Vec::new(),
            leases: Vec::new(),
            reservations: Vec::new(),
            urgent: false,
        };
        batch.push(first);
        batch
    }

    fn full(&self, limits: &BatchLimits) -> bool {
        self.rows >= limits.max_rows || self.bytes >= limits.max_bytes
    }

    /// Whether `next` can join without crossing a limit or mixing schema versions.
    fn fits(&self, next: &Submission, limits: &BatchLimits) -> bool {
        self.schema.version == next.schema.version
            && self.rows + next.rows.rows() <= limits.max_rows
            && self.bytes + next.rows.bytes() <= limits.max_bytes
    }

    fn push(&mut self, submission: Submission) {
        for chunk in submission.rows.chunks {
            self.rows += chunk.rows;
            self.bytes += chunk.data.len();
            self.groups.add(chunk);
        }
        self.acks.extend(submission.ack);
        self.leases.extend(submission.lease);
        self.reservations.extend(submission.reservation);
        self.urgent |= submission.urgent;
    }

    async fn flush(self, writer: &Writer, idempotency: &Idempotency) {
        let mut result = Ok(());
        for group in self.groups.0 {
            result = writer.write_rows(&self.schema, &self.schema.table, group).await;
            if result.is_err() {
                break;
            }
        }
        // Keys are committed only once the rows are in ClickHouse, and before anyone hears so.
        if result.is_ok() {
            if idempotency.commit(&self.reservations).await.is_err() {
                tracing::warn!(
                    requests = self.reservations.len(),
                    "written, but their idempotency keys stay pending until the lease expires"
                );
            }
        } else {
            // On failure the lease expiry frees them anyway.
            let _ = idempotency.release(&self.reservations).await;
        }
        for ack in self.acks {
            // The request may be gone (client hung up, or `wait=false`): nothing to tell.
            let _ = ack.send(result.clone());
        }
        drop(self.leases);
    }
}

/// One partition's task and what it needs.
pub(super) struct Partition {
    pub id: usize,
    pub writer: Arc<Writer>,
    pub idempotency: Arc<Idempotency>,
    pub limits: BatchLimits,
    pub queued: Arc<Vec<Waiting>>,
}

impl Partition {
    /// Counts written (or failed) rows out of the partition's waiting rows.
    fn done(&self, rows: usize) {
        self.queued[self.id].sub(rows);
    }

    pub(super) async fn run(self, mut queue: mpsc::Receiver<Submission>, close: CancellationToken) {
        let limits = self.limits;
        let mut carry: Option<Submission> = None;
        let mut closing = false;
        loop {
            let first = match carry.take() {
                Some(submission) => submission,
                None => tokio::select! {
                    biased;
                    next = queue.recv() => match next {
                        Some(submission) => submission,
                        None => break,
                    },
                    () = close.cancelled(), if !closing => {
                        // No more senders can get in; what is queued still comes out of recv().
                        queue.close();
                        closing = true;
                        continue;
                    }
                },
            };
            let mut batch = Batch::new(first);
            let deadline = Instant::now() + limits.linger;
            while !batch.full(&limits) {
                let next = match queue.try_recv() {
                    Ok(submission) => Some(submission),
                    Err(_) if closing || batch.urgent || limits.linger.is_zero() => None,
                    Err(_) => tokio::select! {
                        next = queue.recv() => next,
                        () = tokio::time::sleep_until(deadline) => None,
                        () = close.cancelled() => None,
                    },
                };
                let Some(next) = next else { break };
                if !batch.fits(&next, &limits) {
                    carry = Some(next);
                    break;
                }
                batch.push(next);
            }
            tracing::trace!(partition = self.id, rows = batch.rows, bytes = batch.bytes, "flushing");
            let rows = batch.rows;
            batch.flush(&self.writer, &self.idempotency).await;
            self.done(rows);
        }
        tracing::debug!(partition = self.id, "coalescer partition drained");
    }
}
