//! A crash-safe, bounded, group-committed write-ahead journal of opaque records.
//!
//! Before a block of rows goes to ClickHouse, its caller appends the block (serialized by the
//! caller; the journal never looks inside) and answers its HTTP request only once the append
//! has resolved, i.e. once the record is written and `fdatasync`ed. When the caller knows the
//! rows are in ClickHouse's MergeTree it confirms the block; segments whose blocks are all
//! confirmed are deleted. On start-up [`Wal::open`] hands back every block not confirmed,
//! in append order, for the caller to check and send again. The journal is bounded: an append
//! that would take it past `max_bytes` fails at once with [`WalError::Full`].
//!
//! # Writing
//!
//! One writer thread owns the files. Appends and confirmations reach it through a bounded
//! channel (a full channel makes callers wait: back-pressure). It takes everything queued,
//! writes it with one vectored `write` and one `fdatasync` (group commit: whatever queues while a sync
//! runs goes out in the next one), then answers every caller of the batch. A batch that
//! crosses a segment boundary syncs the old segment before rolling. Confirmations are written
//! but not synced on their own: a confirmation lost in a crash only makes the caller check that
//! block again, which it must cope with anyway. A new segment's directory entry is synced
//! when the segment is created, and the directory again after segments are deleted.
//!
//! After a failed write or sync (a full disk, an I/O error) the journal refuses all further
//! work ([`WalError::Broken`]): what the file holds past its last sync is unknown then. It
//! reopens by itself, at most once a second, when a command or [`Wal::probe`] comes: it starts
//! a new segment, writes a confirmation of every block whose append failed (so that none of
//! them, torn or whole in the old segment, is handed back at the next open), syncs it, and
//! takes work again. Until that succeeds (the disk has room again) it stays broken.
//!
//! # On disk
//!
//! A directory of segment files `<first id>.journal`, the id zero-padded to 20 digits (so that
//! names sort as numbers): the first block id the segment may hold; every block in it has that
//! id or a larger one, and ids grow from segment to segment. One segment, the last, is active:
//! appended to until its records (not counting confirmations carried into it, below) would
//! pass `segment_bytes`. Records follow each other with no padding:
//!
//! ```text
//! u32 LE  length of the rest (kind and body)
//! u32 LE  CRC-32 (IEEE, as crc32fast computes it) of the rest
//! u8      kind: 1 = block, 2 = confirmations
//! kind 1: u64 LE block id, then the payload (the rest of the length)
//! kind 2: u32 LE count, then count × u64 LE ids of confirmed blocks
//! ```
//!
//! All integers are little-endian. The journal's size, which `max_bytes` bounds, is the sum of
//! its segment files' sizes. Ids start at 1 and go on after the largest one seen at open.
//!
//! At open each segment is read in order. The first record whose length runs past the end of
//! the file or whose checksum does not match (a torn write, a zero-filled tail) is cut, with all
//! that follows it in that segment, and a warning says how many bytes. A record whose checksum
//! holds but that cannot be understood (an unknown kind, ids out of order) stops the open with
//! [`WalError::Corrupt`] instead: cutting it would silently drop records a newer writer or
//! another program put there.
//!
//! # Deletion
//!
//! A block is unconfirmed unless a confirmation of it survives on disk. A confirmation record
//! may sit in a later segment than its block, so the rule is:
//!
//! - a segment other than the active one is deleted once every block in it is confirmed;
//! - the confirmations in it whose blocks are in segments that stay are first written again
//!   into the active segment and synced, so no confirmation that was journal is lost;
//! - the active segment is closed (rolled over, then deleted by the first rule) once it held
//!   blocks, all are confirmed, and it is at least min(1 MiB, `segment_bytes`) long and longer
//!   than the confirmations carried into it (so each roll writes at least as much new data as
//!   it carries).
//!
//! Deleting a segment thus drops only confirmed blocks and confirmations that no block still
//! on disk needs. Carrying is cheap (8 bytes per confirmed block of a segment that another,
//! unconfirmed, block keeps alive) and keeps one stuck block from pinning every later segment,
//! which a rule of "delete only when nothing earlier depends on it" would.
//!
//! # Stopping
//!
//! [`Wal::close`] lets the writer finish what is queued, syncs, and stops it; appends made
//! later fail with [`WalError::Closed`]. Dropping the last handle without closing does the
//! same in the background, without waiting. One journal per directory: two processes writing
//! one directory would corrupt it, so an open journal holds `<dir>/lock` (an advisory lock the
//! kernel drops with the process), and a second open fails with [`WalError::Locked`].

mod appender;
mod book;
mod format;
mod scan;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use self::appender::{Appender, Command};
pub use self::format::Payload;

/// Identifies one appended block. Ids grow in append order, possibly with gaps; an id is never
/// given to a second block once an append of it was acknowledged.
pub type BlockId = u64;

