//! Keeps the shared schema in step with the table: reads the columns at start-up, then on a
//! timer and whenever an INSERT failure suggests the table changed. Also the readiness probe
//! of ClickHouse itself. On a cluster the nodes are asked in turn: one node down does not make
//! the gateway unready (every node has the same tables, `migrate` made them so).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{ClickHouse, ClickHouseError};
use crate::config::Config;
use crate::health::Health;
use crate::schema::{SharedSchema, SpecialColumns};

/// What the refresher needs, shared with the rest of the gateway.
#[derive(Debug, Clone)]
pub struct Refresher {
    /// Every node, the first listed first.
    pub nodes: Vec<ClickHouse>,
    pub schema: Arc<SharedSchema>,
    pub health: Arc<Health>,
    pub config: Arc<Config>,
    /// Notified by the INSERT path when a failure looks like a schema change.
    pub wake: Arc<Notify>,
    /// Shards of the cluster: with more than one, rows are placed by the sharding key.
    pub shards: usize,
}

impl Refresher {
    fn special(&self) -> SpecialColumns {
        SpecialColumns {
            id: self.config.table.id_column.clone(),
            timestamp: self.config.table.timestamp_column.clone(),
            partition_key: self.config.table.partition_key.clone(),
            sharding: self.sharding(),
        }
    }

    /// The column rows are placed on shards by: only with several shards and a key column.
    fn sharding(&self) -> Option<(String, crate::config::KeyFunction)> {
        match self.config.sharding() {
            crate::config::ShardingKey::Column { function, column } if self.shards > 1 => Some((column, function)),
            _ => None,
        }
    }

    /// Reads the columns once and updates the schema and health.
    pub async fn refresh(&self) {
        let (db, table) = (&self.config.table.database, &self.config.table.buffer_table);
        let mut answer = Err(ClickHouseError::Protocol("no ClickHouse node configured".into()));
        let mut answered = None;
        for ch in &self.nodes {
            answer = ch.columns(db, table).await;
            if answer.is_ok() {
                answered = Some(ch);
                break;
            }
        }
        match answer {
            Ok(columns) if columns.is_empty() => {
                self.health.set_clickhouse_up(true);
                self.health.set_table_present(false);
                tracing::warn!(database = %db, table = %table, "the Buffer table does not exist; run `buffergate migrate`");
            }
            Ok(columns) => {
                self.health.set_clickhouse_up(true);
                self.health.set_table_present(true);
                if self.health.clickhouse_version().is_none()
                    && let Some(ch) = answered
                    && let Ok(caps) = ch.capabilities().await
                {
                    self.health.set_clickhouse_server(caps.version, caps.timezone);
                }
                if let Some(version) = self.schema.update(db, table, columns, &self.special()) {
                    tracing::info!(version, database = %db, table = %table, "table schema loaded");
                    if let Some(problem) = self.schema.get().and_then(|s| s.sharding_problem()) {
                        tracing::error!(%problem, sharding_key = %self.config.clickhouse.sharding_key, "events cannot be placed on shards");
                    }
                }
            }
            Err(error) => {
                self.health.set_clickhouse_up(false);
                tracing::warn!(%error, "cannot read the table schema");
            }
        }
    }

    /// Refreshes every `schema_refresh_interval_ms` or when woken, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let interval = Duration::from_millis(self.config.clickhouse.schema_refresh_interval_ms);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
                () = self.wake.notified() => {}
            }
            self.refresh().await;
        }
    }
}
