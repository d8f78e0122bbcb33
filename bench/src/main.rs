//! Side-by-side benchmark: the same seed-shaped event stream sent by producers straight into
//! the Buffer table (`INSERT … FORMAT JSONEachRow` over ClickHouse's HTTP interface) and
//! through buffergate (`POST /v1/events`), on one machine, in one run. Starts its own
//! ClickHouse, Redis and gateways; prints throughput, latency, CPU per million events per
//! process, the gateway's peak RSS and parts created, verifies that every acknowledged event
//! is stored exactly once, and writes JSON and Markdown results.
//!
//! The machine it runs on is shared and noisy, so it runs every scenario `--rounds` times,
//! the rounds one after the other, and reports each scenario's median round; ratios to direct
//! are the median of each round's ratio (a gateway run against the direct run next to it).
//!
//!     cargo run --release -p buffergate-bench -- [--seconds 6] [--rounds 3] [--only large_gw] [--out bench/results] [--gateway PATH]
//!
//! `--kafka` runs the Kafka scenarios instead ([`kafka`]: a pre-filled topic consumed by
//! `buffergate consume` and by ClickHouse's Kafka engine) and writes `kafka.json`/`kafka.md`;
//! `--soak SECONDS` runs the soak ([`soak`]: 1% malformed requests, RSS over time) and writes
//! `soak.json`/`soak.md`; `--cluster SECONDS` runs the cluster scenarios ([`cluster`]: two
//! ClickHouse shards behind one gateway, rows placed by key) and writes `cluster.json`/`cluster.md`;
//! `--streams SECONDS` runs the streams scenarios ([`streams`]: idle streams' cost, several
//! streams under load) and writes `streams.json`/`streams.md`; `--protocol` runs the
//! ClickHouse-protocol scenarios ([`protocol`]: the same `INSERT … FORMAT JSONEachRow` requests
//! to ClickHouse and to the gateway, beside `/v1/events`) and writes `protocol.json`/`protocol.md`;
//! `--overload` runs the goodput-under-overload scenario ([`overload`]: producers that never back
//! off, at the saturating connection count and at 30 times it) and writes
//! `overload.json`/`overload.md`; `--peer-bulk PATH` runs clickhouse-bulk beside direct and the
//! gateway's modes ([`peer`]) and writes `peer.json`/`peer.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a harness: fail loudly, print results

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::net::TcpStream;

mod cluster;
mod kafka;
mod overload;
mod peer;
mod protocol;
mod soak;
mod streams;

const EVENT_TYPES: [&str; 8] = ["page_view", "click", "signup", "purchase", "search", "add_to_cart", "logout", "share"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (`/proc/stat`): busy is
/// everything but idle and I/O wait.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0);
    (total - idle, total)
}

/// µs of Redis CPU per event of a scenario with idempotency on (CPU s per million events is
/// µs per event); `None` without idempotency, where Redis only idles.
fn redis_per_event(result: &Value) -> Option<f64> {
    let dedup = result["scenario"].as_str().is_some_and(|name| name.ends_with("_gw_dedup"));
    dedup.then(|| num(&result["cpu_seconds_per_million_events"]["redis"]))
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, usize::from) as f64
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// A memory figure (`VmHWM:`, `VmRSS:`) of `/proc/PID/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn wait_http(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered");
}

pub(crate) struct Servers {
    clickhouse: Child,
    redis: Child,
    ch_url: String,
    redis_url: String,
    /// A clickhouse-bulk binary (`--peer-bulk`), for [`Mode::Bulk`].
    peer_bulk: Option<PathBuf>,
    /// Another buffergate build (`--before`), for [`Mode::Before`].
    before: Option<PathBuf>,
    dir: PathBuf,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.clickhouse.kill();
        let _ = self.redis.kill();
    }
}

/// A process the harness started for one scenario (a gateway, clickhouse-bulk): stopped with
/// [`Process::stop`], or killed when dropped while still running, so that a panic mid-run
/// leaves nothing holding its port and the CPU of the runs after it.
pub(crate) struct Process(Child);

