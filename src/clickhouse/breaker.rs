//! A circuit breaker on INSERT failures: after `threshold` consecutive failed attempts it
//! opens, and requests get 503 at once instead of queueing behind retries that will fail too.
//! After `open_for` it lets one probe INSERT through (half-open): success closes it, failure
//! opens it again. Time is tokio's clock, so tests step it instead of sleeping.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics;

#[derive(Debug)]
pub struct Breaker {
    epoch: Instant,
    threshold: u32,
    open_for: Duration,
    failures: AtomicU32,
    /// While open: milliseconds after `epoch` when a probe may go; 0 when closed.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
    /// The node it guards, as the metrics name it.
    node: String,
    /// The stream whose INSERTs it watches (each stream has its own breaker per node).
    stream: crate::config::StreamName,
}

impl Breaker {
    /// `threshold` 0 disables the breaker.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            threshold,
            open_for,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            node: String::new(),
            stream: crate::config::StreamName::default(),
        }
    }

    /// The breaker of the node at `url`.
    pub fn for_node(threshold: u32, open_for: Duration, url: &str, stream: crate::config::StreamName) -> Self {
        Self { node: crate::config::redacted(url), stream, ..Self::new(threshold, open_for) }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Open and not yet due for a probe: requests should be refused at once.
    pub fn is_open(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        until != 0 && self.now_ms() < until
    }

    /// Whether an INSERT attempt may go now; in half-open state only one (the probe) may.
    pub fn allow(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now_ms() < until {
            return false;
        }
        self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    pub fn record(&self, ok: bool) {
        if self.threshold == 0 {
            return;
        }
        if ok {
            self.failures.store(0, Ordering::Release);
            if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
                tracing::info!(node = %self.node, "INSERT circuit closed");
                metrics::circuit_open(&self.stream, &self.node, false);
            }
            self.probing.store(false, Ordering::Release);
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.threshold {
            let until = self.now_ms() + self.open_for.as_millis() as u64;
            if self.open_until_ms.swap(until.max(1), Ordering::AcqRel) == 0 {
                tracing::warn!(node = %self.node, failures, open_for = ?self.open_for, "INSERT circuit opened");
            }
            metrics::circuit_open(&self.stream, &self.node, true);
            self.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_probes_and_closes() {
        let breaker = Breaker::new(3, Duration::from_millis(50));
        breaker.record(false);
        breaker.record(false);
        assert!(breaker.allow() && !breaker.is_open());
        breaker.record(false);
        assert!(breaker.is_open() && !breaker.allow());
        tokio::time::advance(Duration::from_millis(40)).await;
        assert!(breaker.is_open(), "still open before open_for has passed");
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(!breaker.is_open());
        assert!(breaker.allow(), "one probe");
        assert!(!breaker.allow(), "only one");
        breaker.record(false);
        assert!(breaker.is_open(), "a failed probe opens it again");
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(breaker.allow());
        breaker.record(true);
        assert!(breaker.allow() && breaker.allow() && !breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.record(false);
        breaker.record(true);
        breaker.record(false);
        assert!(!breaker.is_open());
    }
}
