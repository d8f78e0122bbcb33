//! Exactly-once delivery: per-event idempotency keys, request-level `Idempotency-Key`
//! replay, and producer offsets, kept in Redis (or, for a single replica, in process).
//!
//! The order is the design. A key recorded before the write would lose the event when the
//! write fails, so each event's key is first **reserved** with a short lease, the rows are
//! written, and only then is the key **committed** for the dedup window; a failed write
//! **releases** the reservations so the producer's retry goes through. A gateway that dies in
//! between leaves leases that expire, after which a retry is written (at-least-once is kept).
//!
//! One write per event: an event's key holds the *token* of the request (and partition) that
//! reserved it and the end of its lease; the token's own status key, written once the flush is
//! settled, says `c` (committed, TTL = window) or `r` (released). Reserving a fresh id is then
//! one write, and committing or releasing a whole flush one write per token, not one per event.
//! A key whose token has no status is pending until its lease ends and void after; a void or
//! released one is taken over by the next reservation ([`holder_state`]).

pub mod groups;
mod memory;
mod redis_conn;
mod redis_store;
mod reserve;
mod reserve_queue;
pub mod trust;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, DedupMode, OnStoreError, StreamName};
use crate::journal::watermark::now_ms;
use crate::metrics;
pub use memory::MemoryStore;
pub use redis_store::{RedisStore, ServerFacts, primaries_facts, server_facts};
pub use reserve::{ReserveError, Reserved};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("idempotency store: {0}")]
    Backend(String),
    #[error("idempotency store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("idempotency store configuration: {0}")]
    Config(String),
    #[error("idempotency store write reached {acked} of the {wanted} replicas asked for")]
    Replication { acked: u32, wanted: u32 },
}

/// What the store says about an event key after a reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Ours now: write the event, then commit or release.
    Reserved,
    /// Written before, inside the window: a duplicate.
    Committed,
    /// Reserved by another request still in flight.
    Pending,
}

/// What the store knows of a request-level `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestState {
    /// First time: ours now.
    New,
    /// Another request with this key is being processed.
    InFlight { same_body: bool },
    /// Answered before.
    Done { same_body: bool, status: u16, body: Vec<u8> },
}

/// Stored answer to an `Idempotency-Key`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredAnswer {
    /// Hash of the request body it answered.
    h: String,
    s: u16,
    b: String,
}

/// Status values: of a token (`c`, `r`) and of a request-level key (`p` + body hash, `d` + answer).
const COMMITTED: &[u8] = b"c";
const RELEASED: &[u8] = b"r";
const PENDING: u8 = b'p';
const DONE: u8 = b'd';

/// What an id held by another token means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HolderState {
    /// Its events were written: a duplicate.
    Committed,
    /// Being written now: wait for the outcome.
    Pending,
    /// Released, or abandoned (the lease ended with no outcome): take it over.
    Void,
}

/// The rule, the same in both stores: a holder's status decides, and without one its lease does.
pub(crate) fn holder_state(status: Option<&[u8]>, lease_over: bool) -> HolderState {
    match status {
        Some(COMMITTED) => HolderState::Committed,
        Some(RELEASED) => HolderState::Void,
        _ if lease_over => HolderState::Void,
        _ => HolderState::Pending,
    }
}

/// Bytes of a reservation token: 8 random, then the partition (little-endian u16).
const TOKEN_BYTES: usize = 10;

/// The backends, with the same semantics.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process
pub enum Store {
    Redis(RedisStore),
    Memory(MemoryStore),
}

/// The store plus the policy around it; what the request path and the coalescers call.
#[derive(Debug)]
pub struct Idempotency {
    store: Store,
    pub mode: DedupMode,
    pub on_error: OnStoreError,
    pub pending_wait: Duration,
    /// Lease, window and key prefix, as every reservation call needs them.
    terms: Terms,
    offsets: OffsetTerms,
    /// Whether the store can be trusted to remember what it was told (see [`trust`]).
    trust: Arc<trust::Trust>,
    /// Reads the store's signs of loss (Redis only).
    check: Option<tokio::sync::Mutex<trust::Check>>,
    /// `dedup_lookup_after_loss_ms` is not 0.
    looks_up: bool,
    stream: StreamName,
}

/// A request's reservation of the event keys bound for one partition: what the flush that
/// writes them commits, or releases if it fails.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The value the reserved keys hold; its status key decides what they mean.
    pub token: Vec<u8>,
}

