//! What streams cost (`--streams SECONDS`): a gateway with twenty configured streams left idle
//! against one with the `default` stream alone (CPU, ClickHouse queries per second of all the
//! pollers and watchers, resident memory per stream); one stream's throughput with and without
//! a second stream configured; four streams loaded at once against one. Every stream's table
//! is a copy of the seed table, so the events are the same everywhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{Process, Servers, cpu_seconds, drive, free_port, gateway_env, median, num, query, status_mib, wait_http};

const DB: &str = "bench_streams";
/// Large batches: the case where the gateway's own work per event dominates.
const BATCH: u64 = 1000;
const CONNECTIONS: usize = 8;

/// A gateway with `streams` named streams (`s01`…) besides `default`, idempotency off.
struct Gateway {
    child: Process,
    url: String,
    data: PathBuf,
}

impl Gateway {
    async fn start(binary: &Path, servers: &Servers, streams: usize) -> Gateway {
        let port = free_port();
        let data = std::env::temp_dir().join(format!("buffergate-bench-streams-{port}"));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let file = data.join("streams.toml");
        std::fs::write(&file, streams_toml(streams)).unwrap();
        let mut cmd = Command::new(binary);
        gateway_env(&mut cmd, servers, DB);
        cmd.env("BUFFERGATE_DATA_DIR", data.join("data"))
            .env("BUFFERGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("BUFFERGATE_DEDUP", "off")
            .arg("--config")
            .arg(&file)
            .arg("serve")
            .stderr(Stdio::null());
        let child = Process(cmd.spawn().unwrap());
        let url = format!("http://127.0.0.1:{port}");
        wait_http(&format!("{url}/readyz")).await;
        // Every stream's schema read and its first polls done.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Gateway { child, url, data }
    }

    fn stop(self) {
        self.child.stop();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn name(i: usize) -> String {
    format!("s{:02}", i + 1)
}

fn streams_toml(streams: usize) -> String {
    (0..streams)
        .map(|i| {
            let name = name(i);
            format!("[streams.{name}]\nbuffer_table = \"{name}_buffer\"\ndestination_table = \"{name}\"\n")
        })
        .collect()
}

/// ClickHouse's count of queries so far.
async fn queries(ch: &str) -> f64 {
    num(&query(ch, "SELECT value FROM system.events WHERE event = 'Query'").await[0]["value"])
}

/// The idle cost of a gateway over `seconds`: its CPU (s per s), the ClickHouse queries it
/// causes per second, its resident memory at the end.
async fn idle(binary: &Path, servers: &Servers, streams: usize, seconds: f64) -> Value {
    let gateway = Gateway::start(binary, servers, streams).await;
    let pid = gateway.child.id();
    let (cpu, asked) = (cpu_seconds(pid), queries(&servers.ch_url).await);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    // The query that reads the count is one of them.
    let asked = queries(&servers.ch_url).await - asked - 1.0;
    let report = json!({
        "streams": streams + 1,
        "gateway_cpu_percent": (cpu_seconds(pid) - cpu) / seconds * 100.0,
        "clickhouse_queries_per_second": asked / seconds,
        "rss_mib": status_mib(pid, "VmRSS:"),
    });
    gateway.stop();
    report
}

/// Events/s stored through `streams` of a gateway with `configured` named streams, the
/// connections spread evenly over them (`streams` = 0: the default stream alone).
async fn loaded(
    binary: &Path,
    servers: &Servers,
    configured: usize,
    streams: usize,
    seconds: f64,
    first_id: u64,
) -> f64 {
    let gateway = Gateway::start(binary, servers, configured).await;
    let urls: Vec<String> = if streams == 0 {
        vec![format!("{}/v1/events", gateway.url)]
    } else {
        (0..streams).map(|i| format!("{}/v1/streams/{}/events", gateway.url, name(i))).collect()
    };
    let per = CONNECTIONS / urls.len();
    let drives: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| tokio::spawn(drive(url.clone(), false, BATCH, per, seconds, first_id + (i as u64) * (1 << 36))))
        .collect();
    let mut loads = Vec::new();
    for drive in drives {
        loads.push(drive.await.unwrap());
    }
    gateway.stop();
    loads.iter().map(|l| l.acknowledged as f64 / l.elapsed.max(1e-9)).sum()
}

pub async fn run(binary: &Path, servers: &Servers, seconds: f64, rounds: usize) -> (Value, String) {
    let ch = &servers.ch_url;
    let mut migrate = Command::new(binary);
    gateway_env(&mut migrate, servers, DB);
    assert!(migrate.arg("migrate").stderr(Stdio::null()).status().unwrap().success(), "migrate");
    for i in 0..20 {
        let sql = format!("CREATE TABLE IF NOT EXISTS {DB}.{} AS {DB}.events_raw", name(i));
        // 18.x creates LowCardinality columns only with this setting.
        let url = format!("{ch}/?allow_experimental_low_cardinality_type=1");
        let response = reqwest::Client::new().post(url).body(sql).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
    }
    let file = std::env::temp_dir().join(format!("buffergate-bench-streams-{}.toml", std::process::id()));
    std::fs::write(&file, streams_toml(20)).unwrap();
    let mut migrate = Command::new(binary);
    gateway_env(&mut migrate, servers, DB);
    let migrated = migrate.arg("--config").arg(&file).arg("migrate").output().unwrap();
    assert!(migrated.status.success(), "migrate the streams: {}", String::from_utf8_lossy(&migrated.stderr));
    let _ = std::fs::remove_file(&file);

    println!("idle: one stream, then twenty-one, {seconds} s each...");
    let (one, twenty) = (idle(binary, servers, 0, seconds).await, idle(binary, servers, 20, seconds).await);
    let per_stream_mib = (num(&twenty["rss_mib"]) - num(&one["rss_mib"])) / 20.0;

    // Interleaved rounds: each comparison's two runs next to each other.
    let (mut alone, mut beside, mut single, mut four) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut first_id = 1 << 44;
    for round in 0..rounds {
        println!("round {}/{rounds}: one stream alone, beside a second, four at once...", round + 1);
        first_id += 1 << 40;
        alone.push(loaded(binary, servers, 0, 0, seconds, first_id).await);
        first_id += 1 << 40;
        beside.push(loaded(binary, servers, 1, 0, seconds, first_id).await);
        first_id += 1 << 40;
        single.push(loaded(binary, servers, 4, 1, seconds, first_id).await);
        first_id += 1 << 40;
        four.push(loaded(binary, servers, 4, 4, seconds, first_id).await);
    }
    let report = json!({
        "idle": [one, twenty],
        "rss_mib_per_configured_stream": per_stream_mib,
        "events_per_second": {
            "default_alone": alone, "default_beside_a_second_stream": beside,
            "one_of_four_streams": single, "four_streams_at_once": four,
        },
    });
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(a, b)| a / b).collect());
    let md = format!(
        "Streams: idle for {seconds} s, then {rounds} interleaved rounds of {seconds} s, {CONNECTIONS} connections × {BATCH} events, idempotency off.\n\n\
         | idle gateway | gateway CPU | ClickHouse queries/s | RSS |\n|---|---|---|---|\n\
         | 1 stream | {:.2}% | {:.1} | {:.1} MiB |\n| 21 streams | {:.2}% | {:.1} | {:.1} MiB |\n\n\
         - memory per configured stream: {per_stream_mib:.2} MiB (target ≤ 2 MiB)\n\
         - one stream with a second configured ÷ alone: {:.2}× (events/s by round: {:?} vs {:?})\n\
         - four streams at once ÷ one of them alone, summed events/s: {:.2}× (target ≥ 0.90×; by round: {:?} vs {:?}); ÷ the default stream of a gateway with no other: {:.2}×\n",
        num(&one["gateway_cpu_percent"]),
        num(&one["clickhouse_queries_per_second"]),
        num(&one["rss_mib"]),
        num(&twenty["gateway_cpu_percent"]),
        num(&twenty["clickhouse_queries_per_second"]),
        num(&twenty["rss_mib"]),
        ratio(&beside, &alone),
        beside.iter().map(|v| v.round()).collect::<Vec<_>>(),
        alone.iter().map(|v| v.round()).collect::<Vec<_>>(),
        ratio(&four, &single),
        four.iter().map(|v| v.round()).collect::<Vec<_>>(),
        single.iter().map(|v| v.round()).collect::<Vec<_>>(),
        ratio(&four, &alone),
    );
    (report, md)
}