/// Commands queued for the writer before callers wait to send more.
const QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Where the segment files live; created if missing.
    pub dir: PathBuf,
    /// Appends are refused while the segment files add up to this (counting appends in flight).
    /// Confirmations are never refused — they are what frees room — so they may take the files
    /// a little past it.
    pub max_bytes: u64,
    /// The size at which the active segment is closed and a new one started. Space is given
    /// back a segment at a time, so smaller segments free it sooner, at more files.
    pub segment_bytes: u64,
}

/// A block found unconfirmed at open.
#[derive(Debug)]
pub struct Record {
    pub id: BlockId,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WalStats {
    /// The segment files' sizes added up.
    pub bytes: u64,
    pub segments: usize,
    /// Blocks appended (or found at open) and not confirmed.
    pub unconfirmed: usize,
    /// How long the oldest unconfirmed block has waited: since its append or, for a block found
    /// at open, since the open.
    pub oldest_unconfirmed: Option<Duration>,
    /// `fdatasync` calls on segment files since open: appends ÷ syncs is the group-commit factor.
    pub syncs: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("the journal is full ({max_bytes} bytes); retry once blocks are confirmed")]
    Full { max_bytes: u64 },
    #[error("a block of {len} bytes is larger than a journal record can hold")]
    TooLarge { len: usize },
    #[error("journal I/O failed on {}: {source}", path.display())]
    Io { path: PathBuf, source: Arc<io::Error> },
    #[error("journal segment {} has a record at byte {offset} that cannot be read: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: &'static str },
    /// A write or sync failed earlier; every later command gets this (see the module docs).
    #[error("the journal stopped after a failed write or sync on {}: {source}; it must be opened again", path.display())]
    Broken { path: PathBuf, source: Arc<io::Error> },
    #[error("the journal is closed")]
    Closed,
    #[error("another process holds the journal at {} (one gateway per data directory)", path.display())]
    Locked { path: PathBuf },
}

/// Attaches the path an I/O error happened on.
trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, WalError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, WalError> {
        self.map_err(|source| WalError::Io { path: path.to_path_buf(), source: Arc::new(source) })
    }
}

fn segment_path(dir: &Path, name: u64) -> PathBuf {
    dir.join(scan::segment_file_name(name))
}

/// Knobs for tests; all zero outside them.
#[derive(Debug, Default, Clone, Copy)]
struct Hooks {
    /// A pause before each `fdatasync`, so that tests of group commit do not depend on how
    /// fast the disk syncs.
    sync_delay: Duration,
}

/// What the writer thread publishes for the callers' side, and the byte budget both share.
#[derive(Debug)]
struct Shared {
    max_bytes: u64,
    /// Bytes on disk plus bytes of appends reserved and not yet written: what `max_bytes`
    /// bounds. One atomic, so that concurrent appends cannot both take the last room.
    used: AtomicU64,
    /// Bytes on disk.
    disk: AtomicU64,
    segments: AtomicUsize,
    unconfirmed: AtomicUsize,
    /// When the oldest unconfirmed block was appended, in nanoseconds after `epoch`;
    /// [`NO_OLDEST`] when every block is confirmed.
    oldest: AtomicU64,
    syncs: AtomicU64,
    /// The open: blocks found then count as appended then.
    epoch: Instant,
    /// A write or sync failed and the journal has not reopened since.
    broken: AtomicBool,
}

const NO_OLDEST: u64 = u64::MAX;

impl Shared {
    fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            used: AtomicU64::new(0),
            disk: AtomicU64::new(0),
            segments: AtomicUsize::new(0),
            unconfirmed: AtomicUsize::new(0),
            oldest: AtomicU64::new(NO_OLDEST),
            syncs: AtomicU64::new(0),
            epoch: Instant::now(),
            broken: AtomicBool::new(false),
        }
    }

    fn set_oldest(&self, since: Option<Instant>) {
        let nanos = since.map_or(NO_OLDEST, |since| {
            u64::try_from(since.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(NO_OLDEST - 1)
        });
        self.oldest.store(nanos, Relaxed);
    }

    fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, WalError> {
        let max_bytes = self.max_bytes;
        self.used
            .fetch_update(Relaxed, Relaxed, |used| used.checked_add(bytes).filter(|&n| n <= max_bytes))
            .map_err(|_| WalError::Full { max_bytes })?;
        Ok(Reservation { shared: Arc::clone(self), bytes })
    }
}

/// Room taken for one append, given back when dropped: by then the writer has counted the
/// record as on disk, or it was never written (failed, closed, or the caller gave up before
/// it was queued).
#[derive(Debug)]
struct Reservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared.used.fetch_sub(self.bytes, Relaxed);
    }
}

/// The journal; share it as `Arc<Wal>`.
#[derive(Debug)]
pub struct Wal {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    dir: PathBuf,
    /// Held while open: a second process on the same directory is refused.
    _lock: std::fs::File,
}

/// Takes the directory's lock file (an advisory `flock`, released when the process dies): two
/// gateways appending to one journal would corrupt each other's records.
fn lock_dir(dir: &Path) -> Result<std::fs::File, WalError> {
    let path = dir.join("lock");
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).at(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(WalError::Locked { path }),
        Err(std::fs::TryLockError::Error(error)) => Err(error).at(&path),
    }
}

