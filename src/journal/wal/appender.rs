//! The writer thread: sole owner of the files and of the [`Book`]. It takes commands off the
//! channel in batches, writes each batch with one vectored `write` and one `fdatasync`, answers, and
//! then deletes what confirmations have freed.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::book::Book;
use super::format::{self, Payload, Pending};
use super::scan::{self, Scan};
use super::{BlockId, Hooks, IoContext, Record, Reservation, Shared, WalConfig, WalError, segment_path};

/// Stop gathering a batch past this many payload bytes, so one batch's buffer stays modest.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// An active segment whose blocks are all confirmed is closed (and so deleted) once it is this
/// long, or `segment_bytes` if smaller: rolling over for every few bytes would trade the disk
/// space for a file creation and two fsyncs each time.
const ROLL_CONFIRMED_AT: u64 = 1 << 20;
/// A broken journal tries to reopen at most this often.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
pub(super) enum Command {
    Append {
        payload: Payload,
        /// Held until answered: the bytes count against `max_bytes` until the writer has counted
        /// them as written (or the append failed).
        reservation: Reservation,
        reply: oneshot::Sender<Result<BlockId, WalError>>,
    },
    Confirm {
        ids: Vec<BlockId>,
        reply: oneshot::Sender<Result<(), WalError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), WalError>>,
    },
    /// Nothing to do but reopen a broken journal if it can.
    Probe {
        reply: oneshot::Sender<Result<(), WalError>>,
    },
}

impl Command {
    fn weight(&self) -> usize {
        match self {
            Self::Append { payload, .. } => payload.len(),
            Self::Confirm { ids, .. } => ids.len() * 8,
            Self::Close { .. } | Self::Probe { .. } => 0,
        }
    }

    /// Answers with `outcome`; `id` is what an append was given.
    fn answer(self, outcome: &Result<(), WalError>, id: Option<BlockId>) {
        // A caller that stopped waiting drops its receiver; nothing to tell it.
        match self {
            Self::Append { reply, reservation, .. } => {
                // Released first: once written, the bytes are counted as on disk, and a caller
                // that appends again at once must not see them twice.
                drop(reservation);
                let _ = reply.send(outcome.clone().and_then(|()| id.ok_or(WalError::Closed)));
            }
            Self::Confirm { reply, .. } | Self::Close { reply } | Self::Probe { reply } => {
                let _ = reply.send(outcome.clone());
            }
        }
    }
}

/// The segment being written.
#[derive(Debug)]
struct Active {
    name: u64,
    path: PathBuf,
    /// Opened with `O_APPEND`: every write lands at the end, no offset to track.
    file: File,
    /// Bytes written and not yet synced.
    unsynced: bool,
}

#[derive(Debug)]
pub(super) struct Appender {
    dir: PathBuf,
    /// Synced after a segment is created or deleted: `fdatasync` of a file does not make its
    /// directory entry journal.
    dir_handle: File,
    segment_bytes: u64,
    book: Book,
    active: Active,
    next_id: BlockId,
    /// The batch being gathered, written in one go.
    buf: Pending,
    /// `buf` holds block records, so the batch must be synced before it is answered.
    buf_blocks: bool,
    shared: Arc<Shared>,
    /// The failure that stopped the journal. After a failed write or `fdatasync` what the file
    /// holds is unknown (Linux may drop the dirty pages and report the error only once), so
    /// carrying on could acknowledge records that never reach the disk.
    broken: Option<WalError>,
    /// Blocks whose append failed: confirmed when the journal reopens.
    failed: Vec<BlockId>,
    /// Confirmations that came while the journal was broken: written when it reopens (until
    /// then, and if the process stops first, their blocks are only checked again).
    deferred: Vec<BlockId>,
    /// The last attempt to reopen, to try at most once per [`REOPEN_EVERY`].
    reopened_at: Option<Instant>,
    hooks: Hooks,
}

