//! Protecting ClickHouse and the gateway itself: the decisions, with no HTTP in them.
//!
//! - [`poller`] reads how full the Buffer table is, off the request path, and decides (with
//!   hysteresis) whether ingestion is shed; the request path reads the verdict ([`Verdict`])
//!   from atomics. The HTTP layer that answers 503 + `Retry-After` lives in `http::shed`.
//! - [`budget`] bounds the bytes held in flight.
//!
//! The circuit breaker on failing INSERTs sits with the writer it guards
//! (`clickhouse::breaker`).

pub mod budget;
pub mod poller;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Config, OnStale, ShedMode};

/// The request path's view of the Buffer, written by the poller.
#[derive(Debug)]
pub struct ShedState {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last successful poll; 0 before the first.
    last_ok_ms: AtomicU64,
    shedding: AtomicBool,
    retry_after_s: AtomicU32,
    bytes: AtomicU64,
    capacity: AtomicU64,
}

impl Default for ShedState {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
            shedding: AtomicBool::new(false),
            retry_after_s: AtomicU32::new(1),
            bytes: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
        }
    }
}

/// How a shed verdict is read and acted on, built once from the configuration: every front
/// (the HTTP gate, the Kafka consumer) and every replica choice applies the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub mode: ShedMode,
    /// A fill older than this is stale...
    pub stale_after: Duration,
    /// ...and then taken as room (`fail_open`) or as saturation (`fail_closed`).
    pub on_stale: OnStale,
}

impl Policy {
    pub fn of(config: &Config) -> Self {
        Self {
            mode: config.shed.shed_mode,
            stale_after: Duration::from_millis(config.shed.shed_stale_after_ms),
            on_stale: config.shed.shed_on_stale,
        }
    }

    /// The verdict of `state` under this policy.
    pub fn verdict(&self, state: &ShedState) -> Verdict {
        state.current(self.stale_after, self.on_stale)
    }

    /// Whether rows go to the fallback table under `verdict`: in fallback mode, while the
    /// Buffer is known to be saturated (a stale fill is never a reason to bypass it).
    pub fn diverts(&self, verdict: Verdict) -> bool {
        self.mode == ShedMode::Fallback && matches!(verdict, Verdict::Shed { stale: false, .. })
    }
}

/// Whether a request may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// The Buffer is saturated (or unknown and the policy fails closed).
    Shed {
        retry_after_s: u32,
        stale: bool,
    },
}

