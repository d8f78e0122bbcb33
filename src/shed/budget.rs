//! A global budget of bytes held in flight: request bodies being decoded plus encoded rows
//! waiting in the coalescers. Taking more than is left fails at once (503), it never waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics;

#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
    /// Registered once (after the recorder is installed), not looked up on every change.
    gauge: ::metrics::Gauge,
}

/// Bytes taken from the budget, given back when dropped.
#[derive(Debug)]
pub struct Lease {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit, gauge: metrics::inflight_bytes() })
    }

    /// Takes `bytes`, or `None` when that would exceed the limit.
    pub fn try_take(self: &Arc<Self>, bytes: usize) -> Option<Lease> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(bytes).filter(|&n| n <= self.limit)?;
            match self.used.compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.gauge.set(next as f64);
                    return Some(Lease { budget: Arc::clone(self), bytes });
                }
                Err(actual) => used = actual,
            }
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Lease {
    /// Splits off `bytes` into a lease of its own (for rows that outlive the request).
    pub fn split(&mut self, bytes: usize) -> Lease {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Lease { budget: Arc::clone(&self.budget), bytes }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let before = self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.set((before - self.bytes) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_gives_back_and_refuses_over_the_limit() {
        let budget = Budget::new(100);
        let mut a = budget.try_take(60).unwrap();
        assert!(budget.try_take(41).is_none());
        let b = a.split(20);
        drop(a);
        assert_eq!(budget.used(), 20);
        let c = budget.try_take(80).unwrap();
        drop((b, c));
        assert_eq!(budget.used(), 0);
    }
}