impl Appender {
    /// Scans `config.dir` and makes it ready to append; returns the unconfirmed records.
    pub fn open(config: WalConfig, shared: Arc<Shared>, hooks: Hooks) -> Result<(Self, Vec<Record>), WalError> {
        let WalConfig { dir, segment_bytes, .. } = config;
        scan::ensure_dir(&dir)?;
        let dir_handle = File::open(&dir).at(&dir)?;
        let names = scan::segment_names(&dir)?;
        let mut found = Scan::new(shared.epoch);
        for &name in &names {
            found.segment(&dir, name)?;
        }
        let Scan { book, payloads, last_id, .. } = found;
        let last = names.last().copied();
        // Ids go on after the largest seen, and never below the last segment's name: that
        // segment may hold no block (yet), and its name promises its blocks' ids start there.
        let next_id = last_id.map_or(1, |id| id + 1).max(last.unwrap_or(1));
        let reuse = last.filter(|&name| book.segment(name).is_some_and(|s| s.fill() < segment_bytes));
        let active = match reuse {
            Some(name) => {
                let path = segment_path(&dir, name);
                let file = OpenOptions::new().append(true).open(&path).at(&path)?;
                Active { name, path, file, unsynced: false }
            }
            None => {
                let name = next_id.max(last.map_or(0, |n| n + 1));
                create_segment(&dir, &dir_handle, name)?
            }
        };
        let mut writer = Self {
            dir,
            dir_handle,
            segment_bytes,
            book,
            next_id: next_id.max(active.name),
            active,
            buf: Pending::default(),
            buf_blocks: false,
            shared,
            broken: None,
            failed: Vec::new(),
            deferred: Vec::new(),
            reopened_at: None,
            hooks,
        };
        writer.book.add_segment(writer.active.name);
        let bytes = writer.book.bytes();
        writer.shared.disk.store(bytes, Relaxed);
        writer.shared.used.store(bytes, Relaxed);
        // Segments confirmed before the last stop, or emptied by cutting a tail, go now.
        writer.reclaim()?;
        writer.publish();
        let records = payloads.into_iter().map(|(id, payload)| Record { id, payload }).collect();
        Ok((writer, records))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serves commands until a close, or until every sender is gone.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(first) = commands.blocking_recv() {
            // Everything that queued while the last batch was being synced goes out together:
            // that is the group commit.
            let mut bytes = first.weight();
            let mut batch = vec![first];
            while bytes < MAX_BATCH_BYTES && !matches!(batch.last(), Some(Command::Close { .. })) {
                match commands.try_recv() {
                    Ok(command) => {
                        bytes += command.weight();
                        batch.push(command);
                    }
                    Err(_) => break,
                }
            }
            if self.handle(batch).is_break() {
                // Dropping the receiver fails whatever queued after the close with Closed.
                return;
            }
        }
        // Every handle dropped without close: make the (unsynced) confirmations journal too.
        if self.broken.is_none()
            && let Err(error) = self.sync_if_dirty()
        {
            tracing::warn!(%error, "journal not synced at shutdown");
        }
    }

