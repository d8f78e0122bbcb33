//! The cluster scenarios (`--cluster SECONDS`): two ClickHouse servers, each a shard of one
//! replica (plain MergeTree, no ZooKeeper), that know each other as the cluster `bench` of
//! their `remote_servers`; Redis; and one gateway writing to both, idempotency and the
//! journal on. Small batches (64 connections × 10 events, fresh ids) are driven, as in the
//! main scenario, against:
//!
//! - the gateway on the first server alone (one node, as before), the baseline of the same run;
//! - the cluster with `sharding_key = intHash64(user_id)`: every row placed by its key;
//! - the cluster with `rand()`: each request to one shard.
//!
//! After each run the gateway is stopped (it drains) and the Buffers flushed, then it checks
//! that every acknowledged event is stored exactly once (count and distinct ids through the
//! Distributed table) and, with a key, that each shard's local table holds only rows whose
//! key says so. It records CPU per event of the gateway, Redis and each ClickHouse server.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

use super::{
    Process, cores, cpu_seconds, drive_paced, free_port, gateway_env_for, machine_ticks, median, median_run, num,
    peak_rss_mib, percentile, spawn_clickhouse, spawn_redis, wait_http,
};

const CONNECTIONS: usize = 64;
const EVENTS_PER_REQUEST: u64 = 10;
/// The cluster's name in both servers' `remote_servers`.
const CLUSTER: &str = "bench";
/// Lines of the gateway's log (warnings and errors) kept in the report.
const LOG_LINES_KEPT: usize = 20;

/// One ClickHouse server of the cluster.
struct Node {
    process: Child,
    url: String,
}

/// The servers: the shards in the cluster's order, and Redis. Killed when dropped.
struct Servers {
    nodes: Vec<Node>,
    redis: Child,
    redis_url: String,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.process.kill();
            let _ = node.process.wait();
        }
        let _ = self.redis.kill();
        let _ = self.redis.wait();
    }
}

