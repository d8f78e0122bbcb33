//! The consumer's state as `/readyz` and `/v1/status` tell it, written by the poll loop and
//! the client's callbacks.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use serde_json::{Value, json};

#[derive(Debug, Default)]
pub struct Status {
    /// Subscribed: the journal was settled and the group joined (or being joined).
    subscribed: AtomicBool,
    brokers_down: AtomicBool,
    failed: Mutex<Option<String>>,
    assigned: AtomicUsize,
    paused: AtomicUsize,
    /// Bumped by every assignment: a paused consumer pauses what it was newly given.
    generation: AtomicU64,
}

impl Status {
    pub fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::Relaxed);
    }

    pub fn set_brokers_down(&self, down: bool) {
        self.brokers_down.store(down, Ordering::Relaxed);
    }

    pub fn fail(&self, why: String) {
        if let Ok(mut failed) = self.failed.lock() {
            *failed = Some(why);
        }
    }

    pub fn set_partitions(&self, assigned: usize, paused: usize) {
        self.assigned.store(assigned, Ordering::Relaxed);
        self.paused.store(paused, Ordering::Relaxed);
        crate::metrics::kafka::partitions(assigned, paused);
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    pub fn next_generation(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// `Ok` when the consumer is doing its work, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.failure().is_some() {
            Err("the Kafka consumer stopped on an error")
        } else if !self.subscribed.load(Ordering::Relaxed) {
            Err("the Kafka consumer is starting: settling the journal, then joining its group")
        } else if self.brokers_down.load(Ordering::Relaxed) {
            Err("the Kafka brokers cannot be reached")
        } else {
            Ok(())
        }
    }

    pub fn report(&self) -> Value {
        json!({
            "subscribed": self.subscribed.load(Ordering::Relaxed),
            "brokers_down": self.brokers_down.load(Ordering::Relaxed),
            "assigned_partitions": self.assigned(),
            "paused_partitions": self.paused.load(Ordering::Relaxed),
            "error": self.failure(),
        })
    }
}
