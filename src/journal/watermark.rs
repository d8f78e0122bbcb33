//! The completeness watermark of a stream: the receive time before which every acknowledged
//! event is confirmed in the destination, so a downstream job can wait until an hour is
//! complete instead of guessing.
//!
//! Two things can hold it back: a request still on its way (its rows not yet written and in
//! the journal's ledger) and a block in the ledger not yet confirmed. [`Receipts`] tracks the
//! first: every request registers its receive time for as long as it is in flight. The
//! second: when a block enters the ledger its requests are still registered (they hear of the
//! write only after that), so the oldest registered receive time at that moment is at or
//! before the receive time of every row of the block: the block's *floor*. Blocks read back
//! after a restart have no known floor (0): the watermark waits for them to be confirmed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Receive times of the requests in flight, in milliseconds since the epoch, with how many
/// requests hold each.
#[derive(Debug, Default)]
pub struct Receipts {
    held: Mutex<BTreeMap<u64, usize>>,
}

/// A request's registration; dropping it ends the request's hold on the watermark.
#[derive(Debug)]
pub struct Receipt {
    receipts: Arc<Receipts>,
    at_ms: u64,
}

impl Receipts {
    /// Registers a request received at `at_ms`.
    pub fn hold(self: &Arc<Self>, at_ms: u64) -> Receipt {
        *self.lock().entry(at_ms).or_default() += 1;
        Receipt { receipts: Arc::clone(self), at_ms }
    }

    /// The earliest receive time still held.
    pub fn oldest(&self) -> Option<u64> {
        self.lock().keys().next().copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        let mut held = self.receipts.lock();
        if let Some(count) = held.get_mut(&self.at_ms) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.at_ms);
            }
        }
    }
}

/// The watermark: before the earliest of what holds it back (`floors` of unconfirmed blocks,
/// the oldest request in flight), or `now_ms` when nothing does.
pub fn watermark(floors: impl IntoIterator<Item = u64>, in_flight: Option<u64>, now_ms: u64) -> u64 {
    floors.into_iter().chain(in_flight).fold(now_ms, u64::min)
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_hold_the_oldest_until_dropped() {
        let receipts = Arc::new(Receipts::default());
        assert_eq!(receipts.oldest(), None);
        let a = receipts.hold(10);
        let b = receipts.hold(10);
        let c = receipts.hold(20);
        assert_eq!(receipts.oldest(), Some(10));
        drop(a);
        assert_eq!(receipts.oldest(), Some(10), "still held by the other request of that time");
        drop(b);
        assert_eq!(receipts.oldest(), Some(20));
        drop(c);
        assert_eq!(receipts.oldest(), None);
    }

    #[test]
    fn the_watermark_is_the_earliest_hold() {
        assert_eq!(watermark([], None, 100), 100, "nothing owed: now");
        assert_eq!(watermark([40, 30], Some(50), 100), 30);
        assert_eq!(watermark([40], Some(20), 100), 20);
        assert_eq!(watermark([0], None, 100), 0, "a block of unknown floor holds it at the start");
    }
}
