//! Goodput under overload: the gateway (no dedup, 10-event requests) driven by producers that
//! send the next request the moment they get an answer, refusals included (no back-off, as
//! clients that ignore `Retry-After` do), at the connection count that saturates it and at 30
//! times that. What counts is the events acknowledged per second at 30× against at 1×, the
//! latency, and that the gateway's memory stays bounded; every acknowledged event is checked to
//! be stored once. Rounds interleave the two loads.

use std::path::Path;

use serde_json::{Value, json};

use super::{Mode, Servers, median, num, scenario};

/// Connections that keep the gateway busy on this kind of machine (its throughput does not
/// grow beyond them).
const SATURATING: usize = 64;
const TIMES: usize = 30;

pub async fn run(binary: &Path, servers: &Servers, seconds: f64, rounds: usize) -> (Value, String) {
    let needed = SATURATING * TIMES + 256;
    assert!(
        open_files_limit() >= needed as u64,
        "{} connections need more open files: run with `ulimit -n {}` or more",
        SATURATING * TIMES,
        needed * 2
    );
    let mut runs: Vec<[Value; 2]> = Vec::new();
    // Ids stay below 2^48: the harness writes them in 12 hex digits of a UUID.
    let mut first_id = 0u64;
    for round in 0..rounds {
        let mut pair = Vec::new();
        for (k, connections) in [SATURATING, SATURATING * TIMES].into_iter().enumerate() {
            println!("round {}/{rounds}: {connections} connections, {seconds} s...", round + 1);
            first_id += 1 << 40;
            // Each run its own database (`round` names it), so each is checked on its own.
            let load = (Mode::Gateway { dedup: false }, 10, connections);
            let result = scenario(binary, servers, load, seconds, round * 2 + k, first_id).await;
            println!(
                "  {:.0} events/s acknowledged, {:.0} requests/s refused",
                num(&result["events_per_second"]),
                num(&result["failed_requests"]) / num(&result["seconds"]).max(1e-9)
            );
            pair.push(result);
        }
        runs.push([pair.remove(0), pair.remove(0)]);
    }
    let ratios: Vec<f64> = runs
        .iter()
        .map(|[one, many]| num(&many["events_per_second"]) / num(&one["events_per_second"]).max(1.0))
        .collect();
    let goodput = median(ratios);
    let mut md = String::from(
        "| connections | events/s acknowledged | requests/s refused | p50 / p99 ms | gateway peak RSS | lost / duplicated |\n|---|---|---|---|---|---|\n",
    );
    for [one, many] in &runs {
        for r in [one, many] {
            md.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.1} / {:.1} | {} | {} / {} |\n",
                r["connections"],
                num(&r["events_per_second"]),
                num(&r["failed_requests"]) / num(&r["seconds"]).max(1e-9),
                num(&r["latency_ms"]["p50"]),
                num(&r["latency_ms"]["p99"]),
                r["gateway_peak_rss_mib"].as_f64().map_or("–".to_string(), |m| format!("{m:.0} MiB")),
                r["lost"],
                r["duplicated_ids"],
            ));
        }
    }
    md.push_str(&format!(
        "\nGoodput at {TIMES}× the saturating connections: **{:.0}%** of the acknowledged events/s at {SATURATING} (median of the rounds' ratios; target ≥ 90%).\n",
        goodput * 100.0
    ));
    let report = json!({"saturating_connections": SATURATING, "times": TIMES, "goodput": goodput, "runs": runs});
    (report, md)
}

/// The soft limit of open files of this process (`/proc/self/limits`).
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(0)
}
