//! The embedded store: the same semantics as Redis, in this process. Right for one replica
//! (and for tests); several replicas need a shared store, so the gateway warns at start-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{COMMITTED, KeyState, event_state};

#[derive(Debug, Default)]
struct Inner {
    values: HashMap<Vec<u8>, (Vec<u8>, Instant)>,
    offsets: HashMap<Vec<u8>, BTreeMap<u32, u64>>,
    writes_since_sweep: usize,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

/// Expired entries are swept after this many writes, keeping memory bounded by the window.
const SWEEP_EVERY: usize = 4096;

impl Inner {
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

    pub fn reserve(&self, token: &[u8], keys: &[Vec<u8>], lease: Duration) -> Vec<KeyState> {
        let now = Instant::now();
        let mut inner = self.lock();
        keys.iter()
            .map(|key| match event_state(inner.get(key, now), token) {
                None => {
                    inner.set(key, token, lease, now);
                    KeyState::Reserved
                }
                Some(state) => state,
            })
            .collect()
    }

    pub fn commit(&self, keys: &[Vec<u8>], window: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        for key in keys {
            inner.set(key, COMMITTED, window, now);
        }
    }

    pub fn release(&self, token: &[u8], keys: &[Vec<u8>]) {
        let now = Instant::now();
        let mut inner = self.lock();
        for key in keys {
            if inner.get(key, now) == Some(token) {
                inner.values.remove(key);
            }
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

    pub fn offset(&self, key: &[u8], partition: u32) -> Option<u64> {
        self.lock().offsets.get(key).and_then(|p| p.get(&partition).copied())
    }

    pub fn advance_offset(&self, key: &[u8], partition: u32, offset: u64) -> bool {
        let mut inner = self.lock();
        let partitions = inner.offsets.entry(key.to_vec()).or_default();
        match partitions.get(&partition) {
            Some(&current) if current >= offset => false,
            _ => {
                partitions.insert(partition, offset);
                true
            }
        }
    }

    pub fn offsets(&self, key: &[u8]) -> BTreeMap<String, u64> {
        self.lock().offsets.get(key).map(|p| p.iter().map(|(k, v)| (k.to_string(), *v)).collect()).unwrap_or_default()
    }
}
