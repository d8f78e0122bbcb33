//! Durable acknowledgement on top of the journal: which journaled blocks are still owed to
//! ClickHouse, and the task that settles them.
//!
//! A block is journaled before its INSERT is answered, and stays until its rows are known to
//! be in the destination MergeTree, not merely in the Buffer's RAM. Three facts make that
//! knowable without reading every row back:
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
//! suspect too (a restart missed between polls, a flush that dropped rows): the look through
//! the Buffer then finds its rows (still buffered: nothing to do) or sends what is missing.
//! Nothing is ever sent again without having been looked for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Waiter;
use super::block::{self, Block};
use super::resolve::{Doubtful, Resolver};
use super::store::{BlockId, Journal, JournalConfig, JournalError};
use crate::clickhouse::presence::Lookup;
use crate::clickhouse::writer::Writer;
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::config::Config;
use crate::metrics;
use crate::schema::quote_ident;

/// The Memory table in the gateway's database that tells a restart (see [`doubt`]).
pub const LIVENESS_TABLE: &str = "buffergate_liveness";

/// Sample ids asked about per confirmation query.
const SAMPLES_PER_PASS: usize = 4_000;
/// Suspect blocks read back and settled per pass (each is read from disk whole).
const SUSPECTS_PER_PASS: usize = 64;

/// A journaled block not yet confirmed, as kept in memory (its rows stay on disk).
#[derive(Debug)]
struct Owed {
    /// Since when the rows are known to be in the Buffer (written, or found there).
    since: Instant,
    samples: Vec<Uuid>,
    seconds: Option<(i64, i64)>,
    rows: usize,
    /// Whether the rows must be looked for before anything else, and why.
    suspect: Option<&'static str>,
    /// The block itself while suspect from an ambiguous INSERT (it is at hand then).
    block: Option<Block>,
    /// Requests waiting for the rows to be written (an ambiguous INSERT being resolved).
    written: Vec<Waiter>,
    /// Requests waiting for the rows to be visible in the destination.
    visible: Vec<Waiter>,
}

impl Owed {
    fn of(block: &Block, since: Instant) -> Self {
        Self {
            since,
            samples: block.samples(),
            seconds: block.seconds(),
            rows: block.rows(),
            suspect: None,
            block: None,
            written: Vec::new(),
            visible: Vec::new(),
        }
    }
}

/// A block whose samples are to be looked for in the destination.
#[derive(Debug)]
struct Due {
    id: BlockId,
    samples: Vec<Uuid>,
    seconds: Option<(i64, i64)>,
    /// Past its flush window: not found means suspect.
    ripe: bool,
}

/// What the confirmer knows of the server between passes.
#[derive(Debug, Clone, Copy)]
struct Watch {
    mark: Option<ServerMark>,
    /// The last look got no answer (or there was none yet): the server may be thawing, with
    /// INSERTs it received but has not started; suspects wait one more pass.
    unsure: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Self { mark: None, unsure: true }
    }
}

/// What the confirmer last saw of the server.
#[derive(Debug, Clone, Copy)]
struct ServerMark {
    uptime: u64,
    at: Instant,
    flush_errors: u64,
    /// This process's row was still in the liveness table (`None`: it cannot be kept there).
    marked: Option<bool>,
}

/// The decision of one look at the server: was there reason for doubt since the last? With
/// no earlier look to compare with (the first answer since start-up), blocks owed for longer
/// than the server has been up were written to a server that restarted since: they are
/// looked for.
fn doubt(previous: Option<ServerMark>, now: ServerMark, oldest_owed: Option<Duration>) -> Option<&'static str> {
    let Some(previous) = previous else {
        // Up for longer than the oldest block has been owed: no restart lost any of them.
        let up_since_before = |age: Duration| now.uptime > age.as_secs() + 2;
        return oldest_owed.filter(|age| !up_since_before(*age)).map(|_| "unobserved");
    };
    let expected = previous.uptime + now.at.duration_since(previous.at).as_secs();
    // Uptime counts whole seconds, two of slack for rounding at both ends: a restart within
    // them is told by the liveness row, which a restart loses however quick.
    let row_lost = previous.marked.is_some() && now.marked == Some(false);
    if row_lost || now.uptime < previous.uptime || now.uptime + 2 < expected {
        Some("restart")
    } else if now.flush_errors > previous.flush_errors {
        Some("flush_error")
    } else {
        None
    }
}

