//! Fallback mode while the Buffer is saturated: a request's rows go straight into the fallback
//! MergeTree table, one INSERT per column list, bypassing the coalescers.
//!
//! A MergeTree keeps what an INSERT wrote, so a success needs no journal. A failure is where
//! exactly-once is at stake: an INSERT that may have landed (its answer lost, or timed out),
//! or a failure after an earlier column list of the request was written, leaves rows in the
//! table that releasing the idempotency keys would let the producer's retry store again. Such a
//! request is settled before it is answered: its INSERTs are stopped, its ids looked up in the
//! table, and only the missing rows sent, never the whole request blindly.

use uuid::Uuid;

use super::{IngestError, Pipeline};
use crate::clickhouse::presence::{Lookup, RECHECK_PAUSE};
use crate::clickhouse::writer::WriteError;
use crate::idempotency::Reservation;
use crate::journal::block::Block;
use crate::rows::{Groups, PartitionRows};
use crate::schema::{TableSchema, quote_ident};

/// Looks (each after stopping the request's INSERTs) at most this many times, a pause apart,
/// before a doubtful request is answered unsettled.
const SETTLE_ROUNDS: u32 = 3;

/// What writing a request into the fallback table came to.
#[derive(Debug)]
enum Sent {
    /// Every row is in the table.
    All,
    /// None of them can be.
    Nothing(WriteError),
    /// Some may be: what landed is not known.
    Doubt(WriteError),
}

/// The policy after a failed INSERT of the request's `written`-th column list (from 0): a clean
/// failure of the first wrote nothing; one that may have landed, or any failure after a column
/// list that was written, leaves rows in the table.
fn after_failure(error: WriteError, written: usize) -> Sent {
    if written == 0 && !error.ambiguous { Sent::Nothing(error) } else { Sent::Doubt(error) }
}

impl Pipeline {
    pub(super) async fn write_fallback(
        &self,
        schema: &TableSchema,
        partitions: Vec<PartitionRows>,
        reservations: Vec<Option<Reservation>>,
    ) -> Result<(), IngestError> {
        let table = format!("{}.{}", quote_ident(&self.config.database), quote_ident(&self.config.fallback_table));
        let mut groups = Groups::default();
        for chunk in partitions.into_iter().flat_map(|p| p.chunks) {
            groups.add(chunk);
        }
        let query_id = format!("buffergate-fallback-{}", Uuid::new_v4().simple());
        let block = Block::of(schema, &table, &mut groups, query_id, 0);
        let reservations: Vec<Reservation> = reservations.into_iter().flatten().collect();
        let sent = match self.send_fallback(&block, &block.query_id).await {
            Sent::Doubt(error) => self.settle_fallback(&block, error).await,
            sent => sent,
        };
        match sent {
            Sent::All => {
                let _ = self.idempotency.commit_with_retries(&reservations).await;
                Ok(())
            }
            Sent::Nothing(error) => {
                let _ = self.idempotency.release(&reservations).await;
                Err(IngestError::FlushFailed(error.to_string()))
            }
            Sent::Doubt(error) => {
                // Neither committed nor released: the keys stay reserved until their lease
                // ends, and a retry meanwhile is told they are pending, not stored twice.
                tracing::warn!(query_id = %block.query_id, %error, "a fallback INSERT could not be settled");
                Err(IngestError::FlushFailed(format!(
                    "{error}; whether its rows were stored could not be settled, so its events' \
                     idempotency keys stay reserved until their lease ends"
                )))
            }
        }
    }

    /// Sends each column list of `block` under `query_id`, stopping at the first failure.
    async fn send_fallback(&self, block: &Block, query_id: &str) -> Sent {
        match block.send(&self.writer, query_id).await {
            Ok(()) => Sent::All,
            Err((written, error)) => after_failure(error, written),
        }
    }

    /// Stops the request's INSERTs, looks up which of its rows the table holds and sends the
    /// others; up to [`SETTLE_ROUNDS`] times while ClickHouse cannot be asked or the sending
    /// fails. Rows without ids cannot be told apart: such a request stays in doubt.
    async fn settle_fallback(&self, block: &Block, mut error: WriteError) -> Sent {
        // The node the INSERTs went to.
        let ch = self.writer.client();
        if !block.identified() {
            return Sent::Doubt(error);
        }
        let ids: Vec<Uuid> = block.ids().collect();
        let time_column = (!self.config.timestamp_column.is_empty()).then_some(self.config.timestamp_column.as_str());
        let lookup = Lookup { table: &block.table, id_column: &self.config.id_column, time_column };
        for round in 0..SETTLE_ROUNDS {
            if round > 0 {
                tokio::time::sleep(RECHECK_PAUSE).await;
            }
            if ch.stop_queries(&block.query_id).await.is_err() {
                continue;
            }
            let Ok(present) = ch.present(lookup, &ids, block.seconds()).await else { continue };
            let missing = block.without(&present);
            if missing.rows() == 0 {
                return Sent::All;
            }
            match self.send_fallback(&missing, &format!("{}-r{round}", block.query_id)).await {
                Sent::All => return Sent::All,
                Sent::Nothing(failed) if present.is_empty() => return Sent::Nothing(failed),
                Sent::Nothing(failed) | Sent::Doubt(failed) => error = failed,
            }
        }
        Sent::Doubt(error)
    }
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
