//! Durable acknowledgement: every block the gateway sends to the Buffer is first appended to
//! a local write-ahead log, and stays there until ClickHouse's MergeTree destination is known
//! to hold its rows. An answer goes out only once the block is on disk (and, for 200, once its
//! INSERT succeeded), so a ClickHouse that dies with a full Buffer, an INSERT whose answer was
//! lost, or a gateway killed mid-flush loses nothing and stores nothing twice.
//!
//! Three facts make "the destination holds it" knowable without reading every row back:
//! - a Buffer layer takes an INSERT's block whole and flushes it whole, within about
//!   `max_time` of its arrival while flushes succeed; so once that time has passed, finding
//!   the block's sample ids (first and last row of each column list) in the destination
//!   confirms it;
//! - a killed server loses the Buffer and comes back with a lower `uptime()`; a failed flush
//!   shows as `StorageBufferErrorOnFlush`. Either makes every unconfirmed block suspect;
//! - reading the Buffer table returns its buffered rows and the destination's: for a suspect
//!   block, the gateway asks which of its event ids ClickHouse holds and sends exactly the
//!   missing rows again, after stopping any INSERT of it still running on the server.
//!
//! A block whose samples are not in the destination after `max_time` and the grace is made
//! suspect too (a restart missed between polls, a flush that dropped rows). Nothing is ever
//! sent again without having been looked for.
//!
//! - [`Journal`] (here): one node's journal: append, and what became of each block's INSERT;
//! - [`wal`]: the write-ahead log on disk (segments of checksummed records, group-committed
//!   fsync, bounded, a torn tail cut at start-up), a self-contained unit with its own tests;
//! - [`block`]: a flushed batch as a record (statement, rows, row ends, event ids, times);
//! - `ledger`: the blocks still owed, whether each is suspect ([`Suspect`]) and who waits;
//! - `watch`: what the confirmer watches of its node, and when it doubts every block
//!   ([`Doubt`]);
//! - `confirm`: the task that confirms, settles suspects and restores lost rows;
//! - [`resolve`]: the one way an INSERT of unknown fate is settled.

pub mod block;
mod confirm;
mod ledger;
pub mod resolve;
pub mod wal;
mod watch;
pub mod watermark;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::clickhouse::presence::Lookup;
use crate::clickhouse::writer::{WriteError, Writer};
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::config::Config;
use crate::metrics;
use crate::schema::quote_ident;
use ledger::Owed;
use wal::{Wal, WalConfig};
use watch::ServerMark;

pub use block::Block;
pub use ledger::Suspect;
pub use wal::{BlockId, WalError};
pub use watch::Doubt;
pub use watermark::Receipts;

/// The Memory table in the gateway's database that tells a restart (see [`Doubt`]).
pub const LIVENESS_TABLE: &str = "buffergate_liveness";

/// Why a request's rows were not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The journal is at its bound: nothing more can be made journal now.
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

impl From<&WalError> for FlushError {
    fn from(error: &WalError) -> Self {
        match error {
            WalError::Full { .. } => Self::JournalFull,
            other => Self::Journal(other.to_string()),
        }
    }
}

/// What a waiting request learns about its rows.
pub type FlushResult = Result<(), FlushError>;

/// Someone waiting for rows: to be journaled, written or visible.
pub type Waiter = oneshot::Sender<FlushResult>;

/// Where blocks are written and looked for.
#[derive(Debug, Clone)]
struct Places {
    buffer: String,
    /// A Memory table whose rows, like the Buffer's, die with the server's memory.
    liveness: String,
    destination: String,
    id_column: String,
    time_column: Option<String>,
}

impl Places {
    fn lookup<'a>(&'a self, table: &'a str) -> Lookup<'a> {
        Lookup { table, id_column: &self.id_column, time_column: self.time_column.as_deref() }
    }
}

/// The journal and the blocks it protects.
#[derive(Debug)]
pub struct Journal {
    /// The ClickHouse node this journal's blocks are written to (its URL).
    node: String,
    stream: crate::config::StreamName,
    wal: Wal,
    writer: Arc<Writer>,
    ch: ClickHouse,
    places: Places,
    /// How long after its arrival a block's rows should have left the Buffer.
    flush_window: Duration,
    interval: Duration,
    owed: Mutex<BTreeMap<BlockId, Owed>>,
    wake: Notify,
    /// Prefix of this process's INSERT query ids.
    instance: String,
    sequence: AtomicU64,
    /// What the confirmer last saw of the server: when it last answered, and what the passes
    /// at shutdown compare with (a fresh start would doubt every block older than the
    /// server's uptime).
    last_look: Mutex<Option<ServerMark>>,
    /// The stream's requests in flight: the floor of a block entering the ledger.
    receipts: Arc<Receipts>,
}

/// The journal's state for `/v1/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct JournalStatus {
    pub bytes: u64,
    pub max_bytes: u64,
    pub unconfirmed_blocks: usize,
    pub unconfirmed_rows: usize,
    pub suspect_blocks: usize,
    pub oldest_unconfirmed_s: f64,
    /// Seconds since the confirmer last had an answer from ClickHouse; `None` before the first.
    pub last_answer_s: Option<f64>,
}

