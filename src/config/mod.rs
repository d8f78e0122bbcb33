//! Gateway configuration: an optional TOML file overridden by `BUFFERGATE_*` environment
//! variables. Every key of the file is the lower-case name of its variable without the
//! prefix (`BUFFERGATE_MAX_BODY_BYTES` ⇔ `max_body_bytes`). Defaults sit next to each field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod sharding;
mod topology;

pub use sharding::{KeyFunction, ShardingKey};
pub use topology::{ClusterRow, ShardSpec, Topology};

/// The data directory of a local run; the container image sets `/var/lib/buffergate`.
pub const DEFAULT_DATA_DIR: &str = "buffergate-data";

/// What is wrong with a configuration; printed as is to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error("configuration: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// Per-event deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupMode {
    /// By the event's id column.
    Event,
    Off,
}

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// 503 + Retry-After, nothing written: the producer's retry loses nothing.
    Reject,
    /// Write without deduplication, and count it.
    Accept,
}

/// What to do while the Buffer is saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShedMode {
    /// Answer 503 `buffer_saturated` with `Retry-After`.
    Reject,
    /// Write batches straight into `fallback_table` (a MergeTree), bypassing the Buffer.
    Fallback,
}

/// What to do when the poller has had no answer from ClickHouse for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// Keep taking traffic as if the Buffer had room.
    FailOpen,
    /// Shed, as if the Buffer were saturated.
    FailClosed,
}

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

/// What to do with an event field that names no column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFields {
    /// Reject the event, naming the field: nothing a producer sends is dropped silently.
    Reject,
    /// Store the known fields and drop the others.
    Ignore,
}

