//! One partition's loop: take what is queued, send it as one batch, report to every request
//! whose rows it held, repeat.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BatchLimits, Submission, Waiting};
use crate::clickhouse::writer::{WriteError, Writer};
use crate::cluster::{Replica, choose_replica};
use crate::idempotency::{Idempotency, Reservation};
use crate::journal::{Block, BlockId, Durable, FlushError, FlushResult, Waiter};
use crate::rows::Groups;
use crate::schema::TableSchema;
use crate::shed::Policy;
use crate::shed::budget::Lease;

/// Rows of several submissions that share a schema, grouped by INSERT column list.
struct Batch {
    schema: Arc<TableSchema>,
    groups: Groups,
    rows: usize,
    bytes: usize,
    /// Who waits for the rows: journaled, written, visible.
    journaled: Vec<Waiter>,
    written: Vec<Waiter>,
    visible: Vec<Waiter>,
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
            journaled: Vec::new(),
            written: Vec::new(),
            visible: Vec::new(),
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
        self.journaled.extend(submission.acks.journaled);
        self.written.extend(submission.acks.written);
        self.visible.extend(submission.acks.visible);
        self.leases.extend(submission.lease);
        self.reservations.extend(submission.reservation);
        self.urgent |= submission.urgent;
    }

    /// Journals the batch and INSERTs it on a replica of its shard, both at once (the fsync
    /// overlaps the INSERT it protects), fails over to another replica when the INSERT failed
    /// cleanly, then settles its keys and tells every waiter.
    async fn flush(self, route: &Route<'_>, idempotency: &Idempotency) {
        let Self { schema, groups, journaled, written, visible, leases, reservations, .. } = self;
        let mut tried = Vec::new();
        let Some(first) = route.next(&tried) else {
            let failed = Err(FlushError::Write(WriteError::not_sent()));
            let _ = idempotency.release(&reservations).await;
            for waiters in [journaled, written, visible] {
                tell(waiters, &failed);
            }
            return;
        };
        tried.push(first);
        let sent = attempt(&route.replicas[first], &schema, groups, route.replicas.len() > 1).await;
        // Told "safe" now: from here on their block may not be given back.
        let promised = !journaled.is_empty();
        tell(journaled, &sent.journal_result);
        let Sent { mut at, mut result, block, journal_result } = sent;
        // A clean failure wrote nothing: the block moves to the next replica, its journal
        // record with it (appended there before it is dropped here).
        while let (Err(error), Some(block)) = (&result, &block)
            && !error.ambiguous
            && let Some(next) = route.next(&tried)
        {
            tried.push(next);
            tracing::warn!(from = %at.replica.url, to = %route.replicas[next].url, %error, "INSERT failed; failing over");
            let Some((moved, outcome)) = failover(&at, &route.replicas[next], block, promised).await else {
                // The next replica's journal could not take it: it stays where it is.
                break;
            };
            (at, result) = (moved, outcome);
        }
        let waiters = Waiters { written, visible, promised, journal_result };
        settle(at, result, block, waiters, idempotency, &reservations).await;
        drop(leases);
    }
}

/// A batch's first attempt: where it went, how it went, its block (kept when journaled, or
/// when another replica may need it) and how its journaling went.
struct Sent<'a> {
    at: Settle<'a>,
    result: Result<(), WriteError>,
    block: Option<Block>,
    journal_result: FlushResult,
}

/// Journals the batch on `replica` (when it journals) while sending it there.
async fn attempt<'a>(replica: &'a Replica, schema: &TableSchema, mut groups: Groups, keep_block: bool) -> Sent<'a> {
    let durable = replica.durable.as_deref();
    let query_id = durable.map_or_else(|| format!("bg-{:016x}", rand::random::<u64>()), Durable::next_query_id);
    let block = (durable.is_some() || keep_block)
        .then(|| Block::of(schema, &schema.table, &mut groups, query_id.clone(), unix_ms()));
    let append = async {
        match (durable, &block) {
            (Some(durable), Some(block)) => Some(durable.append(block).await),
            _ => None,
        }
    };
    let sent_id = durable.map(|_| query_id.as_str());
    let (appended, result) = tokio::join!(append, insert(&replica.writer, schema, groups, sent_id));
    let journal_result: FlushResult = match &appended {
        Some(Err(error)) => Err(FlushError::from(error)),
        _ => Ok(()),
    };
    Sent { at: Settle { replica, id: appended.and_then(Result::ok) }, result, block, journal_result }
}

/// Who still waits for a batch once its INSERT is done.
struct Waiters {
    written: Vec<Waiter>,
    visible: Vec<Waiter>,
    /// Someone was told the block is journaled (202s, Kafka offsets).
    promised: bool,
    journal_result: FlushResult,
}

