//! The Redis store: one connection manager (reconnects by itself), every call bounded by a
//! timeout, and each multi-key step one round trip (a Lua script or a pipeline).
//!
//! Reservations, the one store call on every request's path, are batched across concurrent
//! requests: a single task sends one script call for everything queued while earlier calls were
//! in flight (group commit, up to two calls pipelined so Redis has the next one as soon as it
//! finishes one), so Redis runs one script per group of requests rather than one per request,
//! and no request waits for a timer.
//!
//! Key layout (prefix `bg:` by default):
//! - `bg:h:<slot>`: a hash of event id (its 16 UUID bytes, or its text) → the 10-byte token
//!   that reserved it, for every event reserved in one *slot*, `floor(Redis TIME / window)`.
//!   Reservations look in the current and the previous slot, so an id is seen for at least one
//!   window after it was reserved; the slot before those is `UNLINK`ed (freed off the main
//!   thread), with an expiry three windows on as a backstop. One hash field costs about 90
//!   bytes against about 150 for a key with its own TTL, and a reservation is two `HMGET`s and
//!   one `HSET` per few thousand events rather than one command per event.
//! - `bg:t:<token>` per request and partition: `p` (pending, TTL = lease) or `c` (committed,
//!   TTL = window). It decides what the ids holding the token mean, so the dedup window is
//!   counted from the commit, exactly.
//! - `bg:r:<key>` per `Idempotency-Key`; `bg:o:<producer>` a hash of partition → committed
//!   offset (no TTL).
//!
//! The reservation script derives key names (slots, token statuses) inside Redis, so it needs
//! one node: Redis Cluster and Sentinel URLs are refused. It needs Redis 4.0 or later (`UNLINK`,
//! many-field `HSET`, writes after `TIME` with effects replication).

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::{Arc, OnceLock};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use redis::{Client, IntoConnectionInfo, Script};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{KeyState, StoreError, Terms};