/// When the Kafka consumer commits a message's offset: once its rows are...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaCommit {
    /// ...in the journal on disk (needs the journal): restored from there after any crash.
    Journaled,
    /// ...in the Buffer table (an INSERT succeeded).
    Written,
    /// ...in the destination MergeTree table (needs the journal): Kafka keeps them until then.
    Visible,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole configuration. Field names are the public contract (see `docs/configuration.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    pub log_format: LogFormat,

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

    pub database: String,
    pub buffer_table: String,
    pub destination_table: String,

    /// `Buffer(...)` engine arguments used by `migrate` (thresholds are per layer).
    pub buffer_num_layers: u32,
    pub buffer_min_time: u64,
    pub buffer_max_time: u64,
    pub buffer_min_rows: u64,
    pub buffer_max_rows: u64,
    pub buffer_min_bytes: u64,
    pub buffer_max_bytes: u64,

    /// Largest request body accepted as sent on the wire (compressed or not).
    pub max_body_bytes: usize,
    /// Largest request body accepted after decompression (gzip-bomb guard).
    pub max_decompressed_bytes: usize,
    pub max_events_per_request: usize,
    pub unknown_fields: UnknownFields,

    /// UUID column filled with a generated UUIDv7 when an event omits it.
    pub id_column: String,
    /// Time column filled with the receive time when an event omits it.
    pub timestamp_column: String,
    /// Event field whose value picks the coalescer partition.
    pub partition_key: String,

    /// Coalescer partitions (per shard on a cluster); 0 means one per [`CPUS_PER_PARTITION`] CPUs, at least one.
    pub partitions: usize,
    /// Submissions (one per request and partition) a partition queues before producers wait.
    pub queue_capacity: usize,
    /// How long a request waits for room in a full queue before it gets 503.
    pub queue_timeout_ms: u64,
    /// A batch is sent once it holds this many rows...
    pub flush_max_rows: usize,
    /// ...or this many encoded bytes...
    pub flush_max_bytes: usize,
    /// ...or its first row has waited this long while no INSERT was pending (0: send at once).
    pub flush_linger_ms: u64,
    /// Concurrent INSERTs over all partitions; 0 means one per partition.
    pub max_concurrent_inserts: usize,
    /// Retries of a failed INSERT when the failure is retryable.
    pub insert_retries: u32,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,

    /// How often the table's columns and ClickHouse's reachability are re-read.
    pub schema_refresh_interval_ms: u64,
    /// After SIGTERM, keep serving (not ready) this long so load balancers stop routing here.
    pub shutdown_delay_ms: u64,

    /// How often the Buffer's fill is polled.
    pub shed_poll_interval_ms: u64,
    /// Fill ratio at which ingestion is shed...
    pub shed_threshold: f64,
    /// ...and below which it resumes (hysteresis).
    pub shed_resume: f64,
    /// Buffer capacity in bytes; 0 reads `num_layers × max_bytes` from the table's engine.
    pub buffer_capacity_bytes: u64,
    /// With no poll answer for this long, the fill is unknown: apply `shed_on_stale`.
    pub shed_stale_after_ms: u64,
    pub shed_on_stale: OnStale,
    pub shed_mode: ShedMode,
    /// MergeTree table (same columns as the Buffer) that takes batches in fallback mode.
    pub fallback_table: String,
    /// Report not-ready while shedding, so load balancers route around this replica.
    pub shed_readiness: bool,
    /// Upper bound of the `Retry-After` given to shed producers.
    pub shed_retry_after_max_s: u32,
    /// Budget of bytes in flight: bodies being decoded plus encoded rows queued.
    pub max_inflight_bytes: usize,
    /// Ingestion requests handled at once; more get 503 at once.
    pub max_concurrent_requests: usize,
    /// An ingestion request still unanswered after this long gets 503.
    pub request_timeout_ms: u64,
    /// A request body not fully received after this long gets 408: a stalled upload must not
    /// hold a connection and an in-flight slot for the whole request timeout.
    pub body_timeout_ms: u64,
    /// Bytes of a refused request's body read and thrown away before the answer, so that a
    /// client that sends its whole body before reading gets the answer instead of a reset
    /// connection (0: never drain).
    pub body_drain_max_bytes: u64,
    /// How long that drain may take at most.
    pub body_drain_timeout_ms: u64,
    /// A connection whose request head (line and headers) has not arrived this long after the
    /// connection opened or its previous answer was sent is closed: slow-header clients, and
    /// idle keep-alive connections, hold no socket beyond it.
    pub header_timeout_ms: u64,
    /// Open client connections at most; a connection accepted beyond it is closed at once, so
    /// idle or slow clients can never take the file descriptors the gateway needs for
    /// ClickHouse, Redis and the journal. At start the soft open-files limit is raised (up to
    /// the hard one) to leave room for them.
    pub max_connections: usize,
    /// Consecutive INSERT failures that open the circuit breaker (0 disables it).
    pub circuit_failures: u32,
    /// How long the breaker stays open before a probe INSERT.
    pub circuit_open_ms: u64,

    /// Redis for idempotency keys and producer offsets; empty: the in-process store (one
    /// replica only).
    /// `redis+cluster://h1:6379,h2:6379` for a Redis Cluster (the nodes are seeds).
    pub redis_url: String,
    pub redis_timeout_ms: u64,
    /// Replicas each store write must reach (`WAIT`) before it counts; 0: Redis's asynchronous
    /// replication alone.
    pub redis_wait_replicas: u32,
    /// How long a write waits for those replicas before it is reported failed.
    pub redis_wait_timeout_ms: u64,
    /// Groups the event ids are spread over (one hash tag, so one cluster slot, each); fixed
    /// for the life of the remembered ids. 0: 1 on one primary, 16 on a cluster.
    pub redis_key_groups: u16,
    /// Per-event deduplication by `id_column`.
    pub dedup: DedupMode,
    pub dedup_on_store_error: OnStoreError,
    pub dedup_key_prefix: String,
    /// How long a reservation holds before it expires (a crashed gateway's events become
    /// writable again after this); must outlast a flush with its retries.
    pub dedup_lease_ms: u64,
    /// How long a written event's key (and a request's answer) is remembered.
    pub dedup_window_ms: u64,
    /// How long a request waits for events another request is writing before it gets 503.
    pub dedup_pending_wait_ms: u64,

    /// Where the gateway keeps its journal (a volume in a container).
    pub data_dir: String,
    /// Journal every block before it is acknowledged (see `docs/delivery-guarantees.md`);
    /// off: a 200 means the rows reached the Buffer's RAM, and an ambiguous INSERT is retried.
    pub journal: bool,
    /// Bound of the journal on disk; when full, requests get 503 `journal_full`.
    pub journal_max_bytes: u64,
    /// Size at which the journal starts a new segment file.
    pub journal_segment_bytes: u64,
    /// How often unconfirmed blocks are checked against ClickHouse.
    pub confirm_interval_ms: u64,
    /// Margin past the Buffer's `max_time` before a block is looked for in the destination.
    pub confirm_grace_ms: u64,
    /// At shutdown, how long to spend flushing the Buffer and confirming the journal.
    pub shutdown_confirm_ms: u64,

    /// Bearer token of the admin API (`/admin/flush`, `/v1/status`); empty disables it.
    pub admin_token: String,
    /// Producer API keys, comma-separated (`name=key` or `key`); with `api_keys_file`, both
    /// count. None: producer authentication is off.
    pub api_keys: String,
    /// A file of API keys, one per line (e.g. a mounted Kubernetes Secret).
    pub api_keys_file: String,
    /// Requests per second allowed per API key (0: unlimited)...
    pub api_key_rate_per_s: f64,
    /// ...with bursts of this many.
    pub api_key_burst: u32,

    /// Kafka bootstrap brokers, comma-separated (`buffergate consume`; docs/kafka.md).
    pub kafka_brokers: String,
    /// Topics consumed, comma-separated.
    pub kafka_topics: String,
    /// The consumer group.
    pub kafka_group: String,
    /// Where messages that cannot be decoded or validated go; empty: logged, counted, skipped.
    pub kafka_dead_letter_topic: String,
    /// librdkafka properties passed through to the consumer and the dead-letter producer
    /// (`key=value`, one per line): TLS, SASL, timeouts.
    pub kafka_properties: String,
    /// A file of such properties (e.g. a mounted Secret); its lines come after `kafka_properties`.
    pub kafka_properties_file: String,
    /// When a message's offset may be committed.
    pub kafka_commit_after: KafkaCommit,
    /// How often finished offsets are committed.
    pub kafka_commit_interval_ms: u64,
    /// Messages being delivered at once; the partitions pause beyond it.
    pub kafka_max_in_flight: usize,
    /// On a revoke, how long to wait for the revoked partitions' messages before giving them up.
    pub kafka_revoke_timeout_ms: u64,
    /// How often the partitions' high watermarks are read for the lag gauge.
    pub kafka_lag_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            log_format: LogFormat::Text,
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_cluster: String::new(),
            sharding_key: "rand()".into(),
            distributed_table: String::new(),
            clickhouse_user: "default".into(),
            clickhouse_password: String::new(),
            clickhouse_compression: Compression::Lz4,
            insert_format: InsertFormat::Native,
            clickhouse_timeout_ms: 30_000,
            database: "analytics".into(),
            buffer_table: "events_buffer".into(),
            destination_table: "events_raw".into(),
            buffer_num_layers: 16,
            buffer_min_time: 10,
            buffer_max_time: 60,
            buffer_min_rows: 100_000,
            buffer_max_rows: 1_000_000,
            buffer_min_bytes: 10 * 1024 * 1024,
            // The seed's 10 GiB per layer would let 16 layers hold 160 GiB of RAM; 128 MiB per
            // layer caps the Buffer at 2 GiB, above what 1M seed-shaped rows occupy per layer.
            buffer_max_bytes: 128 * 1024 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            max_decompressed_bytes: 10 * 1024 * 1024,
            max_events_per_request: 10_000,
            unknown_fields: UnknownFields::Reject,
            id_column: "event_id".into(),
            timestamp_column: "event_ts".into(),
            partition_key: "user_id".into(),
            partitions: 0,
            queue_capacity: 1024,
            queue_timeout_ms: 1_000,
            flush_max_rows: 100_000,
            flush_max_bytes: 16 * 1024 * 1024,
            flush_linger_ms: 0,
            max_concurrent_inserts: 0,
            insert_retries: 4,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 3_000,
            schema_refresh_interval_ms: 10_000,
            shutdown_delay_ms: 0,
            shed_poll_interval_ms: 1_000,
            shed_threshold: 0.8,
            shed_resume: 0.7,
            buffer_capacity_bytes: 0,
            shed_stale_after_ms: 10_000,
            shed_on_stale: OnStale::FailClosed,
            shed_mode: ShedMode::Reject,
            fallback_table: String::new(),
            shed_readiness: true,
            shed_retry_after_max_s: 30,
            max_inflight_bytes: 256 * 1024 * 1024,
            max_concurrent_requests: 1024,
            request_timeout_ms: 60_000,
            body_timeout_ms: 10_000,
            body_drain_max_bytes: 64 * 1024 * 1024,
            body_drain_timeout_ms: 10_000,
            header_timeout_ms: 75_000,
            max_connections: 4096,
            circuit_failures: 5,
            circuit_open_ms: 5_000,
            redis_url: String::new(),
            redis_timeout_ms: 1_000,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 100,
            redis_key_groups: 0,
            dedup: DedupMode::Event,
            dedup_on_store_error: OnStoreError::Reject,
            dedup_key_prefix: "bg:".into(),
            dedup_lease_ms: 60_000,
            dedup_window_ms: 24 * 3600 * 1000,
            dedup_pending_wait_ms: 10_000,
            data_dir: DEFAULT_DATA_DIR.into(),
            journal: true,
            journal_max_bytes: 4 << 30,
            journal_segment_bytes: 64 << 20,
            confirm_interval_ms: 1_000,
            confirm_grace_ms: 5_000,
            shutdown_confirm_ms: 20_000,
            admin_token: String::new(),
            api_keys: String::new(),
            api_keys_file: String::new(),
            api_key_rate_per_s: 0.0,
            api_key_burst: 100,
            kafka_brokers: String::new(),
            kafka_topics: String::new(),
            kafka_group: "buffergate".into(),
            kafka_dead_letter_topic: String::new(),
            kafka_properties: String::new(),
            kafka_properties_file: String::new(),
            kafka_commit_after: KafkaCommit::Journaled,
            kafka_commit_interval_ms: 1_000,
            kafka_max_in_flight: 1_000,
            kafka_revoke_timeout_ms: 30_000,
            kafka_lag_interval_ms: 5_000,
        }
    }
}