/// Where blocks are written and looked for.
#[derive(Debug, Clone)]
struct Places {
    buffer: String,
    /// A Memory table whose rows, like the Buffer's, die with the server's memory.
    liveness: String,
    destination: String,
    id_column: String,
    time_column: String,
}

impl Places {
    fn lookup<'a>(&'a self, table: &'a str) -> Lookup<'a> {
        let time = (!self.time_column.is_empty()).then_some(self.time_column.as_str());
        Lookup { table, id_column: &self.id_column, time_column: time }
    }
}

/// The journal and the blocks it protects.
#[derive(Debug)]
pub struct Durable {
    /// The ClickHouse node this journal's blocks are written to (its URL).
    node: String,
    journal: Journal,
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
    /// When the confirmer last had an answer.
    answered: Mutex<Option<Instant>>,
}

/// The journal's state for `/v1/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DurableStatus {
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
pub async fn leftover(config: &Config, dir: std::path::PathBuf) -> Result<usize, JournalError> {
    if !dir.exists() {
        return Ok(0);
    }
    let store = JournalConfig { dir, max_bytes: config.journal_max_bytes, segment_bytes: config.journal_segment_bytes };
    let (journal, records) =
        tokio::task::spawn_blocking(move || Journal::open(store)).await.map_err(|_| JournalError::Closed)??;
    journal.close().await?;
    Ok(records.len())
}