/// Settles a batch after its last attempt: its keys committed (written, or sure to be) or
/// released, its block handed to the journal of the node it is at, its waiters told.
async fn settle(
    Settle { replica, id }: Settle<'_>,
    result: Result<(), WriteError>,
    block: Option<Block>,
    Waiters { written, visible, promised, journal_result }: Waiters,
    idempotency: &Idempotency,
    reservations: &[Reservation],
) {
    let durable = replica.durable.as_deref();
    match (result, durable, block) {
        (Ok(()), durable, block) => {
            commit(idempotency, reservations).await;
            // A 200 promises the journal too: written but not journaled is refused (the
            // keys are committed, so the producer's retry is answered as duplicates).
            tell(written, &journal_result);
            match (durable, id, block) {
                (Some(durable), Some(id), Some(block)) => durable.written(id, &block, visible),
                // Not journaled (the append failed): no confirmation will come.
                _ => tell(visible, &journal_result),
            }
        }
        (Err(error), Some(durable), Some(block)) if keep_after_failure(error.ambiguous, promised && id.is_some()) => {
            // The rows are in the journal, or at hand, and will be stored exactly once:
            // their keys are committed now, the requests hear once they are settled.
            commit(idempotency, reservations).await;
            durable.ambiguous(id.unwrap_or_else(unjournaled_id), block, written, visible);
        }
        (Err(error), durable, _) => {
            // Not written, and nobody was told it is safe: the producers' retries go
            // through. (On failure the lease expiry frees them anyway.)
            let _ = idempotency.release(reservations).await;
            if let (Some(durable), Some(id)) = (durable, id) {
                durable.discard(id).await;
            }
            let failed = Err(FlushError::Write(error));
            tell(written, &failed);
            tell(visible, &failed);
        }
    }
}

/// Where a batch's block is, and its journal record there.
struct Settle<'a> {
    replica: &'a Replica,
    id: Option<BlockId>,
}

/// Which replicas of its shard a partition writes to, preferring its own.
pub(super) struct Route<'a> {
    pub replicas: &'a [Arc<Replica>],
    pub preferred: usize,
    pub policy: Policy,
}

impl Route<'_> {
    fn next(&self, tried: &[usize]) -> Option<usize> {
        let usable: Vec<bool> = self.replicas.iter().map(|r| r.usable(self.policy)).collect();
        // `is_open`, not `allow`: asking must not take a half-open breaker's one probe.
        let allowed: Vec<bool> = self.replicas.iter().map(|r| !r.breaker.is_open()).collect();
        choose_replica(&usable, &allowed, self.preferred, tried)
    }
}

/// Sends a block whose INSERT failed cleanly on `from` to `to`: journaled there first (when
/// either journals), then its record on `from` dropped, then sent (as RowBinary, the groups
/// of the block). `None` when `to`'s journal cannot take a promised block: it stays on `from`.
async fn failover<'a>(
    from: &Settle<'_>,
    to: &'a Replica,
    block: &Block,
    promised: bool,
) -> Option<(Settle<'a>, Result<(), WriteError>)> {
    let id = match &to.durable {
        Some(durable) => match durable.append(block).await {
            Ok(id) => Some(id),
            Err(_) if promised && from.id.is_some() => return None,
            Err(_) => None,
        },
        None => None,
    };
    if let (Some(durable), Some(old)) = (&from.replica.durable, from.id) {
        durable.discard(old).await;
    }
    // Under the block's own query id: resolving it on `to` stops these INSERTs too.
    let result = block.send(&to.writer, &format!("{}-f", block.query_id)).await.map_err(|(_, error)| error);
    Some((Settle { replica: to, id }, result))
}

/// Whether a batch whose INSERT failed is kept, to be settled through the journal, rather
/// than given back to its producers: when the INSERT may have landed, and when the block is
/// journaled and someone was told so (`promised`: 202s, Kafka offsets), whatever the failure —
/// a journaled block reaches the destination exactly once. A batch only `200`s wait for is
/// given back on a clean failure, so that they hear 503 at once and retry.
fn keep_after_failure(ambiguous: bool, promised: bool) -> bool {
    ambiguous || promised
}

/// The batch's INSERTs, one per column list, stopping at the first failure.
async fn insert(
    writer: &Writer,
    schema: &TableSchema,
    groups: Groups,
    query_id: Option<&str>,
) -> Result<(), WriteError> {
    for (n, group) in groups.0.into_iter().enumerate() {
        let id = query_id.map(|base| format!("{base}-{n}"));
        writer.write_rows(schema, &schema.table, group, id.as_deref()).await?;
    }
    Ok(())
}

/// Keys are committed only once the rows are in ClickHouse (or sure to be), and before
/// anyone hears so.
async fn commit(idempotency: &Idempotency, reservations: &[Reservation]) {
    if idempotency.commit_with_retries(reservations).await.is_err() {
        tracing::warn!(
            requests = reservations.len(),
            "written, but their idempotency keys stay pending until the lease expires"
        );
    }
}

fn tell(waiters: Vec<Waiter>, result: &FlushResult) {
    for waiter in waiters {
        // The request may be gone (client hung up): nothing to tell.
        let _ = waiter.send(result.clone());
    }
}

/// An id for a block the journal could not take, so the resolver can still track it.
fn unjournaled_id() -> BlockId {
    u64::MAX - u64::from(rand::random::<u32>())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One partition's task and what it needs.
pub(super) struct Partition {
    pub id: usize,
    /// The replicas of the partition's shard.
    pub replicas: Arc<[Arc<Replica>]>,
    pub policy: Policy,
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
            let route = Route { replicas: &self.replicas, preferred: self.id, policy: self.policy };
            batch.flush(&route, &self.idempotency).await;
            self.done(rows);
        }
        tracing::debug!(partition = self.id, "coalescer partition drained");
    }
}

#[cfg(test)]
mod tests {
    use super::keep_after_failure;

    #[test]
    fn a_journaled_batch_is_never_given_back() {
        assert!(keep_after_failure(true, true));
        assert!(keep_after_failure(false, true), "a clean failure after a promised append: the 202 stands");
        assert!(keep_after_failure(true, false), "may have landed: looked for, never sent blind");
        assert!(!keep_after_failure(false, false), "nothing anywhere: the producer retries");
    }
}
