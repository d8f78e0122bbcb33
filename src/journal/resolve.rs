//! The one way an INSERT of unknown fate is settled: a block whose INSERT timed out, lost its
//! answer, or went to a server that has since restarted or failed a Buffer flush.
//!
//! 1. **Stop** every INSERT of the block still running on its node (by its query id), so none
//!    lands after the rows were looked for.
//! 2. **Look** for its rows by event id in the table it was written to (a Buffer answers for
//!    its memory and its destination alike).
//! 3. **Look again**, after one pause, for the rows the first look missed: rows a Buffer is
//!    flushing are, for the moment of the flush, in neither its memory nor the destination.
//! 4. **Send** exactly the rows missing twice, never the block whole.
//!
//! The journal's confirmer settles its suspect blocks this way, and a fallback INSERT that may
//! have landed is settled the same way before its request is answered. Rows without ids cannot
//! be told apart: such a block is sent again whole (at-least-once), when the caller allows it.

use std::collections::HashSet;

use uuid::Uuid;

use super::block::Block;
use crate::clickhouse::presence::{Lookup, RECHECK_PAUSE};
use crate::clickhouse::writer::{WriteError, Writer};
use crate::clickhouse::{ClickHouse, ClickHouseError};

/// Where blocks are looked for and sent again: one node, and the columns rows are known by.
#[derive(Debug, Clone, Copy)]
pub struct Resolver<'a> {
    pub ch: &'a ClickHouse,
    pub writer: &'a Writer,
    pub id_column: &'a str,
    /// Prunes look-ups to the rows' time span, when the table has one.
    pub time_column: Option<&'a str>,
}

/// A block to settle, and the query id its missing rows are sent under.
#[derive(Debug)]
pub struct Doubtful<'b> {
    pub block: &'b Block,
    pub resend_id: String,
}

/// Why a block is not settled yet.
#[derive(Debug, thiserror::Error)]
pub enum Unsettled {
    /// ClickHouse could not be asked (stopping the INSERTs or a look-up failed).
    #[error("ClickHouse could not be asked: {0}")]
    Unanswered(ClickHouseError),
    /// The missing rows could not be sent: `written` of the block's column lists went in
    /// before `error`.
    #[error("the missing rows could not be sent: {error}")]
    Send { found: usize, written: usize, error: WriteError },
}

impl Resolver<'_> {
    /// Settles blocks together: each is stopped and looked at once, then, after one pause
    /// when a first look missed rows, looked at again and its rows missing twice are sent.
    /// One outcome per block, in order: once every row is in ClickHouse, the rows that were
    /// missing and have been sent.
    pub async fn settle(&self, blocks: &[Doubtful<'_>]) -> Vec<Result<usize, Unsettled>> {
        let mut first = Vec::with_capacity(blocks.len());
        for doubtful in blocks {
            first.push(self.first_look(doubtful.block).await);
        }
        if blocks.iter().zip(&first).any(|(d, f)| d.block.identified() && f.as_ref().is_ok_and(|m| m.rows() > 0)) {
            tokio::time::sleep(RECHECK_PAUSE).await;
        }
        let mut outcomes = Vec::with_capacity(blocks.len());
        for (doubtful, first) in blocks.iter().zip(first) {
            outcomes.push(match first {
                Ok(missing) => self.send_missing(doubtful, missing).await,
                Err(error) => Err(Unsettled::Unanswered(error)),
            });
        }
        outcomes
    }

    /// Stops the block's INSERTs still running and asks which of its rows ClickHouse holds;
    /// returns the block of the rows it lacks.
    async fn first_look(&self, block: &Block) -> Result<Block, ClickHouseError> {
        self.ch.stop_queries(&block.query_id).await?;
        if !block.identified() {
            return Ok(block.clone());
        }
        let present = self.present(block, block.ids().collect()).await?;
        tracing::debug!(query_id = %block.query_id, rows = block.rows(), found = present.len(), "looked for a doubtful block's rows");
        Ok(block.without(&present))
    }

    /// Looks again for the rows the first look missed and sends the rows missing twice.
    async fn send_missing(&self, doubtful: &Doubtful<'_>, missing: Block) -> Result<usize, Unsettled> {
        let block = doubtful.block;
        let missing = if block.identified() && missing.rows() > 0 {
            let found = self.present(block, missing.ids().collect()).await.map_err(Unsettled::Unanswered)?;
            missing.without(&found)
        } else {
            missing
        };
        let found = block.rows() - missing.rows();
        if missing.rows() == 0 {
            return Ok(0);
        }
        match missing.send(self.writer, &doubtful.resend_id).await {
            Ok(()) => Ok(missing.rows()),
            Err((written, error)) => Err(Unsettled::Send { found, written, error }),
        }
    }

    async fn present(&self, block: &Block, ids: Vec<Uuid>) -> Result<HashSet<Uuid>, ClickHouseError> {
        let lookup = Lookup { table: &block.table, id_column: self.id_column, time_column: self.time_column };
        self.ch.present(lookup, &ids, block.seconds()).await
    }
}
