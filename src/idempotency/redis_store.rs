//! The Redis store: one connection manager (reconnects by itself), every call bounded by a
//! timeout, and each multi-key step one round trip (a Lua script or a pipeline).
//!
//! Reservations, the one store call on every request's path, are batched across concurrent
//! requests: a single task sends one script call for everything queued while the previous call
//! was in flight (group commit), so Redis runs one script per group of requests rather than one
//! per request, and no request waits for a timer.
//!
//! Key layout (prefix `bg:` by default): `bg:e:<16 UUID bytes>` per event, holding the 10-byte
//! token that reserved it (TTL = dedup window); `bg:t:<token>` per request and partition, `p`
//! (pending, TTL = lease) or `c` (committed, TTL = window); `bg:r:<key>` per `Idempotency-Key`;
//! `bg:o:<producer>` a hash of partition → committed offset (no TTL). The reservation script
//! reads status keys it derives from values, so it needs one node: Redis Cluster and Sentinel
//! URLs are refused.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::OnceLock;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::sync::{mpsc, oneshot};

use super::{KeyState, StoreError, Terms};

/// `ARGV[1..3]`: lease, window, status-key prefix; `ARGV[3 + i]`: the token reserving `KEYS[i]`.
/// Codes: 0 reserved, 1 committed (a duplicate), 2 pending (another request holds it).
const RESERVE: &str = r"
local lease, window, prefix = ARGV[1], ARGV[2], ARGV[3]
local out, marked = {}, {}
for i, key in ipairs(KEYS) do
  local token = ARGV[i + 3]
  if not marked[token] then
    marked[token] = true
    local status = prefix .. token
    if redis.call('GET', status) ~= 'c' then redis.call('SET', status, 'p', 'PX', lease) end
  end
  if redis.call('SET', key, token, 'NX', 'PX', window) then
    out[i] = 0
  else
    local holder = redis.call('GET', key)
    if holder == token then
      out[i] = 0
    else
      local state = redis.call('GET', prefix .. holder)
      if state == 'c' then out[i] = 1
      elseif state == 'p' then out[i] = 2
      else
        -- Released, or its lease ran out: the reservation is void; take the key over.
        redis.call('SET', key, token, 'PX', window)
        out[i] = 0
      end
    end
  end
end
return out
";

/// Keys per batched reservation call, so one script never holds Redis for long (a single
/// request larger than this still goes alone, in one call).
const MAX_BATCH_KEYS: usize = 4096;

/// Reservations waiting for the batching task; beyond this, requests wait to queue.
const MAX_QUEUED_JOBS: usize = 1024;

