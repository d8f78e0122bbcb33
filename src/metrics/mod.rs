//! Prometheus metrics: every name, help text and histogram bucket set lives here, and the
//! request path records through the small functions below. `GET /metrics` renders them.
//!
//! The recorder is process-global (the `metrics` facade is); several gateways in one process
//! (tests) share it.
//!
//! [`kafka`]: the Kafka front's own metrics, described and installed with these.

pub mod kafka;

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, SharedString, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{StreamName, redacted};

pub const HTTP_REQUESTS: &str = "buffergate_http_requests_total";
pub const HTTP_DURATION: &str = "buffergate_http_request_duration_seconds";
pub const EVENTS: &str = "buffergate_events_total";
pub const FLUSHES: &str = "buffergate_flushes_total";
pub const FLUSH_ROWS: &str = "buffergate_flush_rows";
pub const FLUSH_BYTES: &str = "buffergate_flush_bytes";
pub const FLUSH_DURATION: &str = "buffergate_flush_duration_seconds";
pub const FLUSH_RETRIES: &str = "buffergate_flush_retries_total";
pub const QUEUE_ROWS: &str = "buffergate_coalescer_queue_rows";
pub const INFLIGHT_BYTES: &str = "buffergate_inflight_bytes";
pub const BUFFER_BYTES: &str = "buffergate_clickhouse_buffer_bytes";
pub const BUFFER_CAPACITY: &str = "buffergate_clickhouse_buffer_capacity_bytes";
pub const BUFFER_FILL: &str = "buffergate_clickhouse_buffer_fill_ratio";
pub const SHED_ACTIVE: &str = "buffergate_shed_active";
pub const POLL_ERRORS: &str = "buffergate_clickhouse_poll_errors_total";
pub const CIRCUIT_OPEN: &str = "buffergate_circuit_open";
pub const SHED_REQUESTS: &str = "buffergate_shed_requests_total";
pub const IDEMPOTENCY_DURATION: &str = "buffergate_idempotency_duration_seconds";
pub const IDEMPOTENCY_ERRORS: &str = "buffergate_idempotency_store_errors_total";
pub const DEDUP_BYPASSED: &str = "buffergate_dedup_bypassed_events_total";
pub const STORE_LOSSES: &str = "buffergate_idempotency_store_losses_total";
pub const LOOKUP_ACTIVE: &str = "buffergate_idempotency_lookup_active";
pub const LOOKED_UP: &str = "buffergate_idempotency_looked_up_events_total";
pub const CONNECTIONS_OPEN: &str = "buffergate_http_connections_open";
pub const CONNECTIONS_REFUSED: &str = "buffergate_http_connections_refused_total";
pub const QUARANTINED: &str = "buffergate_quarantined_events_total";
pub const REPLAYED: &str = "buffergate_replayed_events_total";

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Rejected,
    Shed,
    Fallback,
}

impl Outcome {
    const ALL: [Self; 5] = [Self::Accepted, Self::Duplicate, Self::Rejected, Self::Shed, Self::Fallback];

    fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
            Self::Shed => "shed",
            Self::Fallback => "fallback",
        }
    }
}

/// Installs the recorder once per process and returns the handle that renders it.
pub const JOURNAL_BYTES: &str = "buffergate_journal_bytes";
pub const JOURNAL_UNCONFIRMED_BLOCKS: &str = "buffergate_journal_unconfirmed_blocks";
pub const JOURNAL_UNCONFIRMED_ROWS: &str = "buffergate_journal_unconfirmed_rows";
pub const JOURNAL_OLDEST_SECONDS: &str = "buffergate_journal_oldest_unconfirmed_seconds";
pub const JOURNAL_CONFIRMED: &str = "buffergate_journal_confirmed_blocks_total";
pub const JOURNAL_RESOLVED: &str = "buffergate_journal_resolved_blocks_total";
pub const JOURNAL_RESTORED_ROWS: &str = "buffergate_journal_restored_rows_total";
pub const JOURNAL_RESTARTS: &str = "buffergate_journal_clickhouse_restarts_total";
pub const JOURNAL_ERRORS: &str = "buffergate_journal_errors_total";

pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = build().unwrap_or_else(|error| {
                tracing::error!(%error, "cannot install the Prometheus recorder; /metrics will be empty");
                PrometheusBuilder::new().build_recorder().handle()
            });
            describe();
            // Histograms are folded into their buckets by upkeep; keep it regular.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            handle
        })
        .clone()
}

fn build() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    const ROWS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0];
    const BYTES: &[f64] = &[1024.0, 16_384.0, 131_072.0, 1_048_576.0, 4_194_304.0, 16_777_216.0, 67_108_864.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full(FLUSH_DURATION.into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full(IDEMPOTENCY_DURATION.into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full(FLUSH_ROWS.into()), ROWS)?
        .set_buckets_for_metric(Matcher::Full(FLUSH_BYTES.into()), BYTES)?
        .set_buckets_for_metric(Matcher::Full(kafka::COMMIT_DURATION.into()), SECONDS)?
        .install_recorder()
}

fn describe() {
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status code.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time to answer an HTTP request, by route.");
    describe_counter!(EVENTS, "Events by outcome: accepted, duplicate, rejected, shed, fallback.");
    describe_counter!(FLUSHES, "INSERTs of coalesced batches into ClickHouse, by outcome (ok, error).");
    describe_histogram!(FLUSH_ROWS, Unit::Count, "Rows per INSERT.");
    describe_histogram!(FLUSH_BYTES, Unit::Bytes, "Encoded bytes per INSERT (before compression).");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Time per INSERT attempt.");
    describe_counter!(FLUSH_RETRIES, "INSERT attempts retried after a retryable failure.");
    describe_gauge!(
        QUEUE_ROWS,
        Unit::Count,
        "Rows waiting in a coalescer partition: queued, or in a batch not yet written."
    );
    describe_gauge!(INFLIGHT_BYTES, Unit::Bytes, "Bytes of request bodies being decoded plus rows queued.");
    describe_gauge!(
        BUFFER_BYTES,
        Unit::Bytes,
        "Bytes held by the Buffer table (server-wide StorageBufferBytes on old servers)."
    );
    describe_gauge!(BUFFER_CAPACITY, Unit::Bytes, "Capacity of the Buffer table: num_layers x max_bytes.");
    describe_gauge!(BUFFER_FILL, "Buffer bytes / capacity.");
    describe_gauge!(SHED_ACTIVE, "1 while ingestion is shed because the Buffer is saturated.");
    describe_counter!(POLL_ERRORS, "Failed polls of the Buffer table's size.");
    describe_gauge!(CIRCUIT_OPEN, "1 while the INSERT circuit breaker is open.");
    describe_histogram!(IDEMPOTENCY_DURATION, Unit::Seconds, "Time per idempotency store call, by op.");
    describe_counter!(IDEMPOTENCY_ERRORS, "Failed idempotency store calls, by op.");
    describe_counter!(
        DEDUP_BYPASSED,
        "Events written without deduplication because the store failed (dedup_on_store_error = accept)."
    );
    describe_counter!(
        STORE_LOSSES,
        "Times the idempotency store was seen to have lost keys, by sign (epoch_gone, restarted, failover, evicted)."
    );
    describe_gauge!(
        LOOKUP_ACTIVE,
        "1 while ids the idempotency store calls fresh are looked up in ClickHouse before they are written."
    );
    describe_counter!(
        LOOKED_UP,
        "Events looked up in ClickHouse because the store may have forgotten them, by outcome (present: dropped as a duplicate; absent: written)."
    );
    describe_counter!(
        SHED_REQUESTS,
        "Ingestion requests refused, by reason (buffer_saturated, stale, overloaded, circuit_open, timeout, shard_saturated, journal_full, journal_failed)."
    );
    describe_gauge!(CONNECTIONS_OPEN, Unit::Count, "Client connections open.");
    describe_counter!(CONNECTIONS_REFUSED, "Client connections closed as accepted because max_connections were open.");
    describe_counter!(QUARANTINED, "Rejected events stored in the stream's quarantine table, by reason.");
    describe_counter!(
        REPLAYED,
        "Quarantined events replayed, by outcome (stored: now in the destination; rejected: still refused)."
    );
    describe_gauge!(JOURNAL_BYTES, Unit::Bytes, "Bytes of the journal on disk.");
    describe_gauge!(JOURNAL_UNCONFIRMED_BLOCKS, Unit::Count, "Journaled blocks not yet confirmed in the destination.");
    describe_gauge!(JOURNAL_UNCONFIRMED_ROWS, Unit::Count, "Rows of the journaled blocks not yet confirmed.");
    describe_gauge!(JOURNAL_OLDEST_SECONDS, Unit::Seconds, "Age of the oldest unconfirmed journaled block.");
    describe_counter!(JOURNAL_CONFIRMED, "Journaled blocks confirmed in the destination and released.");
    describe_counter!(
        JOURNAL_RESOLVED,
        "Blocks whose rows were looked for after a doubt (restart, ambiguous INSERT, flush error), by cause."
    );
    describe_counter!(JOURNAL_RESTORED_ROWS, "Rows sent again because ClickHouse did not hold them, by cause.");
    describe_counter!(JOURNAL_RESTARTS, "ClickHouse restarts seen (its uptime went back).");
    describe_counter!(JOURNAL_ERRORS, "Journal operations that failed, by op (append, confirm, read).");
    kafka::describe();
}

/// A stream's name as a label: shared, not copied (these are recorded on the request path).
fn label(stream: &StreamName) -> SharedString {
    SharedString::from(stream.shared())
}

/// The journal's size and what it still protects.
/// One node's journal (`node`: the ClickHouse URL its blocks were written to).
pub fn journal(stream: &StreamName, node: &str, bytes: u64, blocks: usize, rows: usize, oldest: Duration) {
    let (node, stream) = (redacted(node), label(stream));
    gauge!(JOURNAL_BYTES, "stream" => stream.clone(), "node" => node.clone()).set(bytes as f64);
    gauge!(JOURNAL_UNCONFIRMED_BLOCKS, "stream" => stream.clone(), "node" => node.clone()).set(blocks as f64);
    gauge!(JOURNAL_UNCONFIRMED_ROWS, "stream" => stream.clone(), "node" => node.clone()).set(rows as f64);
    gauge!(JOURNAL_OLDEST_SECONDS, "stream" => stream, "node" => node).set(oldest.as_secs_f64());
}

pub fn journal_confirmed(blocks: usize) {
    counter!(JOURNAL_CONFIRMED).increment(blocks as u64);
}

/// A block looked for after a doubt (`cause`: restart, ambiguous, not_found, recovered), and
/// the rows of it that had to be sent again.
pub fn journal_resolved(cause: &'static str, restored_rows: usize) {
    counter!(JOURNAL_RESOLVED, "cause" => cause).increment(1);
    counter!(JOURNAL_RESTORED_ROWS, "cause" => cause).increment(restored_rows as u64);
}

/// A restart of ClickHouse seen by a journal of `stream` (each stream's journal, and its
/// quarantine's, sees it once).
pub fn clickhouse_restart(stream: &StreamName) {
    counter!(JOURNAL_RESTARTS, "stream" => label(stream)).increment(1);
}

pub fn journal_error(op: &'static str) {
    counter!(JOURNAL_ERRORS, "op" => op).increment(1);
}

/// A client connection opened (`+1`) or ended (`-1`).
pub fn connections(change: f64) {
    gauge!(CONNECTIONS_OPEN).increment(change);
}

pub fn connection_refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

/// The HTTP requests counter and duration histogram of each route, registered at first use
/// and kept: looking them up in the registry (labels hashed and compared) cost ~2.3k
/// instructions per request (`bench/count-instructions.sh`). Answers other than the common
/// ones are rare and looked up each time.
#[derive(Debug)]
pub struct HttpRequests {
    /// Route templates, and `unmatched` last.
    routes: Box<[RouteRequests]>,
}

/// One route's series.
#[derive(Debug)]
struct RouteRequests {
    label: &'static str,
    duration: OnceLock<Histogram>,
    by_status: [OnceLock<Counter>; COMMON_STATUSES.len()],
}

/// The answers kept registered.
const COMMON_STATUSES: [(u16, &str); 3] = [(200, "200"), (202, "202"), (503, "503")];

impl HttpRequests {
    /// Series for `routes` (templates: bounded label values) and for requests no route matched.
    pub fn new(routes: &[&'static str]) -> Self {
        let route = |label| RouteRequests { label, duration: OnceLock::new(), by_status: Default::default() };
        Self { routes: routes.iter().copied().chain(["unmatched"]).map(route).collect() }
    }

    /// Counts and times one request of the route with this template (`None`, or a template
    /// not given to [`HttpRequests::new`]: `unmatched`).
    pub fn record(&self, matched: Option<&str>, status: u16, elapsed: Duration) {
        let last = self.routes.len() - 1;
        let series =
            matched.and_then(|path| self.routes[..last].iter().find(|r| r.label == path)).unwrap_or(&self.routes[last]);
        let route = series.label;
        match COMMON_STATUSES.iter().position(|(code, _)| *code == status) {
            Some(i) => series.by_status[i]
                .get_or_init(|| counter!(HTTP_REQUESTS, "route" => route, "status" => COMMON_STATUSES[i].1))
                .increment(1),
            None => counter!(HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1),
        }
        series.duration.get_or_init(|| histogram!(HTTP_DURATION, "route" => route)).record(elapsed.as_secs_f64());
    }
}

/// The events counters of one stream, one per outcome, each registered at its first use and
/// kept: looking a labelled counter up in the registry (its labels hashed and compared) cost
/// ~1.2k instructions per request (`bench/count-instructions.sh`).
#[derive(Debug)]
pub struct EventCounters {
    stream: SharedString,
    by_outcome: [OnceLock<Counter>; Outcome::ALL.len()],
}

impl EventCounters {
    pub fn new(stream: &StreamName) -> Self {
        Self { stream: label(stream), by_outcome: Default::default() }
    }

    /// Counts `count` events of this stream with `outcome` (none: nothing registered).
    pub fn add(&self, outcome: Outcome, count: usize) {
        if count == 0 {
            return;
        }
        let counter = self.by_outcome[outcome as usize]
            .get_or_init(|| counter!(EVENTS, "stream" => self.stream.clone(), "outcome" => outcome.label()));
        counter.increment(count as u64);
    }
}

/// Rejected events of `stream` stored in its quarantine table for `reason`.
pub fn quarantined(stream: &StreamName, reason: &'static str, count: usize) {
    counter!(QUARANTINED, "stream" => label(stream), "reason" => reason).increment(count as u64);
}

/// Quarantined events of `stream` replayed (`outcome`: stored, rejected).
pub fn replayed(stream: &StreamName, outcome: &'static str, count: usize) {
    if count > 0 {
        counter!(REPLAYED, "stream" => label(stream), "outcome" => outcome).increment(count as u64);
    }
}

pub fn flush_attempt(stream: &StreamName, ok: bool, rows: usize, bytes: usize, elapsed: Duration) {
    let stream = label(stream);
    counter!(FLUSHES, "stream" => stream.clone(), "outcome" => if ok { "ok" } else { "error" }).increment(1);
    histogram!(FLUSH_DURATION, "stream" => stream.clone()).record(elapsed.as_secs_f64());
    if ok {
        histogram!(FLUSH_ROWS, "stream" => stream.clone()).record(rows as f64);
        histogram!(FLUSH_BYTES, "stream" => stream).record(bytes as f64);
    }
}

pub fn flush_retry() {
    counter!(FLUSH_RETRIES).increment(1);
}

/// The gauge of a partition's waiting rows, registered once: the coalescer keeps the handle
/// rather than formatting the label and searching the registry on every request.
pub fn queue_rows(stream: &StreamName, partition: usize) -> Gauge {
    gauge!(QUEUE_ROWS, "stream" => label(stream), "partition" => partition.to_string())
}

/// The gauge of in-flight bytes, registered once by the budget that sets it.
pub fn inflight_bytes() -> Gauge {
    gauge!(INFLIGHT_BYTES)
}

/// One node's Buffer, as its poller read it (`node`: its URL).
pub fn buffer(stream: &StreamName, node: &str, bytes: u64, capacity: u64, fill: f64) {
    let (node, stream) = (redacted(node), label(stream));
    gauge!(BUFFER_BYTES, "stream" => stream.clone(), "node" => node.clone()).set(bytes as f64);
    gauge!(BUFFER_CAPACITY, "stream" => stream.clone(), "node" => node.clone()).set(capacity as f64);
    gauge!(BUFFER_FILL, "stream" => stream, "node" => node).set(fill);
}

pub fn shed_active(stream: &StreamName, node: &str, active: bool) {
    gauge!(SHED_ACTIVE, "stream" => label(stream), "node" => redacted(node)).set(if active { 1.0 } else { 0.0 });
}

pub fn poll_error() {
    counter!(POLL_ERRORS).increment(1);
}

pub fn circuit_open(stream: &StreamName, node: &str, open: bool) {
    gauge!(CIRCUIT_OPEN, "stream" => label(stream), "node" => redacted(node)).set(if open { 1.0 } else { 0.0 });
}

/// A request refused before its rows were handed on (`stream`: the stream it named).
pub fn shed_request(stream: &StreamName, reason: &'static str) {
    counter!(SHED_REQUESTS, "stream" => label(stream), "reason" => reason).increment(1);
}

pub fn idempotency(op: &'static str, elapsed: Duration, ok: bool) {
    histogram!(IDEMPOTENCY_DURATION, "op" => op).record(elapsed.as_secs_f64());
    if !ok {
        counter!(IDEMPOTENCY_ERRORS, "op" => op).increment(1);
    }
}

/// The idempotency store of `stream` was seen to have lost keys.
pub fn store_lost(stream: &StreamName, sign: &'static str) {
    counter!(STORE_LOSSES, "stream" => label(stream), "sign" => sign).increment(1);
}

pub fn lookup_active(stream: &StreamName, active: bool) {
    gauge!(LOOKUP_ACTIVE, "stream" => label(stream)).set(if active { 1.0 } else { 0.0 });
}

/// Events looked up because the store was unsure: `present` dropped, `absent` written.
pub fn looked_up(stream: &StreamName, present: usize, absent: usize) {
    counter!(LOOKED_UP, "stream" => label(stream), "outcome" => "present").increment(present as u64);
    counter!(LOOKED_UP, "stream" => label(stream), "outcome" => "absent").increment(absent as u64);
}

pub fn dedup_bypassed(count: usize) {
    counter!(DEDUP_BYPASSED).increment(count as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`EventCounters`] indexes its counters by the outcome's discriminant.
    #[test]
    fn outcomes_are_listed_in_discriminant_order() {
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, i, "{outcome:?}");
        }
    }

    /// Each request is counted under its route template (`unmatched` for anything else) and
    /// its status, whether its series was kept from an earlier request or looked up.
    #[test]
    fn http_requests_are_counted_by_route_and_status() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let requests = HttpRequests::new(&["/v1/events", "/v1/streams/{name}/events"]);
            let took = Duration::from_millis(3);
            for status in [200, 200, 202, 503, 415, 415] {
                requests.record(Some("/v1/events"), status, took);
            }
            requests.record(Some("/v1/streams/{name}/events"), 200, took);
            requests.record(Some("/not/a/route"), 200, took);
            requests.record(None, 404, took);
        });
        let text = handle.render();
        for line in [
            r#"buffergate_http_requests_total{route="/v1/events",status="200"} 2"#,
            r#"buffergate_http_requests_total{route="/v1/events",status="202"} 1"#,
            r#"buffergate_http_requests_total{route="/v1/events",status="503"} 1"#,
            r#"buffergate_http_requests_total{route="/v1/events",status="415"} 2"#,
            r#"buffergate_http_requests_total{route="/v1/streams/{name}/events",status="200"} 1"#,
            r#"buffergate_http_requests_total{route="unmatched",status="200"} 1"#,
            r#"buffergate_http_requests_total{route="unmatched",status="404"} 1"#,
            r#"buffergate_http_request_duration_seconds_count{route="/v1/events"} 6"#,
            r#"buffergate_http_request_duration_seconds_count{route="unmatched"} 2"#,
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }

    /// Every metric this module names is in docs/metrics.md, so the reference cannot drift from
    /// what `/metrics` serves.
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        let sources = [include_str!("mod.rs"), include_str!("kafka.rs")];
        let prefix = "buffergate_";
        let quoted = format!("\"{prefix}");
        let mut names: Vec<&str> = sources
            .iter()
            .flat_map(|text| text.match_indices(quoted.as_str()).map(move |(at, _)| &text[at + 1..]))
            .filter_map(|rest| rest.split('"').next())
            .filter(|name| name.len() > prefix.len() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() > 30, "{names:?}");
        let missing: Vec<&&str> = names.iter().filter(|name| !doc.contains(&format!("`{name}`"))).collect();
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
    }
}
