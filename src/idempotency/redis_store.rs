//! The Redis store, on one primary or a Redis Cluster: every call bounded by a timeout, each
//! multi-key step one round trip per node (a Lua script, a pipeline, or on a cluster one
//! command per key sent in parallel), and each write optionally confirmed by `WAIT`.
//!
//! Key layout (prefix `bg:` by default):
//! - `bg:{<tag>}h:<slot>`: per id *group* (the id's CRC-32 modulo `redis_key_groups`, each
//!   with its own hash tag, see [`super::groups`]) and per *slot* of time, `floor(Redis TIME /
//!   window)`: a hash of event id (its 16 UUID bytes, or its text) → the token that reserved
//!   it followed by the end of its lease (6 bytes, Redis milliseconds). Reservations look in the
//!   current and the previous slot, so an id is seen for at least one window after it was
//!   reserved; the first write of a slot `UNLINK`s the slot before those, and every hash also
//!   expires three windows on as a backstop.
//! - `bg:t:<token>` per request and partition, written once its flush is settled: `c`
//!   (committed, TTL = window) or `r` (released, TTL = two leases). An id held by a token with
//!   no status is pending until its lease ends, void after. Nothing is written per token when
//!   reserving: a fresh id costs one hash field.
//! - `bg:r:<key>` per `Idempotency-Key`; `bg:o:<producer>` a hash of partition → committed
//!   offset, kept `producer_offset_ttl_s` after its last write. Each is one key, so one slot.
//!
//! Needs Redis 4.0 or later (`UNLINK`, many-field `HSET`, writes after `TIME` with effects
//! replication).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::Script;
use tokio::sync::{mpsc, oneshot};

use super::groups::{group_of, tags};
use super::redis_conn::{Connection, client, first_node};
use super::reserve_queue::{self, ReserveJob, ReserveQueue, Seen, replicated};
use super::trust::{EPOCH_SUFFIX, Groups, Trust};
use super::{Committed, HolderState, KeyState, OffsetTerms, StoreError, TOKEN_BYTES, Terms, holder_state};
use crate::config::Config;

const DELETE_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

const SET_NX_OR_GET: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
";

/// Offsets are decimal u64 strings: compare by length, then lexically (no float rounding).
/// Moves a partition's offset forward (never back) and keeps the hash `ARGV[3]` ms from now.
/// Offsets are decimal text of at most 19 digits: longer is larger, else compared as text.
const ADVANCE_OFFSET: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
local new = ARGV[2]
local moved = 0
if current == false or #new > #current or (#new == #current and new > current) then
  redis.call('HSET', KEYS[1], ARGV[1], new)
  moved = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return moved
";

pub struct RedisStore {
    connection: Connection,
    timeout: Duration,
    /// Replicas each write must reach, and how long to wait for them.
    wait: Option<(u32, Duration)>,
    /// Hash tag of each id group.
    tags: Vec<String>,
    reserve: Script,
    take_over: Script,
    /// The batching task's queue, started on first use (it needs a runtime); the task ends
    /// when the store is dropped.
    reservations: OnceLock<mpsc::Sender<ReserveJob>>,
    delete_if: Script,
    set_nx_or_get: Script,
    advance_offset: Script,
    /// Whether what the store says can be trusted (see [`super::trust`]).
    trust: Arc<Trust>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.connection.is_cluster())
            .field("timeout", &self.timeout)
            .field("groups", &self.tags.len())
            .finish_non_exhaustive()
    }
}

/// Id groups: as configured, else one on a single primary (a script call per batch touches
/// each group's hashes, so more groups only cost there) and 16 on a cluster (enough to spread
/// over 16 primaries; more for a larger cluster).
fn key_groups(configured: u16, cluster: bool) -> u16 {
    match (configured, cluster) {
        (0, false) => 1,
        (0, true) => 16,
        (n, _) => n,
    }
}