    fn handle(&mut self, batch: Vec<Command>) -> ControlFlow<()> {
        let now = Instant::now();
        if self.broken.is_some() && self.reopened_at.is_none_or(|at| now.duration_since(at) >= REOPEN_EVERY) {
            self.reopened_at = Some(now);
            self.reopen();
        }
        let mut outcome = match &self.broken {
            Some(first) => Err(stopped_by(first)),
            None => Ok(()),
        };
        let mut staged = Vec::with_capacity(batch.len());
        let mut close = None;
        for command in batch {
            if let Command::Close { reply } = command {
                close = Some(reply);
                continue;
            }
            // A broken journal keeps the confirmations for its reopening: losing one only makes
            // its block be checked again, so they are answered as taken.
            if let (Err(_), Command::Confirm { ids, .. }) = (&outcome, &command) {
                self.deferred.extend(ids);
                command.answer(&Ok(()), None);
                continue;
            }
            let id = match &outcome {
                Ok(()) => self.stage(&command, now).unwrap_or_else(|error| {
                    outcome = Err(error);
                    None
                }),
                Err(_) => None,
            };
            staged.push((command, id));
        }
        if outcome.is_ok() {
            outcome = self.finish_batch();
        }
        if let (Err(error), None) = (&outcome, &self.broken) {
            tracing::error!(%error, "journal write failed; it refuses all work until it reopens");
            self.broken = Some(error.clone());
            self.failed.extend(staged.iter().filter_map(|(_, id)| *id));
        }
        self.publish();
        for (command, id) in staged {
            command.answer(&outcome, id);
        }
        match close {
            Some(reply) => {
                let _ = reply.send(outcome.and_then(|()| self.sync_if_dirty()));
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        }
    }

    /// Adds one command's record to the batch; returns the id an append gets.
    fn stage(&mut self, command: &Command, now: Instant) -> Result<Option<BlockId>, WalError> {
        match command {
            Command::Append { payload, .. } => {
                // append() checked that the length fits.
                let len = format::BLOCK_OVERHEAD + payload.len() as u64;
                self.make_room(len)?;
                let id = self.next_id;
                self.next_id += 1;
                format::push_block(&mut self.buf, id, payload);
                self.buf_blocks = true;
                self.book.add_block(self.active.name, id, now);
                Ok(Some(id))
            }
            Command::Confirm { ids, .. } => {
                let fresh = self.book.unconfirmed_among(ids);
                if !fresh.is_empty() {
                    self.make_room(format::confirmations_len(fresh.len()))?;
                    format::push_confirmations(&mut self.buf, &fresh);
                    for id in fresh {
                        self.book.confirm(id, self.active.name);
                    }
                }
                Ok(None)
            }
            Command::Close { .. } | Command::Probe { .. } => Ok(None),
        }
    }

    /// Takes work again after a failure, if the disk lets it: a new segment (what the broken
    /// one holds past its last sync is unknown), a confirmation of every block whose append
    /// failed, synced. Stays broken when any step fails.
    fn reopen(&mut self) {
        let deferred = self.book.unconfirmed_among(&self.deferred);
        let reopened = self.roll().and_then(|()| {
            let ids: Vec<BlockId> = self.failed.iter().chain(&deferred).copied().collect();
            if !ids.is_empty() {
                format::push_confirmations(&mut self.buf, &ids);
                self.write(true)?;
            }
            self.sync()
        });
        match reopened {
            Ok(()) => {
                for id in std::mem::take(&mut self.failed).into_iter().chain(deferred) {
                    self.book.confirm(id, self.active.name);
                }
                self.deferred.clear();
                tracing::warn!(dir = %self.dir.display(), "the journal reopened after a failed write");
                self.broken = None;
            }
            Err(error) => {
                self.buf.take();
                // A segment file may have been made under the name tried: the next attempt
                // takes a new one (ids may have gaps).
                self.next_id = self.next_id.max(self.active.name) + 1;
                tracing::debug!(%error, "the journal could not reopen yet");
            }
        }
        self.publish();
    }

    /// Rolls to a new segment first when `len` more bytes would take the active one past
    /// `segment_bytes` (a record larger than that gets a segment of its own).
    fn make_room(&mut self, len: u64) -> Result<(), WalError> {
        let fill = self.book.segment(self.active.name).map_or(0, |s| s.fill()) + self.buf.len() as u64;
        if fill > 0 && fill + len > self.segment_bytes {
            // What this batch put in the old segment must be journal before it is answered,
            // and the writes to the new one are synced on that one's handle only.
            self.write_buf()?;
            self.sync_if_dirty()?;
            self.roll()?;
        }
        Ok(())
    }

    fn finish_batch(&mut self) -> Result<(), WalError> {
        let must_sync = self.buf_blocks;
        self.write_buf()?;
        // Confirmations alone are not synced: losing one in a crash only makes the caller
        // check that block again. The next synced batch carries them to the disk anyway.
        if must_sync {
            self.sync()?;
        }
        self.reclaim()
    }

    fn write_buf(&mut self) -> Result<(), WalError> {
        self.write(false)
    }

    /// Writes `buf` to the active segment; `carried` when it holds carried confirmations.
    fn write(&mut self, carried: bool) -> Result<(), WalError> {
        self.buf_blocks = false;
        if self.buf.is_empty() {
            return Ok(());
        }
        self.active.unsynced = true;
        let n = self.buf.len() as u64;
        write_all_parts(&mut self.active.file, &self.buf.take()).at(&self.active.path)?;
        self.book.grow(self.active.name, n, carried);
        self.shared.disk.fetch_add(n, Relaxed);
        self.shared.used.fetch_add(n, Relaxed);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        if !self.hooks.sync_delay.is_zero() {
            std::thread::sleep(self.hooks.sync_delay);
        }
        // fdatasync: the file's size is synced with its data, which is all a reader needs.
        self.active.file.sync_data().at(&self.active.path)?;
        self.active.unsynced = false;
        self.shared.syncs.fetch_add(1, Relaxed);
        Ok(())
    }

    fn sync_if_dirty(&mut self) -> Result<(), WalError> {
        if self.active.unsynced { self.sync() } else { Ok(()) }
    }

    fn roll(&mut self) -> Result<(), WalError> {
        // The new segment is named by the next id, or one past the active one when that held
        // no block: names must stay unique and in order.
        let name = self.next_id.max(self.active.name + 1);
        self.next_id = name;
        self.active = create_segment(&self.dir, &self.dir_handle, name)?;
        self.book.add_segment(name);
        self.shared.segments.store(self.book.segment_count(), Relaxed);
        Ok(())
    }

    /// Deletes every segment but the active one whose blocks are all confirmed, and closes the
    /// active one first when it is spent (see [`Book::is_spent`]).
    ///
    /// A block counts as unconfirmed unless a confirmation of it survives, so deleting a
    /// segment must not drop a confirmation of a block in a segment that stays. Those are
    /// written again into the active segment and synced before any file is removed.
    fn reclaim(&mut self) -> Result<(), WalError> {
        if self.book.is_spent(self.active.name, ROLL_CONFIRMED_AT.min(self.segment_bytes)) {
            self.roll()?;
        }
        let doomed = self.book.deletable(self.active.name);
        if doomed.is_empty() {
            return Ok(());
        }
        let needed = self.book.still_needed(&doomed);
        if !needed.is_empty() {
            format::push_confirmations(&mut self.buf, &needed);
            self.write(true)?;
            // Synced before the unlink: a confirmation that was journal stays journal.
            self.sync()?;
            for id in needed {
                self.book.confirm(id, self.active.name);
            }
        }
        self.delete(&doomed)
    }

    fn delete(&mut self, doomed: &BTreeSet<u64>) -> Result<(), WalError> {
        for &name in doomed {
            let path = segment_path(&self.dir, name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).at(&path),
                _ => {}
            }
            if let Some(segment) = self.book.remove_segment(name) {
                self.shared.disk.fetch_sub(segment.size, Relaxed);
                self.shared.used.fetch_sub(segment.size, Relaxed);
            }
        }
        // Made journal at once, so that a crash cannot bring back a deleted segment without the
        // later one that held its blocks' confirmations.
        self.dir_handle.sync_all().at(&self.dir)
    }

