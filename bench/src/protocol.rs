//! What ClickHouse's insert protocol costs (`--protocol`): the byte-identical `INSERT …
//! FORMAT JSONEachRow` requests sent straight to ClickHouse's Buffer table and to the gateway,
//! beside the same events through `/v1/events`, for small (10 × 64 connections) and large
//! (1,000 × 8) batches, idempotency off. The rounds interleave the three, so each round's
//! ratios compare runs minutes apart at most.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use super::{Mode, Servers, announced, num, row};

/// The gateway's CPU seconds per million events of a result.
fn gateway_cpu(result: &Value) -> f64 {
    num(&result["cpu_seconds_per_million_events"]["gateway"])
}

/// The median over rounds of `f(protocol) / f(events)`.
fn median_ratio(pairs: &[(Value, Value)], f: impl Fn(&Value) -> f64) -> f64 {
    super::median(pairs.iter().map(|(protocol, events)| f(protocol) / f(events).max(1e-9)).collect())
}

pub async fn run(binary: &Path, servers: &Servers, seconds: f64, rounds: usize) -> (Value, String) {
    let mut report = Vec::new();
    let mut md = format!(
        "{seconds} s per scenario, {rounds} interleaved rounds; each row is a round. The requests to ClickHouse and to the gateway's protocol are the same bytes.\n\n| mode | events × connections | events/s | latency p50 / p99 / p99.9 ms | CPU s per M events: gateway / ClickHouse / Redis (= total) | load generator CPU s per M events | machine busy · events/s with every core busy | gateway peak RSS | parts per M events | lost / duplicated |\n|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut summary = String::new();
    let mut first_id = 0u64;
    for (batch, connections) in [(10u64, 64usize), (1000, 8)] {
        let mut pairs = Vec::new();
        for round in 0..rounds {
            let mut results = Vec::new();
            for mode in [Mode::Direct, Mode::Gateway { dedup: false }, Mode::Protocol] {
                let load = (mode, batch, connections);
                let result = announced(binary, servers, load, seconds, (round, rounds), &mut first_id).await;
                let _ = writeln!(md, "{}", row(&result));
                results.push(result);
            }
            pairs.push((results[2].clone(), results[1].clone()));
            report.extend(results);
        }
        let eps = median_ratio(&pairs, |r| num(&r["events_per_second"]));
        let cpu = median_ratio(&pairs, gateway_cpu);
        let _ = writeln!(
            summary,
            "- {batch} events × {connections} connections: the protocol ÷ `/v1/events`, medians of each round's ratio: events/s {eps:.2}×, gateway CPU per event {cpu:.2}× (target ≤ 1.05×: {}).",
            if cpu <= 1.05 { "met" } else { "NOT met" }
        );
    }
    let md = format!("{md}\n{summary}");
    (json!(report), md)
}