fn backend(e: &redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisStore {
    /// Connects lazily: the gateway starts even when Redis is down, and reconnects by itself.
    /// Default groups, no `WAIT`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let defaults = Config::default();
        Self::with(url, timeout, defaults.idempotency.redis_key_groups, None)
    }

    /// The store `config` describes.
    pub fn from_config(config: &Config) -> Result<Self, StoreError> {
        let wait = (config.idempotency.redis_wait_replicas > 0).then(|| {
            (config.idempotency.redis_wait_replicas, Duration::from_millis(config.idempotency.redis_wait_timeout_ms))
        });
        Self::with(
            &config.idempotency.redis_url,
            Duration::from_millis(config.idempotency.redis_timeout_ms),
            config.idempotency.redis_key_groups,
            wait,
        )
    }

    fn with(url: &str, timeout: Duration, groups: u16, wait: Option<(u32, Duration)>) -> Result<Self, StoreError> {
        // A write that waits for replicas has that long on top of its own bound.
        let timeout = timeout + wait.map_or(Duration::ZERO, |(_, t)| t);
        let connection = Connection::open(url, timeout)?;
        let groups = key_groups(groups, connection.is_cluster());
        Ok(Self {
            connection,
            timeout,
            wait,
            tags: tags(groups),
            reserve: reserve_queue::reserve_script(),
            take_over: reserve_queue::take_over_script(),
            reservations: OnceLock::new(),
            delete_if: Script::new(DELETE_IF),
            set_nx_or_get: Script::new(SET_NX_OR_GET),
            advance_offset: Script::new(ADVANCE_OFFSET),
            trust: Arc::default(),
        })
    }

    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// The id groups' epochs and primaries, under `prefix`, as the store's check reads them.
    pub(crate) fn epoch_groups<'a>(&'a self, prefix: &'a [u8]) -> EpochGroups<'a> {
        EpochGroups { store: self, prefix }
    }

    pub fn is_cluster(&self) -> bool {
        self.connection.is_cluster()
    }

    /// Base name of a group's keys: `<prefix>{<tag>}`.
    fn base(&self, prefix: &[u8], group: usize) -> Vec<u8> {
        let tag = self.tags.get(group).map_or("", String::as_str);
        [prefix, b"{", tag.as_bytes(), b"}"].concat()
    }

    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| backend(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Runs `write` on a clone of the connection, then, when configured, `WAIT`s for the
    /// replicas of the primary holding `key`.
    async fn write<T, F>(&self, key: &[u8], write: impl FnOnce(Connection) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let mut connection = self.connection.clone();
        let value = self.bounded(write(connection.clone())).await?;
        if let Some((replicas, timeout)) = self.wait {
            replicated(self.bounded(connection.wait(key, replicas, timeout)).await?, replicas)?;
        }
        Ok(value)
    }

    /// Reserves each key for its token: the next batched call, then the ids found held by
    /// other tokens settled by their holders' statuses.
    pub async fn reserve(
        &self,
        tokens: &[Vec<u8>],
        keys: &[(usize, Vec<u8>)],
        terms: &Terms,
    ) -> Result<Vec<KeyState>, StoreError> {
        let seen = self.batched(tokens, keys, terms).await?;
        let holders: Vec<&[u8]> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Held { value, .. } => value.get(..TOKEN_BYTES),
                Seen::Reserved => None,
            })
            .collect();
        if holders.is_empty() {
            return Ok(vec![KeyState::Reserved; seen.len()]);
        }
        let statuses = self.statuses(&holders, terms).await?;
        let settle = seen.iter().zip(keys).map(|(seen, (t, key))| {
            let status = match seen {
                Seen::Held { value, lease_over } => {
                    let status = value.get(..TOKEN_BYTES).and_then(|h| statuses.get(h)).and_then(Option::as_deref);
                    Some((value, holder_state(status, *lease_over)))
                }
                Seen::Reserved => None,
            };
            async move {
                match status {
                    None => Ok(KeyState::Reserved),
                    Some((_, HolderState::Committed)) => Ok(KeyState::Committed),
                    Some((_, HolderState::Pending)) => Ok(KeyState::Pending),
                    Some((value, HolderState::Void)) => self.take_over_key(key, value, &tokens[*t], terms).await,
                }
            }
        });
        futures_util::future::try_join_all(settle).await
    }

    async fn batched(&self, tokens: &[Vec<u8>], keys: &[(usize, Vec<u8>)], terms: &Terms) -> reserve_queue::Answer {
        let queue = self.reservations.get_or_init(|| {
            let (tx, rx) = mpsc::channel(reserve_queue::MAX_QUEUED_JOBS);
            // One store serves one `Idempotency`, so every call has the same terms.
            let bases = (0..self.tags.len()).map(|g| self.base(&terms.prefix, g)).collect();
            let batcher = ReserveQueue {
                connection: self.connection.clone(),
                script: self.reserve.clone(),
                timeout: self.timeout,
                terms: terms.clone(),
                bases: Arc::new(bases),
                wait: self.wait,
                trust: Arc::clone(&self.trust),
            };
            tokio::spawn(Arc::new(batcher).run(rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let job = ReserveJob::new(tokens, keys, reply);
        // Queueing for a free call plus our batch's own.
        let bound = self.timeout * 3;
        let outcome = tokio::time::timeout(bound, async {
            queue.send(job).await.map_err(|_| StoreError::Backend("the reservation task stopped".into()))?;
            answer.await.map_err(|_| StoreError::Backend("the reservation task stopped".into()))?
        })
        .await;
        outcome.unwrap_or(Err(StoreError::Timeout(bound)))
    }

    /// The status of each distinct holder token.
    async fn statuses(
        &self,
        holders: &[&[u8]],
        terms: &Terms,
    ) -> Result<HashMap<Vec<u8>, Option<Vec<u8>>>, StoreError> {
        let mut distinct: Vec<&[u8]> = holders.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let keys: Vec<Vec<u8>> = distinct.iter().map(|token| terms.status_key(token)).collect();
        let values = self.get_many(&keys).await?;
        Ok(distinct.into_iter().map(<[u8]>::to_vec).zip(values).collect())
    }

    /// Takes over an id whose holder's reservation is void, unless another request got there first.
    async fn take_over_key(
        &self,
        key: &[u8],
        held: &[u8],
        token: &[u8],
        terms: &Terms,
    ) -> Result<KeyState, StoreError> {
        let base = self.base(&terms.prefix, group_of(key, self.tags.len() as u16));
        let mut invocation = self.take_over.prepare_invoke();
        invocation
            .key(base.as_slice())
            .arg(terms.lease.as_millis() as u64)
            .arg(terms.window.as_millis() as u64)
            .arg(key)
            .arg(held)
            .arg(token);
        let code: u8 = self.write(&base, |mut c| async move { invocation.invoke_async(&mut c).await }).await?;
        Ok(if code == 0 { KeyState::Reserved } else { KeyState::Pending })
    }

    /// Every key's value: one `MGET` on a primary, one `GET` per key in parallel on a cluster
    /// (the keys are in different slots).
    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if !self.connection.is_cluster() {
            let mut cmd = redis::cmd("MGET");
            cmd.arg(keys);
            let mut connection = self.connection.clone();
            return self.bounded(cmd.query_async(&mut connection)).await;
        }
        let gets = keys.iter().map(|key| {
            let mut connection = self.connection.clone();
            async move { redis::cmd("GET").arg(key.as_slice()).query_async(&mut connection).await }
        });
        self.bounded(futures_util::future::try_join_all(gets)).await
    }

    /// Sets every key to `value` with a TTL: one pipeline on a primary, one `SET` per key in
    /// parallel on a cluster; each confirmed by `WAIT` when configured.
    pub async fn set_many(&self, keys: &[Vec<u8>], value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        if !self.connection.is_cluster() {
            let Some(first) = keys.first() else { return Ok(()) };
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("SET").arg(key.as_slice()).arg(value).arg("PX").arg(ttl.as_millis() as u64).ignore();
            }
            return self.write(first, |mut c| async move { pipe.query_async::<()>(&mut c).await }).await;
        }
        let sets = keys.iter().map(|key| self.set(key, value, ttl));
        futures_util::future::try_join_all(sets).await.map(drop)
    }

    /// Deletes `key` if it still holds `value`.
    pub async fn delete_if(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut invocation = self.delete_if.prepare_invoke();
        invocation.key(key).arg(value);
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async::<u64>(&mut connection)).await.map(drop)
    }

    pub async fn set_nx_or_get(&self, key: &[u8], value: &[u8], ttl: Duration) -> Result<Option<Vec<u8>>, StoreError> {
        let mut invocation = self.set_nx_or_get.prepare_invoke();
        invocation.key(key).arg(value).arg(ttl.as_millis() as u64);
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async(&mut connection)).await
    }

    pub async fn set(&self, key: &[u8], value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ttl.as_millis() as u64);
        self.write(key, |mut c| async move { cmd.query_async::<()>(&mut c).await }).await
    }

    pub async fn offset(&self, key: &[u8], partition: u32) -> Result<Committed, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(key).arg(partition).cmd("HLEN").arg(key);
        let mut connection = self.connection.clone();
        let (offset, partitions): (Option<u64>, usize) = self.bounded(pipe.query_async(&mut connection)).await?;
        Ok(Committed { offset, partitions })
    }

    pub async fn advance_offset(
        &self,
        key: &[u8],
        partition: u32,
        offset: u64,
        terms: OffsetTerms,
    ) -> Result<bool, StoreError> {
        let mut invocation = self.advance_offset.prepare_invoke();
        let ttl_ms = u64::try_from(terms.ttl.as_millis()).unwrap_or(u64::MAX);
        invocation.key(key).arg(partition).arg(offset.to_string()).arg(ttl_ms);
        let moved: u8 = self.write(key, |mut c| async move { invocation.invoke_async(&mut c).await }).await?;
        Ok(moved == 1)
    }

    pub async fn offsets(&self, key: &[u8]) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(key);
        let mut connection = self.connection.clone();
        self.bounded(cmd.query_async(&mut connection)).await
    }
}