impl DurableStatus {
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

impl Durable {
    /// Opens the journal under `data_dir`; every block found there is suspect (this process
    /// cannot know what became of it) and is settled by [`Self::run`].
    pub async fn open(config: &Config, ch: ClickHouse, writer: Arc<Writer>) -> Result<Arc<Self>, JournalError> {
        let store = JournalConfig {
            dir: std::path::Path::new(&config.data_dir).join("journal"),
            max_bytes: config.journal_max_bytes,
            segment_bytes: config.journal_segment_bytes,
        };
        let (journal, records) =
            tokio::task::spawn_blocking(move || Journal::open(store)).await.map_err(|_| JournalError::Closed)??;
        let now = Instant::now();
        let mut owed = BTreeMap::new();
        for record in records {
            match Block::decode(&Bytes::from(record.payload)) {
                Ok(block) => {
                    let mut entry = Owed::of(&block, now);
                    entry.suspect = Some("recovered");
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
            buffer: format!("{}.{}", quote_ident(&config.database), quote_ident(&config.buffer_table)),
            liveness: format!("{}.{}", quote_ident(&config.database), quote_ident(LIVENESS_TABLE)),
            destination: format!("{}.{}", quote_ident(&config.database), quote_ident(&config.destination_table)),
            id_column: config.id_column.clone(),
            time_column: config.timestamp_column.clone(),
        };
        Ok(Arc::new(Self {
            node: config.clickhouse_url.clone(),
            journal,
            writer,
            ch,
            places,
            flush_window: Duration::from_secs(config.buffer_max_time) + Duration::from_millis(config.confirm_grace_ms),
            interval: Duration::from_millis(config.confirm_interval_ms),
            owed: Mutex::new(owed),
            wake: Notify::new(),
            instance: format!("bg-{:016x}", rand::random::<u64>()),
            sequence: AtomicU64::new(0),
            answered: Mutex::new(None),
        }))
    }

    fn owed(&self) -> std::sync::MutexGuard<'_, BTreeMap<BlockId, Owed>> {
        self.owed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh `query_id` for a block's INSERTs.
    pub fn next_query_id(&self) -> String {
        format!("{}-{}", self.instance, self.sequence.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether `bytes` more fit in the journal now.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.journal.has_room(bytes)
    }

    /// Journals a block; resolves once it is on disk.
    pub async fn append(&self, block: &Block) -> Result<BlockId, JournalError> {
        let result = self.journal.append(block.encode()).await;
        if result.is_err() {
            metrics::journal_error("append");
        }
        result
    }

    /// The block's INSERT succeeded: its rows are in the Buffer. `visible` waiters hear once
    /// they are in the destination.
    pub fn written(&self, id: BlockId, block: &Block, visible: Vec<Waiter>) {
        let mut entry = Owed::of(block, Instant::now());
        let wake = !visible.is_empty();
        entry.visible = visible;
        self.owed().insert(id, entry);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The block's INSERT may have landed, or failed after its journaling was promised: look for
    /// its rows now and send what is missing; `written` waiters hear once every row is in
    /// ClickHouse.
    pub fn ambiguous(&self, id: BlockId, block: Block, written: Vec<Waiter>, visible: Vec<Waiter>) {
        let mut entry = Owed::of(&block, Instant::now());
        entry.suspect = Some("ambiguous");
        entry.block = Some(block);
        entry.written = written;
        entry.visible = visible;
        self.owed().insert(id, entry);
        self.wake.notify_one();
    }

    /// The block's INSERT failed for good and nobody was told it was journaled: nothing was
    /// written, nothing to protect.
    pub async fn discard(&self, id: BlockId) {
        if self.journal.confirm(&[id]).await.is_err() {
            metrics::journal_error("confirm");
        }
    }

    pub fn status(&self) -> DurableStatus {
        let stats = self.journal.stats();
        let owed = self.owed();
        let now = Instant::now();
        DurableStatus {
            bytes: stats.bytes,
            max_bytes: self.journal.max_bytes(),
            unconfirmed_blocks: owed.len(),
            unconfirmed_rows: owed.values().map(|o| o.rows).sum(),
            suspect_blocks: owed.values().filter(|o| o.suspect.is_some()).count(),
            oldest_unconfirmed_s: owed.values().map(|o| now.duration_since(o.since).as_secs_f64()).fold(0.0, f64::max),
            last_answer_s: self
                .answered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map(|at| now.duration_since(at).as_secs_f64()),
        }
    }

    /// Settles blocks until `stop`: looks at the server, resolves suspects, confirms what has
    /// reached the destination.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut watch = Watch::default();
        tracing::debug!(interval = ?self.interval, "confirmer started");
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
                () = self.wake.notified() => {}
            }
            self.pass(&mut watch, false).await;
        }
    }

    /// One round: a look at the server, the suspects, the due confirmations. `all_due`
    /// confirms every block found in the destination, however young (at shutdown, after the
    /// Buffer was flushed).
    async fn pass(&self, watch: &mut Watch, all_due: bool) {
        match self.look().await {
            Ok(now) => {
                let oldest = self.owed().values().map(|o| now.at.duration_since(o.since)).max();
                if let Some(cause) = doubt(watch.mark, now, oldest) {
                    match cause {
                        "restart" => {
                            metrics::clickhouse_restart();
                            tracing::warn!(
                                node = %self.node,
                                uptime = now.uptime,
                                "ClickHouse restarted: every unconfirmed block is looked for"
                            );
                        }
                        "flush_error" => tracing::warn!("a Buffer flush failed: every unconfirmed block is looked for"),
                        _ => {
                            tracing::info!("first answer from ClickHouse: the blocks written before it are looked for");
                        }
                    }
                    self.suspect_all(cause);
                }
                watch.mark = Some(now);
                *self.answered.lock().unwrap_or_else(PoisonError::into_inner) = Some(now.at);
            }
            // Down or stalled: nothing can be settled until it answers.
            Err(error) => {
                tracing::debug!(%error, "ClickHouse does not answer the confirmer");
                watch.unsure = true;
                return;
            }
        }
        // Suspects wait for a second answer in a row: an INSERT the server received while
        // frozen has had a pass's time to start (and be stopped) or land.
        if !std::mem::take(&mut watch.unsure) {
            self.settle_suspects().await;
        }
        self.confirm_due(all_due).await;
        self.publish();
    }

    async fn look(&self) -> Result<ServerMark, ClickHouseError> {
        let uptime = self.ch.uptime().await?;
        let flush_errors = self.ch.buffer_flush_errors().await?;
        let marked = match self.ch.still_marked(&self.places.liveness, &self.instance).await {
            Ok(marked) => Some(marked),
            // Without the right to create it, uptime alone tells restarts (to within seconds).
            Err(ClickHouseError::Server { .. }) => None,
            Err(error) => return Err(error),
        };
        Ok(ServerMark { uptime, at: Instant::now(), flush_errors, marked })
    }

    fn suspect_all(&self, cause: &'static str) {
        for owed in self.owed().values_mut() {
            owed.suspect.get_or_insert(cause);
        }
    }

    /// Looks for the rows of suspect blocks and sends the missing ones.
    async fn settle_suspects(&self) {
        let suspects: Vec<(BlockId, Option<Block>)> = self
            .owed()
            .iter_mut()
            .filter(|(_, o)| o.suspect.is_some())
            .take(SUSPECTS_PER_PASS)
            .map(|(id, o)| (*id, o.block.take()))
            .collect();
        if suspects.is_empty() {
            return;
        }
        let blocks = match self.load(suspects).await {
            Ok(blocks) => blocks,
            Err(error) => {
                metrics::journal_error("read");
                tracing::error!(%error, "cannot read suspect blocks back from the journal");
                return;
            }
        };
        let doubtful: Vec<Doubtful<'_>> = blocks
            .iter()
            .map(|(_, block, _)| Doubtful {
                block,
                resend_id: format!("{}-r{}", block.query_id, self.sequence.fetch_add(1, Ordering::Relaxed)),
            })
            .collect();
        let outcomes = self.resolver().settle(&doubtful).await;
        drop(doubtful);
        for ((id, block, at_hand), outcome) in blocks.into_iter().zip(outcomes) {
            let outcome = outcome.map(|settled| settled.sent);
            let mut owed = self.owed();
            let Some(entry) = owed.get_mut(&id) else { continue };
            match outcome {
                Ok(restored) => {
                    let cause = entry.suspect.take().unwrap_or("suspect");
                    metrics::journal_resolved(cause, restored);
                    if restored > 0 {
                        tracing::warn!(
                            id,
                            cause,
                            restored,
                            rows = entry.rows,
                            "rows ClickHouse lacked were sent again"
                        );
                    }
                    entry.since = Instant::now();
                    for waiter in entry.written.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                }
                Err(error) => {
                    tracing::warn!(id, %error, "a suspect block could not be settled yet");
                    // What was at hand stays so (it may exist nowhere else); the rest is on disk.
                    if at_hand {
                        entry.block = Some(block);
                    }
                }
            }
        }
    }

    /// The suspect blocks themselves, and whether each was at hand (else read back from disk).
    async fn load(&self, suspects: Vec<(BlockId, Option<Block>)>) -> Result<Vec<(BlockId, Block, bool)>, JournalError> {
        let missing: Vec<BlockId> = suspects.iter().filter(|(_, b)| b.is_none()).map(|(id, _)| *id).collect();
        let mut read = if missing.is_empty() { Default::default() } else { self.journal.read(&missing).await? };
        Ok(suspects
            .into_iter()
            .filter_map(|(id, block)| match block {
                Some(block) => Some((id, block, true)),
                None => Some((id, Block::decode(&Bytes::from(read.remove(&id)?)).ok()?, false)),
            })
            .collect())
    }

    /// The one settling of blocks of unknown fate, on this journal's node.
    fn resolver(&self) -> Resolver<'_> {
        let time = (!self.places.time_column.is_empty()).then_some(self.places.time_column.as_str());
        Resolver { ch: &self.ch, writer: &self.writer, id_column: &self.places.id_column, time_column: time }
    }