const ENV_PREFIX: &str = "BUFFERGATE_";

/// CPUs per coalescer partition when `partitions` is 0. Each partition sends its own INSERTs,
/// and ClickHouse pays a fixed cost per INSERT (~0.4 ms of CPU on 18.16 here) besides its cost
/// per row, so fewer partitions mean fewer, larger INSERTs: one partition instead of two cut
/// ClickHouse's CPU per event by a quarter to a half in the benchmark. What a partition does
/// alone, transposing and compressing its batches, is ~0.2 µs per event, so one partition
/// keeps up with the request handling of several cores (docs/batching.md).
pub const CPUS_PER_PARTITION: usize = 8;

/// The configuration keys, lower case (the file's keys; the variables without their prefix),
/// each with whether its value is text.
fn keys() -> Vec<(String, bool)> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(map)) => map.into_iter().map(|(k, v)| (k, v.is_string())).collect(),
        _ => Vec::new(),
    }
}

fn known_keys() -> Vec<String> {
    keys().into_iter().map(|(k, _)| k).collect()
}

/// `BUFFERGATE_*` variables that name no configuration key (ignored; worth a warning).
pub fn unknown_env_vars() -> Vec<String> {
    let known = known_keys();
    std::env::vars()
        .filter_map(|(name, _)| {
            let key = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
            (key != "config" && !known.contains(&key)).then_some(name)
        })
        .collect()
}

