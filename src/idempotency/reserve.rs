//! Reserving a request's event keys: the first step of reserve → write → commit.
//!
//! Keys already committed, or sent twice in the request, are duplicates; keys another request
//! holds right now are waited for (up to `dedup_pending_wait_ms`), then decided the same way.
//! What is reserved is held per partition, because each partition's flush commits or releases
//! its own share.

use std::collections::HashSet;
use std::time::Duration;

use super::{Idempotency, KeyState, Reservation, Store, StoreError};
use crate::config::OnStoreError;
use crate::metrics;

/// Why keys could not be reserved; nothing is held when this is returned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReserveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another request kept some of the keys past the wait.
    #[error("some of these events are being written by another request right now")]
    InFlight,
}

/// What a reservation decided.
#[derive(Debug)]
pub struct Reserved {
    /// One per partition: the keys of that partition's events, to commit or release.
    pub by_partition: Vec<Option<Reservation>>,
    /// One per event: write it (false: a duplicate).
    pub keep: Vec<bool>,
    pub duplicates: usize,
}

/// First try after this long; the wait doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(200);

impl Idempotency {
    /// The policy on a store failure: `Ok(())` means carry on without the store.
    pub fn tolerate(&self, error: StoreError) -> Result<(), StoreError> {
        match self.on_error {
            OnStoreError::Reject => Err(error),
            OnStoreError::Accept => Ok(()),
        }
    }

