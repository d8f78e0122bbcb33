//! Gateway configuration: an optional TOML file overridden by `BUFFERGATE_*` environment
//! variables. Every key of the file is the lower-case name of its variable without the
//! prefix (`BUFFERGATE_MAX_BODY_BYTES` ⇔ `max_body_bytes`): the keys are flat, the public
//! contract. In the code they are grouped in sections, one file each, with its defaults and
//! its own validation; [`Config::validate`] checks the relations between sections.
//!
//! - [`http`]: the HTTP front and the bounds on what it holds;
//! - [`clickhouse`]: the servers, INSERTs, retries, the breaker; `topology` and
//!   `sharding` parse `clickhouse_url` and `sharding_key`;
//! - [`table`]: the Buffer, its destination, the columns the gateway fills;
//! - [`batching`]: partitions, queues, batch limits;
//! - [`shed`]: load shedding on the Buffer's fill;
//! - [`idempotency`]: the key store and deduplication;
//! - [`journal`]: the journal;
//! - [`auth`]: API keys and the admin token;
//! - [`kafka`]: the Kafka front.

pub mod auth;
pub mod batching;
pub mod clickhouse;
pub mod http;
pub mod idempotency;
pub mod journal;
pub mod kafka;
mod sharding;
pub mod shed;
pub mod streams;
pub mod table;
mod topology;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;

pub use auth::AuthSettings;
pub use batching::BatchingSettings;
pub use clickhouse::{ClickHouseSettings, Compression, InsertFormat};
pub use http::{HttpSettings, LogFormat};
pub use idempotency::{DedupMode, IdempotencySettings, OnStoreError};
pub use journal::{DEFAULT_DATA_DIR, JournalSettings};
pub use kafka::{KafkaCommit, KafkaSettings};
pub use sharding::{KeyFunction, ShardingKey};
pub use shed::{OnStale, ShedMode, ShedSettings};
pub use streams::{DEFAULT_STREAM, StreamName, StreamSettings};
pub use table::{Quarantine, TableSettings, UnknownFields};
pub use topology::{ClusterRow, ShardSpec, Topology, redacted};

/// What is wrong with a configuration; printed as is to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error("configuration: {0} is not a configuration key")]
    UnknownKey(String),
    #[error("configuration: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

fn positive(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 { Err(invalid(key, "must be greater than 0")) } else { Ok(()) }
}