    /// Confirms the blocks whose samples the destination holds, once they are due (or
    /// awaited by `wait=visible`); a due block not found there becomes suspect.
    async fn confirm_due(&self, all_due: bool) {
        let now = Instant::now();
        let due: Vec<Due> = {
            let owed = self.owed();
            let mut samples = 0;
            owed.iter()
                .filter(|(_, o)| o.suspect.is_none())
                .filter_map(|(id, o)| {
                    let ripe = all_due || now.duration_since(o.since) >= self.flush_window;
                    (ripe || !o.visible.is_empty()).then(|| Due {
                        id: *id,
                        samples: o.samples.clone(),
                        seconds: o.seconds,
                        ripe,
                    })
                })
                .take_while(|due| {
                    samples += due.samples.len();
                    samples <= SAMPLES_PER_PASS
                })
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = due.iter().flat_map(|d| d.samples.iter().copied()).collect();
        let span = due.iter().fold(None, |acc, d| block::span(acc, d.seconds));
        let found = match self.ch.present(self.places.lookup(&self.places.destination), &ids, span).await {
            Ok(found) => found,
            Err(_) => return,
        };
        let mut confirmed = Vec::new();
        {
            let mut owed = self.owed();
            for Due { id, samples, ripe, .. } in due {
                let Some(entry) = owed.get_mut(&id) else { continue };
                if samples.iter().all(|s| found.contains(s)) {
                    // Without ids there is nothing to look for: time alone confirms.
                    if samples.is_empty() && !ripe {
                        continue;
                    }
                    for waiter in entry.visible.drain(..).chain(entry.written.drain(..)) {
                        let _ = waiter.send(Ok(()));
                    }
                    owed.remove(&id);
                    confirmed.push(id);
                } else if ripe {
                    entry.suspect = Some("not_found");
                }
            }
        }
        if confirmed.is_empty() {
            return;
        }
        metrics::journal_confirmed(confirmed.len());
        if self.journal.confirm(&confirmed).await.is_err() {
            metrics::journal_error("confirm");
        }
    }

    fn publish(&self) {
        let status = self.status();
        metrics::journal(
            &self.node,
            status.bytes,
            status.unconfirmed_blocks,
            status.unconfirmed_rows,
            Duration::from_secs_f64(status.oldest_unconfirmed_s),
        );
    }

    /// At shutdown: flushes the Buffer into the destination and confirms what is there, so a
    /// replica that goes away leaves as little as it can in its journal. Bounded by `within`.
    pub async fn finish(&self, within: Duration) {
        if !self.owed().is_empty() {
            self.settle_before_exit(within).await;
        }
        if let Err(error) = self.journal.close().await {
            tracing::error!(%error, "the journal did not close cleanly; the next start checks it");
        }
    }

    async fn settle_before_exit(&self, within: Duration) {
        let work = async {
            if let Err(error) = self.ch.execute(&format!("OPTIMIZE TABLE {}", self.places.buffer)).await {
                tracing::warn!(%error, "cannot flush the Buffer at shutdown; the journal keeps its blocks");
                return;
            }
            // The server answered just now (the OPTIMIZE): nothing is thawing.
            let mut watch = Watch { mark: None, unsure: false };
            for _ in 0..3 {
                self.pass(&mut watch, true).await;
                if self.owed().is_empty() {
                    break;
                }
            }
        };
        if tokio::time::timeout(within, work).await.is_err() {
            tracing::warn!("the journal was not settled in time; the next start takes it over");
        }
        let left = self.owed().len();
        tracing::info!(unconfirmed = left, "journal at shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(uptime: u64, at: Instant, flush_errors: u64) -> ServerMark {
        ServerMark { uptime, at, flush_errors, marked: Some(true) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_or_a_failed_flush_is_a_doubt() {
        let t0 = Instant::now();
        let owed = |s| Some(Duration::from_secs(s));
        assert_eq!(doubt(None, mark(5, t0, 0), None), None, "nothing to compare with, nothing owed");
        assert_eq!(doubt(None, mark(50, t0, 0), owed(10)), None, "up since before the blocks were written");
        assert_eq!(doubt(None, mark(5, t0, 0), owed(10)), Some("unobserved"), "restarted since they were");
        tokio::time::advance(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        assert_eq!(doubt(Some(mark(100, t0, 0)), mark(110, t1, 0), owed(1)), None, "uptime went on");
        assert_eq!(doubt(Some(mark(100, t0, 0)), mark(109, t1, 0), owed(1)), None, "rounding");
        assert_eq!(doubt(Some(mark(100, t0, 0)), mark(3, t1, 0), owed(1)), Some("restart"));
        assert_eq!(doubt(Some(mark(1, t0, 0)), mark(4, t1, 0), owed(1)), Some("restart"), "restarted since, up 4 s");
        assert_eq!(doubt(Some(mark(100, t0, 2)), mark(110, t1, 3), owed(1)), Some("flush_error"));
        let lost = ServerMark { marked: Some(false), ..mark(1, t1, 0) };
        assert_eq!(
            doubt(Some(mark(0, t0, 0)), lost, Some(Duration::from_secs(1))),
            Some("restart"),
            "a restart within a second: the row is gone"
        );
        let unknown = ServerMark { marked: None, ..mark(110, t1, 0) };
        assert_eq!(doubt(Some(mark(100, t0, 0)), unknown, owed(1)), None, "no liveness table: uptime decides");
    }
}
