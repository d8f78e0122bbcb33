//! Microbenchmarks of two small pieces of the request path, each against the alternatives it
//! was chosen over: the per-key rate limit (governor against the hand-written token bucket it
//! replaced) and the FNV-1a hasher of `schema` (against `fnv` and `foldhash`).
//! `cargo bench --bench hot_paths`; figures in docs/performance.md.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: fail loudly

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use buffergate::Config;
use buffergate::auth::ApiKeys;
use divan::black_box;
use governor::clock::MonotonicClock;
use governor::{Quota, RateLimiter};

fn main() {
    divan::main();
}

/// High enough that no check in a run is refused: the allowed path is the one every request
/// takes.
const RATE_PER_S: f64 = 5e8;
const BURST: u32 = 1_000_000_000;

mod rate_limit {
    use super::*;

    /// The token bucket `auth` had before governor, as it was.
    struct Bucket {
        tokens: f64,
        at: Instant,
    }

    struct HandWritten {
        rate: f64,
        burst: f64,
        buckets: Mutex<HashMap<String, Bucket>>,
    }

    impl HandWritten {
        fn take_token(&self, name: &str) -> Result<(), u32> {
            let now = Instant::now();
            let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let bucket = buckets.entry(name.to_string()).or_insert(Bucket { tokens: self.burst, at: now });
            bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
            bucket.at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                Ok(())
            } else {
                Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u32)
            }
        }
    }

    fn quota() -> Quota {
        Quota::with_period(Duration::from_secs_f64(1.0 / RATE_PER_S))
            .unwrap()
            .allow_burst(NonZeroU32::new(BURST).unwrap())
    }

    #[divan::bench(threads = [1, 2])]
    fn hand_written(bencher: divan::Bencher) {
        let limiter = HandWritten { rate: RATE_PER_S, burst: f64::from(BURST), buckets: Mutex::new(HashMap::new()) };
        bencher.bench(|| limiter.take_token(black_box("team-a")).unwrap());
    }

    /// What `auth` uses: one direct limiter per key name, on governor's default (quanta) clock.
    #[divan::bench(threads = [1, 2])]
    fn governor_direct(bencher: divan::Bencher) {
        let limiter = RateLimiter::direct(quota());
        bencher.bench(|| black_box(&limiter).check().unwrap());
    }

    /// The same on `std::time::Instant`, to tell the clock's share from the algorithm's.
    #[divan::bench(threads = [1, 2])]
    fn governor_direct_std_clock(bencher: divan::Bencher) {
        let limiter = RateLimiter::direct_with_clock(quota(), MonotonicClock);
        bencher.bench(|| black_box(&limiter).check().unwrap());
    }

    /// One keyed limiter for all names: a hash and a lock per check.
    #[divan::bench(threads = [1, 2])]
    fn governor_keyed(bencher: divan::Bencher) {
        let limiter = RateLimiter::<String, _, _>::keyed(quota());
        let key = "team-a".to_string();
        bencher.bench(|| limiter.check_key(black_box(&key)).unwrap());
    }

    /// `ApiKeys::check` as a request calls it, SHA-256 of the presented key included.
    #[divan::bench]
    fn api_keys_check(bencher: divan::Bencher) {
        let config = {
            let mut config = Config::default();
            config.auth.api_keys = "team-a=alpha-key, team-b=beta-key".into();
            config.auth.api_key_rate_per_s = RATE_PER_S;
            config.auth.api_key_burst = BURST;
            config
        };
        let keys = ApiKeys::from_config(&config).unwrap();
        bencher.bench(|| keys.check(black_box(Some("beta-key"))).unwrap());
    }
}

mod hash {
    use super::*;

    /// `schema`'s hasher, copied: FNV-1a, 64 bits.
    struct NameHasher(u64);

    impl Default for NameHasher {
        fn default() -> Self {
            Self(0xcbf2_9ce4_8422_2325)
        }
    }

    impl Hasher for NameHasher {
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }

        fn finish(&self) -> u64 {
            self.0
        }
    }

    /// The seed table's columns, which every field of every event is looked up among.
    const COLUMNS: [&str; 6] = ["event_id", "event_ts", "user_id", "event_type", "payload", "metadata"];

    /// Partition-key values as `partition_hash` sees them: decimal user ids and UUIDs.
    const KEYS: [&str; 4] =
        ["4242424", "17", "0191d3e4-7a2b-7c3d-8e4f-123456789abc", "00000000-0000-4000-8000-00000000002a"];

    fn lookups<S: BuildHasher + Default + Sync>(bencher: divan::Bencher) {
        let map: HashMap<String, usize, S> = COLUMNS.iter().enumerate().map(|(i, c)| (c.to_string(), i)).collect();
        // One op: an event's six fields, each looked up by name.
        bencher.counter(divan::counter::ItemsCount::new(COLUMNS.len())).bench(|| {
            let mut sum = 0;
            for name in black_box(COLUMNS) {
                sum += map.get(name).copied().unwrap_or(0);
            }
            sum
        });
    }

    #[divan::bench]
    fn lookup_name_hasher(bencher: divan::Bencher) {
        lookups::<BuildHasherDefault<NameHasher>>(bencher);
    }

    #[divan::bench]
    fn lookup_fnv(bencher: divan::Bencher) {
        lookups::<fnv::FnvBuildHasher>(bencher);
    }

    #[divan::bench]
    fn lookup_foldhash(bencher: divan::Bencher) {
        lookups::<foldhash::fast::FixedState>(bencher);
    }

    #[divan::bench]
    fn lookup_siphash(bencher: divan::Bencher) {
        lookups::<std::hash::RandomState>(bencher);
    }

    /// splitmix64's finalizer, as `partition_hash` applies it after FNV.
    fn mix(h: u64) -> u64 {
        let h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }

    fn partition_hashes(bencher: divan::Bencher, hash: impl Fn(&[u8]) -> u64 + Sync) {
        // One op: one hash of each key kind.
        bencher.counter(divan::counter::ItemsCount::new(KEYS.len())).bench(|| {
            let mut acc = 0u64;
            for key in black_box(KEYS) {
                acc ^= hash(key.as_bytes());
            }
            acc
        });
    }

    #[divan::bench]
    fn partition_name_hasher_mixed(bencher: divan::Bencher) {
        partition_hashes(bencher, |bytes| {
            let mut h = NameHasher::default();
            h.write(bytes);
            mix(h.finish())
        });
    }

    #[divan::bench]
    fn partition_fnv_mixed(bencher: divan::Bencher) {
        partition_hashes(bencher, |bytes| {
            let mut h = fnv::FnvHasher::default();
            h.write(bytes);
            mix(h.finish())
        });
    }

    /// foldhash's own finish already spreads the input over the low bits: no extra mix.
    #[divan::bench]
    fn partition_foldhash(bencher: divan::Bencher) {
        let state = foldhash::fast::FixedState::default();
        partition_hashes(bencher, |bytes| {
            let mut h = state.build_hasher();
            h.write(bytes);
            h.finish()
        });
    }
}
