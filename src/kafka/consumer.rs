//! The poll loop: one thread owns the librdkafka consumer (its rebalance callbacks may block
//! there while revoked partitions finish), hands each message to a delivery task on the
//! runtime, commits the partitions' done prefixes every `kafka_commit_interval_ms`, pauses
//! and resumes the assignment as [`super::flow`] decides, and reads the lag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as ClientError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::dead_letter::DeadLetters;
use super::flow::{self, Pause, Signals};
use super::incoming::Incoming;
use super::message::{Handled, Worker};
use super::offsets::PartitionOffsets;
use super::replay::Marks;
use super::{KafkaError, Status, settings};
use crate::config::{Config, KafkaCommit};
use crate::ingest::{Pipeline, Wait};
use crate::metrics::kafka as metrics;
use crate::shed::{Policy, ShedState, Verdict};

const POLL: Duration = Duration::from_millis(100);
/// While paused no message comes, so `poll` would sit out its whole timeout: a short one lets
/// the loop resume as soon as the deliveries in flight have drained (measured: a 100 ms poll
/// while paused for `kafka_max_in_flight` capped one-event messages near 2,000/s).
const PAUSED_POLL: Duration = Duration::from_millis(5);
/// How long the loop waits at `kafka_max_in_flight` without polling before it pauses the
/// partitions instead (so that rebalance callbacks are served while deliveries are stuck).
const IN_FLIGHT_STALL: Duration = Duration::from_secs(1);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

type Tp = (String, i32);

/// An assigned partition.
#[derive(Debug)]
struct Part {
    offsets: PartitionOffsets,
    /// Cancelled when the partition is given up: its deliveries stop retrying.
    cancel: CancellationToken,
    /// Offsets at or below this may have been delivered before ([`super::replay`]).
    suspect_through: Option<i64>,
    /// Tells a delivery finishing after its partition was revoked and assigned again.
    generation: u64,
}

/// What the poll thread, the delivery tasks and the rebalance callbacks share.
#[derive(Debug, Default)]
struct Shared {
    parts: Mutex<HashMap<Tp, Part>>,
    /// Notified whenever a delivery finishes.
    finished: Condvar,
    in_flight: AtomicUsize,
}

impl Shared {
    fn parts(&self) -> MutexGuard<'_, HashMap<Tp, Part>> {
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finish(&self, tp: &Tp, offset: i64, generation: u64, done: bool) {
        let mut parts = self.parts();
        if done && let Some(part) = parts.get_mut(tp).filter(|p| p.generation == generation) {
            part.offsets.finish(offset);
        }
        drop(parts);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.finished.notify_all();
    }

    /// Waits until fewer than `limit` deliveries are in flight, or `timeout`; whether they are.
    fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let below = |shared: &Self| shared.in_flight.load(Ordering::Relaxed) < limit;
        if below(self) {
            return true;
        }
        let parts = self.parts();
        // `finish` decrements before it notifies, under this lock: no wake-up is missed.
        let (_parts, _) =
            self.finished.wait_timeout_while(parts, timeout, |_| !below(self)).unwrap_or_else(PoisonError::into_inner);
        below(self)
    }

    /// Waits until none of `tps` has a delivery in flight, or `timeout`; whether they are idle.
    fn wait_idle(&self, tps: &[Tp], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut parts = self.parts();
        loop {
            let busy = tps.iter().any(|tp| parts.get(tp).is_some_and(|p| p.offsets.in_flight() > 0));
            let left = deadline.saturating_duration_since(Instant::now());
            if !busy {
                return true;
            }
            if left.is_zero() {
                return false;
            }
            parts = self.finished.wait_timeout(parts, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// The client context: rebalances and client errors.
struct Context {
    shared: Arc<Shared>,
    status: Arc<Status>,
    worker: Arc<Worker>,
    handle: Handle,
    revoke_timeout: Duration,
}

impl ClientContext for Context {
    fn error(&self, error: ClientError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.set_brokers_down(true);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.revoke(consumer, &tps(tpl));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.assign(consumer, tpl),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance failed"),
        }
    }
}

impl Context {
    /// Before a partition is given up: let its deliveries finish (up to the revoke timeout),
    /// commit what is done, and stop what is not; the next owner reads it again from there.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[Tp]) {
        if !self.shared.wait_idle(revoked, self.revoke_timeout) {
            tracing::warn!(partitions = revoked.len(), "revoked partitions still had deliveries: given up unfinished");
        }
        commit(consumer, &self.shared, Some(revoked));
        let mut parts = self.shared.parts();
        for tp in revoked {
            if let Some(part) = parts.remove(tp) {
                part.cancel.cancel();
            }
            metrics::lag(&tp.0, tp.1, 0);
        }
        let assigned = parts.len();
        drop(parts);
        self.status.set_partitions(assigned, 0);
        tracing::info!(revoked = revoked.len(), "kafka partitions revoked");
    }

    /// A new assignment: each partition resumes from its committed offset (the client does
    /// that), with what may have been delivered before marked suspect.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let committed = consumer.committed_offsets(tpl.clone(), CALL_TIMEOUT).ok();
        self.status.next_generation();
        let generation = self.status.generation();
        let mut fresh = Vec::new();
        for tp in tps(tpl) {
            let offset =
                committed.as_ref().and_then(|c| c.find_partition(&tp.0, tp.1)).and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            // The store unreadable: every message may have been delivered before.
            let mark = self.handle.block_on(self.worker.marks.read(&tp.0, tp.1));
            let suspect_through = match mark {
                Ok(mark) => mark.map(|m| m as i64),
                Err(error) => {
                    tracing::warn!(%error, "the replay marks cannot be read: every message is looked up");
                    Some(i64::MAX)
                }
            };
            let part = Part {
                offsets: PartitionOffsets::from_committed(offset),
                cancel: CancellationToken::new(),
                suspect_through,
                generation,
            };
            fresh.push((tp, part));
        }
        let mut parts = self.shared.parts();
        let count = fresh.len();
        parts.extend(fresh);
        let assigned = parts.len();
        drop(parts);
        self.status.set_partitions(assigned, 0);
        tracing::info!(assigned = count, "kafka partitions assigned");
    }
}

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

