//! What becomes of a batch after its last attempt: its idempotency keys committed (written,
//! or sure to be) or released, its block handed to the journal of the node it is at, and every
//! request waiting for it told. The choice between keeping a failed batch (to be settled
//! through the journal) and giving it back is [`keep_after_failure`].

use super::unjournaled_id;
use crate::clickhouse::writer::WriteError;
use crate::cluster::Replica;
use crate::idempotency::{Idempotency, Reservation};
use crate::journal::{Block, BlockId, FlushError, FlushResult, Waiter};

/// Who still waits for a batch once its INSERT is done.
pub(super) struct Waiters {
    pub written: Vec<Waiter>,
    pub visible: Vec<Waiter>,
    /// Someone was told the block is journaled (202s, Kafka offsets).
    pub promised: bool,
    pub journal_result: FlushResult,
}

/// Concludes a batch after its last attempt: its keys committed (written, or sure to be) or
/// released, its block handed to the journal of the node it is at, its waiters told.
pub(super) async fn conclude(
    Holder { replica, id }: Holder<'_>,
    result: Result<(), WriteError>,
    block: Option<Block>,
    Waiters { written, visible, promised, journal_result }: Waiters,
    idempotency: &Idempotency,
    reservations: &[Reservation],
) {
    let journal = replica.journal.as_deref();
    match (result, journal, block) {
        (Ok(()), journal, block) => {
            // Into the ledger before anyone can hear of the rows (the requests, or a retry
            // answered "duplicates" once the keys are committed): until then, requests in
            // flight hold the stream's completeness watermark, and the block takes the
            // earliest of them as its floor (journal::watermark).
            match (journal, id, block) {
                (Some(journal), Some(id), Some(block)) => journal.written(id, &block, visible),
                // Written while its append failed (the journal broke under it): kept in memory
                // and confirmed like the others, so that a ClickHouse restart loses none of it;
                // its requests hear the journal's failure, and a retry finds duplicates.
                (Some(journal), None, Some(block)) => {
                    journal.kept(unjournaled_id(), block);
                    let unjournaled = journal_result.clone().and(Err(FlushError::Journal(
                        "the block could not be journaled on the replica it was written to".into(),
                    )));
                    commit(idempotency, reservations).await;
                    tell(visible, &unjournaled);
                    tell(written, &unjournaled);
                    return;
                }
                _ => tell(visible, &journal_result),
            }
            commit(idempotency, reservations).await;
            // A 200 promises the journal too: written but not journaled is refused (the
            // keys are committed, so the producer's retry is answered as duplicates).
            tell(written, &journal_result);
        }
        (Err(error), Some(journal), Some(block)) if keep_after_failure(error.ambiguous, promised && id.is_some()) => {
            // The rows are in the journal, or at hand, and will be stored exactly once:
            // into the ledger (before the keys are committed, as above), the requests hear
            // once they are settled.
            journal.ambiguous(id.unwrap_or_else(unjournaled_id), block, written, visible);
            commit(idempotency, reservations).await;
        }
        (Err(error), journal, _) => {
            // Not written, and nobody was told it is safe: the producers' retries go
            // through. (On failure the lease expiry frees them anyway.)
            let _ = idempotency.release(reservations).await;
            if let (Some(journal), Some(id)) = (journal, id) {
                journal.discard(id).await;
            }
            let failed = Err(FlushError::Write(error));
            tell(written, &failed);
            tell(visible, &failed);
        }
    }
}

/// The node that holds a batch's block, and the block's journal record there.
pub(super) struct Holder<'a> {
    pub replica: &'a Replica,
    pub id: Option<BlockId>,
}

/// Whether a batch whose INSERT failed is kept, to be settled through the journal, rather
/// than given back to its producers: when the INSERT may have landed, and when the block is
/// journaled and someone was told so (`promised`: 202s, Kafka offsets), whatever the failure —
/// a journaled block reaches the destination exactly once. A batch only `200`s wait for is
/// given back on a clean failure, so that they hear 503 at once and retry.
fn keep_after_failure(ambiguous: bool, promised: bool) -> bool {
    ambiguous || promised
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

pub(super) fn tell(waiters: Vec<Waiter>, result: &FlushResult) {
    for waiter in waiters {
        // The request may be gone (client hung up): nothing to tell.
        let _ = waiter.send(result.clone());
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