/// `remote_servers` with the cluster `bench`: one shard per TCP port, in order.
/// `internal_replication` as a replicated setup would have it (one replica here: no effect
/// on writes, which the gateway makes to the local tables anyway).
fn remote_servers(tcp_ports: &[u16]) -> String {
    let shards: String = tcp_ports
        .iter()
        .map(|port| {
            format!(
                "<shard><internal_replication>true</internal_replication><replica><host>127.0.0.1</host><port>{port}</port></replica></shard>"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\"?>\n<yandex><remote_servers><{CLUSTER}>{shards}</{CLUSTER}></remote_servers></yandex>\n"
    )
}

async fn start(dir: &Path, shards: usize) -> Servers {
    let ports: Vec<(u16, u16)> = (0..shards).map(|_| (free_port(), free_port())).collect();
    let tcp: Vec<u16> = ports.iter().map(|(_, t)| *t).collect();
    let mut nodes = Vec::new();
    for (i, (http, tcp_port)) in ports.iter().enumerate() {
        let node_dir = dir.join(format!("clickhouse-{}", i + 1));
        // The server reads config.d/ beside its config.xml, which the script writes.
        std::fs::create_dir_all(node_dir.join("config.d")).unwrap();
        std::fs::write(node_dir.join("config.d/cluster.xml"), remote_servers(&tcp)).unwrap();
        nodes.push(Node {
            process: spawn_clickhouse(&node_dir, *http, *tcp_port),
            url: format!("http://127.0.0.1:{http}"),
        });
    }
    let redis_port = free_port();
    let servers =
        Servers { nodes, redis: spawn_redis(redis_port), redis_url: format!("redis://127.0.0.1:{redis_port}/0") };
    for node in &servers.nodes {
        wait_http(&format!("{}/ping", node.url)).await;
        let defined =
            one_row(&node.url, &format!("SELECT count() AS c FROM system.clusters WHERE cluster = '{CLUSTER}'")).await;
        assert_eq!(num(&defined["c"]) as usize, shards, "{}: the cluster {CLUSTER} in system.clusters", node.url);
    }
    servers
}

/// What the gateway is pointed at.
#[derive(Clone, Copy)]
enum Kind {
    /// The first server alone, no cluster.
    Single,
    /// Both servers as the cluster, with this sharding key.
    Cluster(&'static str),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Single => "single_node",
            Kind::Cluster("rand()") => "cluster_rand",
            Kind::Cluster(_) => "cluster_inthash64",
        }
    }

    fn label(self) -> String {
        match self {
            Kind::Single => "one node (shard 1 alone)".into(),
            Kind::Cluster(key) => format!("2 shards, {key}"),
        }
    }

    /// The key whose placement each shard's local table is checked against.
    fn placed_by_user_id(self) -> bool {
        matches!(self, Kind::Cluster(key) if key.starts_with("intHash64"))
    }
}

/// Posts a statement; its error text, if it failed.
async fn execute(ch: &str, sql: &str) -> Result<(), String> {
    let response = reqwest::Client::new().post(ch).body(sql.to_string()).send().await.map_err(|e| e.to_string())?;
    if response.status().is_success() { Ok(()) } else { Err(response.text().await.unwrap_or_default()) }
}

/// The sum over every label set of the gateway's metric `name` (`/metrics`).
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The one row a query answers; a failed query fails the run with ClickHouse's words.
async fn one_row(ch: &str, sql: &str) -> Value {
    let response = reqwest::Client::new().post(ch).body(format!("{sql} FORMAT JSONEachRow")).send().await.unwrap();
    let ok = response.status().is_success();
    let text = response.text().await.unwrap_or_default();
    assert!(ok, "{ch}: {sql}: {text}");
    serde_json::from_str(text.lines().next().unwrap_or("")).unwrap_or_else(|_| panic!("{ch}: {sql}: {text:?}"))
}

/// Start-up notices every gateway of this setup logs (no API keys; 18.16 has no per-table
/// Buffer sizes): expected, so not findings.
const EXPECTED_WARNINGS: [&str; 2] = ["no API keys configured", "system.tables.total_bytes is missing"];

/// A log line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An SGR sequence: ESC [ … m.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The unexpected warnings and errors of a gateway log: how many, and the first few.
fn log_findings(path: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(plain)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !EXPECTED_WARNINGS.iter().any(|w| l.contains(w)))
        .collect();
    (lines.len(), lines.into_iter().take(LOG_LINES_KEPT).collect())
}

/// A scenario's name: the setup's, `_paced` when the load is held at a rate.
fn scenario_name(kind: Kind, rate: Option<f64>) -> String {
    format!("{}{}", kind.name(), if rate.is_some() { "_paced" } else { "" })
}

fn scenario_label(kind: Kind, rate: Option<f64>) -> String {
    match rate {
        Some(rate) => format!("{}, {rate:.0} events/s offered", kind.label()),
        None => format!("{}, as fast as it goes", kind.label()),
    }
}

