//! Knowing which messages read after a restart or a rebalance may have been delivered before.
//!
//! A message's rows can be in ClickHouse while its offset is not committed: the process died
//! between the two, or gave the partition up unfinished. Read again, most of its events are
//! recognised by their keys in the idempotency store, but not all: rows the dead process had
//! journaled are restored from its journal while their keys were never committed, and keys
//! reserved by a dead process are taken over once their lease runs out. So before any message
//! is handed on, its partition's **mark** in the store (a producer offset of the gateway's own,
//! only ever moved forward) is moved past it; messages read at or below the mark are
//! *suspect*, and their events are looked up in ClickHouse before they are delivered. The mark
//! is moved in steps of `kafka_max_in_flight`, one store call per step, so that in steady
//! state a message costs nothing here and after a crash at most one step more is looked up.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::idempotency::{Idempotency, StoreError};
use crate::ingest::{IngestError, ProducerOffset};

/// The marks of one consumer group, as far as this process moved or read them.
#[derive(Debug)]
pub struct Marks {
    idempotency: Arc<Idempotency>,
    group: String,
    step: u64,
    known: Mutex<HashMap<(String, i32), u64>>,
}

impl Marks {
    pub fn new(idempotency: Arc<Idempotency>, group: &str, step: usize) -> Self {
        Self { idempotency, group: group.to_string(), step: step.max(1) as u64, known: Mutex::new(HashMap::new()) }
    }

    /// The name the marks of a topic are kept under: a producer of the store's own, apart
    /// from any HTTP producer's id by its prefix.
    fn producer(&self, topic: &str) -> String {
        format!("{}{}/{topic}", ProducerOffset::RESERVED_PREFIX, self.group)
    }

    /// Offsets at or below this were (maybe) handed on before; `None`: none ever was.
    pub async fn read(&self, topic: &str, partition: i32) -> Result<Option<u64>, StoreError> {
        let mark = self.idempotency.offset(&self.producer(topic), partition as u32).await?.offset;
        if let Some(mark) = mark {
            let mut known = self.known.lock().await;
            let entry = known.entry((topic.to_string(), partition)).or_insert(mark);
            *entry = (*entry).max(mark);
        }
        Ok(mark)
    }

    /// Makes sure the mark covers `offset` before its message is handed on.
    pub async fn cover(&self, topic: &str, partition: i32, offset: i64) -> Result<(), IngestError> {
        let offset = offset.max(0) as u64;
        let mut known = self.known.lock().await;
        let key = (topic.to_string(), partition);
        if known.get(&key).is_some_and(|mark| *mark >= offset) {
            return Ok(());
        }
        let mark = offset + self.step;
        self.idempotency.advance_offset(&self.producer(topic), partition as u32, mark).await?;
        known.insert(key, mark);
        Ok(())
    }
}
