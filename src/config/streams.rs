//! Streams: names bound to one destination each. `[streams.<name>]` tables of the file give a
//! stream its `database`, `buffer_table`, `destination_table` and any table-scoped key; every
//! key it leaves out takes the top-level value. The top-level keys themselves define the
//! stream named `default`, so a file without `[streams]` serves one table as before.
//!
//! A stream's configuration is a whole [`Config`] (see [`Config::streams`]): every part of the
//! gateway that serves one table reads its own, unaware that other streams exist.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    BatchingSettings, Config, ConfigError, DedupMode, Quarantine, ShedMode, TableSettings, UnknownFields, invalid,
};

/// The name of the stream the top-level keys define.
pub const DEFAULT_STREAM: &str = "default";

/// The keys a `[streams.<name>]` table may set: those that belong to one table.
pub const SCOPED_KEYS: &[&str] = &[
    "database",
    "buffer_table",
    "destination_table",
    "buffer_num_layers",
    "buffer_min_time",
    "buffer_max_time",
    "buffer_min_rows",
    "buffer_max_rows",
    "buffer_min_bytes",
    "buffer_max_bytes",
    "unknown_fields",
    "id_column",
    "timestamp_column",
    "partition_key",
    "timestamp_max_age_s",
    "timestamp_max_ahead_s",
    "quarantine",
    "quarantine_max_raw_bytes",
    "dedup",
    "shed_threshold",
    "shed_resume",
    "shed_mode",
    "fallback_table",
    "buffer_capacity_bytes",
    "partitions",
    "flush_max_rows",
    "flush_max_bytes",
    "flush_linger_ms",
    "sharding_key",
    "distributed_table",
    "journal_max_bytes",
];

/// A stream's name: `[a-z0-9_-]{1,64}`, checked where it is made. Cheap to clone: it labels
/// metrics on the hot path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl Default for StreamName {
    fn default() -> Self {
        Self(Arc::from(DEFAULT_STREAM))
    }
}

impl StreamName {
    /// The name, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        let valid = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        valid.then(|| Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The internal stream that carries this stream's rejected events into its quarantine
    /// table: `<name>.quarantine`, a name no `[streams]` table and no URL can give.
    pub fn quarantine(&self) -> Self {
        Self(Arc::from(format!("{}.quarantine", self.0)))
    }

    pub fn is_default(&self) -> bool {
        &*self.0 == DEFAULT_STREAM
    }

    /// The name, shared (a metric label without a copy).
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl std::fmt::Display for StreamName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a stream sets for itself: the table-scoped keys, every one resolved (a key the
/// stream's table leaves out holds the top-level value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamSettings {
    /// Flat, as a `[streams.<name>]` table spells its keys.
    #[serde(flatten)]
    pub table: TableSettings,
    pub dedup: DedupMode,
    pub shed_threshold: f64,
    pub shed_resume: f64,
    pub shed_mode: ShedMode,
    pub fallback_table: String,
    pub buffer_capacity_bytes: u64,
    pub partitions: usize,
    pub flush_max_rows: usize,
    pub flush_max_bytes: usize,
    pub flush_linger_ms: u64,
    pub sharding_key: String,
    pub distributed_table: String,
    /// The stream's own journal bound, when its table sets one; otherwise the streams that set
    /// none share what the others leave of the top-level `journal_max_bytes` evenly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_max_bytes: Option<u64>,
}

impl StreamSettings {
    /// The table-scoped values of `config`: a new stream starts from the top-level ones.
    pub fn of(config: &Config) -> Self {
        let BatchingSettings { partitions, flush_max_rows, flush_max_bytes, flush_linger_ms, .. } = config.batching;
        Self {
            table: config.table.clone(),
            dedup: config.idempotency.dedup,
            shed_threshold: config.shed.shed_threshold,
            shed_resume: config.shed.shed_resume,
            shed_mode: config.shed.shed_mode,
            fallback_table: config.shed.fallback_table.clone(),
            buffer_capacity_bytes: config.shed.buffer_capacity_bytes,
            partitions,
            flush_max_rows,
            flush_max_bytes,
            flush_linger_ms,
            sharding_key: config.clickhouse.sharding_key.clone(),
            distributed_table: config.clickhouse.distributed_table.clone(),
            journal_max_bytes: None,
        }
    }

