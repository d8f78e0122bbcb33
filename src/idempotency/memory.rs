//! The embedded store: the same semantics as Redis, in this process. Right for one replica
//! (and for tests); several replicas need a shared store, so the gateway warns at start-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Committed, HolderState, KeyState, OffsetTerms, TOKEN_BYTES, Terms, holder_state};

#[derive(Debug)]
struct Inner {
    values: HashMap<Vec<u8>, (Vec<u8>, Instant)>,
    /// A producer's offsets by partition, and when they are forgotten.
    offsets: HashMap<Vec<u8>, (BTreeMap<u32, u64>, Instant)>,
    writes_since_sweep: usize,
    offset_writes_since_sweep: usize,
    /// What lease ends are counted from (an id's value is its token and its lease's end in
    /// milliseconds since this, as Redis keeps the token and its end in Redis time).
    epoch: Instant,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            values: HashMap::new(),
            offsets: HashMap::new(),
            writes_since_sweep: 0,
            offset_writes_since_sweep: 0,
            epoch: Instant::now(),
        }
    }
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

/// Expired entries are swept after this many writes, keeping memory bounded by the window.
const SWEEP_EVERY: usize = 4096;

impl Inner {
    /// A producer's offsets, unless they expired.
    fn live_offsets(&self, key: &[u8], now: Instant) -> Option<&BTreeMap<u32, u64>> {
        self.offsets.get(key).filter(|(_, expires)| *expires > now).map(|(partitions, _)| partitions)
    }

    fn get(&self, key: &[u8], now: Instant) -> Option<&[u8]> {
        self.values.get(key).filter(|(_, expires)| *expires > now).map(|(v, _)| v.as_slice())
    }

    fn set(&mut self, key: &[u8], value: &[u8], ttl: Duration, now: Instant) {
        self.values.insert(key.to_vec(), (value.to_vec(), now + ttl));
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY.max(self.values.len() / 2) {
            self.values.retain(|_, (_, expires)| *expires > now);
            self.writes_since_sweep = 0;
        }
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every operation is one step).
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reservation script's logic (see the Redis store), under one lock: a fresh id is
    /// written, one held by another token is decided by [`holder_state`].
    pub fn reserve(&self, tokens: &[Vec<u8>], keys: &[(usize, Vec<u8>)], terms: &Terms) -> Vec<KeyState> {
        let now = Instant::now();
        let mut inner = self.lock();
        let now_ms = now.duration_since(inner.epoch).as_millis() as u64;
        let lease_end = (now_ms + terms.lease.as_millis() as u64).to_be_bytes();
        // Event keys apart from status keys, as Redis keeps them; one buffer for all of them.
        let mut key = [terms.prefix.as_slice(), b"e:"].concat();
        let key_prefix = key.len();
        keys.iter()
            .map(|(t, id)| {
                key.truncate(key_prefix);
                key.extend_from_slice(id);
                let token = tokens[*t].as_slice();
                let state = match inner.get(&key, now) {
                    None => None,
                    Some(held) if held.get(..TOKEN_BYTES) == Some(token) => Some(KeyState::Reserved),
                    Some(held) => {
                        let (holder, end) = held.split_at(TOKEN_BYTES.min(held.len()));
                        let lease_over = end.try_into().map_or(true, |end| u64::from_be_bytes(end) <= now_ms);
                        match holder_state(inner.get(&terms.status_key(holder), now), lease_over) {
                            HolderState::Committed => Some(KeyState::Committed),
                            HolderState::Pending => Some(KeyState::Pending),
                            HolderState::Void => None,
                        }
                    }
                };
                state.unwrap_or_else(|| {
                    inner.set(&key, &[token, lease_end.as_slice()].concat(), terms.window, now);
                    KeyState::Reserved
                })
            })
            .collect()
    }

    /// Deletes `key` if it still holds `value`.
    pub fn delete_if(&self, key: &[u8], value: &[u8]) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.get(key, now) == Some(value) {
            inner.values.remove(key);
        }
    }

    pub fn set_nx_or_get(&self, key: &[u8], value: &[u8], ttl: Duration) -> Option<Vec<u8>> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(existing) = inner.get(key, now) {
            return Some(existing.to_vec());
        }
        inner.set(key, value, ttl, now);
        None
    }

    pub fn set(&self, key: &[u8], value: &[u8], ttl: Duration) {
        self.lock().set(key, value, ttl, Instant::now());
    }

    pub fn offset(&self, key: &[u8], partition: u32) -> Committed {
        let inner = self.lock();
        match inner.live_offsets(key, Instant::now()) {
            Some(partitions) => Committed { offset: partitions.get(&partition).copied(), partitions: partitions.len() },
            None => Committed::default(),
        }
    }

    pub fn advance_offset(&self, key: &[u8], partition: u32, offset: u64, terms: OffsetTerms) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.offset_writes_since_sweep += 1;
        if inner.offset_writes_since_sweep >= SWEEP_EVERY.max(inner.offsets.len() / 2) {
            inner.offsets.retain(|_, (_, expires)| *expires > now);
            inner.offset_writes_since_sweep = 0;
        }
        let (partitions, expires) = inner.offsets.entry(key.to_vec()).or_insert_with(|| (BTreeMap::new(), now));
        if *expires <= now {
            partitions.clear();
        }
        *expires = now + terms.ttl;
        match partitions.get(&partition) {
            Some(&current) if current >= offset => false,
            _ => {
                partitions.insert(partition, offset);
                true
            }
        }
    }

    pub fn offsets(&self, key: &[u8]) -> BTreeMap<String, u64> {
        let inner = self.lock();
        inner
            .live_offsets(key, Instant::now())
            .map(|p| p.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_forgotten_after_their_ttl_and_counted_by_partition() {
        let store = MemoryStore::default();
        let terms = OffsetTerms { ttl: Duration::from_millis(50), max_partitions: 2 };
        assert!(store.advance_offset(b"p", 0, 10, terms));
        assert!(store.advance_offset(b"p", 1, 5, terms));
        assert_eq!(store.offset(b"p", 0), Committed { offset: Some(10), partitions: 2 });
        assert_eq!(store.offset(b"p", 7), Committed { offset: None, partitions: 2 });
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(store.offset(b"p", 0), Committed::default(), "expired");
        assert!(store.offsets(b"p").is_empty());
        assert!(store.advance_offset(b"p", 0, 3, terms), "an expired producer starts afresh");
        assert_eq!(store.offset(b"p", 0), Committed { offset: Some(3), partitions: 1 });
    }
}