impl Idempotency {
    /// The Redis store when `redis_url` is set, else the in-process one.
    pub fn from_config(config: &Config) -> Result<Self, StoreError> {
        let store = if config.idempotency.redis_url.is_empty() {
            Store::Memory(MemoryStore::default())
        } else {
            Store::Redis(RedisStore::from_config(config)?)
        };
        Ok(Self::new(store, config))
    }

    pub fn new(store: Store, config: &Config) -> Self {
        let settings = &config.idempotency;
        // Ids committed before a loss are deduplicated for the window after their write: no
        // resend is looked up for longer.
        let period = Duration::from_millis(settings.dedup_lookup_after_loss_ms.min(settings.dedup_window_ms));
        let (trust, check) = match &store {
            Store::Redis(redis) => {
                let marker = config
                    .journal_enabled()
                    .then(|| std::path::Path::new(&config.journal.data_dir).join("idempotency-epoch"));
                let check = trust::Check::new(marker, period, settings.redis_wait_replicas > 0);
                // Suspect until the first check has passed: a request served before it would
                // otherwise trust a store nobody has looked at yet.
                redis.trust().raise();
                (Arc::clone(redis.trust()), Some(tokio::sync::Mutex::new(check)))
            }
            Store::Memory(_) => (Arc::default(), None),
        };
        Self {
            trust,
            check,
            looks_up: !period.is_zero(),
            stream: config.stream.clone(),
            store,
            mode: config.idempotency.dedup,
            on_error: config.idempotency.dedup_on_store_error,
            pending_wait: Duration::from_millis(config.idempotency.dedup_pending_wait_ms),
            terms: Terms {
                lease: Duration::from_millis(config.idempotency.dedup_lease_ms),
                window: Duration::from_millis(config.idempotency.dedup_window_ms),
                prefix: config.idempotency.dedup_key_prefix.clone().into_bytes(),
            },
            offsets: OffsetTerms {
                ttl: Duration::from_secs(config.idempotency.producer_offset_ttl_s),
                max_partitions: config.idempotency.producer_max_partitions,
            },
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self.store, Store::Memory(_))
    }

    /// Whether the ids the store calls fresh must be looked up in ClickHouse before they are
    /// written: the store may have forgotten ids it once committed ([`trust`]).
    pub fn unsure(&self) -> bool {
        self.looks_up && self.mode == DedupMode::Event && self.trust.unsure(now_ms())
    }

    pub fn trust(&self) -> &trust::Trust {
        &self.trust
    }

    /// Reads the store's signs of loss once, and acts on them (see [`trust`]); nothing for
    /// the embedded store.
    pub async fn check_store(&self) {
        let (Store::Redis(store), Some(check)) = (&self.store, &self.check) else { return };
        let mut check = check.lock().await;
        match check.run(&store.epoch_groups(&self.terms.prefix), &self.trust, now_ms()).await {
            Ok(found) => {
                if check.failing {
                    check.failing = false;
                    tracing::info!(stream = %self.stream, "the idempotency store can be checked again");
                }
                for sign in found {
                    metrics::store_lost(&self.stream, sign.as_str());
                    tracing::warn!(
                        stream = %self.stream,
                        sign = sign.as_str(),
                        until = ?self.trust.lookup_until(now_ms()),
                        "the idempotency store lost keys: ids it calls fresh are looked up in ClickHouse until then"
                    );
                }
            }
            Err(error) if !check.failing => {
                check.failing = true;
                tracing::warn!(
                    stream = %self.stream,
                    %error,
                    "the idempotency store cannot be checked: ids it calls fresh are looked up in ClickHouse until it can"
                );
            }
            Err(_) => {}
        }
        metrics::lookup_active(&self.stream, self.unsure());
    }