impl ShedState {
    /// Publishes a successful poll.
    pub fn publish(&self, bytes: u64, capacity: u64, shedding: bool, retry_after_s: u32) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
        self.retry_after_s.store(retry_after_s, Ordering::Relaxed);
        self.shedding.store(shedding, Ordering::Relaxed);
        let ms = self.epoch.elapsed().as_millis().max(1) as u64;
        self.last_ok_ms.store(ms, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    /// Time since the last successful poll; `None` before the first.
    pub fn staleness(&self) -> Option<Duration> {
        match self.last_ok_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch.elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }

    /// The decision for one request: two atomic loads, no I/O.
    pub fn verdict(&self, stale_after: Duration, on_stale: OnStale, startup_grace: bool) -> Verdict {
        let stale = match self.staleness() {
            Some(age) => age > stale_after,
            // Before the first poll answered: stale once the grace period is over.
            None => !startup_grace,
        };
        if stale {
            return match on_stale {
                OnStale::FailOpen => Verdict::Pass,
                OnStale::FailClosed => {
                    Verdict::Shed { retry_after_s: self.retry_after_s.load(Ordering::Relaxed), stale: true }
                }
            };
        }
        if self.is_shedding() {
            Verdict::Shed { retry_after_s: self.retry_after_s.load(Ordering::Relaxed), stale: false }
        } else {
            Verdict::Pass
        }
    }

    /// [`Self::verdict`] now, with the start-up grace every caller gives: until `stale_after`
    /// has passed since the state was made, a poll that has not answered yet is not stale.
    pub fn current(&self, stale_after: Duration, on_stale: OnStale) -> Verdict {
        self.verdict(stale_after, on_stale, self.age() < stale_after)
    }

    /// How long since the state was created (for the start-up grace period).
    pub fn age(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// Hysteresis: start shedding at `threshold`, stop only below `resume`.
pub fn next_shedding(shedding: bool, fill: f64, threshold: f64, resume: f64) -> bool {
    if fill >= threshold {
        true
    } else if fill < resume {
        false
    } else {
        shedding
    }
}

/// Seconds until the Buffer is back under `resume × capacity` at `drain_rate` bytes/s (net of
/// what keeps arriving), bounded to `[1, max]`; `max` when it is not draining.
pub fn retry_after(bytes: u64, capacity: u64, resume: f64, drain_rate: f64, max: u32) -> u32 {
    let target = resume * capacity as f64;
    let excess = bytes as f64 - target;
    if excess <= 0.0 {
        return 1;
    }
    if drain_rate <= 0.0 {
        return max.max(1);
    }
    ((excess / drain_rate).ceil() as u64).clamp(1, u64::from(max.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_known_saturation_diverts_to_the_fallback_table() {
        let policy =
            Policy { mode: ShedMode::Fallback, stale_after: Duration::from_secs(1), on_stale: OnStale::FailClosed };
        assert!(policy.diverts(Verdict::Shed { retry_after_s: 1, stale: false }));
        assert!(!policy.diverts(Verdict::Shed { retry_after_s: 1, stale: true }), "unknown: shed, not bypassed");
        assert!(!policy.diverts(Verdict::Pass));
        let reject = Policy { mode: ShedMode::Reject, ..policy };
        assert!(!reject.diverts(Verdict::Shed { retry_after_s: 1, stale: false }));
    }

    #[test]
    fn hysteresis() {
        assert!(!next_shedding(false, 0.79, 0.8, 0.7));
        assert!(next_shedding(false, 0.8, 0.8, 0.7));
        assert!(next_shedding(true, 0.75, 0.8, 0.7), "stays on between resume and threshold");
        assert!(!next_shedding(true, 0.69, 0.8, 0.7));
        assert!(!next_shedding(false, 0.75, 0.8, 0.7), "stays off between resume and threshold");
    }

    #[test]
    fn retry_after_from_drain_rate() {
        assert_eq!(retry_after(800, 1000, 0.7, 10.0, 30), 10);
        assert_eq!(retry_after(800, 1000, 0.7, 1000.0, 30), 1);
        assert_eq!(retry_after(800, 1000, 0.7, 1.0, 30), 30, "bounded");
        assert_eq!(retry_after(800, 1000, 0.7, 0.0, 30), 30, "not draining");
        assert_eq!(retry_after(600, 1000, 0.7, -5.0, 30), 1, "already under resume");
    }

    #[test]
    fn verdicts() {
        let state = ShedState::default();
        let stale = Duration::from_secs(5);
        assert_eq!(state.verdict(stale, OnStale::FailClosed, true), Verdict::Pass, "grace before the first poll");
        assert!(matches!(state.verdict(stale, OnStale::FailClosed, false), Verdict::Shed { stale: true, .. }));
        assert_eq!(state.verdict(stale, OnStale::FailOpen, false), Verdict::Pass);
        state.publish(900, 1000, true, 7);
        assert_eq!(state.verdict(stale, OnStale::FailOpen, false), Verdict::Shed { retry_after_s: 7, stale: false });
        state.publish(100, 1000, false, 1);
        assert_eq!(state.verdict(stale, OnStale::FailClosed, false), Verdict::Pass);
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(state.verdict(Duration::ZERO, OnStale::FailClosed, false), Verdict::Shed { stale: true, .. }));
    }
}