impl Wal {
    /// Opens the journal in `config.dir`, creating the directory if missing, and returns it with
    /// every block not confirmed, in append order.
    ///
    /// Blocking: it reads every segment. Call it before the runtime serves, or from
    /// `spawn_blocking`. Torn or corrupt tails are cut (see the module docs); segments whose
    /// blocks were all confirmed are deleted.
    pub fn open(config: WalConfig) -> Result<(Self, Vec<Record>), WalError> {
        Self::open_with(config, Hooks::default())
    }

    fn open_with(config: WalConfig, hooks: Hooks) -> Result<(Self, Vec<Record>), WalError> {
        scan::ensure_dir(&config.dir)?;
        let lock = lock_dir(&config.dir)?;
        let shared = Arc::new(Shared::new(config.max_bytes));
        let (writer, records) = Appender::open(config, Arc::clone(&shared), hooks)?;
        let dir = writer.dir().to_path_buf();
        let (commands, queue) = mpsc::channel(QUEUE);
        std::thread::Builder::new().name("journal-writer".into()).spawn(move || writer.run(queue)).at(&dir)?;

        Ok((Self { commands, shared, dir, _lock: lock }, records))
    }

    /// Appends one block and resolves once it is journal: written and `fdatasync`ed, with
    /// whatever other appends queued meanwhile. Fails at once with [`WalError::Full`],
    /// writing nothing, when the record would take the journal past `max_bytes`.
    ///
    /// If the future is dropped once the block is queued, the block is still written (and
    /// found at the next open unless confirmed), under an id the caller never learns.
    pub async fn append(&self, payload: impl Into<Payload>) -> Result<BlockId, WalError> {
        let payload = payload.into();
        let len = payload.len();
        let bytes = format::block_len(len as u64).ok_or(WalError::TooLarge { len })?;
        let reservation = self.shared.reserve(bytes)?;
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Append { payload, reservation, reply }).await.map_err(|_| WalError::Closed)?;
        answer.await.unwrap_or(Err(WalError::Closed))
    }

    /// Marks blocks confirmed (their rows are known to be in ClickHouse). Unknown and already
    /// confirmed ids are ignored. Resolves once the confirmation is written — not synced (see
    /// the module docs) — and the segments it frees are deleted.
    pub async fn confirm(&self, ids: &[BlockId]) -> Result<(), WalError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Confirm { ids: ids.to_vec(), reply }).await.map_err(|_| WalError::Closed)?;
        answer.await.unwrap_or(Err(WalError::Closed))
    }

    /// The payloads of unconfirmed blocks, read back from disk (to settle blocks whose rows
    /// ClickHouse may have lost); ids not found are left out.
    pub async fn read(&self, ids: &[BlockId]) -> Result<std::collections::HashMap<BlockId, Vec<u8>>, WalError> {
        let dir = self.dir.clone();
        let wanted: std::collections::HashSet<BlockId> = ids.iter().copied().collect();
        tokio::task::spawn_blocking(move || scan::read_blocks(&dir, &wanted)).await.map_err(|_| WalError::Closed)?
    }

    /// Whether the journal stopped after a failed write or sync and has not reopened yet.
    pub fn is_broken(&self) -> bool {
        self.shared.broken.load(Relaxed)
    }

    /// Gives a broken journal the chance to reopen (see the module docs); `Ok` once it takes
    /// work.
    pub async fn probe(&self) -> Result<(), WalError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Probe { reply }).await.map_err(|_| WalError::Closed)?;
        answer.await.unwrap_or(Err(WalError::Closed))
    }

    /// The bound given at open.
    pub fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }

    pub fn stats(&self) -> WalStats {
        let shared = &self.shared;
        let oldest = shared.oldest.load(Relaxed);
        WalStats {
            bytes: shared.disk.load(Relaxed),
            segments: shared.segments.load(Relaxed),
            unconfirmed: shared.unconfirmed.load(Relaxed),
            oldest_unconfirmed: (oldest != NO_OLDEST)
                .then(|| shared.epoch.elapsed().saturating_sub(Duration::from_nanos(oldest))),
            syncs: shared.syncs.load(Relaxed),
        }
    }

    /// Whether a block of `payload_bytes` would fit now (for refusing a request before reading
    /// it); appends racing with it may still take the room first.
    pub fn has_room(&self, payload_bytes: u64) -> bool {
        format::block_len(payload_bytes)
            .and_then(|bytes| self.shared.used.load(Relaxed).checked_add(bytes))
            .is_some_and(|n| n <= self.shared.max_bytes)
    }

    /// Lets the writer finish everything queued before this call, syncs, and stops it. Later
    /// appends and confirmations fail with [`WalError::Closed`]; closing again is a no-op.
    /// Errors if the last writes or the final sync failed.
    pub async fn close(&self) -> Result<(), WalError> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).await.is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}
