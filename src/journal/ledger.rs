//! The ledger of blocks still owed to ClickHouse: each journaled block, from its append until
//! its rows are confirmed in the destination, with whether it is suspect (must be looked for
//! before anything else) and who waits for it. The rows stay on disk; the ledger keeps what
//! confirming and settling need.

use std::collections::BTreeMap;
use std::sync::PoisonError;

use tokio::time::Instant;
use uuid::Uuid;

use super::block::Block;
use super::wal::BlockId;
use super::watch::Doubt;
use super::{Journal, JournalStatus, Waiter};
use crate::metrics;

/// Why a block must be looked for before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspect {
    /// Found in the journal at start-up: this process cannot know what became of it.
    Recovered,
    /// Its INSERT may have landed, or failed after its journaling was promised.
    Ambiguous,
    /// Past its flush window and its samples are not in the destination.
    NotFound,
    /// Every block owed when the server gave reason for doubt.
    Doubt(Doubt),
}

impl Suspect {
    /// The label of metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::Ambiguous => "ambiguous",
            Self::NotFound => "not_found",
            Self::Doubt(Doubt::Restart) => "restart",
            Self::Doubt(Doubt::FlushError) => "flush_error",
            Self::Doubt(Doubt::Unobserved) => "unobserved",
        }
    }
}

/// A journaled block not yet confirmed, as kept in memory (its rows stay on disk).
#[derive(Debug)]
pub(super) struct Owed {
    /// Since when the rows are known to be in the Buffer (written, or found there).
    pub(super) since: Instant,
    /// At or before the receive time of every row of the block (see [`super::watermark`]).
    pub(super) floor_ms: u64,
    pub(super) samples: Vec<Uuid>,
    pub(super) seconds: Option<(i64, i64)>,
    pub(super) rows: usize,
    pub(super) bytes: usize,
    /// Whether the rows must be looked for before anything else, and why.
    pub(super) suspect: Option<Suspect>,
    /// The block itself while suspect from an ambiguous INSERT (it is at hand then).
    pub(super) block: Option<Block>,
    /// Requests waiting for the rows to be written (an ambiguous INSERT being resolved).
    pub(super) written: Vec<Waiter>,
    /// Requests waiting for the rows to be visible in the destination.
    pub(super) visible: Vec<Waiter>,
}

impl Owed {
    pub(super) fn of(block: &Block, since: Instant, floor_ms: u64) -> Self {
        Self {
            since,
            floor_ms,
            samples: block.samples(),
            seconds: block.seconds(),
            rows: block.rows(),
            bytes: block.bytes(),
            suspect: None,
            block: None,
            written: Vec::new(),
            visible: Vec::new(),
        }
    }
}

/// A block whose samples are to be looked for in the destination.
#[derive(Debug)]
pub(super) struct Due {
    pub(super) id: BlockId,
    pub(super) samples: Vec<Uuid>,
    pub(super) seconds: Option<(i64, i64)>,
    /// Past its flush window: not found means suspect.
    pub(super) ripe: bool,
}

impl Journal {
    pub(super) fn owed(&self) -> std::sync::MutexGuard<'_, BTreeMap<BlockId, Owed>> {
        self.owed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The block's INSERT succeeded: its rows are in the Buffer. `visible` waiters hear once
    /// they are in the destination.
    pub fn written(&self, id: BlockId, block: &Block, visible: Vec<Waiter>) {
        let mut entry = Owed::of(block, Instant::now(), self.floor());
        let wake = !visible.is_empty();
        entry.visible = visible;
        self.owed().insert(id, entry);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The block's INSERT succeeded but its append failed (the journal broke meanwhile): it is
    /// kept at hand, since it is on no disk, and confirmed (or, after a ClickHouse restart,
    /// sent again) like a journaled one.
    pub fn kept(&self, id: BlockId, block: Block) {
        let mut entry = Owed::of(&block, Instant::now(), self.floor());
        entry.block = Some(block);
        self.owed().insert(id, entry);
    }

    /// The block's INSERT may have landed, or failed after its journaling was promised: look for
    /// its rows now and send what is missing; `written` waiters hear once every row is in
    /// ClickHouse.
    pub fn ambiguous(&self, id: BlockId, block: Block, written: Vec<Waiter>, visible: Vec<Waiter>) {
        let mut entry = Owed::of(&block, Instant::now(), self.floor());
        entry.suspect = Some(Suspect::Ambiguous);
        entry.block = Some(block);
        entry.written = written;
        entry.visible = visible;
        self.owed().insert(id, entry);
        self.wake.notify_one();
    }

    /// The block's INSERT failed for good and nobody was told it was journaled: nothing was
    /// written, nothing to protect.
    pub async fn discard(&self, id: BlockId) {
        if self.wal.confirm(&[id]).await.is_err() {
            metrics::journal_error("confirm");
        }
    }

    pub(super) fn suspect_all(&self, doubt: Doubt) {
        for owed in self.owed().values_mut() {
            owed.suspect.get_or_insert(Suspect::Doubt(doubt));
        }
    }

    /// The floor of a block entering the ledger now: its requests are still in flight.
    fn floor(&self) -> u64 {
        self.receipts.oldest().unwrap_or_else(super::watermark::now_ms)
    }

    /// Bytes of the blocks written and not yet confirmed in the destination: what this
    /// gateway's stream holds in its Buffer on this node, as far as it knows.
    pub fn unconfirmed_bytes(&self) -> u64 {
        self.owed().values().map(|o| o.bytes as u64).sum()
    }

    /// The floors of the unconfirmed blocks (see [`super::watermark`]).
    pub fn floors(&self) -> Vec<u64> {
        self.owed().values().map(|o| o.floor_ms).collect()
    }

    pub fn status(&self) -> JournalStatus {
        let stats = self.wal.stats();
        let owed = self.owed();
        let now = Instant::now();
        JournalStatus {
            bytes: stats.bytes,
            max_bytes: self.wal.max_bytes(),
            unconfirmed_blocks: owed.len(),
            unconfirmed_rows: owed.values().map(|o| o.rows).sum(),
            suspect_blocks: owed.values().filter(|o| o.suspect.is_some()).count(),
            oldest_unconfirmed_s: owed.values().map(|o| now.duration_since(o.since).as_secs_f64()).fold(0.0, f64::max),
            last_answer_s: self
                .last_look
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map(|mark| now.duration_since(mark.at).as_secs_f64()),
        }
    }
}
