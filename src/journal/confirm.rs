//! The confirmer: one task per journal that, every `confirm_interval_ms` (or when woken),
//! looks at its node ([`super::watch`]), settles the suspect blocks the one way an INSERT of
//! unknown fate is settled ([`super::resolve`]), and confirms the blocks whose samples the
//! destination holds, so that the write-ahead log can drop them. At shutdown it flushes the
//! Buffer and confirms what it can before the journal closes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Journal;
use super::block::{self, Block};
use super::ledger::{Due, Suspect};
use super::resolve::{Doubtful, Resolver};
use super::wal::{BlockId, WalError};
use super::watch::{Doubt, Watch, doubt};
use crate::metrics;

/// Sample ids asked about per confirmation query.
const SAMPLES_PER_PASS: usize = 4_000;
/// Suspect blocks read back and settled per pass (each is read from disk whole).
const SUSPECTS_PER_PASS: usize = 64;

impl Journal {
    /// Settles blocks until `stop`: looks at the server, resolves suspects, confirms what has
    /// reached the destination.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut watch = Watch::default();
        tracing::debug!(interval = ?self.interval, "confirmer started");
        // A first look at once: blocks written from now on are then judged by how the
        // server's uptime went on since, not by its uptime alone, which cannot tell a young
        // server (just started beside the gateway) from one that restarted after they were
        // written, and would have every one of them looked for.
        self.pass(&mut watch, false).await;
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
        // A broken journal reopens only when asked (no append comes while admission refuses).
        if self.wal.is_broken() && self.wal.probe().await.is_ok() {
            tracing::info!(node = %self.node, "the journal takes blocks again");
        }
        match self.look().await {
            Ok(now) => {
                let oldest = self.owed().values().map(|o| now.at.duration_since(o.since)).max();
                if let Some(cause) = doubt(watch.mark, now, oldest) {
                    match cause {
                        Doubt::Restart => {
                            metrics::clickhouse_restart(&self.stream);
                            tracing::warn!(
                                node = %self.node,
                                uptime = now.uptime,
                                "ClickHouse restarted: every unconfirmed block is looked for"
                            );
                        }
                        Doubt::FlushError => {
                            tracing::warn!("a Buffer flush failed: every unconfirmed block is looked for");
                        }
                        Doubt::Unobserved => {
                            tracing::info!("first answer from ClickHouse: the blocks written before it are looked for");
                        }
                    }
                    self.suspect_all(cause);
                }
                watch.mark = Some(now);
                *self.last_look.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
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
            let mut owed = self.owed();
            let Some(entry) = owed.get_mut(&id) else { continue };
            match outcome {
                Ok(restored) => {
                    let cause = entry.suspect.take().map_or("suspect", Suspect::label);
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
                    // A block that was at hand may be on no disk (written while its append
                    // failed): it stays at hand until confirmed, for the next doubt.
                    if at_hand {
                        entry.block = Some(block);
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
    async fn load(&self, suspects: Vec<(BlockId, Option<Block>)>) -> Result<Vec<(BlockId, Block, bool)>, WalError> {
        let missing: Vec<BlockId> = suspects.iter().filter(|(_, b)| b.is_none()).map(|(id, _)| *id).collect();
        let mut read = if missing.is_empty() { Default::default() } else { self.wal.read(&missing).await? };
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
        let places = &self.places;
        Resolver {
            ch: &self.ch,
            writer: &self.writer,
            id_column: &places.id_column,
            time_column: places.time_column.as_deref(),
        }
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
                    entry.suspect = Some(Suspect::NotFound);
                }
            }
        }
        if confirmed.is_empty() {
            return;
        }
        metrics::journal_confirmed(confirmed.len());
        if self.wal.confirm(&confirmed).await.is_err() {
            metrics::journal_error("confirm");
        }
    }

    fn publish(&self) {
        let status = self.status();
        metrics::journal(
            &self.stream,
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
            self.confirm_before_exit(within).await;
        }
        if let Err(error) = self.wal.close().await {
            tracing::error!(%error, "the journal did not close cleanly; the next start checks it");
        }
    }

    async fn confirm_before_exit(&self, within: Duration) {
        let work = async {
            if let Err(error) = self.ch.execute(&format!("OPTIMIZE TABLE {}", self.places.buffer)).await {
                tracing::warn!(%error, "cannot flush the Buffer at shutdown; the journal keeps its blocks");
                return;
            }
            // The server answered just now (the OPTIMIZE): nothing is thawing. Compared with
            // what the confirmer last saw, so that only a restart since is a doubt.
            let mark = *self.last_look.lock().unwrap_or_else(PoisonError::into_inner);
            let mut watch = Watch { mark, unsure: false };
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