/// One request's reservation, waiting for its batch.
struct ReserveJob {
    tokens: Vec<Vec<u8>>,
    keys: Vec<(usize, Vec<u8>)>,
    terms: Terms,
    reply: oneshot::Sender<Result<Vec<KeyState>, StoreError>>,
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
    /// Reserve with the script alone even on Redis 7+ (to test the path older servers take).
    scripted_only: bool,
    delete_if: Script,
    set_nx_or_get: Script,
    advance_offset: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("timeout", &self.timeout).finish_non_exhaustive()
    }
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
        let client = Client::open(url).map_err(|e| StoreError::Config(e.to_string()))?;
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
            scripted_only: false,
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

    /// Reserves with the Lua script alone, as on Redis before 7.0, whatever the server.
    #[must_use]
    pub fn scripted_only(mut self) -> Self {
        self.scripted_only = true;
        self
    }

    /// Reserves each key for its token, in the next batched call.
    pub async fn reserve(
        &self,
        tokens: &[Vec<u8>],
        keys: &[(usize, Vec<u8>)],
        terms: Terms,
    ) -> Result<Vec<KeyState>, StoreError> {
        let queue = self.reservations.get_or_init(|| {
            let (tx, rx) = mpsc::channel(MAX_QUEUED_JOBS);
            let batcher = Batcher {
                connection: self.connection.clone(),
                script: self.reserve.clone(),
                timeout: self.timeout,
                native: None,
                scripted_only: self.scripted_only,
            };
            tokio::spawn(batcher.run(rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let job = ReserveJob { tokens: tokens.to_vec(), keys: keys.to_vec(), terms, reply };
        // Queueing plus our batch's call (plus, at worst, the call before it).
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

/// The reservation batching task: takes everything queued, sends one script call, hands each
/// request its share of the answer.
struct Batcher {
    connection: ConnectionManager,
    script: Script,
    timeout: Duration,
    /// Whether the server has `SET … NX GET` (Redis 7.0+); unknown until a probe answers.
    native: Option<bool>,
    scripted_only: bool,
}

impl Batcher {
    async fn probe_native(&mut self) -> Option<bool> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let info = cmd.query_async::<String>(&mut self.connection);
        let info = tokio::time::timeout(self.timeout, info).await.ok()?.ok()?;
        let version = info.lines().find_map(|l| l.strip_prefix("redis_version:"))?;
        let major: u32 = version.split('.').next()?.trim().parse().ok()?;
        tracing::info!(version = version.trim(), native = major >= 7, "Redis reservations");
        Some(major >= 7)
    }

    /// Everything in the Lua script: any Redis version.
    async fn reserve_scripted(&mut self, claims: &[(&[u8], &[u8])], terms: &Terms) -> Result<Vec<u8>, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(terms.lease.as_millis() as u64)
            .arg(terms.window.as_millis() as u64)
            .arg(terms.status_prefix.as_slice());
        for (key, token) in claims {
            invocation.key(*key).arg(*token);
        }
        match tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<u8>>(&mut self.connection)).await {
            Ok(Ok(codes)) => Ok(codes),
            Ok(Err(e)) => Err(backend(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Redis 7+: plain pipelined `SET key token NX PX window GET` (about half the server CPU of
    /// the script per key, measured); only keys someone else holds go through the script,
    /// which decides them atomically.
    async fn reserve_native(&mut self, claims: &[(&[u8], &[u8])], terms: &Terms) -> Result<Vec<u8>, StoreError> {
        // Statuses first: no key may point at a token that has none (it would look void).
        let mut tokens: Vec<&[u8]> = claims.iter().map(|(_, token)| *token).collect();
        tokens.sort_unstable();
        tokens.dedup();
        // Commands sized up front: growing each one argument by argument was most of this
        // task's allocations.
        let mut pipe = redis::Pipeline::with_capacity(tokens.len() + claims.len());
        let (lease, window) = (terms.lease.as_millis() as u64, terms.window.as_millis() as u64);
        let mut status = terms.status_prefix.clone();
        for token in tokens {
            status.truncate(terms.status_prefix.len());
            status.extend_from_slice(token);
            let mut set = redis::Cmd::with_capacity(5, status.len() + 24);
            set.arg("SET").arg(status.as_slice()).arg("p").arg("PX").arg(lease);
            pipe.add_command(set).ignore();
        }
        for (key, token) in claims {
            let mut set = redis::Cmd::with_capacity(7, key.len() + token.len() + 32);
            set.arg("SET").arg(*key).arg(*token).arg("NX").arg("PX").arg(window).arg("GET");
            pipe.add_command(set);
        }
        let holders: Vec<Option<Vec<u8>>> =
            match tokio::time::timeout(self.timeout, pipe.query_async(&mut self.connection)).await {
                Ok(Ok(holders)) => holders,
                Ok(Err(e)) => return Err(backend(&e)),
                Err(_) => return Err(StoreError::Timeout(self.timeout)),
            };
        if holders.len() != claims.len() {
            return Err(StoreError::Backend(format!("{} answers for {} reservations", holders.len(), claims.len())));
        }
        let mut codes = vec![0u8; claims.len()];
        let contested: Vec<usize> =
            (0..claims.len()).filter(|&i| holders[i].as_deref().is_some_and(|holder| holder != claims[i].1)).collect();
        if !contested.is_empty() {
            let again: Vec<(&[u8], &[u8])> = contested.iter().map(|&i| claims[i]).collect();
            let decided = self.reserve_scripted(&again, terms).await?;
            if decided.len() != again.len() {
                return Err(StoreError::Backend("the reservation script answered short".into()));
            }
            for (i, code) in contested.into_iter().zip(decided) {
                codes[i] = code;
            }
        }
        Ok(codes)
    }

    async fn run(mut self, mut queue: mpsc::Receiver<ReserveJob>) {
        while let Some(first) = queue.recv().await {
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
            // Every job of one store has the same terms.
            let terms = jobs[0].terms.clone();
            self.call(jobs, &terms).await;
        }
    }

    async fn call(&mut self, jobs: Vec<ReserveJob>, terms: &Terms) {
        let claims: Vec<(&[u8], &[u8])> = jobs
            .iter()
            .flat_map(|job| job.keys.iter().map(|(t, key)| (key.as_slice(), job.tokens[*t].as_slice())))
            .collect();
        if self.native.is_none() && !self.scripted_only {
            self.native = self.probe_native().await;
        }
        let result = if self.native == Some(true) {
            self.reserve_native(&claims, terms).await
        } else {
            self.reserve_scripted(&claims, terms).await
        };
        let n = claims.len();
        drop(claims);
        let result = result.and_then(|codes| {
            if codes.len() == n {
                Ok(codes)
            } else {
                Err(StoreError::Backend(format!("the reservation answered {} codes for {n} keys", codes.len())))
            }
        });
        let mut codes = match result {
            Ok(codes) => codes.into_iter(),
            Err(error) => return jobs.into_iter().for_each(|job| drop(job.reply.send(Err(error.clone())))),
        };
        for job in jobs {
            let states = codes
                .by_ref()
                .take(job.keys.len())
                .map(|code| match code {
                    0 => KeyState::Reserved,
                    1 => KeyState::Committed,
                    _ => KeyState::Pending,
                })
                .collect();
            // The request may have given up waiting; its leases expire.
            let _ = job.reply.send(Ok(states));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
