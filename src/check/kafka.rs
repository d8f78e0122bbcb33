//! `buffergate check` for the Kafka front: the brokers answer, the topics exist, where
//! rejected messages go, what exactly-once needs besides, and the group's lag.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Finding, Severity, finding};
use crate::config::{Config, DedupMode};
use crate::kafka::settings;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Every Kafka finding; none unless `kafka_topics` is set.
pub async fn run(config: &Config) -> Vec<Finding> {
    if config.kafka_topics().is_empty() {
        return Vec::new();
    }
    let mut out = guarantees(config);
    let config = config.clone();
    let brokers = tokio::task::spawn_blocking(move || brokers(&config)).await;
    out.extend(brokers.unwrap_or_else(|e| vec![finding("kafka_brokers", Severity::Error, e.to_string(), "")]));
    out
}

/// What the configuration promises, apart from the brokers.
fn guarantees(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if config.idempotency.redis_url.is_empty() {
        out.push(finding(
            "kafka_redis",
            Severity::Warning,
            "no redis_url: the consumer's idempotency keys and replay marks die with the process, so messages read again after a restart are written again",
            "set BUFFERGATE_REDIS_URL for exactly-once across restarts and rebalances",
        ));
    }
    if config.idempotency.dedup == DedupMode::Off {
        out.push(finding(
            "kafka_dedup",
            Severity::Warning,
            "dedup = off: messages read again after a crash or rebalance are written again (at-least-once)",
            "set BUFFERGATE_DEDUP=event",
        ));
    }
    if config.kafka.kafka_dead_letter_topic.trim().is_empty() {
        out.push(finding(
            "kafka_dead_letter_topic",
            Severity::Warning,
            "no dead-letter topic: messages that cannot be decoded or validated are logged, counted and skipped",
            "set BUFFERGATE_KAFKA_DEAD_LETTER_TOPIC",
        ));
    }
    out
}

/// The brokers answer, the topics exist with partitions, and the group's lag.
fn brokers(config: &Config) -> Vec<Finding> {
    let consumer: BaseConsumer = match settings::consumer(config).and_then(|c| Ok(c.create()?)) {
        Ok(consumer) => consumer,
        Err(e) => return vec![finding("kafka_config", Severity::Error, e.to_string(), "fix the kafka_* settings")],
    };
    let metadata = match consumer.fetch_metadata(None, TIMEOUT) {
        Ok(metadata) => metadata,
        Err(e) => {
            let message = format!("the Kafka brokers {} do not answer: {e}", config.kafka.kafka_brokers);
            return vec![finding(
                "kafka_brokers",
                Severity::Error,
                message,
                "check kafka_brokers and kafka_properties",
            )];
        }
    };
    let partitions = |name: &str| {
        metadata.topics().iter().find(|t| t.name() == name && t.error().is_none()).map(|t| t.partitions().len())
    };
    let mut out = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for topic in config.kafka_topics() {
        match partitions(topic) {
            Some(n) if n > 0 => {
                for p in 0..n as i32 {
                    tpl.add_partition(topic, p);
                }
            }
            _ => out.push(finding(
                "kafka_topic",
                Severity::Error,
                format!("topic {topic} does not exist"),
                "create it, or fix kafka_topics",
            )),
        }
    }
    let dead = config.kafka.kafka_dead_letter_topic.trim();
    if !dead.is_empty() && partitions(dead).is_none_or(|n| n == 0) {
        out.push(finding(
            "kafka_dead_letter_topic",
            Severity::Error,
            format!("the dead-letter topic {dead} does not exist: a rejected message would stop its partition"),
            "create it",
        ));
    }
    out.extend(lag(&consumer, &tpl, config));
    out
}

/// The group's lag over its topics, as information.
fn lag(consumer: &BaseConsumer, tpl: &TopicPartitionList, config: &Config) -> Option<Finding> {
    let committed = consumer.committed_offsets(tpl.clone(), TIMEOUT).ok()?;
    let mut total = 0i64;
    for element in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(element.topic(), element.partition(), TIMEOUT).ok()?;
        let at = match element.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        total += (high - at).max(0);
    }
    Some(finding(
        "kafka_lag",
        Severity::Info,
        format!(
            "group {}: {total} messages not yet committed over {} partitions",
            config.kafka.kafka_group,
            tpl.count()
        ),
        "",
    ))
}