/// A store's id groups under one prefix: each group's epoch key (`<prefix>{<tag>}e`, in the
/// group's slot) and the primary that holds it.
pub(crate) struct EpochGroups<'a> {
    store: &'a RedisStore,
    prefix: &'a [u8],
}

impl EpochGroups<'_> {
    fn key(&self, group: usize) -> Vec<u8> {
        [self.store.base(self.prefix, group).as_slice(), EPOCH_SUFFIX].concat()
    }
}

impl Groups for EpochGroups<'_> {
    fn groups(&self) -> usize {
        self.store.tags.len()
    }

    async fn read(&self, group: usize) -> Result<(Option<Vec<u8>>, String), StoreError> {
        let key = self.key(group);
        let mut connection = self.store.connection.clone();
        let epoch = self.store.bounded(redis::cmd("GET").arg(key.as_slice()).query_async(&mut connection)).await?;
        // A user without `INFO` (an ACL without @dangerous, a managed service that renamed it)
        // still has its epochs read; restarts and evictions are then seen by them alone.
        let info = match self.store.bounded(connection.info_of(&key)).await {
            Err(StoreError::Backend(refusal)) if refusal.contains("NOPERM") || refusal.contains("unknown command") => {
                String::new()
            }
            info => info?,
        };
        Ok((epoch, info))
    }

    async fn write(&self, group: usize, epoch: &str, only_if_none: bool) -> Result<Vec<u8>, StoreError> {
        let key = self.key(group);
        let mut set = redis::cmd("SET");
        set.arg(key.as_slice()).arg(epoch);
        if only_if_none {
            set.arg("NX");
        }
        self.store.write(&key, |mut c| async move { set.query_async::<()>(&mut c).await }).await?;
        let mut connection = self.store.connection.clone();
        let held: Option<Vec<u8>> =
            self.store.bounded(redis::cmd("GET").arg(key.as_slice()).query_async(&mut connection)).await?;
        Ok(held.unwrap_or_default())
    }
}

