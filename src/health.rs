//! What readiness is made of: ClickHouse answering, the Buffer table present with its schema
//! loaded, and the gateway not draining. Written by background tasks, read by `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    clickhouse_up: AtomicBool,
    table_present: AtomicBool,
    stopping: AtomicBool,
    clickhouse_version: std::sync::RwLock<Option<String>>,
    clickhouse_timezone: std::sync::RwLock<Option<std::sync::Arc<str>>>,
}

impl Health {
    pub fn set_clickhouse_up(&self, up: bool) {
        self.clickhouse_up.store(up, Ordering::Relaxed);
    }

    pub fn set_table_present(&self, present: bool) {
        self.table_present.store(present, Ordering::Relaxed);
    }

    pub fn set_clickhouse_server(&self, version: String, timezone: String) {
        if let Ok(mut slot) = self.clickhouse_version.write() {
            *slot = Some(version);
        }
        if let Ok(mut slot) = self.clickhouse_timezone.write() {
            *slot = Some(timezone.into());
        }
    }

    /// The server's time zone, once it answered.
    pub fn clickhouse_timezone(&self) -> Option<std::sync::Arc<str>> {
        self.clickhouse_timezone.read().ok().and_then(|v| v.clone())
    }

    pub fn clickhouse_version(&self) -> Option<String> {
        self.clickhouse_version.read().ok().and_then(|v| v.clone())
    }

    /// Marks the gateway as shutting down: not ready from now on.
    pub fn start_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// `Ok` when ready to take traffic, else why not.
    pub fn readiness(&self, schema_loaded: bool) -> Result<(), &'static str> {
        if self.is_stopping() {
            Err("the gateway is shutting down")
        } else if !self.clickhouse_up.load(Ordering::Relaxed) {
            Err("ClickHouse is not reachable")
        } else if !self.table_present.load(Ordering::Relaxed) {
            Err("the Buffer table does not exist (run `buffergate migrate`)")
        } else if !schema_loaded {
            Err("the table schema is not loaded yet")
        } else {
            Ok(())
        }
    }
}
