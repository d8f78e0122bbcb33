//! The Kafka front's Prometheus metrics: names, help texts and the small functions that record
//! them. Installed with the rest by `crate::metrics`.

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const MESSAGES: &str = "buffergate_kafka_messages_total";
pub const LAG: &str = "buffergate_kafka_lag_messages";
pub const COMMITS: &str = "buffergate_kafka_commits_total";
pub const COMMIT_DURATION: &str = "buffergate_kafka_commit_duration_seconds";
pub const ASSIGNED: &str = "buffergate_kafka_assigned_partitions";
pub const PAUSED: &str = "buffergate_kafka_paused_partitions";
pub const IN_FLIGHT: &str = "buffergate_kafka_in_flight_messages";
pub const RETRIES: &str = "buffergate_kafka_retries_total";
pub const REPLAYED_DUPLICATES: &str = "buffergate_kafka_replayed_duplicates_total";

pub(crate) fn describe() {
    describe_counter!(
        MESSAGES,
        "Kafka messages by outcome: consumed (read from a partition), stored (its events delivered), rejected (a message or some of its events failed to decode or validate), dead_lettered (sent to the dead-letter topic), dropped (rejected with no dead-letter topic)."
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "Messages of a partition not yet committed by this group: high watermark - committed offset (0 once the partition is revoked)."
    );
    describe_counter!(COMMITS, "Offset commits to Kafka, by outcome (ok, error).");
    describe_histogram!(COMMIT_DURATION, Unit::Seconds, "Time of one offset commit to Kafka.");
    describe_gauge!(ASSIGNED, Unit::Count, "Partitions assigned to this consumer.");
    describe_gauge!(PAUSED, Unit::Count, "Assigned partitions paused for back-pressure.");
    describe_gauge!(IN_FLIGHT, Unit::Count, "Messages read and not yet delivered.");
    describe_counter!(RETRIES, "Delivery attempts of a message retried, by reason.");
    describe_counter!(
        REPLAYED_DUPLICATES,
        "Events of messages read again after a crash or rebalance that ClickHouse already held, and so were not written again."
    );
}

pub fn message(outcome: &'static str) {
    counter!(MESSAGES, "outcome" => outcome).increment(1);
}

pub fn lag(topic: &str, partition: i32, lag: i64) {
    gauge!(LAG, "topic" => topic.to_string(), "partition" => partition.to_string()).set(lag.max(0) as f64);
}

pub fn commit(ok: bool, elapsed: Duration) {
    counter!(COMMITS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
    histogram!(COMMIT_DURATION).record(elapsed.as_secs_f64());
}

pub fn partitions(assigned: usize, paused: usize) {
    gauge!(ASSIGNED).set(assigned as f64);
    gauge!(PAUSED).set(paused as f64);
}

pub fn in_flight(messages: usize) {
    gauge!(IN_FLIGHT).set(messages as f64);
}

pub fn retry(reason: &'static str) {
    counter!(RETRIES, "reason" => reason).increment(1);
}

pub fn replayed_duplicates(events: usize) {
    if events > 0 {
        counter!(REPLAYED_DUPLICATES).increment(events as u64);
    }
}
