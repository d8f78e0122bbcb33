//! The Redis store: one connection manager (reconnects by itself), every call bounded by a
//! timeout, and each multi-key step one round trip (a Lua script or a pipeline).
//!
//! Key layout (prefix `bg:` by default): `bg:e:<16 UUID bytes>` per event, holding `c`
//! (committed, TTL = dedup window) or `p<token>` (reserved, TTL = lease); `bg:r:<key>` per
//! `Idempotency-Key`; `bg:o:<producer>` a hash of partition → committed offset (no TTL).
//! Multi-key scripts need one node: Redis Cluster and Sentinel URLs are refused.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{KeyState, StoreError};

const RESERVE: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 0
  else
    local value = redis.call('GET', key)
    if value == 'c' then out[i] = 1
    elseif value == ARGV[1] then out[i] = 0
    else out[i] = 2 end
  end
end
return out
";

const RELEASE: &str = r"
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
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
    release: Script,
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
            release: Script::new(RELEASE),
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

    pub async fn reserve(&self, token: &[u8], keys: &[Vec<u8>], lease: Duration) -> Result<Vec<KeyState>, StoreError> {
        let mut invocation = self.reserve.prepare_invoke();
        for key in keys {
            invocation.key(key.as_slice());
        }
        invocation.arg(token).arg(lease.as_millis() as u64);
        let mut connection = self.connection.clone();
        let codes: Vec<u8> = self.bounded(invocation.invoke_async(&mut connection)).await?;
        Ok(codes
            .into_iter()
            .map(|code| match code {
                0 => KeyState::Reserved,
                1 => KeyState::Committed,
                _ => KeyState::Pending,
            })
            .collect())
    }

    pub async fn commit(&self, keys: &[Vec<u8>], window: Duration) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(key.as_slice()).arg(super::COMMITTED).arg("PX").arg(window.as_millis() as u64).ignore();
        }
        let mut connection = self.connection.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    pub async fn release(&self, token: &[u8], keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut invocation = self.release.prepare_invoke();
        for key in keys {
            invocation.key(key.as_slice());
        }
        invocation.arg(token);
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
