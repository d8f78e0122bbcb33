//! One partition's loop: take what is queued, send it as one batch ([`crate::flush`]),
//! report the rows written, repeat.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Waiting;
use crate::cluster::Replica;
use crate::flush::{Batch, Limits, Route, Submission};
use crate::idempotency::Idempotency;
use crate::shed::Policy;

/// One partition's task and what it needs.
pub(super) struct Partition {
    pub id: usize,
    /// The replicas of the partition's shard.
    pub replicas: Arc<[Arc<Replica>]>,
    pub policy: Policy,
    pub idempotency: Arc<Idempotency>,
    pub limits: Limits,
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
            let route = Route { replicas: &self.replicas, preferred: self.id, policy: self.policy };
            batch.flush(&route, &self.idempotency).await;
            self.done(rows);
        }
        tracing::debug!(partition = self.id, "coalescer partition drained");
    }
}
