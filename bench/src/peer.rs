//! buffergate beside clickhouse-bulk (`--peer-bulk PATH`): the same events, on the same
//! ClickHouse, sent straight into the Buffer table (direct), through a clickhouse-bulk binary the
//! operator supplies (its JSONEachRow, answered `200` before anything is written: its batches
//! live in its memory until its flush), and through the gateway in its modes: the default
//! (answered after the INSERT and the journal), `wait=false` (`202` once journaled), the journal
//! off, idempotency on, and optionally another build of it (`--before`). Small (10 events × 64
//! connections) and large (1,000 × 8) batches, rounds interleaved; every row is checked for
//! lost and duplicated events, clickhouse-bulk's included.
//!
//! Nothing of clickhouse-bulk is in this repository: docs/performance.md says how to build one.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::{
    Mode, Process, Servers, announced, by_round_lines, free_port, median, median_run, num, proxy_cpu, row,
    scenario_name, wait_http,
};

/// Starts clickhouse-bulk in front of the run's ClickHouse, its files in a directory of its
/// own; its base URL. Its defaults, but for where it listens and writes: batches of up to
/// 10,000 rows per query, sent at least every second.
pub(crate) async fn start_bulk(servers: &Servers, db: &str) -> (Process, String) {
    let binary = servers.peer_bulk.as_deref().expect("--peer-bulk");
    let dir = servers.dir.join(format!("clickhouse-bulk-{db}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "flush_count": 10_000,
        "flush_interval": 1_000,
        "clean_interval": 0,
        "remove_query_id": true,
        "dump_check_interval": 300,
        "debug": false,
        "log_queries": false,
        "dump_dir": dir.join("dumps"),
        "clickhouse": {"down_timeout": 60, "connect_timeout": 10, "servers": [servers.ch_url]},
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("log")).map_or_else(|_| Stdio::null(), Stdio::from);
    let child = Process(
        Command::new(binary)
            .arg("-config")
            .arg(&path)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the clickhouse-bulk binary given to --peer-bulk"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{url}/status")).await;
    (child, url)
}

/// The median over rounds of `of` ÷ `to`, events/s stored, each round against itself; `None`
/// when either did not run (`--only`).
fn median_ratio(rounds: &[Vec<Value>], of: &str, to: &str) -> Option<f64> {
    let ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|round| {
            let find = |n: &str| round.iter().find(|r| r["scenario"] == n);
            let stored = |r: &Value| num(&r["stored_events_per_second"]);
            Some(stored(find(of)?) / stored(find(to)?).max(1.0))
        })
        .collect();
    (!ratios.is_empty()).then(|| median(ratios))
}

/// The modes of a round, in the order they run.
fn modes(servers: &Servers) -> Vec<Mode> {
    let mut modes = vec![Mode::Direct, Mode::Bulk, Mode::Gateway { dedup: false }, Mode::Journaled, Mode::Unjournaled];
    if servers.before.is_some() {
        modes.push(Mode::Before);
    }
    modes.push(Mode::Gateway { dedup: true });
    modes
}