async fn scenario(
    binary: &Path,
    servers: &Servers,
    (kind, rate): (Kind, Option<f64>),
    seconds: f64,
    round: usize,
    first_id: u64,
) -> Value {
    let name = scenario_name(kind, rate);
    let db = format!("bench_{name}_{round}");
    let url = match kind {
        Kind::Single => servers.nodes[0].url.clone(),
        Kind::Cluster(_) => servers.nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(";"),
    };
    let configure = |cmd: &mut Command| {
        gateway_env_for(cmd, &url, &db);
        if let Kind::Cluster(key) = kind {
            cmd.env("BUFFERGATE_CLICKHOUSE_CLUSTER", CLUSTER).env("BUFFERGATE_SHARDING_KEY", key);
        }
    };
    let mut migrate = Command::new(binary);
    configure(&mut migrate);
    let migrated = migrate.arg("migrate").output().unwrap();
    assert!(
        migrated.status.success(),
        "migrate: {}{}",
        String::from_utf8_lossy(&migrated.stdout),
        String::from_utf8_lossy(&migrated.stderr)
    );

    // A journal of its own; the log kept beside it until the run is judged.
    let data = std::env::temp_dir().join(format!("buffergate-bench-{db}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let log_path = data.join("gateway.log");
    let port = free_port();
    let mut cmd = Command::new(binary);
    configure(&mut cmd);
    cmd.env("BUFFERGATE_DATA_DIR", data.join("data"))
        .env("BUFFERGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("BUFFERGATE_REDIS_URL", &servers.redis_url)
        .env("BUFFERGATE_DEDUP", "event")
        .env("BUFFERGATE_JOURNAL", "true")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let gateway = Process(cmd.spawn().unwrap());
    wait_http(&format!("http://127.0.0.1:{port}/readyz")).await;

    let mut pids = vec![("gateway".to_string(), gateway.id()), ("redis".to_string(), servers.redis.id())];
    pids.extend(servers.nodes.iter().enumerate().map(|(i, n)| (format!("clickhouse shard {}", i + 1), n.process.id())));
    pids.push(("load generator".to_string(), std::process::id()));
    let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let machine_before = machine_ticks();
    let url_events = format!("http://127.0.0.1:{port}/v1/events");
    let mut load = drive_paced(url_events, false, (EVENTS_PER_REQUEST, CONNECTIONS), seconds, first_id, rate).await;
    let machine_after = machine_ticks();
    let after: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let rss = peak_rss_mib(gateway.id());
    // INSERTs made and rows in them: the per-node fixed costs are paid per INSERT.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    let inserts = metric_sum(&metrics, "buffergate_flush_rows_count");
    let inserted_rows = metric_sum(&metrics, "buffergate_flush_rows_sum");
    // SIGTERM drains: every acknowledged row reaches its node's Buffer before it exits.
    let stop_started = Instant::now();
    let exit = gateway.stop().unwrap();
    let stop_seconds = stop_started.elapsed().as_secs_f64();

    // The nodes this gateway wrote to (one alone has no tables on the other).
    let written = match kind {
        Kind::Single => &servers.nodes[..1],
        Kind::Cluster(_) => &servers.nodes[..],
    };
    for node in written {
        execute(&node.url, &format!("OPTIMIZE TABLE {db}.events_buffer")).await.unwrap();
    }
    let first = &servers.nodes[0].url;
    // Through the Distributed table on a cluster (what a reader sees); the local table alone.
    let table = match kind {
        Kind::Single => format!("{db}.events_raw"),
        Kind::Cluster(_) => format!("{db}.events_raw_all"),
    };
    let stored = one_row(
        first,
        &format!(
            "SELECT count() AS rows, uniqExact(toString(event_id)) AS ids, uniqExact(user_id) AS users FROM {table}"
        ),
    )
    .await;
    let (rows, ids, users) = (num(&stored["rows"]), num(&stored["ids"]), num(&stored["users"]));
    let mut shards = Vec::new();
    for (i, node) in written.iter().enumerate() {
        // The rows a Distributed table with intHash64(user_id) would not have sent to this shard.
        let local = one_row(
            &node.url,
            &format!(
                "SELECT count() AS rows, countIf(intHash64(user_id) % {} != {i}) AS misplaced FROM {db}.events_raw",
                servers.nodes.len()
            ),
        )
        .await;
        let parts = one_row(
            &node.url,
            &format!(
                "SELECT count() AS parts FROM system.parts WHERE database = '{db}' AND table = 'events_raw' AND level = 0"
            ),
        )
        .await;
        shards.push(json!({
            "shard": i + 1,
            "url": node.url,
            "rows": num(&local["rows"]),
            "misplaced": if kind.placed_by_user_id() { json!(num(&local["misplaced"])) } else { Value::Null },
            "level_0_parts": num(&parts["parts"]),
        }));
    }
    let (warnings, log) = log_findings(&log_path);
    let _ = std::fs::remove_dir_all(&data);

    let millions = (load.acknowledged as f64 / 1e6).max(1e-9);
    load.latencies_us.sort_unstable();
    let cpu: serde_json::Map<String, Value> = pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), (b, a))| (name.clone(), json!((a - b) / millions)))
        .collect();
    let cpu_per_event: f64 = cpu.values().map(num).sum::<f64>() / 1e6;
    let acknowledged = load.acknowledged as f64;
    json!({
        "scenario": name,
        "setup": scenario_label(kind, rate),
        "offered_events_per_second": rate,
        "sharding_key": match kind { Kind::Single => Value::Null, Kind::Cluster(key) => json!(key) },
        "events_per_request": EVENTS_PER_REQUEST,
        "connections": CONNECTIONS,
        "seconds": load.elapsed,
        "acknowledged_events": load.acknowledged,
        "failed_requests": load.failed_requests,
        "events_per_second": acknowledged / load.elapsed,
        "latency_ms": {"p50": percentile(&load.latencies_us, 0.5), "p99": percentile(&load.latencies_us, 0.99), "p99_9": percentile(&load.latencies_us, 0.999)},
        // µs of CPU per event, per process (= CPU seconds per million events).
        "cpu_us_per_event": cpu,
        "machine_busy": (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0),
        "events_per_second_at_full_use": cores() / cpu_per_event.max(1e-12),
        "gateway_peak_rss_mib": rss,
        "inserts": inserts,
        "rows_per_insert": inserted_rows / inserts.max(1.0),
        "gateway_stop_seconds": stop_seconds,
        "gateway_exit_code": exit.code(),
        "stored_rows": rows,
        "distinct_event_ids": ids,
        "distinct_user_ids": users,
        // Acknowledged and not stored; stored more than once; stored and never acknowledged.
        "lost": (acknowledged - ids).max(0.0),
        "duplicated": rows - ids,
        "unacknowledged_rows": (ids - acknowledged).max(0.0),
        "shards": shards,
        // Warnings and errors beyond the start-up notices.
        "gateway_log_warnings": warnings,
        "gateway_log": log,
    })
}