/// What `buffergate check` reads from a Redis server.
#[derive(Debug, Clone, Default)]
pub struct ServerFacts {
    pub version: String,
    /// From `CONFIG GET`; `None` where the server refuses it (managed services often do).
    pub lazyfree_lazy_expire: Option<String>,
    pub maxmemory: Option<u64>,
    pub maxmemory_policy: Option<String>,
}

impl ServerFacts {
    /// Major and minor version.
    pub fn version(&self) -> Option<(u32, u32)> {
        let mut parts = self.version.trim().split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    }
}

/// Reads the server's version and the settings deduplication depends on.
/// On a cluster, of its first seed node (the settings apply to every node alike).
pub async fn server_facts(url: &str, timeout: Duration) -> Result<ServerFacts, StoreError> {
    facts_of(&first_node(url)?, timeout).await
}

/// The facts of every primary: the one server, or each primary of a Redis Cluster as the
/// first seed's `CLUSTER NODES` lists them (each with the seed's scheme and credentials).
pub async fn primaries_facts(
    url: &str,
    timeout: Duration,
) -> Result<Vec<(String, Result<ServerFacts, StoreError>)>, StoreError> {
    let seed = match super::redis_conn::topology(url)? {
        super::redis_conn::Topology::Single(node) => {
            let facts = facts_of(&node, timeout).await;
            return Ok(vec![(node, facts)]);
        }
        super::redis_conn::Topology::Cluster(seeds) => {
            seeds.into_iter().next().ok_or_else(|| StoreError::Config("no seed".into()))?
        }
    };
    let listing = async {
        let mut connection = client(&seed)?.get_multiplexed_async_connection().await.map_err(|e| backend(&e))?;
        redis::cmd("CLUSTER").arg("NODES").query_async::<String>(&mut connection).await.map_err(|e| backend(&e))
    };
    let nodes = tokio::time::timeout(timeout, listing).await.map_err(|_| StoreError::Timeout(timeout))??;
    let mut out = Vec::new();
    for address in cluster_primaries(&nodes) {
        let node = with_address(&seed, &address);
        let facts = facts_of(&node, timeout).await;
        out.push((address, facts));
    }
    Ok(out)
}