impl Process {
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM (a gateway drains, clickhouse-bulk sends what it holds), then its exit.
    pub(crate) fn stop(mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        self.0.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A private ClickHouse server with its files in `dir` (`scripts/clickhouse-server.sh`).
fn spawn_clickhouse(dir: &Path, http: u16, tcp: u16) -> Child {
    Command::new(repo().join("scripts/clickhouse-server.sh"))
        .arg(dir)
        .args([http.to_string(), tcp.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("clickhouse-server (scripts/install-deps.sh installs it)")
}

/// A Redis without persistence on `port`.
fn spawn_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server")
}

async fn start_servers(dir: &Path) -> Servers {
    let (http, tcp, redis_port) = (free_port(), free_port(), free_port());
    let clickhouse = spawn_clickhouse(&dir.join("clickhouse"), http, tcp);
    let redis = spawn_redis(redis_port);
    let ch_url = format!("http://127.0.0.1:{http}");
    wait_http(&format!("{ch_url}/ping")).await;
    Servers {
        clickhouse,
        redis,
        ch_url,
        redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
        peer_bulk: None,
        before: None,
        dir: dir.to_path_buf(),
    }
}

/// One seed-shaped event (~230 bytes), unique by `n`; payload and metadata are JSON text and
/// the time has whole seconds, as producers inserting JSONEachRow into 18.16's String and
/// DateTime columns must send them.
fn write_event(out: &mut String, n: u64, base_ms: u64) {
    let ms = base_ms + n % 3_600_000;
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let kind = EVENT_TYPES[(n.wrapping_mul(2_654_435_761) % 8) as usize];
    let _ = write!(
        out,
        r#"{{"event_id":"{:08x}-0000-4000-8000-{:012x}","event_ts":"2024-05-01 {h:02}:{m:02}:{s:02}","user_id":{n},"event_type":"{kind}","payload":"{{\"page\":\"/p/{}\",\"ref\":\"campaign-{}\",\"ms\":{}}}","metadata":"{{\"source\":\"web\",\"ip\":\"10.{}.{}.{}\"}}"}}"#,
        // The counter's top 16 bits in the first group: every scenario moves it by 2^40.
        n >> 48,
        n & 0xFFFF_FFFF_FFFF,
        n % 997,
        n % 31,
        n % 5000,
        n % 256,
        (n / 256) % 256,
        (n / 65536) % 256
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Gateway {
        dedup: bool,
    },
    /// The gateway through ClickHouse's insert protocol: the requests sent to ClickHouse in
    /// `Direct`, byte for byte.
    Protocol,
    /// The gateway answering `202` once the events are journaled (`wait=false`), idempotency off.
    Journaled,
    /// The gateway with its journal off, idempotency off.
    Unjournaled,
    /// The build given as `--before`, idempotency off.
    Before,
    /// clickhouse-bulk (`--peer-bulk`): the requests sent to ClickHouse in `Direct`, answered
    /// before anything is written.
    Bulk,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Gateway { dedup: true } => "gateway, idempotency on",
            Mode::Gateway { dedup: false } => "gateway, idempotency off",
            Mode::Protocol => "gateway via INSERT … FORMAT JSONEachRow, idempotency off",
            Mode::Journaled => "gateway, wait=false (202 once journaled), idempotency off",
            Mode::Unjournaled => "gateway, journal off, idempotency off",
            Mode::Before => "gateway, the build before, idempotency off",
            Mode::Bulk => "clickhouse-bulk",
        }
    }
}

#[derive(Default)]
struct Load {
    acknowledged: u64,
    failed_requests: u64,
    latencies_us: Vec<u32>,
    elapsed: f64,
}

/// One producer's keep-alive HTTP/1.1 connection. hyper's connection API rather than a pooled
/// client: like `wrk`, the generator should cost the shared cores as little as possible, so
/// that what is measured is the servers.
struct Producer {
    uri: hyper::Uri,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Producer {
    fn new(url: &str) -> Producer {
        Producer { uri: url.parse().unwrap(), sender: None }
    }

    async fn connect(&mut self) -> Option<&mut hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let authority = self.uri.authority()?.as_str();
            let stream = TcpStream::connect(authority).await.ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        self.sender.as_mut()
    }

    /// POSTs `body`; the answer's status and body, or `None` when the connection failed.
    async fn post(&mut self, body: Bytes) -> Option<(u16, Bytes)> {
        let request = hyper::Request::post(self.uri.clone())
            .header("host", self.uri.authority()?.as_str())
            .header("content-type", "application/json")
            .body(Full::new(body))
            .ok()?;
        let sender = self.connect().await?;
        sender.ready().await.ok()?;
        let result = async {
            let response = sender.send_request(request).await.ok()?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        }
        .await;
        if result.is_none() {
            self.sender = None;
        }
        result
    }
}

/// Drives `connections` producers for `seconds`, each sending `batch` events per request.
async fn drive(url: String, ndjson: bool, batch: u64, connections: usize, seconds: f64, first_id: u64) -> Load {
    drive_paced(url, ndjson, (batch, connections), seconds, first_id, None).await
}

/// [`drive`], at most `rate` events/s in all when given: each producer sends a request every
/// `connections × batch / rate` seconds (the producers staggered), so that runs compared at
/// the same rate do the same work per second, whatever their batching would allow.
async fn drive_paced(
    url: String,
    ndjson: bool,
    (batch, connections): (u64, usize),
    seconds: f64,
    first_id: u64,
    rate: Option<f64>,
) -> Load {
    let next = Arc::new(AtomicU64::new(first_id));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let period = rate.map(|rate| Duration::from_secs_f64(connections as f64 * batch as f64 / rate));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let (url, next) = (url.clone(), Arc::clone(&next));
        let mut ticks = period.map(|period| {
            let first = tokio::time::Instant::now() + period.mul_f64(i as f64 / connections as f64);
            let mut ticks = tokio::time::interval_at(first, period);
            // Behind (the servers slower than the rate): carry on from now, no burst.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        tasks.push(tokio::spawn(async move {
            let mut producer = Producer::new(&url);
            let mut load = Load::default();
            let mut body = String::with_capacity(batch as usize * 260);
            while Instant::now() < deadline {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                let first = next.fetch_add(batch, Ordering::Relaxed);
                body.clear();
                if !ndjson {
                    body.push('[');
                }
                for n in first..first + batch {
                    if n > first {
                        body.push(if ndjson { '\n' } else { ',' });
                    }
                    write_event(&mut body, n, 1_714_521_600_000);
                }
                if !ndjson {
                    body.push(']');
                }
                let sent = Instant::now();
                let accepted = match producer.post(Bytes::copy_from_slice(body.as_bytes())).await {
                    // The gateway says how many it accepted; ClickHouse's 200 means all.
                    Some((200..=299, answer)) => accepted_count(&answer).or(Some(batch)),
                    _ => None,
                };
                load.latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                match accepted {
                    Some(n) => load.acknowledged += n,
                    None => load.failed_requests += 1,
                }
            }
            load
        }));
    }
    let mut total = Load::default();
    for task in tasks {
        let load = task.await.unwrap();
        total.acknowledged += load.acknowledged;
        total.failed_requests += load.failed_requests;
        total.latencies_us.extend(load.latencies_us);
    }
    total.elapsed = started.elapsed().as_secs_f64();
    total
}