/// Commits the done prefixes (of `only`, or of every partition), synchronously.
fn commit<C: ConsumerContext>(consumer: &BaseConsumer<C>, shared: &Shared, only: Option<&[Tp]>) {
    let mut tpl = TopicPartitionList::new();
    let mut planned = Vec::new();
    for (tp, part) in shared.parts().iter() {
        if only.is_some_and(|only| !only.contains(tp)) {
            continue;
        }
        if let Some(offset) = part.offsets.to_commit()
            && tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset)).is_ok()
        {
            planned.push((tp.clone(), offset));
        }
    }
    if planned.is_empty() {
        return;
    }
    let started = Instant::now();
    let result = consumer.commit(&tpl, CommitMode::Sync);
    metrics::commit(result.is_ok(), started.elapsed());
    match result {
        Ok(()) => {
            let mut parts = shared.parts();
            for (tp, offset) in planned {
                if let Some(part) = parts.get_mut(&tp) {
                    part.offsets.committed(offset);
                }
            }
        }
        Err(error) => tracing::warn!(%error, "kafka offset commit failed; retried at the next interval"),
    }
}

/// The running consumer: its thread and what stops it.
#[derive(Debug)]
pub struct Front {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
    status: Arc<Status>,
}

impl Front {
    /// Starts the consumer thread. It first waits for the journal to settle what an earlier
    /// process left, so that looking replayed events up cannot race the journal restoring them.
    pub fn start(config: &Arc<Config>, ingest: Arc<Pipeline>, shed: Arc<ShedState>) -> Result<Self, KafkaError> {
        let consumer_config = settings::consumer(config)?;
        let dead = dead_letters(config)?;
        let status = Arc::new(Status::default());
        let shared = Arc::new(Shared::default());
        let config = Arc::clone(config);
        let worker = Arc::new(Worker {
            marks: Marks::new(
                Arc::clone(ingest.idempotency()),
                config.kafka.kafka_group.trim(),
                config.kafka.kafka_max_in_flight,
            ),
            wait: match config.kafka.kafka_commit_after {
                KafkaCommit::Journaled => Wait::Queued,
                KafkaCommit::Written => Wait::Written,
                KafkaCommit::Visible => Wait::Visible,
            },
            ingest,
            config: Arc::clone(&config),
            shed,
            dead,
        });
        let handle = Handle::current();
        let context = Context {
            shared: Arc::clone(&shared),
            status: Arc::clone(&status),
            worker: Arc::clone(&worker),
            handle: handle.clone(),
            revoke_timeout: Duration::from_millis(config.kafka.kafka_revoke_timeout_ms),
        };
        let consumer: BaseConsumer<Context> = consumer_config.create_with_context(context)?;
        let stop = CancellationToken::new();
        let poll_thread =
            PollThread { consumer, shared, worker, handle, status: Arc::clone(&status), stop: stop.clone() };
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || poll_thread.run())
            .map_err(|e| KafkaError::Config(format!("cannot start the consumer thread: {e}")))?;
        Ok(Self { stop, thread, status })
    }

    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// Asks the consumer to stop: it lets deliveries finish, commits, leaves the group.
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Stops the consumer and waits until it has left its group.
    pub async fn stop(self) {
        self.stop.cancel();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

fn dead_letters(config: &Config) -> Result<DeadLetters, KafkaError> {
    let topic = config.kafka.kafka_dead_letter_topic.trim();
    if topic.is_empty() {
        return Ok(DeadLetters::new(None));
    }
    let producer: FutureProducer = settings::producer(config)?.create()?;
    Ok(DeadLetters::new(Some((producer, topic.to_string()))))
}

/// The poll thread's state.
struct PollThread {
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    handle: Handle,
    status: Arc<Status>,
    stop: CancellationToken,
}

impl PollThread {
    fn run(self) {
        if !self.wait_for_journal() {
            return;
        }
        let config = Arc::clone(&self.worker.config);
        if let Err(error) = self.consumer.subscribe(&config.kafka_topics()) {
            tracing::error!(%error, "cannot subscribe to the kafka topics");
            self.status.fail(error.to_string());
            return;
        }
        self.status.set_subscribed();
        tracing::info!(topics = %config.kafka.kafka_topics, group = %config.kafka.kafka_group, "kafka consumer subscribed");
        let mut paused: Option<(Pause, u64)> = None;
        let (mut last_commit, mut last_lag) = (Instant::now(), Instant::now());
        let commit_every = Duration::from_millis(config.kafka.kafka_commit_interval_ms);
        let lag_every = Duration::from_millis(config.kafka.kafka_lag_interval_ms);
        let mut full_since: Option<Instant> = None;
        while !self.stop.is_cancelled() {
            let stalled = full_since.is_some_and(|t| t.elapsed() >= IN_FLIGHT_STALL);
            paused = self.steer(paused, stalled);
            if paused.is_none() && !self.shared.wait_below(config.kafka.kafka_max_in_flight, POLL) {
                full_since.get_or_insert_with(Instant::now);
                continue;
            }
            full_since = None;
            match self.consumer.poll(if paused.is_some() { PAUSED_POLL } else { POLL }) {
                Some(Ok(message)) => {
                    self.status.set_brokers_down(false);
                    self.dispatch(&message);
                }
                Some(Err(error)) => tracing::warn!(%error, "kafka consumer error"),
                None => {}
            }
            if last_commit.elapsed() >= commit_every {
                commit(&self.consumer, &self.shared, None);
                last_commit = Instant::now();
            }
            if last_lag.elapsed() >= lag_every {
                self.read_lag();
                last_lag = Instant::now();
            }
        }
        self.leave(&config);
    }

    /// Waits until the journal has no suspect block (those an earlier process left are
    /// settled first); `false` if stopped meanwhile.
    fn wait_for_journal(&self) -> bool {
        let ingest = &self.worker.ingest;
        if !ingest.journaled() {
            return true;
        }
        let mut told = false;
        while ingest.journal_status().is_some_and(|s| s.suspect_blocks > 0) {
            if !told {
                tracing::info!("waiting for the journal to settle the blocks of an earlier process before consuming");
                told = true;
            }
            if self.stop.is_cancelled() {
                return false;
            }
            std::thread::sleep(POLL);
        }
        true
    }

    /// Hands a message to a delivery task, tracking its offset.
    fn dispatch(&self, message: &BorrowedMessage<'_>) {
        let incoming = incoming(message);
        let tp = (incoming.topic.clone(), incoming.partition);
        let (cancel, suspect, generation) = {
            let mut parts = self.shared.parts();
            // Not assigned as far as we know (cannot happen with the eager protocol): treat
            // every message of it as one that may have been delivered before.
            let part = parts.entry(tp.clone()).or_insert_with(|| Part {
                offsets: PartitionOffsets::default(),
                cancel: CancellationToken::new(),
                suspect_through: Some(i64::MAX),
                generation: self.status.generation(),
            });
            if !part.offsets.start(incoming.offset) {
                return;
            }
            let suspect = part.suspect_through.is_some_and(|s| incoming.offset <= s);
            (part.cancel.clone(), suspect, part.generation)
        };
        metrics::message("consumed");
        let in_flight = self.shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::in_flight(in_flight);
        let (worker, shared) = (Arc::clone(&self.worker), Arc::clone(&self.shared));
        self.handle.spawn(async move {
            let handled = worker.handle(&incoming, suspect, &cancel).await;
            shared.finish(&tp, incoming.offset, generation, handled != Handled::Abandoned);
        });
    }

    /// Pauses or resumes the assignment as the flow policy says; returns the new state.
    fn steer(&self, paused: Option<(Pause, u64)>, stalled: bool) -> Option<(Pause, u64)> {
        let in_flight = self.shared.in_flight.load(Ordering::Relaxed);
        metrics::in_flight(in_flight);
        let next = flow::decide(paused.map(|(p, _)| p), &self.signals(in_flight, stalled));
        let generation = self.status.generation();
        let reapply = paused.is_some_and(|(_, g)| g != generation);
        if next.is_some() == paused.is_some() && !(next.is_some() && reapply) {
            return next.map(|p| (p, generation));
        }
        let Ok(assignment) = self.consumer.assignment() else { return paused };
        let result = match next {
            Some(_) => self.consumer.pause(&assignment),
            None => self.consumer.resume(&assignment),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "cannot pause or resume the kafka partitions");
            return paused;
        }
        let count = assignment.count();
        match next {
            Some(why) if paused.is_none() => {
                tracing::info!(reason = why.label(), partitions = count, "kafka partitions paused");
            }
            None => tracing::info!(partitions = count, "kafka partitions resumed"),
            Some(_) => {}
        }
        self.status.set_partitions(self.status.assigned(), if next.is_some() { count } else { 0 });
        next.map(|p| (p, generation))
    }

    fn signals(&self, in_flight: usize, in_flight_stalled: bool) -> Signals {
        let config = &self.worker.config;
        let policy = Policy::of(config);
        let verdict = policy.verdict(&self.worker.shed);
        // In fallback mode the rows are diverted instead, as HTTP requests are.
        let buffer_saturated = verdict != Verdict::Pass && !policy.diverts(verdict);
        let margin = config.batching.flush_max_bytes as u64;
        let ingest = &self.worker.ingest;
        Signals {
            buffer_saturated,
            circuit_open: ingest.circuit_open(),
            journal_room: ingest.journal_has_room(margin),
            journal_resume_room: ingest.journal_has_room(margin * 2),
            in_flight,
            max_in_flight: config.kafka.kafka_max_in_flight,
            in_flight_stalled,
        }
    }

    /// Lag per assigned partition: high watermark − committed offset.
    fn read_lag(&self) {
        let parts: Vec<(Tp, Option<i64>)> =
            self.shared.parts().iter().map(|(tp, p)| (tp.clone(), p.offsets.committed_offset())).collect();
        if parts.is_empty() {
            let reachable = self.consumer.fetch_metadata(None, Duration::from_secs(2)).is_ok();
            self.status.set_brokers_down(!reachable);
        }
        for ((topic, partition), committed) in parts {
            match self.consumer.fetch_watermarks(&topic, partition, Duration::from_secs(2)) {
                Ok((low, high)) => {
                    self.status.set_brokers_down(false);
                    metrics::lag(&topic, partition, high - committed.unwrap_or(low).max(low));
                }
                Err(error) => tracing::debug!(%error, topic, partition, "cannot read the high watermark"),
            }
        }
    }

    /// Shutting down: lets the deliveries finish (up to the revoke timeout), commits, stops
    /// what is left, and leaves the group. The partitions are forgotten before leaving, so the
    /// revoke callback that leaving runs finds nothing to do: kept, their unfinished
    /// deliveries would have it wait out the revoke timeout a second time.
    fn leave(&self, config: &Config) {
        let all: Vec<Tp> = self.shared.parts().keys().cloned().collect();
        if !self.shared.wait_idle(&all, Duration::from_millis(config.kafka.kafka_revoke_timeout_ms)) {
            tracing::warn!("stopping with kafka deliveries unfinished: their messages are read again next time");
        }
        commit(&self.consumer, &self.shared, None);
        for (_, part) in self.shared.parts().drain() {
            part.cancel.cancel();
        }
        self.consumer.unsubscribe();
        tracing::info!("kafka consumer stopped");
    }
}

/// A message detached from the consumer.
fn incoming(message: &BorrowedMessage<'_>) -> Incoming {
    let headers = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    Incoming {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        headers,
        timestamp_ms: message.timestamp().to_millis(),
    }
}