    /// Reserves the keys of a request's events: `keys[i]` is event `i`'s (partition, key), or
    /// `None` for an event without an id (always written).
    pub async fn reserve_events(
        &self,
        partitions: usize,
        keys: Vec<Option<(usize, Vec<u8>)>>,
    ) -> Result<Reserved, ReserveError> {
        let mut keep = vec![true; keys.len()];
        let mut todo = first_of_each(keys, &mut keep);
        let mut duplicates = keep.iter().filter(|k| !**k).count();
        let mut tokens = Idempotency::new_tokens(partitions);
        let mut held = vec![false; partitions];
        // The keys reserved so far, to start over with when they are given back.
        let mut ours = Vec::new();
        let deadline = tokio::time::Instant::now() + self.pending_wait;
        let mut pause = FIRST_PAUSE;
        while !todo.is_empty() {
            let (events, keys): (Vec<usize>, Vec<(usize, Vec<u8>)>) = todo.into_iter().unzip();
            let states = match self.reserve(&tokens, &keys).await {
                Ok(states) => states,
                Err(error) => {
                    if let Err(refusal) = self.tolerate(error) {
                        self.release_held(&tokens, &held).await;
                        return Err(refusal.into());
                    }
                    metrics::dedup_bypassed(keys.len());
                    break;
                }
            };
            todo = Vec::new();
            for ((i, key), state) in events.into_iter().zip(keys).zip(states) {
                match state {
                    KeyState::Reserved => {
                        held[key.0] = true;
                        ours.push((i, key));
                    }
                    KeyState::Committed => {
                        keep[i] = false;
                        duplicates += 1;
                    }
                    KeyState::Pending => todo.push((i, key)),
                }
            }
            if todo.is_empty() {
                break;
            }
            if tokio::time::Instant::now() + pause > deadline {
                self.release_held(&tokens, &held).await;
                return Err(ReserveError::InFlight);
            }
            if self.reserves_slot_by_slot() && !ours.is_empty() {
                // A request's ids are reserved slot by slot here, not at once: two requests can
                // each hold some of the other's ids and wait for each other. The one that waits
                // gives its own back and starts over under new tokens (the old ones are
                // released, so whatever still holds them is void).
                self.release_held(&tokens, &held).await;
                tokens = Idempotency::new_tokens(partitions);
                held.fill(false);
                todo.append(&mut ours);
            }
            tokio::time::sleep(jittered(pause)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
        let by_partition =
            tokens.into_iter().zip(&held).map(|(token, &h)| h.then_some(Reservation { token })).collect();
        Ok(Reserved { by_partition, keep, duplicates })
    }

    /// Whether one reservation call can hold some of a request's ids without the others: on a
    /// Redis Cluster, where each id group is a call of its own.
    fn reserves_slot_by_slot(&self) -> bool {
        matches!(&self.store, Store::Redis(s) if s.is_cluster())
    }

    /// Gives reservations back before refusing the request, so the producer's retry need not
    /// wait for the lease (best effort: they expire with it anyway).
    async fn release_held(&self, tokens: &[Vec<u8>], held: &[bool]) {
        let reservations: Vec<Reservation> =
            tokens.iter().zip(held).filter(|(_, h)| **h).map(|(t, _)| Reservation { token: t.clone() }).collect();
        let _ = self.release(&reservations).await;
    }
}

/// A pause drawn from half to one and a half times `pause`: requests that met stay apart when
/// they try again.
fn jittered(pause: Duration) -> Duration {
    pause.mul_f64(0.5 + rand::random::<f64>())
}

/// The keys to ask the store about, as (event index, (partition, key)): an id sent twice in the
/// request is asked once, and its later copies are marked duplicates in `keep`.
fn first_of_each(keys: Vec<Option<(usize, Vec<u8>)>>, keep: &mut [bool]) -> Vec<(usize, (usize, Vec<u8>))> {
    let todo: Vec<(usize, (usize, Vec<u8>))> =
        keys.into_iter().enumerate().filter_map(|(i, key)| Some((i, key?))).collect();
    let mut seen = HashSet::with_capacity(todo.len());
    let first: Vec<bool> = todo.iter().map(|(_, (_, key))| seen.insert(key.as_slice())).collect();
    drop(seen);
    todo.into_iter()
        .zip(first)
        .filter_map(|((i, key), first)| {
            if !first {
                keep[i] = false;
            }
            first.then_some((i, key))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::idempotency::MemoryStore;

    fn key(partition: usize, k: &str) -> Option<(usize, Vec<u8>)> {
        Some((partition, k.as_bytes().to_vec()))
    }

    #[tokio::test]
    async fn repeats_in_a_request_and_committed_keys_are_duplicates() {
        let idem = Idempotency::new(Store::Memory(MemoryStore::default()), &Config::default());
        let first = idem.reserve_events(2, vec![key(0, "a"), key(1, "b"), key(0, "a"), None]).await.unwrap();
        assert_eq!((first.keep.as_slice(), first.duplicates), (&[true, true, false, true][..], 1));
        assert!(first.by_partition.iter().all(Option::is_some));
        let reservations: Vec<Reservation> = first.by_partition.into_iter().flatten().collect();
        idem.commit(&reservations[..1]).await.unwrap();
        idem.release(&reservations[1..]).await.unwrap();
        let second = idem.reserve_events(2, vec![key(0, "a"), key(1, "b")]).await.unwrap();
        assert_eq!((second.keep.as_slice(), second.duplicates), (&[false, true][..], 1));
        assert!(second.by_partition[0].is_none() && second.by_partition[1].is_some());
    }

    #[test]
    fn pauses_are_jittered_around_their_value() {
        for _ in 0..100 {
            let pause = jittered(Duration::from_millis(100));
            assert!(pause >= Duration::from_millis(50) && pause <= Duration::from_millis(150), "{pause:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_held_by_another_request_past_the_wait_refuse_and_hold_nothing() {
        let config = {
            let mut config = Config::default();
            config.idempotency.dedup_pending_wait_ms = 300;
            config
        };
        let idem = Idempotency::new(Store::Memory(MemoryStore::default()), &config);
        let holder = idem.reserve_events(1, vec![key(0, "a")]).await.unwrap();
        let refused = idem.reserve_events(1, vec![key(0, "b"), key(0, "a")]).await;
        assert!(matches!(refused, Err(ReserveError::InFlight)));
        // "b" was given back: a third request gets it at once.
        let third = idem.reserve_events(1, vec![key(0, "b")]).await.unwrap();
        assert!(third.by_partition[0].is_some());
        drop(holder);
    }
}
