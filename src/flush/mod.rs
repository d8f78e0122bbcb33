//! Sending a batch: journaled and INSERTed on a replica of its shard at once (the fsync
//! overlaps the INSERT it protects), failed over to another replica when the INSERT failed
//! cleanly, then concluded (`outcome`): its keys committed or released, its block handed to the
//! journal of the node it is at, every waiter told.
//!
//! - `outcome`: what becomes of a batch after its last attempt;
//! - [`fallback`]: a request's rows written straight into the fallback table while the Buffer
//!   is saturated.
//!
//! An INSERT whose fate is unknown is settled the one way [`crate::journal::resolve`] does.

pub mod fallback;
mod outcome;

use std::sync::Arc;
use std::time::Duration;

use crate::clickhouse::writer::{WriteError, Writer};
use crate::cluster::{Replica, choose_replica};
use crate::config::redacted;
use crate::idempotency::{Idempotency, Reservation};
use crate::journal::{Block, BlockId, FlushError, FlushResult, Journal, Waiter};
use crate::rows::{Groups, PartitionRows};
use crate::schema::TableSchema;
use crate::shed::Policy;
use crate::shed::budget::Lease;
use outcome::{Holder, Waiters, conclude, tell};

/// Who hears about a submission's rows, and when.
#[derive(Debug, Default)]
pub struct Acks {
    /// Once they are in the journal (the answer of `wait=false`).
    pub journaled: Option<Waiter>,
    /// Once their INSERT succeeded (the answer of `wait=true`; producer offsets).
    pub written: Option<Waiter>,
    /// Once they are in the destination (`wait=visible`).
    pub visible: Option<Waiter>,
}

/// One request's rows for one partition, and where to report the flush.
#[derive(Debug)]
pub struct Submission {
    pub schema: Arc<TableSchema>,
    pub rows: PartitionRows,
    pub acks: Acks,
    /// The rows' share of the in-flight budget, released once they are written.
    pub lease: Option<Lease>,
    /// Idempotency keys of these rows' events: committed after the write, released if it fails.
    pub reservation: Option<Reservation>,
    /// Send the batch holding this without lingering (an admin flush).
    pub urgent: bool,
}

/// Limits a partition applies to each batch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

/// Rows of several submissions that share a schema, grouped by INSERT column list.
#[derive(Debug)]
pub struct Batch {
    schema: Arc<TableSchema>,
    groups: Groups,
    pub rows: usize,
    pub bytes: usize,
    /// Who waits for the rows: journaled, written, visible.
    journaled: Vec<Waiter>,
    written: Vec<Waiter>,
    visible: Vec<Waiter>,
    /// In-flight budget held by the rows until they are written.
    leases: Vec<Lease>,
    reservations: Vec<Reservation>,
    pub urgent: bool,
}

impl Batch {
    pub fn new(first: Submission) -> Self {
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

    pub fn full(&self, limits: &Limits) -> bool {
        self.rows >= limits.max_rows || self.bytes >= limits.max_bytes
    }

    /// Whether `next` can join without crossing a limit or mixing schema versions.
    pub fn fits(&self, next: &Submission, limits: &Limits) -> bool {
        self.schema.version == next.schema.version
            && self.rows + next.rows.rows() <= limits.max_rows
            && self.bytes + next.rows.bytes() <= limits.max_bytes
    }

    pub fn push(&mut self, submission: Submission) {
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
}

impl Batch {
    /// Journals the batch and INSERTs it on a replica of its shard, both at once (the fsync
    /// overlaps the INSERT it protects), fails over to another replica when the INSERT failed
    /// cleanly, then settles its keys and tells every waiter.
    pub async fn flush(self, route: &Route<'_>, idempotency: &Idempotency) {
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
        // Told "safe" as soon as the block is journaled (the INSERT may still be on its way):
        // from then on their block may not be given back.
        let promised = !journaled.is_empty();
        let sent = attempt(&route.replicas[first], &schema, groups, route.replicas.len() > 1, journaled).await;
        let FirstAttempt { mut at, mut result, block, journal_result } = sent;
        // A clean failure wrote nothing: the block moves to the next replica, its journal
        // record with it (appended there before it is dropped here).
        while let (Err(error), Some(block)) = (&result, &block)
            && !error.ambiguous
            && let Some(next) = route.next(&tried)
        {
            tried.push(next);
            let (from, to) = (redacted(&at.replica.url), redacted(&route.replicas[next].url));
            tracing::warn!(%from, %to, %error, "INSERT failed; failing over");
            let Some((moved, outcome)) = failover(&at, &route.replicas[next], block, promised).await else {
                // The next replica's journal could not take it: it stays where it is.
                break;
            };
            (at, result) = (moved, outcome);
        }
        let waiters = Waiters { written, visible, promised, journal_result };
        conclude(at, result, block, waiters, idempotency, &reservations).await;
        drop(leases);
    }
}

/// A batch's first attempt: where it went, how it went, its block (kept when journaled, or
/// when another replica may need it) and how its journaling went.
struct FirstAttempt<'a> {
    at: Holder<'a>,
    result: Result<(), WriteError>,
    block: Option<Block>,
    journal_result: FlushResult,
}

/// Journals the batch on `replica` (when it journals) while sending it there; `journaled`
/// hear as soon as the append is done (a `202` does not wait for the INSERT).
async fn attempt<'a>(
    replica: &'a Replica,
    schema: &TableSchema,
    mut groups: Groups,
    keep_block: bool,
    journaled: Vec<Waiter>,
) -> FirstAttempt<'a> {
    let journal = replica.journal.as_deref();
    let query_id = journal.map_or_else(|| format!("bg-{:016x}", rand::random::<u64>()), Journal::next_query_id);
    let block = (journal.is_some() || keep_block)
        .then(|| Block::of(schema, &schema.table, &mut groups, query_id.clone(), unix_ms()));
    let append = async {
        let appended = match (journal, &block) {
            (Some(journal), Some(block)) => Some(journal.append(block).await),
            _ => None,
        };
        let told: FlushResult = match &appended {
            Some(Err(error)) => Err(FlushError::from(error)),
            _ => Ok(()),
        };
        tell(journaled, &told);
        appended
    };
    let sent_id = journal.map(|_| query_id.as_str());
    let (appended, result) = tokio::join!(append, insert(&replica.writer, schema, groups, sent_id));
    let journal_result: FlushResult = match &appended {
        Some(Err(error)) => Err(FlushError::from(error)),
        _ => Ok(()),
    };
    FirstAttempt { at: Holder { replica, id: appended.and_then(Result::ok) }, result, block, journal_result }
}

/// Which replicas of its shard a partition writes to, preferring its own.
#[derive(Debug)]
pub struct Route<'a> {
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
    from: &Holder<'_>,
    to: &'a Replica,
    block: &Block,
    promised: bool,
) -> Option<(Holder<'a>, Result<(), WriteError>)> {
    let id = match &to.journal {
        Some(journal) => match journal.append(block).await {
            Ok(id) => Some(id),
            Err(_) if promised && from.id.is_some() => return None,
            Err(_) => None,
        },
        None => None,
    };
    if let (Some(journal), Some(old)) = (&from.replica.journal, from.id) {
        journal.discard(old).await;
    }
    // Under the block's own query id: resolving it on `to` stops these INSERTs too.
    let result = block.send(&to.writer, &format!("{}-f", block.query_id)).await.map_err(|(_, error)| error);
    Some((Holder { replica: to, id }, result))
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

/// An id for a block the journal could not take, so the resolver can still track it.
fn unjournaled_id() -> BlockId {
    u64::MAX - u64::from(rand::random::<u32>())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