/// Whether a run stored exactly what was acknowledged, each shard only its own rows, and the
/// gateway exited cleanly.
fn exact(r: &Value) -> bool {
    r["gateway_exit_code"] == 0
        && num(&r["lost"]) == 0.0
        && num(&r["duplicated"]) == 0.0
        && num(&r["stored_rows"]) == num(&r["acknowledged_events"])
        && r["shards"].as_array().into_iter().flatten().all(|s| num(&s["misplaced"]) == 0.0)
}

fn row(r: &Value) -> String {
    let cpu = &r["cpu_us_per_event"];
    let clickhouse: Vec<String> =
        ["clickhouse shard 1", "clickhouse shard 2"].iter().map(|k| format!("{:.2}", num(&cpu[*k]))).collect();
    let total =
        ["gateway", "redis", "clickhouse shard 1", "clickhouse shard 2"].iter().map(|k| num(&cpu[*k])).sum::<f64>();
    let shards = r["shards"].as_array().cloned().unwrap_or_default();
    let per_shard: Vec<String> = shards.iter().map(|s| format!("{:.0}", num(&s["rows"]))).collect();
    let misplaced: Vec<String> =
        shards.iter().map(|s| s["misplaced"].as_f64().map_or("–".to_string(), |m| format!("{m:.0}"))).collect();
    format!(
        "| {} | {:.0} | {:.1} / {:.1} / {:.0} | {:.2} / {:.2} / {} (= {:.2}) | {:.2} | {:.0}% | {} | {:.0} ({:.0}) | {:.0} / {:.0} / {:.0} | {} | {} | {:.0} / {:.0} | {} |",
        r["setup"].as_str().unwrap_or(""),
        num(&r["events_per_second"]),
        num(&r["latency_ms"]["p50"]),
        num(&r["latency_ms"]["p99"]),
        num(&r["latency_ms"]["p99_9"]),
        num(&cpu["gateway"]),
        num(&cpu["redis"]),
        clickhouse.join(" / "),
        total,
        num(&cpu["load generator"]),
        num(&r["machine_busy"]) * 100.0,
        r["failed_requests"],
        num(&r["inserts"]),
        num(&r["rows_per_insert"]),
        num(&r["acknowledged_events"]),
        num(&r["stored_rows"]),
        num(&r["distinct_event_ids"]),
        per_shard.join(" / "),
        misplaced.join(" / "),
        num(&r["lost"]),
        num(&r["duplicated"]),
        r["gateway_log_warnings"],
    )
}