/// `ARGV[1..4]`: lease (ms), window (ms), key prefix, the number of tokens `T`; then the `T`
/// tokens, how many ids each reserves, and the ids, grouped by token in that order. Answers one
/// byte per id, in order: 0 reserved, 1 committed (a duplicate), 2 pending (another request
/// holds it).
///
/// The commands are per call, not per request or per id: one `MGET` of the statuses, two
/// `HMGET`s and one `HSET` per `CHUNK` ids (Lua's `unpack` stops at about 8,000 values).
const RESERVE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local lease, window, prefix, T = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local CHUNK = 2000
local time = redis.call('TIME')
local slot = math.floor((tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / window)
local function bucket(s) return prefix .. 'h:' .. string.format('%.0f', s) end
local current, previous = bucket(slot), bucket(slot - 1)
redis.call('UNLINK', bucket(slot - 2))
local function each_chunk(first, last, f)
  for from = first, last, CHUNK do f(from, math.min(from + CHUNK - 1, last)) end
end
-- The tokens' statuses: pending for the lease, unless already committed.
local statuses = {}
for t = 1, T do statuses[t] = prefix .. 't:' .. ARGV[4 + t] end
each_chunk(1, T, function(from, to)
  local states = redis.call('MGET', unpack(statuses, from, to))
  for t = from, to do
    if states[t - from + 1] ~= 'c' then redis.call('SET', statuses[t], 'p', 'PX', lease) end
  end
end)
local out, claimed, fresh = {}, {}, {}
local t, left = 1, tonumber(ARGV[4 + T + 1])
each_chunk(5 + 2 * T, #ARGV, function(from, to)
  local now = redis.call('HMGET', current, unpack(ARGV, from, to))
  local before = redis.call('HMGET', previous, unpack(ARGV, from, to))
  for j = from, to do
    while left == 0 do t = t + 1; left = tonumber(ARGV[4 + T + t]) end
    left = left - 1
    local id, token = ARGV[j], ARGV[4 + t]
    -- Newest first: this call's own claims, then the current slot, then the previous one.
    local holder = claimed[id] or now[j - from + 1] or before[j - from + 1]
    local code = 0
    if holder and holder ~= token then
      local state = redis.call('GET', prefix .. 't:' .. holder)
      if state == 'c' then code = 1
      elseif state == 'p' then code = 2
      -- Released, or its lease ran out: the reservation is void; take the id over.
      else holder = false end
    end
    if not holder then
      claimed[id] = token
      fresh[#fresh + 1] = id
      fresh[#fresh + 1] = token
    end
    out[#out + 1] = code
  end
end)
each_chunk(1, #fresh, function(from, to)
  redis.call('HSET', current, unpack(fresh, from, to))
end)
if #fresh > 0 then redis.call('PEXPIREAT', current, string.format('%.0f', (slot + 3) * window)) end
local codes = {}
each_chunk(1, #out, function(from, to) codes[#codes + 1] = string.char(unpack(out, from, to)) end)
return table.concat(codes)
";

/// Keys per batched reservation call, so one script never holds Redis for long (a single
/// request larger than this still goes alone, in one call): a commit, and the next call, wait
/// behind it. Calls of 2,048 with two in flight gave ~20% more events/s than calls of 4,096
/// one at a time on large batches with idempotency (docs/performance.md).
const MAX_BATCH_KEYS: usize = 2048;

/// Reservation calls in flight at once: while Redis runs one script the next is already
/// queued behind it on the connection, so Redis does not idle while the gateway hands out one
/// call's answers and builds the next.
const MAX_CALLS_IN_FLIGHT: usize = 2;

/// Reservations waiting for the batching task; beyond this, requests wait to queue.
const MAX_QUEUED_JOBS: usize = 1024;

/// One request's reservation, waiting for its batch.
struct ReserveJob {
    tokens: Vec<Vec<u8>>,
    /// The keys back to back: one allocation per request, not one per key.
    key_bytes: Vec<u8>,
    /// Per key: its token's index and where its bytes end in `key_bytes`.
    keys: Vec<(usize, usize)>,
    reply: oneshot::Sender<Result<Vec<KeyState>, StoreError>>,
}

impl ReserveJob {
    fn new(
        tokens: &[Vec<u8>],
        keys: &[(usize, Vec<u8>)],
        reply: oneshot::Sender<Result<Vec<KeyState>, StoreError>>,
    ) -> Self {
        let mut key_bytes = Vec::with_capacity(keys.iter().map(|(_, key)| key.len()).sum());
        let keys = keys
            .iter()
            .map(|(token, key)| {
                key_bytes.extend_from_slice(key);
                (*token, key_bytes.len())
            })
            .collect();
        Self { tokens: tokens.to_vec(), key_bytes, keys, reply }
    }

    /// The bytes of key `k`.
    fn key(&self, k: usize) -> &[u8] {
        let start = k.checked_sub(1).and_then(|before| self.keys.get(before)).map_or(0, |&(_, end)| end);
        let end = self.keys.get(k).map_or(start, |&(_, end)| end);
        self.key_bytes.get(start..end).unwrap_or_default()
    }
}

const DELETE_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

const SET_NX_OR_GET: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
";

/// Offsets are decimal u64 strings: compare by length, then lexically (no float rounding).
const ADVANCE_OFFSET: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
local new = ARGV[2]
if current == false or #new > #current or (#new == #current and new > current) then
  redis.call('HSET', KEYS[1], ARGV[1], new)
  return 1
end
return 0
";

pub struct RedisStore {
    connection: ConnectionManager,
    timeout: Duration,
    reserve: Script,
    /// The batching task's queue, started on first use (it needs a runtime); the task ends
    /// when the store is dropped.
    reservations: OnceLock<mpsc::Sender<ReserveJob>>,
    delete_if: Script,
    set_nx_or_get: Script,
    advance_offset: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// A client whose TCP connections set `TCP_NODELAY` (the crate leaves Nagle's algorithm on).
/// Every call shares one multiplexed connection, so commands are routinely written while an
/// earlier one is unacknowledged; Nagle would hold such a write back until the ACK, a round
/// trip on a real network (on loopback the benchmark measured no difference).
fn client(url: &str) -> Result<Client, StoreError> {
    let info = url
        .into_connection_info()
        .map_err(|e| StoreError::Config(e.to_string()))?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    Client::open(info).map_err(|e| StoreError::Config(e.to_string()))
}

fn backend(e: &redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisStore {
    /// Connects lazily: the gateway starts even when Redis is down, and reconnects by itself.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let scheme = url.split("://").next().unwrap_or_default();
        if !matches!(scheme, "redis" | "rediss" | "unix" | "redis+unix") {
            return Err(StoreError::Config(format!(
                "unsupported Redis URL scheme {scheme:?}: Redis Cluster and Sentinel are not supported (the \
                 reservation scripts touch many keys at once); point redis_url at a single primary, e.g. redis://host:6379/0"
            )));
        }
        if url.contains(',') {
            return Err(StoreError::Config(
                "redis_url lists several hosts: use one primary (Cluster and Sentinel are not supported)".into(),
            ));
        }
        let client = client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| backend(&e))?;
        Ok(Self {
            connection,
            timeout,
            reserve: Script::new(RESERVE),
            reservations: OnceLock::new(),
            delete_if: Script::new(DELETE_IF),
            set_nx_or_get: Script::new(SET_NX_OR_GET),
            advance_offset: Script::new(ADVANCE_OFFSET),
        })
    }

    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| backend(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Reserves each key for its token, in the next batched call.
    pub async fn reserve(
        &self,
        tokens: &[Vec<u8>],
        keys: &[(usize, Vec<u8>)],
        terms: &Terms,
    ) -> Result<Vec<KeyState>, StoreError> {
        let queue = self.reservations.get_or_init(|| {
            let (tx, rx) = mpsc::channel(MAX_QUEUED_JOBS);
            // One store serves one `Idempotency`, so every call has the same terms.
            let batcher = Batcher {
                connection: self.connection.clone(),
                script: self.reserve.clone(),
                timeout: self.timeout,
                terms: terms.clone(),
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

    /// Sets every key to `value` with a TTL; one pipeline.
    pub async fn set_many(&self, keys: &[Vec<u8>], value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(key.as_slice()).arg(value).arg("PX").arg(ttl.as_millis() as u64).ignore();
        }
        let mut connection = self.connection.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    pub async fn delete(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(key.as_slice());
        }
        let mut connection = self.connection.clone();
        self.bounded(cmd.query_async::<u64>(&mut connection)).await.map(drop)
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
        let mut connection = self.connection.clone();
        self.bounded(cmd.query_async::<()>(&mut connection)).await
    }

    pub async fn offset(&self, key: &[u8], partition: u32) -> Result<Option<u64>, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(key).arg(partition);
        let mut connection = self.connection.clone();
        self.bounded(cmd.query_async(&mut connection)).await
    }

    pub async fn advance_offset(&self, key: &[u8], partition: u32, offset: u64) -> Result<bool, StoreError> {
        let mut invocation = self.advance_offset.prepare_invoke();
        invocation.key(key).arg(partition).arg(offset.to_string());
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async::<u8>(&mut connection)).await.map(|n| n == 1)
    }

    pub async fn offsets(&self, key: &[u8]) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(key);
        let mut connection = self.connection.clone();
        self.bounded(cmd.query_async(&mut connection)).await
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
pub async fn server_facts(url: &str, timeout: Duration) -> Result<ServerFacts, StoreError> {
    let client = client(url)?;
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

/// The reservation batching task: takes everything queued, sends it as one script call (up to
/// [`MAX_CALLS_IN_FLIGHT`] at a time), hands each request its share of the answer.
struct Batcher {
    connection: ConnectionManager,
    script: Script,
    timeout: Duration,
    terms: Terms,
}

impl Batcher {
    async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<ReserveJob>) {
        let mut calls = JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
                job = queue.recv(), if calls.len() < MAX_CALLS_IN_FLIGHT => {
                    let Some(first) = job else { break };
                    let mut keys = first.keys.len();
                    let mut jobs = vec![first];
                    while keys < MAX_BATCH_KEYS {
                        match queue.try_recv() {
                            Ok(job) => {
                                keys += job.keys.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    calls.spawn(Arc::clone(&self).call(jobs));
                }
            }
        }
        // Calls already sent still answer their requests.
        while calls.join_next().await.is_some() {}
    }

    async fn call(self: Arc<Self>, jobs: Vec<ReserveJob>) {
        let terms = &self.terms;
        // The script takes ids grouped by token; `order` is where each job's answers land.
        let orders: Vec<Vec<usize>> = jobs
            .iter()
            .map(|job| {
                let mut order: Vec<usize> = (0..job.keys.len()).collect();
                order.sort_by_key(|&k| job.keys[k].0);
                order
            })
            .collect();
        let groups: Vec<(&ReserveJob, &[usize])> = jobs
            .iter()
            .zip(&orders)
            .flat_map(|(job, order)| order.chunk_by(|&a, &b| job.keys[a].0 == job.keys[b].0).map(move |g| (job, g)))
            .collect();
        let n: usize = orders.iter().map(Vec::len).sum();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(terms.lease.as_millis() as u64)
            .arg(terms.window.as_millis() as u64)
            .arg(terms.prefix.as_slice())
            .arg(groups.len());
        for (job, group) in &groups {
            invocation.arg(job.tokens[job.keys[group[0]].0].as_slice());
        }
        for (_, group) in &groups {
            invocation.arg(group.len());
        }
        for (job, group) in &groups {
            for &k in *group {
                invocation.arg(job.key(k));
            }
        }
        drop(groups);
        let result =
            match tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<u8>>(&mut self.connection.clone()))
                .await
            {
                Ok(Ok(codes)) if codes.len() == n => Ok(codes),
                Ok(Ok(codes)) => {
                    Err(StoreError::Backend(format!("the reservation answered {} codes for {n} keys", codes.len())))
                }
                Ok(Err(e)) => Err(backend(&e)),
                Err(_) => Err(StoreError::Timeout(self.timeout)),
            };
        let codes = match result {
            Ok(codes) => codes,
            Err(error) => return jobs.into_iter().for_each(|job| drop(job.reply.send(Err(error.clone())))),
        };
        let mut offset = 0;
        for (job, order) in jobs.into_iter().zip(orders) {
            let mut states = vec![KeyState::Reserved; order.len()];
            for (&k, &code) in order.iter().zip(&codes[offset..]) {
                states[k] = match code {
                    0 => KeyState::Reserved,
                    1 => KeyState::Committed,
                    _ => KeyState::Pending,
                };
            }
            offset += order.len();
            // The request may have given up waiting; its leases expire.
            let _ = job.reply.send(Ok(states));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_major_and_minor() {
        let facts = |v: &str| ServerFacts { version: v.into(), ..ServerFacts::default() };
        assert_eq!(facts("7.0.15").version(), Some((7, 0)));
        assert_eq!(facts("3.2").version(), Some((3, 2)));
        assert_eq!(facts("").version(), None);
    }

    #[test]
    fn connections_turn_nagle_off() {
        for url in ["redis://127.0.0.1:6379/0", "rediss://redis.example:6380/1"] {
            let client = client(url).unwrap();
            assert!(client.get_connection_info().tcp_settings().nodelay(), "{url}");
        }
    }

    #[tokio::test]
    async fn cluster_and_sentinel_urls_are_refused_clearly() {
        for url in ["redis+sentinel://h:26379/mymaster", "redis+cluster://h:6379", "redis://a:6379,b:6379"] {
            let Err(StoreError::Config(message)) = RedisStore::new(url, Duration::from_secs(1)) else {
                panic!("{url} accepted")
            };
            assert!(message.contains("Cluster") && message.contains("Sentinel"), "{message}");
        }
        assert!(RedisStore::new("redis://127.0.0.1:1/0", Duration::from_secs(1)).is_ok(), "connects lazily");
    }
}