/// Unconfirmed blocks in a journal directory no running node owns (a node taken out of
/// `clickhouse_url`, or the single node's journal of a gateway now given a cluster): 0 when
/// there is none. Opened, counted and closed again.
pub async fn leftover(config: &Config, dir: std::path::PathBuf) -> Result<usize, WalError> {
    if !dir.exists() {
        return Ok(0);
    }
    let store = WalConfig {
        dir,
        max_bytes: config.journal.journal_max_bytes,
        segment_bytes: config.journal.journal_segment_bytes,
    };
    let (wal, records) =
        tokio::task::spawn_blocking(move || Wal::open(store)).await.map_err(|_| WalError::Closed)??;
    wal.close().await?;
    Ok(records.len())
}

impl JournalStatus {
    /// Two nodes' journals as one: sizes and counts summed, ages the worst.
    pub fn combine(self, other: Self) -> Self {
        Self {
            bytes: self.bytes + other.bytes,
            max_bytes: self.max_bytes + other.max_bytes,
            unconfirmed_blocks: self.unconfirmed_blocks + other.unconfirmed_blocks,
            unconfirmed_rows: self.unconfirmed_rows + other.unconfirmed_rows,
            suspect_blocks: self.suspect_blocks + other.suspect_blocks,
            oldest_unconfirmed_s: self.oldest_unconfirmed_s.max(other.oldest_unconfirmed_s),
            last_answer_s: match (self.last_answer_s, other.last_answer_s) {
                (Some(a), Some(b)) => Some(a.max(b)),
                // A node that never answered is the worst of all.
                _ => None,
            },
        }
    }
}

impl Journal {
    /// Opens the journal under `data_dir`; every block found there is suspect (this process
    /// cannot know what became of it) and is settled by [`Self::run`].
    pub async fn open(
        config: &Config,
        ch: ClickHouse,
        writer: Arc<Writer>,
        receipts: Arc<Receipts>,
    ) -> Result<Arc<Self>, WalError> {
        let store = WalConfig {
            dir: std::path::Path::new(&config.journal.data_dir).join("journal"),
            max_bytes: config.journal.journal_max_bytes,
            segment_bytes: config.journal.journal_segment_bytes,
        };
        let (wal, records) =
            tokio::task::spawn_blocking(move || Wal::open(store)).await.map_err(|_| WalError::Closed)??;
        let now = Instant::now();
        let mut owed = BTreeMap::new();
        for record in records {
            match Block::decode(&Bytes::from(record.payload)) {
                Ok(block) => {
                    // Received before this process started, when exactly is not known.
                    let mut entry = Owed::of(&block, now, 0);
                    entry.suspect = Some(Suspect::Recovered);
                    owed.insert(record.id, entry);
                }
                Err(error) => {
                    metrics::journal_error("read");
                    tracing::error!(id = record.id, %error, "journal record unreadable: its rows cannot be checked");
                }
            }
        }
        if !owed.is_empty() {
            tracing::warn!(blocks = owed.len(), "journal holds unconfirmed blocks from before: settling them");
        }
        let places = Places {
            buffer: format!("{}.{}", quote_ident(&config.table.database), quote_ident(&config.table.buffer_table)),
            liveness: format!("{}.{}", quote_ident(&config.table.database), quote_ident(LIVENESS_TABLE)),
            destination: format!(
                "{}.{}",
                quote_ident(&config.table.database),
                quote_ident(&config.table.destination_table)
            ),
            id_column: config.table.id_column.clone(),
            time_column: config.table.time_column().map(str::to_owned),
        };
        Ok(Arc::new(Self {
            node: crate::config::redacted(&config.clickhouse.clickhouse_url),
            stream: config.stream.clone(),
            wal,
            writer,
            ch,
            places,
            flush_window: Duration::from_secs(config.table.buffer_max_time)
                + Duration::from_millis(config.journal.confirm_grace_ms),
            interval: Duration::from_millis(config.journal.confirm_interval_ms),
            owed: Mutex::new(owed),
            wake: Notify::new(),
            instance: format!("bg-{:016x}", rand::random::<u64>()),
            sequence: AtomicU64::new(0),
            last_look: Mutex::new(None),
            receipts,
        }))
    }

    /// A fresh `query_id` for a block's INSERTs.
    pub fn next_query_id(&self) -> String {
        format!("{}-{}", self.instance, self.sequence.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether `bytes` more fit in the journal now.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.wal.has_room(bytes)
    }

    /// Whether the journal cannot write (a failed write or sync, not reopened yet): nothing
    /// may be acknowledged until it can.
    pub fn is_broken(&self) -> bool {
        self.wal.is_broken()
    }

    /// Journals a block; resolves once it is on disk.
    pub async fn append(&self, block: &Block) -> Result<BlockId, WalError> {
        let result = self.wal.append(block.encode()).await;
        if result.is_err() {
            metrics::journal_error("append");
        }
        result
    }
}