/// The median over rounds of `scenario`'s gateway CPU per event ÷ `single`'s.
fn gateway_cpu_ratio(rounds: &[Vec<Value>], scenario: &str, single: &str) -> f64 {
    let ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|round| {
            let find = |n: &str| round.iter().find(|r| r["scenario"] == n);
            let gateway = |r: &Value| num(&r["cpu_us_per_event"]["gateway"]);
            Some(gateway(find(scenario)?) / gateway(find(single)?).max(1e-9))
        })
        .collect();
    median(ratios)
}

/// Runs the scenarios `rounds` times, round after round, each for `seconds`: every setup as
/// fast as it goes, then every setup at `rate` events/s (CPU per event depends on how full
/// the batches are, so setups are compared for cost at the same load). The report and its
/// Markdown.
pub async fn run(binary: &Path, dir: &Path, seconds: f64, rounds_wanted: usize, rate: f64) -> (Value, String) {
    let servers = start(dir, 2).await;
    let version = one_row(&servers.nodes[0].url, "SELECT version() AS v").await["v"].as_str().unwrap_or("").to_string();
    let kinds = [Kind::Single, Kind::Cluster("intHash64(user_id)"), Kind::Cluster("rand()")];
    let scenarios: Vec<(Kind, Option<f64>)> =
        [None, Some(rate)].into_iter().flat_map(|rate| kinds.map(|kind| (kind, rate))).collect();
    let mut rounds: Vec<Vec<Value>> = Vec::new();
    // Ids never repeat: the Redis store outlives each gateway.
    let mut first_id = 0u64;
    for round in 0..rounds_wanted {
        let mut this = Vec::new();
        for &(kind, rate) in &scenarios {
            println!("round {}/{rounds_wanted}: {}, {seconds} s...", round + 1, scenario_label(kind, rate));
            first_id += 1 << 40;
            let result = scenario(binary, &servers, (kind, rate), seconds, round, first_id).await;
            println!(
                "  {:.0} events/s, gateway {:.2} µs/event, exact: {}, log warnings: {}",
                num(&result["events_per_second"]),
                num(&result["cpu_us_per_event"]["gateway"]),
                exact(&result),
                result["gateway_log_warnings"]
            );
            this.push(result);
        }
        rounds.push(this);
    }
    drop(servers);
    let eps = |r: &Value| num(&r["events_per_second"]);
    let results: Vec<Value> = (0..scenarios.len())
        .map(|i| {
            // At a fixed rate events/s says nothing: the median of the cost instead.
            let key =
                |r: &Value| if scenarios[i].1.is_some() { num(&r["cpu_us_per_event"]["gateway"]) } else { eps(r) };
            let mut median = median_run(rounds.iter().map(|round| &round[i]).collect(), key).clone();
            median["events_per_second_by_round"] = json!(rounds.iter().map(|round| eps(&round[i])).collect::<Vec<_>>());
            median["gateway_stop_seconds_by_round"] =
                json!(rounds.iter().map(|round| num(&round[i]["gateway_stop_seconds"])).collect::<Vec<_>>());
            median["gateway_cpu_us_per_event_by_round"] =
                json!(rounds.iter().map(|round| num(&round[i]["cpu_us_per_event"]["gateway"])).collect::<Vec<_>>());
            median
        })
        .collect();
    let all_exact = rounds.iter().flatten().all(exact);
    let ratio = |scenario: &str, single: &str| gateway_cpu_ratio(&rounds, scenario, single);
    let (keyed, random) = (ratio("cluster_inthash64", "single_node"), ratio("cluster_rand", "single_node"));
    let (keyed_paced, random_paced) =
        (ratio("cluster_inthash64_paced", "single_node_paced"), ratio("cluster_rand_paced", "single_node_paced"));

    let mut md = format!(
        "ClickHouse {version}: 2 servers as the cluster `{CLUSTER}` (2 shards × 1 replica, MergeTree); the gateway with \
         idempotency (Redis) and the journal on. {CONNECTIONS} connections × \
         {EVENTS_PER_REQUEST} events per request, fresh ids, {seconds} s per scenario, {rounds_wanted} round(s): each row \
         is the scenario's median round (by events/s; paced rows by gateway CPU per event).\n\n"
    );
    md.push_str(
        "| setup | events/s | latency p50 / p99 / p99.9 ms | CPU µs per event: gateway / Redis / ClickHouse shard 1 / shard 2 (= total) | load generator µs per event | machine busy | failed requests | INSERTs (rows per INSERT) | acknowledged / stored / distinct ids | rows per shard | misplaced per shard | lost / duplicated | gateway log warnings |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &results {
        md.push_str(&row(r));
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\nGateway CPU per event, cluster ÷ one node (median of each round's ratio): at {rate:.0} events/s {keyed_paced:.2}× with \
         intHash64(user_id), {random_paced:.2}× with rand(); as fast as each goes {keyed:.2}× and {random:.2}×.\n"
    );
    let _ = writeln!(
        md,
        "By round (events/s; gateway µs per event; seconds the gateway took to drain and exit at SIGTERM):\n"
    );
    for r in &results {
        let list = |field: &str, digits: usize| -> String {
            r[field]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{:.digits$}", num(v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "- {}: {}; {}; {}",
            r["scenario"].as_str().unwrap_or(""),
            list("events_per_second_by_round", 0),
            list("gateway_cpu_us_per_event_by_round", 2),
            list("gateway_stop_seconds_by_round", 1)
        );
    }
    let _ = writeln!(
        md,
        "\n{} every acknowledged event stored exactly once in every run (count and distinct ids through `events_raw_all`), \
         and with intHash64(user_id) every shard's local table holding only its own rows.",
        if all_exact { "Met:" } else { "NOT met:" }
    );
    for r in rounds.iter().flatten().filter(|r| num(&r["gateway_log_warnings"]) > 0.0) {
        let _ = writeln!(
            md,
            "\nGateway log of {} ({} warnings/errors), first lines:\n\n```",
            r["scenario"].as_str().unwrap_or(""),
            r["gateway_log_warnings"]
        );
        for line in r["gateway_log"].as_array().into_iter().flatten() {
            let _ = writeln!(md, "{}", line.as_str().unwrap_or(""));
        }
        let _ = writeln!(md, "```");
    }
    let report = json!({
        "clickhouse": version,
        "shards": 2,
        "seconds_per_scenario": seconds,
        "rounds": rounds_wanted,
        "results": results,
        "all_rounds": rounds,
        "exactly_once_and_placed": all_exact,
        "offered_events_per_second": rate,
        "gateway_cpu_vs_single_node": {
            "paced": {"intHash64(user_id)": keyed_paced, "rand()": random_paced},
            "as_fast_as_it_goes": {"intHash64(user_id)": keyed, "rand()": random},
        },
    });
    (report, md)
}