/// The `host:port` of every primary that is not failing, from `CLUSTER NODES`.
fn cluster_primaries(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let primary = flags.split(',').any(|f| f == "master") && !flags.contains("fail");
            primary.then(|| fields.get(1)?.split(['@', ',']).next().map(String::from)).flatten()
        })
        .collect()
}

/// `seed` (`redis://[user:pass@]host:port[/db]`) pointing at `address` instead.
fn with_address(seed: &str, address: &str) -> String {
    let (scheme, rest) = seed.split_once("://").unwrap_or(("redis", seed));
    let (auth, hostpart) = rest.rsplit_once('@').map_or(("", rest), |(a, h)| (a, h));
    let path = hostpart.find('/').map_or("", |i| &hostpart[i..]);
    let auth = if auth.is_empty() { String::new() } else { format!("{auth}@") };
    format!("{scheme}://{auth}{address}{path}")
}

async fn facts_of(node: &str, timeout: Duration) -> Result<ServerFacts, StoreError> {
    let client = client(node)?;
    let facts = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await?;
        let version =
            info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or_default().trim().to_string();
        let mut config = async |name: &str| {
            let pair: redis::RedisResult<Vec<String>> =
                redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut connection).await;
            pair.ok().and_then(|pair| pair.into_iter().nth(1))
        };
        Ok::<_, redis::RedisError>(ServerFacts {
            version,
            lazyfree_lazy_expire: config("lazyfree-lazy-expire").await,
            maxmemory: config("maxmemory").await.and_then(|v| v.parse().ok()),
            maxmemory_policy: config("maxmemory-policy").await,
        })
    };
    match tokio::time::timeout(timeout, facts).await {
        Ok(result) => result.map_err(|e| backend(&e)),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_on_a_primary_sixteen_on_a_cluster_unless_configured() {
        assert_eq!((key_groups(0, false), key_groups(0, true)), (1, 16));
        assert_eq!((key_groups(64, false), key_groups(64, true)), (64, 64));
    }

    #[test]
    fn every_live_primary_of_a_cluster_is_checked() {
        let nodes = "a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7002@17002,host-b master - 0 0 2 connected 5461-10922\n\
                     c3 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected\n\
                     d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected\n";
        assert_eq!(cluster_primaries(nodes), ["127.0.0.1:7001", "127.0.0.1:7002"]);
        assert_eq!(with_address("rediss://u:p@h1:6379/0", "10.0.0.2:7000"), "rediss://u:p@10.0.0.2:7000/0");
        assert_eq!(with_address("redis://h1:6379", "10.0.0.2:7000"), "redis://10.0.0.2:7000");
    }

    #[test]
    fn versions_read_as_major_and_minor() {
        let facts = |v: &str| ServerFacts { version: v.into(), ..ServerFacts::default() };
        assert_eq!(facts("7.0.15").version(), Some((7, 0)));
        assert_eq!(facts("3.2").version(), Some((3, 2)));
        assert_eq!(facts("").version(), None);
    }

    #[tokio::test]
    async fn sentinel_and_bare_host_lists_are_refused_clearly() {
        for url in ["redis+sentinel://h:26379/mymaster", "redis://a:6379,b:6379"] {
            let Err(StoreError::Config(message)) = RedisStore::new(url, Duration::from_secs(1)) else {
                panic!("{url} accepted")
            };
            assert!(message.contains("cluster") || message.contains("Sentinel"), "{message}");
        }
        assert!(RedisStore::new("redis://127.0.0.1:1/0", Duration::from_secs(1)).is_ok(), "connects lazily");
        assert!(RedisStore::new("redis+cluster://127.0.0.1:1,127.0.0.1:2", Duration::from_secs(1)).is_ok());
    }
}
