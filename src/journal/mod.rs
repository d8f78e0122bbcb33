//! Durable acknowledgement: every block the gateway sends to the Buffer is first appended to
//! a local write-ahead journal, and stays there until ClickHouse's MergeTree destination is
//! known to hold its rows. An answer goes out only once the block is on disk (and, for 200,
//! once its INSERT succeeded), so a ClickHouse that dies with a full Buffer, an INSERT whose
//! answer was lost, or a gateway killed mid-flush loses nothing and stores nothing twice.
//!
//! - [`store`]: the journal on disk (segments of checksummed records, group-committed fsync,
//!   bounded, a torn tail cut at start-up);
//! - [`block`]: a flushed batch as a record (statement, rows, row ends, event ids, times);
//! - [`durable`]: the blocks still owed and the task that confirms, resolves and restores them.

pub mod block;
pub mod durable;
pub mod resolve;
pub mod store;

use tokio::sync::oneshot;

use crate::clickhouse::ClickHouseError;
use crate::clickhouse::writer::WriteError;

pub use block::Block;
pub use durable::{Durable, DurableStatus};
pub use store::{BlockId, JournalError};

/// Why a request's rows were not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The journal is at its bound: nothing more can be made durable now.
    #[error("the journal is full")]
    JournalFull,
    #[error("the journal failed: {0}")]
    Journal(String),
}

impl FlushError {
    /// Not sent because the INSERT circuit is open.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, Self::Write(WriteError { error: ClickHouseError::CircuitOpen, .. }))
    }
}

impl From<&JournalError> for FlushError {
    fn from(error: &JournalError) -> Self {
        match error {
            JournalError::Full { .. } => Self::JournalFull,
            other => Self::Journal(other.to_string()),
        }
    }
}

/// What a waiting request learns about its rows.
pub type FlushResult = Result<(), FlushError>;

/// Someone waiting for rows: to be journaled, written or visible.
pub type Waiter = oneshot::Sender<FlushResult>;