    /// Copies what stats() reports.
    fn publish(&self) {
        let shared = &self.shared;
        shared.broken.store(self.broken.is_some(), Relaxed);
        shared.segments.store(self.book.segment_count(), Relaxed);
        shared.unconfirmed.store(self.book.unconfirmed_count(), Relaxed);
        shared.set_oldest(self.book.oldest_unconfirmed());
    }
}

/// Writes `parts` in order with as few `writev` calls as the kernel allows (std caps each at
/// `IOV_MAX` slices); short writes carry on where they stopped.
fn write_all_parts(file: &mut File, parts: &[bytes::Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|part| IoSlice::new(part)).collect();
    let mut rest = slices.as_mut_slice();
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates segment `name` and makes its directory entry journal.
fn create_segment(dir: &Path, dir_handle: &File, name: u64) -> Result<Active, WalError> {
    let path = segment_path(dir, name);
    // The rows of producers' events: for the gateway's user alone.
    let file = OpenOptions::new().append(true).create_new(true).mode(0o600).open(&path).at(&path)?;
    dir_handle.sync_all().at(dir)?;
    Ok(Active { name, path, file, unsynced: false })
}

/// What a command gets once the journal has stopped on `first`.
fn stopped_by(first: &WalError) -> WalError {
    match first {
        WalError::Io { path, source } => WalError::Broken { path: path.clone(), source: Arc::clone(source) },
        other => other.clone(),
    }
}