    /// Writes these values over `config`'s.
    fn apply(&self, config: &mut Config) {
        config.table = self.table.clone();
        config.idempotency.dedup = self.dedup;
        config.shed.shed_threshold = self.shed_threshold;
        config.shed.shed_resume = self.shed_resume;
        config.shed.shed_mode = self.shed_mode;
        config.shed.fallback_table = self.fallback_table.clone();
        config.shed.buffer_capacity_bytes = self.buffer_capacity_bytes;
        config.batching.partitions = self.partitions;
        config.batching.flush_max_rows = self.flush_max_rows;
        config.batching.flush_max_bytes = self.flush_max_bytes;
        config.batching.flush_linger_ms = self.flush_linger_ms;
        config.clickhouse.sharding_key = self.sharding_key.clone();
        config.clickhouse.distributed_table = self.distributed_table.clone();
    }
}

impl Config {
    /// Adds (or replaces) the stream `name`, starting from the top-level table-scoped values
    /// and changed by `set`. The programmatic twin of a `[streams.<name>]` table.
    pub fn add_stream(&mut self, name: &str, set: impl FnOnce(&mut StreamSettings)) -> &mut Self {
        let mut settings = StreamSettings::of(self);
        set(&mut settings);
        self.streams.insert(name.to_string(), settings);
        self
    }

    /// Every stream's own configuration, `default` first: the top-level configuration with the
    /// stream's table-scoped values, its own journal directory and share of `journal_max_bytes`,
    /// and its own namespace of idempotency keys. The `default` stream keeps the top-level
    /// directory and key prefix, so a gateway that gains streams keeps its journal and keys.
    pub fn streams(&self) -> Vec<Arc<Config>> {
        let count = 1 + self.streams.len() as u64;
        // A journal's room is its own, so that a stream whose destination stops confirming
        // fills its journal only: set per stream, or an even share of what is left.
        let set: u64 = self.streams.values().filter_map(|s| s.journal_max_bytes).sum();
        let unset = count - self.streams.values().filter(|s| s.journal_max_bytes.is_some()).count() as u64;
        let share = (self.journal.journal_max_bytes.saturating_sub(set) / unset.max(1))
            .max(self.journal.journal_segment_bytes.saturating_mul(2));
        let mut top = self.clone();
        top.streams.clear();
        top.stream = StreamName::default();
        let mut streams = Vec::with_capacity(count as usize);
        for (name, settings) in &self.streams {
            let mut config = top.clone();
            settings.apply(&mut config);
            config.stream = StreamName::parse(name).unwrap_or_default();
            if !config.journal.data_dir.is_empty() {
                config.journal.data_dir = stream_dir(&self.journal.data_dir, name);
            }
            config.journal.journal_max_bytes = settings.journal_max_bytes.unwrap_or(share);
            // `<prefix><name>/`: a default key continues the prefix with `{`, `r:`, `o:`, `t:` or
            // `e:`, never with a name followed by `/` (names hold neither `:` nor `{`).
            config.idempotency.dedup_key_prefix = format!("{}{name}/", self.idempotency.dedup_key_prefix);
            // Its own consumer group: a group's members must read the same topics to share them.
            config.kafka.kafka_topics = topics_of(self, name);
            config.kafka.kafka_group = format!("{}-{name}", self.kafka.kafka_group.trim());
            streams.push(Arc::new(config));
        }
        top.journal.journal_max_bytes = share;
        top.kafka.kafka_topics = topics_of(self, DEFAULT_STREAM);
        streams.insert(0, Arc::new(top));
        streams
    }

    /// The names of every configured stream, `default` first.
    pub fn stream_names(&self) -> Vec<String> {
        std::iter::once(DEFAULT_STREAM.to_string()).chain(self.streams.keys().cloned()).collect()
    }