/// The whole configuration, by section. Serialized, it is the flat map of keys (see
/// `docs/configuration.md`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    #[serde(flatten)]
    pub http: HttpSettings,
    #[serde(flatten)]
    pub clickhouse: ClickHouseSettings,
    #[serde(flatten)]
    pub table: TableSettings,
    #[serde(flatten)]
    pub batching: BatchingSettings,
    #[serde(flatten)]
    pub shed: ShedSettings,
    #[serde(flatten)]
    pub idempotency: IdempotencySettings,
    #[serde(flatten)]
    pub journal: JournalSettings,
    #[serde(flatten)]
    pub auth: AuthSettings,
    #[serde(flatten)]
    pub kafka: KafkaSettings,
    /// The stream this configuration serves: `default` for the top-level keys (see
    /// [`streams`]).
    #[serde(skip)]
    pub stream: StreamName,
    /// The `[streams.<name>]` tables, resolved; empty in a stream's own configuration.
    #[serde(skip)]
    pub streams: BTreeMap<String, StreamSettings>,
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
        let mut stream_tables = BTreeMap::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            let given: BTreeMap<String, figment::value::Value> =
                Figment::from(Toml::file(path)).extract().map_err(Box::new)?;
            let known = known_keys();
            if let Some(unknown) = given.keys().find(|key| !known.contains(key) && *key != "streams") {
                return Err(ConfigError::UnknownKey(unknown.clone()));
            }
            stream_tables = given.get("streams").map(stream_tables_of).transpose()?.unwrap_or_default();
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
        let mut config = Self::extract(&figment)?;
        // A stream's keys over the top-level ones (file and environment): what it leaves out
        // is the top level's.
        for (name, table) in stream_tables {
            let own_journal = table.contains_key("journal_max_bytes");
            let stream = Self::extract(&figment.clone().merge(Serialized::defaults(table)))?;
            let mut settings = StreamSettings::of(&stream);
            settings.journal_max_bytes = own_journal.then_some(stream.journal.journal_max_bytes);
            config.streams.insert(name, settings);
        }
        config.validate()?;
        Ok(config)
    }

    /// Section by section from the same keys: each error names its key.
    fn extract(figment: &Figment) -> Result<Self, ConfigError> {
        Ok(Config {
            http: figment.extract().map_err(Box::new)?,
            clickhouse: figment.extract().map_err(Box::new)?,
            table: figment.extract().map_err(Box::new)?,
            batching: figment.extract().map_err(Box::new)?,
            shed: figment.extract().map_err(Box::new)?,
            idempotency: figment.extract().map_err(Box::new)?,
            journal: figment.extract().map_err(Box::new)?,
            auth: figment.extract().map_err(Box::new)?,
            kafka: figment.extract().map_err(Box::new)?,
            stream: StreamName::default(),
            streams: BTreeMap::new(),
        })
    }

    /// Checks the configuration of every stream (see [`streams`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_one()?;
        self.validate_streams()
    }

    /// Checks each section, then the relations between sections that types alone cannot
    /// express.
    fn validate_one(&self) -> Result<(), ConfigError> {
        self.table.validate()?;
        self.clickhouse.validate()?;
        if self.topology_shards() > 1 && self.shed.shed_mode == ShedMode::Fallback {
            return Err(invalid("shed_mode", "fallback works with one shard; a cluster sheds per shard"));
        }
        self.http.validate()?;
        self.batching.validate()?;
        self.shed.validate()?;
        self.idempotency.validate()?;
        // An INSERT larger than the Buffer's max_rows/max_bytes bypasses the buffer and writes a
        // part straight into the destination: a gateway batch must never be that large.
        if self.batching.flush_max_rows as u64 >= self.table.buffer_max_rows {
            return Err(invalid("flush_max_rows", "must be below buffer_max_rows, or INSERTs bypass the Buffer"));
        }
        if self.batching.flush_max_bytes as u64 >= self.table.buffer_max_bytes {
            return Err(invalid("flush_max_bytes", "must be below buffer_max_bytes, or INSERTs bypass the Buffer"));
        }
        let fallback = &self.shed.fallback_table;
        if self.shed.shed_mode == ShedMode::Fallback
            && (fallback.is_empty() || fallback.contains('`') || *fallback == self.table.buffer_table)
        {
            return Err(invalid(
                "fallback_table",
                "must name a MergeTree table other than the Buffer when shed_mode = fallback",
            ));
        }
        // One flush's block must fit a segment, and a segment the journal.
        if self.journal_enabled()
            && (self.journal.journal_segment_bytes as usize) < self.batching.flush_max_bytes.saturating_mul(2)
        {
            return Err(invalid("journal_segment_bytes", "must be at least twice flush_max_bytes"));
        }
        self.journal.validate()?;
        self.kafka.validate()?;
        if !self.kafka.topics().is_empty()
            && self.kafka.kafka_commit_after != KafkaCommit::Written
            && !self.journal_enabled()
        {
            return Err(invalid(
                "kafka_commit_after",
                "journaled and visible need the journal; use written without it",
            ));
        }
        Ok(())
    }

    /// Shards `clickhouse_url` lists (1 when it does not parse: validation says why).
    fn topology_shards(&self) -> usize {
        Topology::parse(&self.clickhouse.clickhouse_url).map_or(1, |t| t.shards.len())
    }

    /// The consumed topics, trimmed, empty ones dropped.
    pub fn kafka_topics(&self) -> Vec<&str> {
        self.kafka.topics()
    }

    /// Partitions to run: the configured count, or one per [`CPUS_PER_PARTITION`] CPUs.
    pub fn partition_count(&self) -> usize {
        if self.batching.partitions > 0 {
            return self.batching.partitions;
        }
        partitions_for_cpus(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Concurrent INSERTs allowed over all partitions.
    pub fn insert_concurrency(&self) -> usize {
        let configured = self.clickhouse.max_concurrent_inserts;
        if configured > 0 { configured } else { self.partition_count() }
    }

    pub fn clickhouse_timeout(&self) -> Duration {
        Duration::from_millis(self.clickhouse.clickhouse_timeout_ms)
    }

    /// The sharding key, as validated.
    pub fn sharding(&self) -> ShardingKey {
        ShardingKey::parse(&self.clickhouse.sharding_key).unwrap_or(ShardingKey::Random)
    }

    /// This configuration for one node of the cluster: its URL, its share of the journal, its
    /// own data directory (one journal per node, see `journal`).
    pub fn for_node(&self, url: &str, data_dir: String, nodes: usize) -> Self {
        let journal = &self.journal;
        let journal_max_bytes =
            (journal.journal_max_bytes / nodes.max(1) as u64).max(journal.journal_segment_bytes.saturating_mul(2));
        let mut node = self.clone();
        node.clickhouse.clickhouse_url = url.to_string();
        node.journal.data_dir = data_dir;
        node.journal.journal_max_bytes = journal_max_bytes;
        node
    }

    /// Whether blocks are journaled (and ambiguous INSERTs resolved rather than retried).
    pub fn journal_enabled(&self) -> bool {
        self.journal.enabled()
    }
}

/// The `[streams.<name>]` tables of a file: each name's keys, every one table-scoped.
fn stream_tables_of(value: &figment::value::Value) -> Result<BTreeMap<String, figment::value::Dict>, ConfigError> {
    let not_tables = || invalid("streams", "must hold one table per stream: [streams.<name>]");
    let streams = value.as_dict().ok_or_else(not_tables)?;
    let mut tables = BTreeMap::new();
    for (name, table) in streams {
        let table = table.as_dict().ok_or_else(not_tables)?;
        if let Some(key) = table.keys().find(|key| !streams::SCOPED_KEYS.contains(&key.as_str())) {
            return Err(ConfigError::UnknownKey(format!(
                "streams.{name}.{key} (a stream sets only table-scoped keys, docs/streams.md)"
            )));
        }
        tables.insert(name.clone(), table.clone());
    }
    Ok(tables)
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
        let set = {
            let mut config = Config::default();
            config.batching.partitions = 3;
            config
        };
        assert_eq!((set.partition_count(), set.insert_concurrency()), (3, 3));
        let limited = {
            let mut config = Config::default();
            config.batching.partitions = 3;
            config.clickhouse.max_concurrent_inserts = 2;
            config
        };
        assert_eq!((limited.partition_count(), limited.insert_concurrency()), (3, 2));
    }

    #[test]
    fn streams_from_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "database = \"top\"\nflush_linger_ms = 3\n\n[streams.logs]\nbuffer_table = \"lb\"\n\
                 destination_table = \"l\"\nshed_threshold = 0.5\nshed_resume = 0.4\njournal_max_bytes = 1073741824\n",
            )?;
            jail.set_env("BUFFERGATE_FLUSH_LINGER_MS", "9");
            let config = Config::load(Some(Path::new("gw.toml"))).map_err(|e| e.to_string())?;
            let streams = config.streams();
            let logs = &streams[1];
            assert_eq!((logs.stream.as_str(), logs.table.database.as_str()), ("logs", "top"));
            assert_eq!((logs.table.buffer_table.as_str(), logs.shed.shed_threshold), ("lb", 0.5));
            assert_eq!(logs.batching.flush_linger_ms, 9, "what it leaves out: the top level, environment included");
            assert_eq!(logs.journal.journal_max_bytes, 1 << 30);
            assert_eq!(streams[0].table.buffer_table, "events_buffer");
            jail.create_file("bad.toml", "[streams.logs]\nbuffer_table = \"lb\"\nredis_url = \"redis://x\"\n")?;
            let error = Config::load(Some(Path::new("bad.toml"))).unwrap_err().to_string();
            assert!(error.contains("streams.logs.redis_url"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "database = \"from_file\"\nmax_events_per_request = 5\n")?;
            jail.set_env("BUFFERGATE_MAX_EVENTS_PER_REQUEST", "7");
            jail.set_env("BUFFERGATE_CLICKHOUSE_PASSWORD", "0123");
            let config = Config::load(Some(Path::new("gw.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.table.database, "from_file");
            assert_eq!(config.http.max_events_per_request, 7);
            assert_eq!(config.clickhouse.clickhouse_password, "0123");
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
