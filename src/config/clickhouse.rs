//! The ClickHouse servers: where they are (one node or a cluster, see `topology`), how to reach
//! them, and how INSERTs are sent, retried and cut off by the circuit breaker.

use serde::{Deserialize, Serialize};

use super::{ConfigError, ShardingKey, Topology, invalid, positive};

/// Compression of the blocks sent to ClickHouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// ClickHouse's native LZ4 block framing (`decompress=1`).
    Lz4,
    None,
}

/// How rows travel to ClickHouse in an INSERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InsertFormat {
    /// Columnar blocks, transcoded from the encoded rows just before the INSERT: the least
    /// work for the server. Tables with a type that is not transcoded fall back to RowBinary.
    Native,
    /// The rows as encoded, one after another.
    RowBinary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClickHouseSettings {
    /// One node (`http://h:8123`), or a cluster: shards separated by `;`, the replicas of a
    /// shard by `,` (`http://a1:8123,http://a2:8123;http://b1:8123`).
    pub clickhouse_url: String,
    /// A cluster of the servers' `remote_servers` (`system.clusters`): the shards' weights, the
    /// Distributed table's cluster, `ON CLUSTER` DDL. Required with several shards; with a
    /// single URL, the topology itself is read from it.
    pub clickhouse_cluster: String,
    /// The Distributed table's sharding key, by which rows are placed on shards: `rand()`,
    /// `cityHash64(col)` (String), `intHash64(col)` or `col` (unsigned integers).
    pub sharding_key: String,
    /// The Distributed table `migrate` creates over the shards' destinations, for reads;
    /// empty: the destination's name + `_all`.
    pub distributed_table: String,
    pub clickhouse_user: String,
    pub clickhouse_password: String,
    pub clickhouse_compression: Compression,
    pub insert_format: InsertFormat,
    /// Upper bound on one INSERT or metadata query, connection to answer.
    pub clickhouse_timeout_ms: u64,
    /// Concurrent INSERTs over all partitions; 0 means one per partition.
    pub max_concurrent_inserts: usize,
    /// Retries of a failed INSERT when the failure is retryable.
    pub insert_retries: u32,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Consecutive INSERT failures that open the circuit breaker (0 disables it).
    pub circuit_failures: u32,
    /// How long the breaker stays open before a probe INSERT.
    pub circuit_open_ms: u64,
    /// How often the table's columns and ClickHouse's reachability are re-read.
    pub schema_refresh_interval_ms: u64,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        Self {
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_cluster: String::new(),
            sharding_key: "rand()".into(),
            distributed_table: String::new(),
            clickhouse_user: "default".into(),
            clickhouse_password: String::new(),
            clickhouse_compression: Compression::Lz4,
            insert_format: InsertFormat::Native,
            clickhouse_timeout_ms: 30_000,
            max_concurrent_inserts: 0,
            insert_retries: 4,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 3_000,
            circuit_failures: 5,
            circuit_open_ms: 5_000,
            schema_refresh_interval_ms: 10_000,
        }
    }
}

impl ClickHouseSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let topology = Topology::parse(&self.clickhouse_url).map_err(|problem| invalid("clickhouse_url", problem))?;
        if topology.shards.len() > 1 && self.clickhouse_cluster.trim().is_empty() {
            return Err(invalid(
                "clickhouse_cluster",
                "must name the servers' cluster (remote_servers) when clickhouse_url lists several shards",
            ));
        }
        ShardingKey::parse(&self.sharding_key).map_err(|problem| invalid("sharding_key", problem))?;
        positive("clickhouse_timeout_ms", self.clickhouse_timeout_ms)?;
        if self.retry_initial_backoff_ms == 0 || self.retry_initial_backoff_ms > self.retry_max_backoff_ms {
            return Err(invalid("retry_initial_backoff_ms", "must be > 0 and <= retry_max_backoff_ms"));
        }
        if self.schema_refresh_interval_ms < 100 {
            return Err(invalid("schema_refresh_interval_ms", "must be at least 100"));
        }
        Ok(())
    }
}