impl Config {
    /// Loads defaults, then the TOML file (if any), then `BUFFERGATE_*` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only known keys: Kubernetes injects BUFFERGATE_PORT, BUFFERGATE_SERVICE_HOST... into
        // pods when a Service is named `buffergate`; those must not stop the gateway.
        // Figment parses variables as TOML-like scalars, which would turn a password "0123" into
        // the number 123: text keys are taken verbatim instead, the others parsed.
        let (text, parsed): (Vec<_>, Vec<_>) = keys().into_iter().partition(|(_, is_text)| *is_text);
        let parsed: Vec<String> = parsed.into_iter().map(|(k, _)| k).collect();
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX).filter(move |key| parsed.iter().any(|k| key.as_str().eq_ignore_ascii_case(k))),
        );
        let verbatim: BTreeMap<String, String> = text
            .into_iter()
            .filter_map(|(key, _)| {
                Some((key.clone(), std::env::var(format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())).ok()?))
            })
            .collect();
        figment = figment.merge(Serialized::defaults(verbatim));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between values that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key, problem: problem.into() }
        }
        for (key, value) in [
            ("database", &self.database),
            ("buffer_table", &self.buffer_table),
            ("destination_table", &self.destination_table),
        ] {
            if value.is_empty() || value.contains('`') || value.contains('\0') {
                return Err(invalid(key, "must be a non-empty identifier without backticks"));
            }
        }
        if self.buffer_table == self.destination_table {
            return Err(invalid("buffer_table", "must differ from destination_table"));
        }
        let topology = Topology::parse(&self.clickhouse_url).map_err(|problem| invalid("clickhouse_url", problem))?;
        if topology.shards.len() > 1 && self.clickhouse_cluster.trim().is_empty() {
            return Err(invalid(
                "clickhouse_cluster",
                "must name the servers' cluster (remote_servers) when clickhouse_url lists several shards",
            ));
        }
        if topology.shards.len() > 1 && self.shed_mode == ShedMode::Fallback {
            return Err(invalid("shed_mode", "fallback works with one shard; a cluster sheds per shard"));
        }
        ShardingKey::parse(&self.sharding_key).map_err(|problem| invalid("sharding_key", problem))?;
        for (key, value) in [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_decompressed_bytes", self.max_decompressed_bytes as u64),
            ("max_events_per_request", self.max_events_per_request as u64),
            ("queue_capacity", self.queue_capacity as u64),
            ("flush_max_rows", self.flush_max_rows as u64),
            ("flush_max_bytes", self.flush_max_bytes as u64),
            ("clickhouse_timeout_ms", self.clickhouse_timeout_ms),
            ("shed_poll_interval_ms", self.shed_poll_interval_ms),
            ("shed_stale_after_ms", self.shed_stale_after_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("shed_retry_after_max_s", u64::from(self.shed_retry_after_max_s)),
            ("max_inflight_bytes", self.max_inflight_bytes as u64),
            ("max_concurrent_requests", self.max_concurrent_requests as u64),
            ("max_connections", self.max_connections as u64),
            ("redis_timeout_ms", self.redis_timeout_ms),
            ("redis_wait_timeout_ms", self.redis_wait_timeout_ms),
            ("dedup_lease_ms", self.dedup_lease_ms),
            ("dedup_window_ms", self.dedup_window_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.dedup_key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "dedup_key_prefix",
                "must not contain { or }: the gateway's keys carry their own hash tags",
            ));
        }
        if self.redis_key_groups > 16384 {
            return Err(invalid("redis_key_groups", "must be at most 16384 (Redis Cluster's slots)"));
        }
        if self.buffer_num_layers == 0 || self.buffer_num_layers > 256 {
            return Err(invalid("buffer_num_layers", "must be between 1 and 256"));
        }
        if self.buffer_min_time > self.buffer_max_time
            || self.buffer_min_rows > self.buffer_max_rows
            || self.buffer_min_bytes > self.buffer_max_bytes
        {
            return Err(invalid("buffer_min_*", "each minimum must not exceed its maximum"));
        }
        // An INSERT larger than the Buffer's max_rows/max_bytes bypasses the buffer and writes a
        // part straight into the destination: a gateway batch must never be that large.
        if self.flush_max_rows as u64 >= self.buffer_max_rows {
            return Err(invalid("flush_max_rows", "must be below buffer_max_rows, or INSERTs bypass the Buffer"));
        }
        if self.flush_max_bytes as u64 >= self.buffer_max_bytes {
            return Err(invalid("flush_max_bytes", "must be below buffer_max_bytes, or INSERTs bypass the Buffer"));
        }
        if self.retry_initial_backoff_ms == 0 || self.retry_initial_backoff_ms > self.retry_max_backoff_ms {
            return Err(invalid("retry_initial_backoff_ms", "must be > 0 and <= retry_max_backoff_ms"));
        }
        if self.schema_refresh_interval_ms < 100 {
            return Err(invalid("schema_refresh_interval_ms", "must be at least 100"));
        }
        if !(0.0 < self.shed_resume && self.shed_resume <= self.shed_threshold && self.shed_threshold <= 1.0) {
            return Err(invalid("shed_threshold", "needs 0 < shed_resume <= shed_threshold <= 1"));
        }
        if self.shed_mode == ShedMode::Fallback
            && (self.fallback_table.is_empty()
                || self.fallback_table.contains('`')
                || self.fallback_table == self.buffer_table)
        {
            return Err(invalid(
                "fallback_table",
                "must name a MergeTree table other than the Buffer when shed_mode = fallback",
            ));
        }
        if self.max_inflight_bytes < self.max_body_bytes + self.max_decompressed_bytes {
            return Err(invalid(
                "max_inflight_bytes",
                "must hold at least one request (max_body_bytes + max_decompressed_bytes)",
            ));
        }
        if self.dedup_window_ms < self.dedup_lease_ms {
            return Err(invalid("dedup_window_ms", "must be at least dedup_lease_ms"));
        }
        if self.journal_enabled() {
            // One flush's block must fit a segment, and a segment the journal.
            if (self.journal_segment_bytes as usize) < self.flush_max_bytes.saturating_mul(2) {
                return Err(invalid("journal_segment_bytes", "must be at least twice flush_max_bytes"));
            }
            if self.journal_max_bytes < self.journal_segment_bytes.saturating_mul(2) {
                return Err(invalid("journal_max_bytes", "must be at least two segments (journal_segment_bytes)"));
            }
            if self.confirm_interval_ms < 10 {
                return Err(invalid("confirm_interval_ms", "must be at least 10"));
            }
        }
        self.validate_kafka()
    }

    /// The Kafka front's settings, checked only when `kafka_topics` is set (`consume`).
    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| Err(ConfigError::Invalid { key, problem: problem.into() });
        if self.kafka_topics().is_empty() {
            return Ok(());
        }
        if self.kafka_brokers.trim().is_empty() {
            return invalid("kafka_brokers", "must name at least one broker when kafka_topics is set");
        }
        if self.kafka_group.trim().is_empty() {
            return invalid("kafka_group", "must not be empty");
        }
        if self.kafka_topics().iter().any(|t| *t == self.kafka_dead_letter_topic.trim()) {
            return invalid("kafka_dead_letter_topic", "must not be one of kafka_topics");
        }
        if self.kafka_commit_after != KafkaCommit::Written && !self.journal_enabled() {
            return invalid("kafka_commit_after", "journaled and visible need the journal; use written without it");
        }
        if self.kafka_max_in_flight == 0 || self.kafka_commit_interval_ms == 0 || self.kafka_lag_interval_ms == 0 {
            return invalid("kafka_max_in_flight", "kafka_max_in_flight and the kafka_*_interval_ms must be > 0");
        }
        Ok(())
    }

    /// The consumed topics, trimmed, empty ones dropped.
    pub fn kafka_topics(&self) -> Vec<&str> {
        self.kafka_topics.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
    }

    /// Partitions to run: the configured count, or one per [`CPUS_PER_PARTITION`] CPUs.
    pub fn partition_count(&self) -> usize {
        if self.partitions > 0 {
            return self.partitions;
        }
        partitions_for_cpus(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Concurrent INSERTs allowed over all partitions.
    pub fn insert_concurrency(&self) -> usize {
        if self.max_concurrent_inserts > 0 { self.max_concurrent_inserts } else { self.partition_count() }
    }

    pub fn clickhouse_timeout(&self) -> Duration {
        Duration::from_millis(self.clickhouse_timeout_ms)
    }

    /// The sharding key, as validated.
    pub fn sharding(&self) -> ShardingKey {
        ShardingKey::parse(&self.sharding_key).unwrap_or(ShardingKey::Random)
    }

    /// This configuration for one node of the cluster: its URL, its share of the journal, its
    /// own data directory (one journal per node, see `journal`).
    pub fn for_node(&self, url: &str, data_dir: String, nodes: usize) -> Self {
        let journal_max_bytes =
            (self.journal_max_bytes / nodes.max(1) as u64).max(self.journal_segment_bytes.saturating_mul(2));
        Self { clickhouse_url: url.to_string(), data_dir, journal_max_bytes, ..self.clone() }
    }

    /// Whether blocks are journaled (and ambiguous INSERTs resolved rather than retried).
    pub fn journal_enabled(&self) -> bool {
        self.journal && !self.data_dir.is_empty()
    }
}

/// Partitions for a machine of `cpus` CPUs when none are configured: one per
/// [`CPUS_PER_PARTITION`], at least one. Apart from [`Config::partition_count`] so tests can
/// ask about machines other than the one they run on.
pub fn partitions_for_cpus(cpus: usize) -> usize {
    cpus.div_ceil(CPUS_PER_PARTITION).max(1)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn partitions_default_to_one_per_eight_cpus() {
        let table = [(1, 1), (2, 1), (7, 1), (8, 1), (9, 2), (16, 2), (17, 3), (64, 8), (65, 9)];
        for (cpus, partitions) in table {
            assert_eq!(partitions_for_cpus(cpus), partitions, "{cpus} CPUs");
        }
        assert_eq!(partitions_for_cpus(0), 1, "never no partition");
        // This machine's count goes through the same function: 1 up to 8 CPUs, more above.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let auto = Config::default();
        assert_eq!(auto.partition_count(), partitions_for_cpus(cpus));
        if cpus <= 8 {
            assert_eq!(auto.partition_count(), 1, "{cpus} CPUs");
        }
        assert_eq!(auto.insert_concurrency(), auto.partition_count());
        let set = Config { partitions: 3, ..Config::default() };
        assert_eq!((set.partition_count(), set.insert_concurrency()), (3, 3));
        let limited = Config { partitions: 3, max_concurrent_inserts: 2, ..Config::default() };
        assert_eq!((limited.partition_count(), limited.insert_concurrency()), (3, 2));
    }

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "database = \"from_file\"\nmax_events_per_request = 5\n")?;
            jail.set_env("BUFFERGATE_MAX_EVENTS_PER_REQUEST", "7");
            jail.set_env("BUFFERGATE_CLICKHOUSE_PASSWORD", "0123");
            let config = Config::load(Some(Path::new("gw.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.database, "from_file");
            assert_eq!(config.max_events_per_request, 7);
            assert_eq!(config.clickhouse_password, "0123");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("BUFFERGATE_MAX_BODY_BYTES", "lots");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("max_body_bytes") || err.contains("MAX_BODY_BYTES"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("BUFFERGATE_FLUSH_MAX_ROWS", "2000000");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("bypass"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "not_a_key = 1\n")?;
            let err = Config::load(Some(Path::new("gw.toml"))).unwrap_err().to_string();
            assert!(err.contains("not_a_key"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("BUFFERGATE_PORT_8080_TCP", "tcp://10.0.0.1:8080");
            Config::load(None).map_err(|e| e.to_string())?;
            assert!(unknown_env_vars().contains(&"BUFFERGATE_PORT_8080_TCP".to_string()));
            Ok(())
        });
    }
}
