//! Fallback mode while the Buffer is saturated: a request's rows go straight into the fallback
//! MergeTree table, one INSERT per column list, bypassing the coalescers.
//!
//! A MergeTree keeps what an INSERT wrote, so a success needs no journal. A failure is where
//! exactly-once is at stake: an INSERT that may have landed (its answer lost, or timed out),
//! or a failure after an earlier column list of the request was written, leaves rows in the
//! table that releasing the idempotency keys would let the producer's retry store again. Such a
//! request is settled before it is answered, the one way an INSERT of unknown fate is
//! ([`crate::journal::resolve`]): its INSERTs stopped, its ids looked up in the table, and only
//! the missing rows sent, never the whole request blindly.

use uuid::Uuid;

use crate::clickhouse::presence::RECHECK_PAUSE;
use crate::clickhouse::writer::{WriteError, Writer};
use crate::idempotency::{Idempotency, Reservation};
use crate::journal::block::Block;
use crate::journal::resolve::{Doubtful, Resolver, Unsettled};
use crate::rows::{Groups, PartitionRows};
use crate::schema::TableSchema;

/// Settles (each round after stopping the request's INSERTs) at most this many times, a pause
/// apart, before a doubtful request is answered unsettled.
const SETTLE_ROUNDS: u32 = 3;

/// Where the fallback table is and how its rows are known.
#[derive(Debug, Clone, Copy)]
pub struct Table<'a> {
    /// `` `db`.`table` ``.
    pub name: &'a str,
    pub id_column: &'a str,
    pub time_column: Option<&'a str>,
}

/// What writing a request into the fallback table came to.
#[derive(Debug)]
pub enum Outcome {
    /// Every row is in the table; the keys are committed.
    Written,
    /// None of them is, nor can be; the keys are released.
    NotWritten(WriteError),
    /// Some may be and it could not be settled: the keys stay reserved until their lease ends,
    /// and a retry meanwhile is told they are pending, not stored twice.
    Unsettled(WriteError),
}

/// What sending the request came to, before its keys are settled.
#[derive(Debug)]
enum Sent {
    All,
    Nothing(WriteError),
    Doubt(WriteError),
}

/// The policy after a failed INSERT of the request's `written`-th column list (from 0): a clean
/// failure of the first wrote nothing; one that may have landed, or any failure after a column
/// list that was written, leaves rows in the table.
fn after_failure(error: WriteError, written: usize) -> Sent {
    if written == 0 && !error.ambiguous { Sent::Nothing(error) } else { Sent::Doubt(error) }
}

/// Writes a request's rows into `table` through `writer` (its node), settles a doubtful
/// INSERT, then commits or releases the request's keys.
pub async fn write(
    writer: &Writer,
    table: Table<'_>,
    schema: &TableSchema,
    partitions: Vec<PartitionRows>,
    reservations: Vec<Option<Reservation>>,
    idempotency: &Idempotency,
) -> Outcome {
    let mut groups = Groups::default();
    for chunk in partitions.into_iter().flat_map(|p| p.chunks) {
        groups.add(chunk);
    }
    let query_id = format!("buffergate-fallback-{}", Uuid::new_v4().simple());
    let block = Block::of(schema, table.name, &mut groups, query_id, 0);
    let reservations: Vec<Reservation> = reservations.into_iter().flatten().collect();
    let sent = match block.send(writer, &block.query_id).await {
        Ok(()) => Sent::All,
        Err((written, error)) => match after_failure(error, written) {
            Sent::Doubt(error) => resolve(writer, table, &block, error).await,
            sent => sent,
        },
    };
    match sent {
        Sent::All => {
            let _ = idempotency.commit_with_retries(&reservations).await;
            Outcome::Written
        }
        Sent::Nothing(error) => {
            let _ = idempotency.release(&reservations).await;
            Outcome::NotWritten(error)
        }
        Sent::Doubt(error) => {
            tracing::warn!(query_id = %block.query_id, %error, "a fallback INSERT could not be settled");
            Outcome::Unsettled(error)
        }
    }
}

/// Settles the request's block up to [`SETTLE_ROUNDS`] times while ClickHouse cannot be asked
/// or the sending fails. Rows without ids cannot be told apart: such a request stays in doubt.
async fn resolve(writer: &Writer, table: Table<'_>, block: &Block, mut error: WriteError) -> Sent {
    if !block.identified() {
        return Sent::Doubt(error);
    }
    // The node the INSERTs went to.
    let resolver = Resolver { ch: writer.client(), writer, id_column: table.id_column, time_column: table.time_column };
    for round in 0..SETTLE_ROUNDS {
        if round > 0 {
            tokio::time::sleep(RECHECK_PAUSE).await;
        }
        let doubtful = [Doubtful { block, resend_id: format!("{}-r{round}", block.query_id) }];
        let Some(outcome) = resolver.settle(&doubtful).await.pop() else { continue };
        match outcome {
            Ok(_) => return Sent::All,
            Err(Unsettled::Unanswered(_)) => {}
            Err(Unsettled::Send { found, written, error: failed }) => match after_failure(failed, written) {
                Sent::Nothing(failed) if found == 0 => return Sent::Nothing(failed),
                Sent::Nothing(failed) | Sent::Doubt(failed) => error = failed,
                Sent::All => {}
            },
        }
    }
    Sent::Doubt(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clickhouse::ClickHouseError;

    fn failure(ambiguous: bool) -> WriteError {
        WriteError { attempts: 1, error: ClickHouseError::Protocol("failed".into()), ambiguous }
    }

    #[test]
    fn only_a_clean_failure_of_the_first_insert_wrote_nothing() {
        assert!(matches!(after_failure(failure(false), 0), Sent::Nothing(_)), "released: the retry goes through");
        assert!(matches!(after_failure(failure(true), 0), Sent::Doubt(_)), "may have landed: looked up");
        assert!(matches!(after_failure(failure(false), 1), Sent::Doubt(_)), "an earlier column list was written");
        assert!(matches!(after_failure(failure(true), 2), Sent::Doubt(_)));
    }
}