    /// Checks the store every [`trust::CHECK_EVERY`] for as long as it is in use.
    pub fn watch(self: &Arc<Self>) {
        if self.check.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(trust::CHECK_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(idempotency) = weak.upgrade() else { break };
                idempotency.check_store().await;
            }
        });
    }

    /// Key of an event id, as the stores keep it: the id's 16 UUID bytes (any spelling of one
    /// UUID is one key), or the id's text when it is not a UUID.
    pub fn event_key(id: &str) -> Vec<u8> {
        match uuid::Uuid::parse_str(id) {
            Ok(uuid) => uuid.as_bytes().to_vec(),
            Err(_) => id.as_bytes().to_vec(),
        }
    }

    /// Scopes `text` (an `Idempotency-Key` or a producer id) to the API key `owner` names:
    /// `<owner>\x01<text>`. Header values cannot hold `\x01` and key names hold none, so a
    /// scoped text never equals an unscoped one or one of another owner: no key can replay
    /// another's answers or move its offsets. Event ids are not scoped: the journal finds rows
    /// in the destination by id, so ids are the stream's (docs/streams.md).
    pub fn scoped(owner: Option<&str>, text: String) -> String {
        match owner {
            Some(owner) => format!("{owner}\x01{text}"),
            None => text,
        }
    }

    fn request_key(&self, key: &str) -> Vec<u8> {
        [self.terms.prefix.as_slice(), b"r:", key.as_bytes()].concat()
    }

    fn offsets_key(&self, producer: &str) -> Vec<u8> {
        [self.terms.prefix.as_slice(), b"o:", producer.as_bytes()].concat()
    }

    /// Fresh reservation tokens for one request, one per partition (a request's partitions are
    /// flushed, so committed or released, separately).
    pub fn new_tokens(partitions: usize) -> Vec<Vec<u8>> {
        let base = rand::random::<u64>().to_le_bytes();
        (0..partitions)
            .map(|p| {
                let mut token = Vec::with_capacity(TOKEN_BYTES);
                token.extend_from_slice(&base);
                token.extend_from_slice(&(p as u16).to_le_bytes());
                token
            })
            .collect()
    }

    /// Keys of the reservations' token statuses.
    fn status_keys(&self, reservations: &[Reservation]) -> Vec<Vec<u8>> {
        reservations.iter().map(|r| self.terms.status_key(&r.token)).collect()
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = fut.await;
        metrics::idempotency(op, started.elapsed(), result.is_ok());
        if let Err(error) = &result {
            // Redis may be restarting empty: until a check has passed, its answers are looked
            // behind.
            self.trust.raise();
            tracing::warn!(op, %error, "idempotency store call failed");
        }
        result
    }

    /// Reserves each key `(t, key)` for `tokens[t]`; one round trip (shared with concurrent
    /// requests on Redis).
    pub async fn reserve(&self, tokens: &[Vec<u8>], keys: &[(usize, Vec<u8>)]) -> Result<Vec<KeyState>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.timed("reserve", async {
            match &self.store {
                Store::Redis(s) => s.reserve(tokens, keys, &self.terms).await,
                Store::Memory(s) => Ok(s.reserve(tokens, keys, &self.terms)),
            }
        })
        .await
    }

    /// Marks the events reserved under these tokens as written, for the dedup window.
    pub async fn commit(&self, reservations: &[Reservation]) -> Result<(), StoreError> {
        if reservations.is_empty() {
            return Ok(());
        }
        let status = self.status_keys(reservations);
        self.timed("commit", async {
            match &self.store {
                Store::Redis(s) => s.set_many(&status, COMMITTED, self.terms.window).await,
                Store::Memory(s) => {
                    for key in &status {
                        s.set(key, COMMITTED, self.terms.window);
                    }
                    Ok(())
                }
            }
        })
        .await
    }

    /// [`Self::commit`], retried for [`commit_budget`] (a Redis failover takes seconds): the
    /// events are written, and while their tokens are uncommitted a producer's retry of them
    /// waits as pending, but once the lease ends it would write them again.
    pub async fn commit_with_retries(&self, reservations: &[Reservation]) -> Result<(), StoreError> {
        let deadline = Instant::now() + commit_budget(self.terms.lease);
        let mut pause = Duration::from_millis(50);
        loop {
            match self.commit(reservations).await {
                Err(_) if Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                result => return result,
            }
        }
    }

    /// Voids the reservations, so a retry can write the events at once.
    pub async fn release(&self, reservations: &[Reservation]) -> Result<(), StoreError> {
        if reservations.is_empty() {
            return Ok(());
        }
        let status = self.status_keys(reservations);
        let ttl = self.terms.released_ttl();
        self.timed("release", async {
            match &self.store {
                Store::Redis(s) => s.set_many(&status, RELEASED, ttl).await,
                Store::Memory(s) => {
                    for key in &status {
                        s.set(key, RELEASED, ttl);
                    }
                    Ok(())
                }
            }
        })
        .await
    }

    /// Claims a request-level key for a body with hash `body_hash`, or reports its state.
    pub async fn begin_request(&self, key: &str, body_hash: &str) -> Result<RequestState, StoreError> {
        let store_key = self.request_key(key);
        let mut pending = vec![PENDING];
        pending.extend_from_slice(body_hash.as_bytes());
        let existing = self
            .timed("request_begin", async {
                match &self.store {
                    Store::Redis(s) => s.set_nx_or_get(&store_key, &pending, self.terms.lease).await,
                    Store::Memory(s) => Ok(s.set_nx_or_get(&store_key, &pending, self.terms.lease)),
                }
            })
            .await?;
        Ok(match existing {
            None => RequestState::New,
            Some(value) if value.first() == Some(&PENDING) => {
                RequestState::InFlight { same_body: value[1..] == *body_hash.as_bytes() }
            }
            Some(value) if value.first() == Some(&DONE) => match serde_json::from_slice::<StoredAnswer>(&value[1..]) {
                Ok(answer) => RequestState::Done {
                    same_body: answer.h == body_hash,
                    status: answer.s,
                    body: answer.b.into_bytes(),
                },
                Err(e) => return Err(StoreError::Backend(format!("unreadable stored answer: {e}"))),
            },
            Some(_) => return Err(StoreError::Backend("unexpected value under a request key".into())),
        })
    }

    /// Stores the answer to replay for the dedup window.
    pub async fn finish_request(&self, key: &str, body_hash: &str, status: u16, body: &[u8]) -> Result<(), StoreError> {
        let answer =
            StoredAnswer { h: body_hash.to_string(), s: status, b: String::from_utf8_lossy(body).into_owned() };
        let mut value = vec![DONE];
        value.extend_from_slice(&serde_json::to_vec(&answer).map_err(|e| StoreError::Backend(e.to_string()))?);
        let store_key = self.request_key(key);
        self.timed("request_finish", async {
            match &self.store {
                Store::Redis(s) => s.set(&store_key, &value, self.terms.window).await,
                Store::Memory(s) => {
                    s.set(&store_key, &value, self.terms.window);
                    Ok(())
                }
            }
        })
        .await
    }

    /// Forgets a request key whose answer must not be replayed (a 503: the retry should run).
    pub async fn abandon_request(&self, key: &str, body_hash: &str) -> Result<(), StoreError> {
        let mut pending = vec![PENDING];
        pending.extend_from_slice(body_hash.as_bytes());
        let store_key = self.request_key(key);
        self.timed("request_abandon", async {
            match &self.store {
                Store::Redis(s) => s.delete_if(&store_key, &pending).await,
                Store::Memory(s) => {
                    s.delete_if(&store_key, &pending);
                    Ok(())
                }
            }
        })
        .await
    }

    /// The committed offset of a producer's partition, and how many partitions the producer
    /// has offsets for.
    pub async fn offset(&self, producer: &str, partition: u32) -> Result<Committed, StoreError> {
        let key = self.offsets_key(producer);
        self.timed("offset_get", async {
            match &self.store {
                Store::Redis(s) => s.offset(&key, partition).await,
                Store::Memory(s) => Ok(s.offset(&key, partition)),
            }
        })
        .await
    }

    /// Whether a producer with `committed` may commit an offset for a partition it has none
    /// for yet: at most `producer_max_partitions` partitions per producer id.
    pub fn partition_allowed(&self, committed: &Committed) -> Result<(), u32> {
        let limit = self.offsets.max_partitions;
        if committed.offset.is_none() && committed.partitions >= limit as usize { Err(limit) } else { Ok(()) }
    }

    /// Moves a partition's committed offset forward to `offset` (never back), and keeps the
    /// producer's offsets for `producer_offset_ttl_s` from now.
    pub async fn advance_offset(&self, producer: &str, partition: u32, offset: u64) -> Result<bool, StoreError> {
        let key = self.offsets_key(producer);
        let terms = self.offsets;
        self.timed("offset_advance", async {
            match &self.store {
                Store::Redis(s) => s.advance_offset(&key, partition, offset, terms).await,
                Store::Memory(s) => Ok(s.advance_offset(&key, partition, offset, terms)),
            }
        })
        .await
    }

    /// Every committed offset of a producer, by partition.
    pub async fn offsets(&self, producer: &str) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let key = self.offsets_key(producer);
        self.timed("offsets", async {
            match &self.store {
                Store::Redis(s) => s.offsets(&key).await,
                Store::Memory(s) => Ok(s.offsets(&key)),
            }
        })
        .await
    }
}

