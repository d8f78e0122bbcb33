//! The Kafka front (`buffergate consume`, docs/kafka.md).

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaSettings {
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

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
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

impl KafkaSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.topics().is_empty() {
            return Ok(());
        }
        if self.kafka_brokers.trim().is_empty() {
            return Err(invalid("kafka_brokers", "must name at least one broker when kafka_topics is set"));
        }
        if self.kafka_group.trim().is_empty() {
            return Err(invalid("kafka_group", "must not be empty"));
        }
        if self.topics().iter().any(|t| *t == self.kafka_dead_letter_topic.trim()) {
            return Err(invalid("kafka_dead_letter_topic", "must not be one of kafka_topics"));
        }
        if self.kafka_max_in_flight == 0 || self.kafka_commit_interval_ms == 0 || self.kafka_lag_interval_ms == 0 {
            return Err(invalid("kafka_max_in_flight", "kafka_max_in_flight and the kafka_*_interval_ms must be > 0"));
        }
        Ok(())
    }

    /// The consumed topics, trimmed, empty ones dropped, without the streams they name.
    pub fn topics(&self) -> Vec<&str> {
        self.routes().into_iter().map(|(topic, _)| topic).collect()
    }

    /// Each consumed topic with the stream it writes to: `topic=stream`, or `topic` for the
    /// `default` stream.
    pub fn routes(&self) -> Vec<(&str, &str)> {
        self.kafka_topics
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|entry| match entry.split_once('=') {
                Some((topic, stream)) => (topic.trim(), stream.trim()),
                None => (entry, super::DEFAULT_STREAM),
            })
            .collect()
    }
}