/// Runs every round; `only` keeps the scenarios whose name holds it (the targets that need a
/// scenario left out are not judged).
pub async fn run(binary: &Path, servers: &Servers, seconds: f64, rounds: usize, only: Option<&str>) -> (Value, String) {
    let sizes = [(10u64, 64usize), (1000, 8)];
    let modes = modes(servers);
    let loads: Vec<(Mode, u64, usize)> = sizes
        .into_iter()
        .flat_map(|(batch, connections)| modes.iter().map(move |&mode| (mode, batch, connections)))
        .filter(|&(mode, batch, _)| only.is_none_or(|only| scenario_name(mode, batch).contains(only)))
        .collect();
    // rounds[r]: every scenario of round r.
    let mut by_round: Vec<Vec<Value>> = Vec::new();
    let mut first_id = 0u64;
    for round in 0..rounds {
        let mut this = Vec::new();
        for &load in &loads {
            this.push(announced(binary, servers, load, seconds, (round, rounds), &mut first_id).await);
        }
        by_round.push(this);
    }

    // What counts is what is stored: clickhouse-bulk (and `wait=false`) answer before.
    let eps = |r: &Value| num(&r["stored_events_per_second"]);
    let mut md = format!(
        "{seconds} s per scenario, {rounds} interleaved rounds; each row is the scenario's median round. Events/s are stored events: the events acknowledged over the time until ClickHouse held them all (the answers of clickhouse-bulk and of `wait=false` come before the write); CPU counts until then too. In clickhouse-bulk's rows the gateway's columns are clickhouse-bulk's process.\n\n| mode | events × connections | events/s stored | latency p50 / p99 / p99.9 ms | CPU s per M events: gateway / ClickHouse / Redis (= total) | load generator CPU s per M events | machine busy · events/s with every core busy | gateway peak RSS | parts per M events | lost / duplicated |\n|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut medians = Vec::new();
    for i in 0..by_round.first().map_or(0, Vec::len) {
        let mut median = median_run(by_round.iter().map(|round| &round[i]).collect(), eps).clone();
        median["stored_events_per_second_by_round"] =
            json!(by_round.iter().map(|round| eps(&round[i])).collect::<Vec<_>>());
        let mut shown = median.clone();
        shown["events_per_second"] = json!(eps(&median));
        let _ = writeln!(md, "{}", row(&shown));
        medians.push(median);
    }
    let find = |name: &str| medians.iter().find(|r| r["scenario"] == name);
    let ratio = |of: &str, to: &str| median_ratio(&by_round, of, to);
    let p99 = |r: &Value| num(&r["latency_ms"]["p99"]);
    let front_cpu = |r: &Value| proxy_cpu(&r["cpu_seconds_per_million_events"]);
    let clickhouse_cpu = |r: &Value| num(&r["cpu_seconds_per_million_events"]["clickhouse"]);

    let _ =
        write!(md, "\nEvents/s stored, by round:\n\n{}", by_round_lines(&medians, "stored_events_per_second_by_round"));
    let _ = writeln!(md, "\nRatios to clickhouse-bulk (events/s stored, medians of each round's ratio):\n");
    let mut targets: Vec<(String, bool)> = Vec::new();
    for (batch, _) in sizes {
        let size = if batch >= 100 { "large" } else { "small" };
        let name = |mode: Mode| scenario_name(mode, batch);
        let shown: Vec<String> = modes
            .iter()
            .filter(|&&m| m != Mode::Bulk)
            .filter_map(|&m| Some(format!("{} {:.2}×", m.label(), ratio(&name(m), &name(Mode::Bulk))?)))
            .collect();
        if !shown.is_empty() {
            let _ = writeln!(md, "- {size} batches: {}.", shown.join("; "));
        }
        let (want_202, want_default) = if batch >= 100 { (1.2, 1.2) } else { (1.5, 1.0) };
        let (bulk, accepted, default) =
            (find(&name(Mode::Bulk)), find(&name(Mode::Journaled)), find(&name(Mode::Gateway { dedup: false })));
        if let (Some(bulk), Some(accepted)) = (bulk, accepted) {
            let got = ratio(&name(Mode::Journaled), &name(Mode::Bulk)).unwrap_or(0.0);
            targets.push((
                format!("{size} batches, wait=false: events/s ≥ {want_202} × clickhouse-bulk (got {got:.2}×)"),
                got >= want_202,
            ));
            targets.push((
                format!(
                    "{size} batches, wait=false: p99 below clickhouse-bulk's ({:.1} vs {:.1} ms)",
                    p99(accepted),
                    p99(bulk)
                ),
                p99(accepted) < p99(bulk),
            ));
        }
        if let (Some(bulk), Some(default)) = (bulk, default) {
            let got = ratio(&name(Mode::Gateway { dedup: false }), &name(Mode::Bulk)).unwrap_or(0.0);
            targets.push((
                format!("{size} batches, default (200 after the write): events/s ≥ {want_default} × clickhouse-bulk (got {got:.2}×)"),
                got >= want_default,
            ));
            targets.push((
                format!(
                    "{size} batches, default: gateway CPU per event at most clickhouse-bulk's ({:.2} vs {:.2} s per million), ClickHouse's too ({:.2} vs {:.2})",
                    front_cpu(default),
                    front_cpu(bulk),
                    clickhouse_cpu(default),
                    clickhouse_cpu(bulk)
                ),
                front_cpu(default) <= front_cpu(bulk) && clickhouse_cpu(default) <= clickhouse_cpu(bulk),
            ));
        }
        if batch >= 100
            && let Some(got) = ratio(&name(Mode::Gateway { dedup: false }), &name(Mode::Unjournaled))
        {
            targets.push((format!("large batches: the journal within 10% of journal off (got {got:.2}×)"), got >= 0.9));
        }
        if let Some(got) = ratio(&name(Mode::Gateway { dedup: false }), &name(Mode::Before)) {
            let _ = writeln!(md, "- {size} batches: this build ÷ the build before, default mode: {got:.2}×.");
        }
    }
    let gateway_runs: Vec<&Value> =
        by_round.iter().flatten().filter(|r| r["scenario"].as_str().is_some_and(|s| s.contains("_gw"))).collect();
    if !gateway_runs.is_empty() {
        let exact = gateway_runs.iter().all(|r| num(&r["lost"]) == 0.0 && num(&r["duplicated_ids"]) == 0.0);
        targets.push(("the gateway: zero lost and zero duplicated events in every run".into(), exact));
    }
    let _ = writeln!(md, "\nTargets:\n");
    for (text, met) in &targets {
        let _ = writeln!(md, "- {} {text}", if *met { "met:" } else { "NOT met:" });
    }
    let report = json!({
        "seconds_per_scenario": seconds,
        "rounds": rounds,
        "results": medians,
        "by_round": by_round,
        "targets": targets.iter().map(|(t, m)| json!({"target": t, "met": m})).collect::<Vec<_>>(),
    });
    (report, md)
}