/// How long a failed commit is retried: well inside the lease (half of it, at most 10 s; the
/// partition's next flush waits meanwhile).
fn commit_budget(lease: Duration) -> Duration {
    (lease / 2).min(Duration::from_secs(10))
}

/// What a producer's committed offsets are kept under.
#[derive(Debug, Clone, Copy)]
pub struct OffsetTerms {
    /// From the last write.
    pub ttl: Duration,
    /// Partitions per producer id.
    pub max_partitions: u32,
}

/// A producer's committed offset for one partition, and its number of partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    pub offset: Option<u64>,
    pub partitions: usize,
}

/// How long reservations and commits last, and where the keys live.
#[derive(Debug, Clone)]
pub struct Terms {
    /// Of a pending token: how long a reservation outlives a gateway that died holding it.
    pub lease: Duration,
    /// Of a committed token (and so of what its event keys mean).
    pub window: Duration,
    /// Of every key: `<prefix>t:<token>` is a token's status.
    pub prefix: Vec<u8>,
}

impl Terms {
    fn status_key(&self, token: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), b"t:", token].concat()
    }

    /// A released status outlives every lease of its token's ids (their lease ends were
    /// stamped before the release, by a clock that may run a little apart).
    fn released_ttl(&self) -> Duration {
        self.lease * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idem() -> Idempotency {
        Idempotency::new(Store::Memory(MemoryStore::default()), &Config::default())
    }

    #[test]
    fn a_holder_is_decided_by_its_status_then_its_lease() {
        use HolderState::*;
        for lease_over in [false, true] {
            assert_eq!(holder_state(Some(COMMITTED), lease_over), Committed);
            assert_eq!(holder_state(Some(RELEASED), lease_over), Void);
        }
        assert_eq!(holder_state(None, false), Pending);
        assert_eq!(holder_state(None, true), Void);
        assert_eq!(holder_state(Some(b"p"), false), Pending, "a status of the previous layout");
    }

    #[test]
    fn commits_are_retried_well_inside_the_lease() {
        assert_eq!(commit_budget(Duration::from_secs(60)), Duration::from_secs(10));
        assert_eq!(commit_budget(Duration::from_secs(4)), Duration::from_secs(2));
    }

    #[test]
    fn keys_are_compact_and_spelling_independent() {
        let a = Idempotency::event_key("018f2b6e-1d2c-7a3b-9c4d-5e6f708192a3");
        assert_eq!(a, Idempotency::event_key("018F2B6E1D2C7A3B9C4D5E6F708192A3"));
        assert_eq!(a.len(), 16);
        assert_eq!(Idempotency::event_key("order-17"), b"order-17".to_vec());
    }

    #[tokio::test]
    async fn memory_store_semantics() {
        let idem = idem();
        // Request 1 puts k1 in partition 0 and k2 in partition 1; request 2 wants both.
        let (t1, t2) = (Idempotency::new_tokens(2), Idempotency::new_tokens(1));
        assert_ne!(t1[0], t1[1]);
        let keys1 = vec![(0, b"k1".to_vec()), (1, b"k2".to_vec())];
        let keys2 = vec![(0, b"k1".to_vec()), (0, b"k2".to_vec())];
        assert_eq!(idem.reserve(&t1, &keys1).await.unwrap(), [KeyState::Reserved, KeyState::Reserved]);
        assert_eq!(idem.reserve(&t2, &keys2).await.unwrap(), [KeyState::Pending, KeyState::Pending]);
        assert_eq!(idem.reserve(&t1, &keys1).await.unwrap(), [KeyState::Reserved, KeyState::Reserved], "ours");
        // Partition 0's flush succeeds, partition 1's fails.
        idem.commit(&[Reservation { token: t1[0].clone() }]).await.unwrap();
        idem.release(&[Reservation { token: t1[1].clone() }]).await.unwrap();
        assert_eq!(idem.reserve(&t2, &keys2).await.unwrap(), [KeyState::Committed, KeyState::Reserved]);
        assert!(idem.advance_offset("p", 0, 10).await.unwrap());
        assert!(!idem.advance_offset("p", 0, 9).await.unwrap());
        assert!(idem.advance_offset("p", 0, u64::MAX).await.unwrap());
        assert_eq!(idem.offset("p", 0).await.unwrap(), Committed { offset: Some(u64::MAX), partitions: 1 });
        assert_eq!(idem.begin_request("r", "h1").await.unwrap(), RequestState::New);
        assert_eq!(idem.begin_request("r", "h1").await.unwrap(), RequestState::InFlight { same_body: true });
        idem.finish_request("r", "h1", 200, b"{}").await.unwrap();
        assert_eq!(
            idem.begin_request("r", "h2").await.unwrap(),
            RequestState::Done { same_body: false, status: 200, body: b"{}".to_vec() }
        );
    }
}