/// How long after now the Buffer table `db.events_buffer` (its buffers and its destination)
/// first held `events` rows; `limit` when it never did. Polled after 10 ms, then less and
/// less often, at most four times a second: on 18.16 a `count()` reads a column of every part,
/// and a tight poll through a long drain would cost ClickHouse CPU the scenario is charged for.
async fn stored_within(ch: &str, db: &str, events: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    let sql = format!("SELECT count() AS n FROM {db}.events_buffer");
    let mut pause = Duration::from_millis(10);
    while started.elapsed() < limit {
        if query(ch, &sql).await.first().is_some_and(|r| num(&r["n"]) >= events as f64) {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    started.elapsed()
}

/// [`scenario`] for round `round` of `rounds`, announced and its events/s printed; ids go on
/// from `first_id`, which moves past them.
pub(crate) async fn announced(
    binary: &Path,
    servers: &Servers,
    (mode, batch, connections): (Mode, u64, usize),
    seconds: f64,
    (round, rounds): (usize, usize),
    first_id: &mut u64,
) -> Value {
    println!("round {}/{rounds}: {} with {batch} events × {connections} connections...", round + 1, mode.label());
    *first_id += 1 << 40;
    let result = scenario(binary, servers, (mode, batch, connections), seconds, round, *first_id).await;
    println!("  {:.0} events/s", num(&result["events_per_second"]));
    result
}

/// One line per result: its scenario and the figures of `field` (a list by round).
fn by_round_lines(results: &[Value], field: &str) -> String {
    let mut out = String::new();
    for r in results {
        let shown: Vec<String> = r[field].as_array().into_iter().flatten().map(|v| format!("{:.0}", num(v))).collect();
        let _ = writeln!(out, "- {}: {}", r["scenario"].as_str().unwrap_or(""), shown.join(", "));
    }
    out
}

/// `accepted` from a gateway answer, without parsing the rest.
fn accepted_count(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = &text[text.find("\"accepted\":")? + 11..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
}

/// The median of `values`: the middle one, or the mean of the two middle ones; 0 when empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median round of `runs` (at least one: `--rounds` is) by `key`: a real run, so with an
/// even count the lower of the two middle ones by `key` (the figures of a row come from one run).
pub(crate) fn median_run(mut runs: Vec<&Value>, key: impl Fn(&Value) -> f64) -> &Value {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    runs[runs.len().saturating_sub(1) / 2]
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

async fn query(ch: &str, sql: &str) -> Vec<Value> {
    let text = reqwest::Client::new()
        .post(ch)
        .body(format!("{sql} FORMAT JSONEachRow"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn num(v: &Value) -> f64 {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0.0)
}

fn gateway_env(cmd: &mut Command, servers: &Servers, db: &str) {
    gateway_env_for(cmd, &servers.ch_url, db);
}

/// The gateway's environment with `clickhouse_url` = `ch_url` (one node, or a cluster's list).
fn gateway_env_for(cmd: &mut Command, ch_url: &str, db: &str) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // A run that looks wrong can be rerun with the gateway's log (beside its journal) at
        // another level.
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .env("BUFFERGATE_CLICKHOUSE_URL", ch_url)
        .env("BUFFERGATE_DATABASE", db);
    // Tuning knobs to measure (`BUFFERGATE_CLICKHOUSE_COMPRESSION=none …`) pass through.
    for (key, value) in std::env::vars() {
        if ["BUFFERGATE_", "MIMALLOC_", "TOKIO_"].iter().any(|prefix| key.starts_with(prefix))
            && !matches!(key.as_str(), "BUFFERGATE_CLICKHOUSE_URL" | "BUFFERGATE_DATABASE")
        {
            cmd.env(key, value);
        }
    }
}

/// `small_direct`, `large_gw_dedup`, ...: what `--only` matches.
fn scenario_name(mode: Mode, batch: u64) -> String {
    format!(
        "{}_{}",
        if batch >= 100 { "large" } else { "small" },
        match mode {
            Mode::Direct => "direct",
            Mode::Gateway { dedup: true } => "gw_dedup",
            Mode::Gateway { dedup: false } => "gw_nodedup",
            Mode::Protocol => "gw_protocol",
            Mode::Journaled => "gw_202",
            Mode::Unjournaled => "gw_nojournal",
            Mode::Before => "gw_before",
            Mode::Bulk => "bulk",
        }
    )
}

pub(crate) async fn scenario(
    binary: &Path,
    servers: &Servers,
    (mode, batch, connections): (Mode, u64, usize),
    seconds: f64,
    round: usize,
    first_id: u64,
) -> Value {
    let name = scenario_name(mode, batch);
    let db = format!("bench_{name}_{round}");
    let mut migrate = Command::new(binary);
    gateway_env(&mut migrate, servers, &db);
    assert!(migrate.arg("migrate").stderr(Stdio::null()).status().unwrap().success(), "migrate");

    let mut gateway = None;
    let insert = format!("/?query=INSERT%20INTO%20{db}.events_buffer%20FORMAT%20JSONEachRow");
    let url = match mode {
        Mode::Direct => format!("{}{insert}", servers.ch_url),
        Mode::Bulk => {
            let (child, url) = peer::start_bulk(servers, &db).await;
            gateway = Some(child);
            format!("{url}{insert}")
        }
        Mode::Gateway { .. } | Mode::Protocol | Mode::Journaled | Mode::Unjournaled | Mode::Before => {
            let dedup = mode == Mode::Gateway { dedup: true };
            let port = free_port();
            let before = servers.before.as_deref().filter(|_| mode == Mode::Before);
            let mut cmd = Command::new(before.unwrap_or(binary));
            gateway_env(&mut cmd, servers, &db);
            if mode == Mode::Unjournaled {
                cmd.env("BUFFERGATE_JOURNAL", "false");
            }
            // A journal of its own: a gateway of an earlier scenario must not hand it blocks.
            let data = std::env::temp_dir().join(format!("buffergate-bench-{db}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&data);
            cmd.env("BUFFERGATE_DATA_DIR", &data);
            cmd.env("BUFFERGATE_LISTEN", format!("127.0.0.1:{port}"))
                .env("BUFFERGATE_REDIS_URL", if dedup { servers.redis_url.as_str() } else { "" })
                .env("BUFFERGATE_DEDUP", if dedup { "event" } else { "off" })
                .arg("serve")
                // Its log beside its journal, for a run that looks wrong.
                .stderr(std::fs::File::create(data.with_extension("log")).map_or_else(|_| Stdio::null(), Stdio::from));
            gateway = Some(Process(cmd.spawn().unwrap()));
            wait_http(&format!("http://127.0.0.1:{port}/readyz")).await;
            match mode {
                Mode::Protocol => format!("http://127.0.0.1:{port}{insert}"),
                Mode::Journaled => format!("http://127.0.0.1:{port}/v1/events?wait=false"),
                _ => format!("http://127.0.0.1:{port}/v1/events"),
            }
        }
    };
    let pids = [
        // The process in front of ClickHouse, named for what it is.
        (if mode == Mode::Bulk { "clickhouse-bulk" } else { "gateway" }, gateway.as_ref().map(Process::id)),
        ("clickhouse", Some(servers.clickhouse.id())),
        ("redis", Some(servers.redis.id())),
        ("load generator", Some(std::process::id())),
    ];
    let before: Vec<f64> = pids.iter().map(|(_, p)| p.map_or(0.0, cpu_seconds)).collect();
    let machine_before = machine_ticks();
    let ndjson = matches!(mode, Mode::Direct | Mode::Protocol | Mode::Bulk);
    let mut load = drive(url, ndjson, batch, connections, seconds, first_id).await;
    // An answer may come before the write (`wait=false`, clickhouse-bulk): the run ends, and
    // its CPU is counted, once ClickHouse holds every acknowledged event.
    let drained = stored_within(&servers.ch_url, &db, load.acknowledged, Duration::from_secs(120)).await;
    let machine_after = machine_ticks();
    let after: Vec<f64> = pids.iter().map(|(_, p)| p.map_or(0.0, cpu_seconds)).collect();
    let rss = gateway.as_ref().map(|g| peak_rss_mib(g.id()));
    if let Some(g) = gateway {
        // The answers were all received already.
        g.stop();
    }

    let ch = &servers.ch_url;
    let _ = reqwest::Client::new().post(ch).body(format!("OPTIMIZE TABLE {db}.events_buffer")).send().await;
    let stored = query(ch, &format!(
        "SELECT count() AS distinct_ids, sum(c) AS rows, sum(c > 1) AS duplicated FROM (SELECT user_id, count() AS c FROM {db}.events_raw GROUP BY user_id)"
    ))
    .await;
    let parts = query(
        ch,
        &format!(
            "SELECT count() AS parts FROM system.parts WHERE database = '{db}' AND table = 'events_raw' AND level = 0"
        ),
    )
    .await;
    let (rows, distinct, duplicated) =
        (num(&stored[0]["rows"]), num(&stored[0]["distinct_ids"]), num(&stored[0]["duplicated"]));
    let millions = (load.acknowledged as f64 / 1e6).max(1e-9);
    load.latencies_us.sort_unstable();
    let cpu: serde_json::Map<String, Value> = pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), (b, a))| ((*name).to_string(), json!((a - b) / millions)))
        .collect();
    // How much of the machine the run used, and what its CPU per event would allow with every
    // core busy: a scenario well below full use is bound by latency, not by CPU.
    let machine_busy = (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0);
    let cpu_per_event: f64 = cpu.values().map(num).sum::<f64>() / 1e6;
    let ceiling = cores() / cpu_per_event.max(1e-12);
    // The process in front of ClickHouse, under its own name as in the CPU figures.
    let rss_key = if mode == Mode::Bulk { "clickhouse_bulk_peak_rss_mib" } else { "gateway_peak_rss_mib" };
    let mut result = json!({
        "scenario": name,
        "mode": mode.label(),
        "events_per_request": batch,
        "connections": connections,
        "seconds": load.elapsed,
        "acknowledged_events": load.acknowledged,
        "failed_requests": load.failed_requests,
        "events_per_second": load.acknowledged as f64 / load.elapsed,
        // Acknowledged events over the time until ClickHouse held them all.
        "stored_events_per_second": load.acknowledged as f64 / (load.elapsed + drained.as_secs_f64()),
        "seconds_until_stored": drained.as_secs_f64(),
        "latency_ms": {"p50": percentile(&load.latencies_us, 0.5), "p99": percentile(&load.latencies_us, 0.99), "p99_9": percentile(&load.latencies_us, 0.999)},
        "cpu_seconds_per_million_events": cpu,
        "machine_busy": machine_busy,
        // All four processes' CPU (load generator included) spread over every core.
        "events_per_second_at_full_use": ceiling,
        "parts_per_million_events": num(&parts[0]["parts"]) / millions,
        "stored_rows": rows,
        // Every acknowledged event is there (no loss) and no id is stored twice.
        "lost": (load.acknowledged as f64 - distinct).max(0.0),
        "duplicated_ids": duplicated,
    });
    result[rss_key] = json!(rss);
    result
}

/// Peak RSS of the process in front of ClickHouse: the gateway's, or clickhouse-bulk's.
pub(crate) fn proxy_rss(r: &Value) -> Option<f64> {
    r["gateway_peak_rss_mib"].as_f64().or_else(|| r["clickhouse_bulk_peak_rss_mib"].as_f64())
}

/// CPU per event of the process in front of ClickHouse: the gateway's, or clickhouse-bulk's.
pub(crate) fn proxy_cpu(cpu: &Value) -> f64 {
    num(&cpu["gateway"]) + num(&cpu["clickhouse-bulk"])
}

fn row(r: &Value) -> String {
    let cpu = &r["cpu_seconds_per_million_events"];
    let total = proxy_cpu(cpu) + num(&cpu["clickhouse"]) + num(&cpu["redis"]);
    format!(
        "| {} | {} × {} | {:.0} | {:.1} / {:.1} / {:.1} | {:.2} / {:.2} / {:.2} (= {:.2}) | {:.2} | {:.0}% · {:.0} | {} | {:.1} | {} / {} |",
        r["mode"].as_str().unwrap_or(""),
        r["events_per_request"],
        r["connections"],
        num(&r["events_per_second"]),
        num(&r["latency_ms"]["p50"]),
        num(&r["latency_ms"]["p99"]),
        num(&r["latency_ms"]["p99_9"]),
        proxy_cpu(cpu),
        num(&cpu["clickhouse"]),
        num(&cpu["redis"]),
        total,
        num(&cpu["load generator"]),
        num(&r["machine_busy"]) * 100.0,
        num(&r["events_per_second_at_full_use"]),
        proxy_rss(r).map_or("–".to_string(), |m| format!("{m:.0} MiB")),
        num(&r["parts_per_million_events"]),
        r["lost"],
        r["duplicated_ids"],
    )
}

/// The median over rounds of gateway ÷ direct events/s, each round against its own direct run.
fn median_ratio(rounds: &[Vec<Value>], gateway: &str, direct: &str) -> f64 {
    median_ratio_of(rounds, gateway, "events_per_second", direct)
}

/// The same with the gateway's `field` (an events/s figure) in place of its measured events/s.
fn median_ratio_of(rounds: &[Vec<Value>], gateway: &str, field: &str, direct: &str) -> f64 {
    let ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|round| {
            let find = |n: &str| round.iter().find(|r| r["scenario"] == n);
            Some(num(&find(gateway)?[field]) / num(&find(direct)?["events_per_second"]).max(1.0))
        })
        .collect();
    median(ratios)
}

fn targets(results: &[Value], rounds: &[Vec<Value>]) -> Vec<(String, bool)> {
    let find = |name: &str| results.iter().find(|r| r["scenario"] == name).cloned().unwrap_or(Value::Null);
    let cpu = |r: &Value| {
        ["gateway", "clickhouse", "redis"].iter().map(|k| num(&r["cpu_seconds_per_million_events"][*k])).sum::<f64>()
    };
    let (sd, sg) = (find("small_direct"), find("small_gw_dedup"));
    let (ld, lg) = (find("large_direct"), find("large_gw_nodedup"));
    let (small, large) = (
        median_ratio(rounds, "small_gw_dedup", "small_direct"),
        median_ratio(rounds, "large_gw_nodedup", "large_direct"),
    );
    // What the scenario's CPU per event would allow with every core busy, against direct's
    // measured events/s in the same round (direct keeps the cores busy).
    let at_full_use =
        |gateway: &str, direct: &str| median_ratio_of(rounds, gateway, "events_per_second_at_full_use", direct);
    let mut out = vec![
        (
            format!(
                "small batches, idempotency on: events/s ≥ 3 × direct (got {small:.2}×; with every core busy its CPU per event would allow {:.2}×)",
                at_full_use("small_gw_dedup", "small_direct")
            ),
            small >= 3.0,
        ),
        (
            format!(
                "small batches, idempotency on: p99 no worse than direct ({:.1} vs {:.1} ms)",
                num(&sg["latency_ms"]["p99"]),
                num(&sd["latency_ms"]["p99"])
            ),
            num(&sg["latency_ms"]["p99"]) <= num(&sd["latency_ms"]["p99"]),
        ),
        (
            format!(
                "large batches, idempotency off: events/s ≥ 1.0 × direct (got {large:.2}×; with every core busy its CPU per event would allow {:.2}×)",
                at_full_use("large_gw_nodedup", "large_direct")
            ),
            large >= 1.0,
        ),
        (
            format!(
                "large batches, idempotency off: less CPU per million events than direct ({:.2} vs {:.2} s)",
                cpu(&lg),
                cpu(&ld)
            ),
            cpu(&lg) < cpu(&ld),
        ),
    ];
    let max_rss = results.iter().filter_map(|r| r["gateway_peak_rss_mib"].as_f64()).fold(0.0, f64::max);
    out.push((format!("gateway peak RSS ≤ 256 MiB in every scenario (max {max_rss:.0} MiB)"), max_rss <= 256.0));
    let parts_ok = [("small", &sd), ("large", &ld)].iter().all(|(size, direct)| {
        results
            .iter()
            .filter(|r| r["scenario"].as_str().is_some_and(|s| s.starts_with(size) && s.contains("gw")))
            .all(|r| num(&r["parts_per_million_events"]) <= num(&direct["parts_per_million_events"]))
    });
    out.push(("no more parts per million events than direct".to_string(), parts_ok));
    let exact = results.iter().all(|r| num(&r["lost"]) == 0.0 && num(&r["duplicated_ids"]) == 0.0);
    out.push(("zero lost and zero duplicated events in every run".to_string(), exact));
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = cores();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = mem.lines().find_map(|l| l.strip_prefix("MemTotal:")).map(|v| v.trim().to_string()).unwrap_or_default();
    format!(
        "{cores} cores ({model}), {total} RAM; ClickHouse, Redis, the gateway and the load generator on the same machine"
    )
}

/// Prints a run's results under `# buffergate benchmark: {title}` and writes them to
/// `{name}.json` and `{name}.md` in `out_dir`.
fn publish(out_dir: &Path, name: &str, title: &str, report: &Value, md: &str) {
    let md = format!("# buffergate benchmark: {title}\n\n{md}");
    println!("\n{md}");
    std::fs::create_dir_all(out_dir).unwrap();
    std::fs::write(out_dir.join(format!("{name}.json")), format!("{report:#}\n")).unwrap();
    std::fs::write(out_dir.join(format!("{name}.md")), md).unwrap();
}

/// Producers inserting into the Buffer table directly vs through buffergate, side by side:
/// throughput, latency, CPU per million events, peak RSS, parts created, exactly-once check.
#[derive(Debug, Parser)]
#[command(name = "buffergate-bench")]
struct Args {
    /// Seconds each scenario runs, per round.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// Rounds of every scenario; each scenario reports its median round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Runs only the scenarios whose name contains this (e.g. `large_gw`), for profiling.
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Directory for latest.json and latest.md [default: bench/results in the repository]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// A buffergate binary built elsewhere, run instead of building this checkout's (an A/B
    /// of two builds, interleaved).
    #[arg(long, value_name = "PATH")]
    gateway: Option<PathBuf>,
    /// Runs the Kafka scenarios (a topic of this many one-event messages, then a hundredth as
    /// many of 100 events) instead of the HTTP ones.
    #[arg(long, value_name = "MESSAGES", num_args = 0..=1, default_missing_value = "100000")]
    kafka: Option<u64>,
    /// Runs the soak for this many seconds (1% malformed requests, RSS sampled) instead.
    #[arg(long, value_name = "SECONDS")]
    soak: Option<u64>,
    /// Runs the cluster scenarios instead (two ClickHouse shards, rows placed by key), each
    /// for this many seconds per round (`--rounds` rounds).
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "20")]
    cluster: Option<f64>,
    /// The rate, events/s, at which `--cluster` also runs every setup, to compare their CPU
    /// per event at the same load; meant to be below what every setup sustains.
    #[arg(long, value_name = "EVENTS_PER_SECOND", default_value_t = 40_000.0)]
    cluster_rate: f64,
    /// Runs the ClickHouse-protocol scenarios instead: the same `INSERT … FORMAT JSONEachRow`
    /// requests to ClickHouse and to the gateway, beside `/v1/events` (`--rounds` interleaved
    /// rounds of `--seconds` each).
    #[arg(long)]
    protocol: bool,
    /// Runs the streams scenarios instead (twenty idle streams; one, two and four streams
    /// under load), each for this many seconds (`--rounds` interleaved rounds).
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "8")]
    streams: Option<f64>,
    /// Runs the overload scenario instead: producers that resend refusals at once, at the
    /// saturating connection count and at 30 times it (`--rounds` interleaved rounds of
    /// `--seconds` each).
    #[arg(long)]
    overload: bool,
    /// Runs the comparison with clickhouse-bulk instead, this binary of it (built by the
    /// operator, docs/performance.md says how): direct, clickhouse-bulk and the gateway's
    /// modes on the same events (`--rounds` interleaved rounds of `--seconds` each).
    #[arg(long, value_name = "PATH")]
    peer_bulk: Option<PathBuf>,
    /// With `--peer-bulk`: also the gateway build at PATH, its default mode, in every round.
    #[arg(long, value_name = "PATH", requires = "peer_bulk")]
    before: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let seconds = args.seconds;
    let rounds_wanted = usize::from(args.rounds);
    let only = args.only;
    let out_dir = args.out.unwrap_or_else(|| repo().join("bench/results"));

    let binary = match args.gateway {
        Some(path) => path,
        None => {
            let status = Command::new("cargo")
                .args(["build", "--release", "--locked", "--bin", "buffergate"])
                .current_dir(repo())
                .status()
                .unwrap();
            assert!(status.success(), "cargo build --release");
            // Where cargo put it: a shared CARGO_TARGET_DIR (a worktree's build) or the checkout's.
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| repo().join("target"), |dir| repo().join(PathBuf::from(dir)))
                .join("release/buffergate")
        }
    };
    let dir = std::env::temp_dir().join(format!("buffergate-bench-{}", std::process::id()));
    if let Some(seconds) = args.cluster {
        // Its own servers: two ClickHouses that know each other as a cluster.
        let (report, md) = cluster::run(&binary, &dir, seconds, rounds_wanted, args.cluster_rate).await;
        let md = format!("# buffergate benchmark: cluster\n\nMachine: {}. {md}", machine());
        println!("\n{md}");
        std::fs::create_dir_all(&out_dir).unwrap();
        let report = json!({"machine": machine(), "cluster": report});
        std::fs::write(out_dir.join("cluster.json"), format!("{report:#}\n")).unwrap();
        std::fs::write(out_dir.join("cluster.md"), md).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut servers = start_servers(&dir).await;
    let version = query(&servers.ch_url, "SELECT version() AS v").await[0]["v"].as_str().unwrap_or("").to_string();
    if let Some(seconds) = args.soak {
        let (report, md) = soak::run(&binary, &servers, seconds).await;
        publish(&out_dir, "soak", &format!("soak\n\nMachine: {}. ClickHouse {version}.", machine()), &report, &md);
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if let Some(seconds) = args.streams {
        let (report, md) = streams::run(&binary, &servers, seconds, rounds_wanted).await;
        let report = json!({"machine": machine(), "clickhouse": version, "streams": report});
        publish(
            &out_dir,
            "streams",
            &format!("streams\n\nMachine: {}. ClickHouse {version}.", machine()),
            &report,
            &md,
        );
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if args.overload {
        let (report, md) = overload::run(&binary, &servers, seconds, rounds_wanted).await;
        let report = json!({"machine": machine(), "clickhouse": version, "overload": report});
        publish(
            &out_dir,
            "overload",
            &format!("overload\n\nMachine: {}. ClickHouse {version}.", machine()),
            &report,
            &md,
        );
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if let Some(bulk) = args.peer_bulk {
        servers.peer_bulk = Some(bulk);
        servers.before = args.before;
        let (report, md) = peer::run(&binary, &servers, seconds, rounds_wanted, only.as_deref()).await;
        let report = json!({"machine": machine(), "clickhouse": version, "peer_bulk": report});
        let title = format!("clickhouse-bulk side by side\n\nMachine: {}. ClickHouse {version}.", machine());
        publish(&out_dir, "peer", &title, &report, &md);
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if args.protocol {
        let (report, md) = protocol::run(&binary, &servers, seconds, rounds_wanted).await;
        let report = json!({"machine": machine(), "clickhouse": version, "protocol": report});
        let title = format!("ClickHouse protocol\n\nMachine: {}. ClickHouse {version}.", machine());
        publish(&out_dir, "protocol", &title, &report, &md);
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if let Some(messages) = args.kafka {
        let (results, table) = kafka::run(&binary, &servers, messages).await;
        let report = json!({"machine": machine(), "clickhouse": version, "results": results});
        publish(&out_dir, "kafka", &format!("Kafka\n\nMachine: {}. ClickHouse {version}.", machine()), &report, &table);
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    let scenarios: Vec<(Mode, u64, usize)> = [(10u64, 64usize), (1000, 8)]
        .into_iter()
        .flat_map(|(batch, connections)| {
            [Mode::Direct, Mode::Gateway { dedup: true }, Mode::Gateway { dedup: false }]
                .map(|mode| (mode, batch, connections))
        })
        .filter(|(mode, batch, _)| {
            only.as_ref().is_none_or(|only| scenario_name(*mode, *batch).contains(only.as_str()))
        })
        .collect();
    // rounds[r][s]: round r of scenario s.
    let mut rounds: Vec<Vec<Value>> = Vec::new();
    let mut first_id = 0;
    for round in 0..rounds_wanted {
        let mut this = Vec::new();
        for &(mode, batch, connections) in &scenarios {
            println!(
                "round {}/{rounds_wanted}: {} with {batch} events per request, {connections} connections, {seconds} s...",
                round + 1,
                mode.label()
            );
            // Ids never repeat across scenarios: the Redis store outlives each gateway.
            first_id += 1 << 40;
            let result = scenario(&binary, &servers, (mode, batch, connections), seconds, round, first_id).await;
            let redis = redis_per_event(&result).map(|us| format!(", Redis {us:.2} µs of CPU per event"));
            println!("  {:.0} events/s{}", num(&result["events_per_second"]), redis.unwrap_or_default());
            this.push(result);
        }
        rounds.push(this);
    }
    let eps = |r: &Value| num(&r["events_per_second"]);
    // Each scenario's median round, with every round's events/s beside it.
    let results: Vec<Value> = (0..scenarios.len())
        .map(|i| {
            let mut median = median_run(rounds.iter().map(|round| &round[i]).collect(), eps).clone();
            median["events_per_second_by_round"] = json!(rounds.iter().map(|round| eps(&round[i])).collect::<Vec<_>>());
            if redis_per_event(&median).is_some() {
                let by_round: Vec<Option<f64>> = rounds.iter().map(|round| redis_per_event(&round[i])).collect();
                median["redis_cpu_us_per_event_by_round"] = json!(by_round);
            }
            median
        })
        .collect();
    let ratio = |g: &str, d: &str| median_ratio(&rounds, g, d);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# buffergate benchmark\n\nMachine: {}. ClickHouse {version}. {seconds} s per scenario, {rounds_wanted} rounds: each row is the scenario's median round; ratios are medians of each round's ratio.\n",
        machine()
    );
    let _ = writeln!(
        md,
        "| mode | events × connections | events/s | latency p50 / p99 / p99.9 ms | CPU s per M events: gateway / ClickHouse / Redis (= total) | load generator CPU s per M events | machine busy · events/s with every core busy | gateway peak RSS | parts per M events | lost / duplicated |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let _ = writeln!(md, "{}", row(r));
    }
    let _ = writeln!(
        md,
        "\nGateway ÷ direct, events/s: small batches {:.2}× (idempotency on), {:.2}× (off); large batches {:.2}× (on), {:.2}× (off).\n",
        ratio("small_gw_dedup", "small_direct"),
        ratio("small_gw_nodedup", "small_direct"),
        ratio("large_gw_dedup", "large_direct"),
        ratio("large_gw_nodedup", "large_direct")
    );
    let _ = write!(md, "Events/s by round:\n\n{}", by_round_lines(&results, "events_per_second_by_round"));
    let redis: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let by_round = r["redis_cpu_us_per_event_by_round"].as_array()?;
            let shown: Vec<String> = by_round.iter().map(|v| format!("{:.2}", num(v))).collect();
            Some(format!("- {}: {}", r["scenario"].as_str().unwrap_or(""), shown.join(", ")))
        })
        .collect();
    if !redis.is_empty() {
        let _ = writeln!(md, "\nRedis µs of CPU per event by round (idempotency on):\n\n{}", redis.join("\n"));
    }
    let _ = writeln!(md, "\nTargets:\n");
    let targets = targets(&results, &rounds);
    for (text, met) in &targets {
        let _ = writeln!(md, "- {} {text}", if *met { "met:" } else { "NOT met:" });
    }
    println!("\n{md}");
    std::fs::create_dir_all(&out_dir).unwrap();
    let report = json!({"machine": machine(), "clickhouse": version, "seconds_per_scenario": seconds, "rounds": rounds_wanted, "results": results,
        "targets": targets.iter().map(|(t, m)| json!({"target": t, "met": m})).collect::<Vec<_>>()});
    std::fs::write(out_dir.join("latest.json"), format!("{report:#}\n")).unwrap();
    std::fs::write(out_dir.join("latest.md"), md).unwrap();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_median_of_an_even_count_is_the_mean_of_its_middle_two_and_a_median_run_the_lower_one() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
        let runs: Vec<Value> = [4.0, 1.0, 3.0, 2.0].iter().map(|e| json!({"events_per_second": e})).collect();
        let chosen = median_run(runs.iter().collect(), |r| num(&r["events_per_second"]));
        assert_eq!(num(&chosen["events_per_second"]), 2.0);
    }

    #[test]
    fn event_ids_stay_uuids_past_the_256th_scenario() {
        for n in [1u64, (1 << 48) - 1, 1 << 48, 300 << 40, u64::MAX] {
            let mut event = String::new();
            write_event(&mut event, n, 0);
            let parsed: Value = serde_json::from_str(&event).unwrap();
            let id = parsed["event_id"].as_str().unwrap();
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{id}");
        }
        let id = |n: u64| {
            let mut event = String::new();
            write_event(&mut event, n, 0);
            serde_json::from_str::<Value>(&event).unwrap()["event_id"].clone()
        };
        assert_ne!(id(1), id((1 << 48) + 1), "ids a multiple of 2^48 apart differ");
    }
}