    /// Checks each stream's name and its configuration, and that no two streams share a table.
    pub(super) fn validate_streams(&self) -> Result<(), ConfigError> {
        let streams = self.streams();
        for name in self.streams.keys() {
            if name == DEFAULT_STREAM {
                return Err(invalid("streams", "`default` is the stream of the top-level keys; set them there"));
            }
            if StreamName::parse(name).is_none() {
                return Err(invalid("streams", format!("{name:?} is not a stream name: [a-z0-9_-]{{1,64}}")));
            }
        }
        let names = self.stream_names();
        let routes = self.kafka.routes();
        if let Some((topic, stream)) = routes.iter().find(|(_, s)| !names.iter().any(|n| n == s)) {
            return Err(invalid("kafka_topics", format!("{topic}={stream}: no stream is named {stream:?}")));
        }
        if let Some((topic, _)) = routes.iter().enumerate().find_map(|(i, r)| routes[..i].iter().find(|o| o.0 == r.0)) {
            return Err(invalid("kafka_topics", format!("{topic} is listed twice: a topic is read into one stream")));
        }
        let mut tables: Vec<(String, String, &str)> = Vec::new();
        for stream in streams.iter().skip(1) {
            stream.validate_one().map_err(|error| match error {
                ConfigError::Invalid { key, problem } => {
                    invalid(key, format!("{problem} (in [streams.{}])", stream.stream))
                }
                other => other,
            })?;
        }
        for stream in &streams {
            let mut own = vec![stream.table.buffer_table.clone(), stream.table.destination_table.clone()];
            // The fallback table `migrate` creates after the destination's columns, and the
            // Distributed table in front of it: each stream's own too.
            if stream.shed.shed_mode == ShedMode::Fallback {
                own.push(stream.shed.fallback_table.clone());
            }
            if !stream.clickhouse.clickhouse_cluster.trim().is_empty() {
                own.push(stream.distributed_table());
            }
            if stream.table.quarantine == Quarantine::Table {
                own.push(stream.table.quarantine_table());
                own.push(stream.table.quarantine_buffer());
            }
            for table in &own {
                let table = (stream.table.database.clone(), table.clone());
                if let Some((_, _, other)) = tables.iter().find(|(d, t, _)| (d, t) == (&table.0, &table.1)) {
                    return Err(invalid(
                        "streams",
                        format!(
                            "{}.{} belongs to both {other} and {}: each stream needs its own tables (Buffer, destination, fallback, Distributed)",
                            table.0, table.1, stream.stream
                        ),
                    ));
                }
                tables.push((table.0, table.1, stream.stream.as_str()));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The configuration of the internal stream that carries this stream's rejected events
    /// into its quarantine table (`None` when the stream does not park them): the stream's own
    /// servers, batching and journal settings, its quarantine table and Buffer, one partition,
    /// its own journal directory and namespace of idempotency keys, no Kafka topics.
    pub fn quarantine_stream(&self) -> Option<Config> {
        if self.table.quarantine != Quarantine::Table {
            return None;
        }
        let mut q = self.clone();
        q.streams.clear();
        q.stream = self.stream.quarantine();
        q.table.destination_table = self.table.quarantine_table();
        q.table.buffer_table = self.table.quarantine_buffer();
        q.table.id_column = super::table::QUARANTINE_ID_COLUMN.into();
        q.table.timestamp_column = super::table::QUARANTINE_TIME_COLUMN.into();
        q.table.partition_key = String::new();
        q.table.unknown_fields = UnknownFields::Reject;
        q.table.timestamp_max_age_s = 0;
        q.table.timestamp_max_ahead_s = 0;
        q.table.quarantine = Quarantine::Off;
        q.batching.partitions = 1;
        q.shed.shed_mode = ShedMode::Reject;
        q.shed.fallback_table = String::new();
        q.clickhouse.sharding_key = String::new();
        q.clickhouse.distributed_table = format!("{}_all", q.table.destination_table);
        if !self.journal.data_dir.is_empty() {
            q.journal.data_dir =
                std::path::Path::new(&self.journal.data_dir).join("quarantine").to_string_lossy().into_owned();
        }
        // Rejected events are few while producers send what the table holds; an eighth of the
        // stream's room, at least two segments.
        q.journal.journal_max_bytes =
            (self.journal.journal_max_bytes / 8).max(self.journal.journal_segment_bytes.saturating_mul(2));
        // Default keys continue a prefix with `{`, `r:`, `o:`, `t:`, `e:` or a stream's name
        // and `/`; `q:` is none of those.
        q.idempotency.dedup_key_prefix = format!("{}q:", self.idempotency.dedup_key_prefix);
        q.kafka.kafka_topics = String::new();
        Some(q)
    }

    /// The Distributed table reads go through on a cluster (`distributed_table`, or the
    /// destination's name + `_all`).
    pub fn distributed_table(&self) -> String {
        if self.clickhouse.distributed_table.is_empty() {
            format!("{}_all", self.table.destination_table)
        } else {
            self.clickhouse.distributed_table.clone()
        }
    }
}

/// The topics of `kafka_topics` that write to `stream`, as that stream's `kafka_topics`.
fn topics_of(config: &Config, stream: &str) -> String {
    let topics: Vec<&str> = config.kafka.routes().into_iter().filter(|(_, s)| *s == stream).map(|(t, _)| t).collect();
    topics.join(",")
}

/// A named stream's own directory under `data_dir` (its journal lives there).
pub fn stream_dir(data_dir: &str, name: &str) -> String {
    std::path::Path::new(data_dir).join("streams").join(name).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["logs", "a", "audit-v2", "x_1", &"a".repeat(64)] {
            assert!(StreamName::parse(good).is_some(), "{good}");
        }
        for bad in ["", "Logs", "a/b", "a:b", "a{b}", "é", &"a".repeat(65)] {
            assert!(StreamName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn streams_inherit_and_override() {
        let mut config = Config::default();
        config.batching.flush_linger_ms = 7;
        config.journal.journal_max_bytes = 3 << 30;
        config.add_stream("logs", |s| {
            s.table.database = "ops".into();
            s.table.destination_table = "logs".into();
            s.table.buffer_table = "logs_buffer".into();
            s.shed_threshold = 0.5;
            s.shed_resume = 0.4;
        });
        config.validate().unwrap();
        let streams = config.streams();
        assert_eq!(streams.len(), 2);
        let (default, logs) = (&streams[0], &streams[1]);
        assert!(default.stream.is_default() && default.streams.is_empty());
        assert_eq!(default.journal.data_dir, config.journal.data_dir, "the default stream keeps its journal");
        assert_eq!(default.idempotency.dedup_key_prefix, "bg:", "and its keys");
        assert_eq!(logs.stream.as_str(), "logs");
        assert_eq!((logs.table.database.as_str(), logs.shed.shed_threshold), ("ops", 0.5));
        assert_eq!(logs.batching.flush_linger_ms, 7, "what the stream leaves out comes from the top level");
        assert_eq!(logs.journal.data_dir, stream_dir(&config.journal.data_dir, "logs"));
        assert_eq!(logs.idempotency.dedup_key_prefix, "bg:logs/");
        assert_eq!(logs.journal.journal_max_bytes, (3 << 30) / 2, "the journal's room is shared");
        config.add_stream("audit", |s| {
            s.table.buffer_table = "ab".into();
            s.table.destination_table = "a".into();
            s.journal_max_bytes = Some(2 << 30);
        });
        let rooms: Vec<u64> = config.streams().iter().map(|s| s.journal.journal_max_bytes).collect();
        assert_eq!(rooms, [1 << 29, 2 << 30, 1 << 29], "a stream's own bound, the rest shared by the others");
    }

    #[test]
    fn kafka_topics_name_their_streams() {
        let mut config = Config::default();
        config.kafka.kafka_brokers = "k:9092".into();
        config.kafka.kafka_topics = "events, logs-topic=logs ,more".into();
        config.add_stream("logs", |s| {
            s.table.buffer_table = "lb".into();
            s.table.destination_table = "l".into();
        });
        config.validate().unwrap();
        assert_eq!(config.kafka_topics(), ["events", "logs-topic", "more"]);
        let streams = config.streams();
        assert_eq!(streams[0].kafka_topics(), ["events", "more"]);
        assert_eq!(streams[0].kafka.kafka_group, "buffergate", "the default stream keeps its group and offsets");
        assert_eq!(streams[1].kafka_topics(), ["logs-topic"]);
        assert_eq!(streams[1].kafka.kafka_group, "buffergate-logs");
        config.kafka.kafka_topics = "events, events=logs".into();
        assert!(config.validate().unwrap_err().to_string().contains("events"), "a topic is read into one stream");
        config.kafka.kafka_topics = "x=nope".into();
        assert!(config.validate().unwrap_err().to_string().contains("no stream is named \"nope\""));
    }

    #[test]
    fn streams_need_their_own_tables_and_names() {
        let mut config = Config::default();
        config.add_stream("copy", |_| {});
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("both default and copy"), "{error}");
        let mut config = Config::default();
        config.add_stream("Bad", |s| s.table.buffer_table = "b".into());
        assert!(config.validate().unwrap_err().to_string().contains("not a stream name"));
        let mut config = Config::default();
        config.add_stream("x", |s| {
            s.table.buffer_table = "xb".into();
            s.table.destination_table = "xb".into();
        });
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("[streams.x]"), "{error}");
        // A fallback table (and a cluster's Distributed table) inherited from the top level
        // would be shared: each stream needs its own.
        let mut config = Config::default();
        config.shed.shed_mode = ShedMode::Fallback;
        config.shed.fallback_table = "fb".into();
        config.add_stream("logs", |s| {
            s.table.buffer_table = "lb".into();
            s.table.destination_table = "l".into();
        });
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("analytics.fb belongs to both default and logs"), "{error}");
        config.streams.get_mut("logs").unwrap().fallback_table = "lfb".into();
        config.validate().unwrap();
    }
}
