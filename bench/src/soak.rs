//! The soak (`--soak SECONDS`): the load generator's small batches against one gateway
//! (idempotency on) for minutes, with 1% of the requests malformed — truncated JSON, invalid
//! UTF-8, trailing garbage, a bare number — each of which must be answered 400. Samples the
//! gateway's resident memory as it goes, and checks at the end that every event acknowledged
//! is stored exactly once and that nothing else is.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use super::{Producer, Servers, accepted_count, free_port, gateway_env, num, query, wait_http, write_event};

const CONNECTIONS: usize = 64;
const EVENTS_PER_REQUEST: u64 = 10;
/// One request in this many is malformed.
const MALFORMED_EVERY: u64 = 100;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// A malformed body, one of four kinds by `n`.
fn malformed(n: u64) -> (&'static str, Vec<u8>) {
    match n % 4 {
        0 => ("truncated", br#"[{"user_id": 1, "event_type": "soak"#.to_vec()),
        1 => ("invalid_utf8", b"[{\"user_id\": 1, \"event_type\": \"\xff\xfe\"}]".to_vec()),
        2 => ("trailing_garbage", br#"[{"user_id": 1}] and more"#.to_vec()),
        _ => ("not_events", b"42".to_vec()),
    }
}

/// Current resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    super::status_mib(pid, "VmRSS:")
}

#[derive(Default)]
struct Tally {
    acknowledged: u64,
    malformed: u64,
    malformed_answered_400: u64,
    failed: u64,
}

/// One producer: good batches of fresh ids, every `MALFORMED_EVERY`th request malformed.
async fn produce(url: String, requests: Arc<AtomicU64>, ids: Arc<AtomicU64>, deadline: Instant) -> Tally {
    let mut producer = Producer::new(&url);
    let mut tally = Tally::default();
    let mut body = String::new();
    while Instant::now() < deadline {
        let r = requests.fetch_add(1, Ordering::Relaxed);
        if r % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
            tally.malformed += 1;
            let (_, bytes) = malformed(r / MALFORMED_EVERY);
            if let Some((400, _)) = producer.post(Bytes::from(bytes)).await {
                tally.malformed_answered_400 += 1;
            }
            continue;
        }
        let first = ids.fetch_add(EVENTS_PER_REQUEST, Ordering::Relaxed);
        body.clear();
        body.push('[');
        for n in first..first + EVENTS_PER_REQUEST {
            if n > first {
                body.push(',');
            }
            write_event(&mut body, n, 1_714_521_600_000);
        }
        body.push(']');
        match producer.post(Bytes::copy_from_slice(body.as_bytes())).await {
            Some((200, answer)) if accepted_count(&answer) == Some(EVENTS_PER_REQUEST) => {
                tally.acknowledged += EVENTS_PER_REQUEST;
            }
            _ => tally.failed += 1,
        }
    }
    tally
}

/// Runs the soak for `seconds`; the report and its Markdown.
pub async fn run(binary: &std::path::Path, servers: &Servers, seconds: u64) -> (Value, String) {
    let db = "bench_soak";
    let mut migrate = Command::new(binary);
    gateway_env(&mut migrate, servers, db);
    assert!(migrate.arg("migrate").stderr(Stdio::null()).status().unwrap().success(), "migrate");
    let port = free_port();
    let data = std::env::temp_dir().join(format!("buffergate-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut cmd = Command::new(binary);
    gateway_env(&mut cmd, servers, db);
    cmd.env("BUFFERGATE_DATA_DIR", &data)
        .env("BUFFERGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("BUFFERGATE_REDIS_URL", &servers.redis_url)
        .arg("serve")
        .stderr(Stdio::null());
    let gateway = super::Process(cmd.spawn().unwrap());
    wait_http(&format!("http://127.0.0.1:{port}/readyz")).await;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    // Ids below 2^48: the events' UUIDs carry them in 12 hex digits.
    let (requests, ids) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(1 << 44)));
    let producers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let url = format!("http://127.0.0.1:{port}/v1/events");
            tokio::spawn(produce(url, Arc::clone(&requests), Arc::clone(&ids), deadline))
        })
        .collect();
    let mut samples = vec![(0.0, rss_mib(gateway.id()))];
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
        samples.push((started.elapsed().as_secs_f64(), rss_mib(gateway.id())));
    }
    let mut tally = Tally::default();
    for p in producers {
        let t = p.await.unwrap();
        tally.acknowledged += t.acknowledged;
        tally.malformed += t.malformed;
        tally.malformed_answered_400 += t.malformed_answered_400;
        tally.failed += t.failed;
    }
    let peak = super::peak_rss_mib(gateway.id());
    gateway.stop();
    let _ = std::fs::remove_dir_all(&data);

    let ch = &servers.ch_url;
    let _ = reqwest::Client::new().post(ch).body(format!("OPTIMIZE TABLE {db}.events_buffer")).send().await;
    let stored = query(ch, &format!(
        "SELECT count() AS distinct_ids, sum(c) AS rows, sum(c > 1) AS duplicated FROM (SELECT user_id, count() AS c FROM {db}.events_raw GROUP BY user_id)"
    ))
    .await;
    let (rows, distinct) = (num(&stored[0]["rows"]), num(&stored[0]["distinct_ids"]));
    let report = json!({
        "seconds": seconds,
        "connections": CONNECTIONS,
        "events_per_request": EVENTS_PER_REQUEST,
        "requests": requests.load(Ordering::Relaxed),
        "malformed_requests": tally.malformed,
        "malformed_answered_400": tally.malformed_answered_400,
        "failed_good_requests": tally.failed,
        "acknowledged_events": tally.acknowledged,
        "events_per_second": tally.acknowledged as f64 / seconds as f64,
        "stored_rows": rows,
        "lost": (tally.acknowledged as f64 - distinct).max(0.0),
        "duplicated_ids": num(&stored[0]["duplicated"]),
        // Rows beyond the acknowledged events: a malformed request's, or a failed one's.
        "unexpected_rows": (rows - tally.acknowledged as f64).max(0.0),
        "rss_mib": samples.iter().map(|(t, m)| json!({"t": t, "mib": m})).collect::<Vec<_>>(),
        "peak_rss_mib": peak,
    });
    let curve: Vec<String> = samples.iter().map(|(t, m)| format!("{t:.0} s: {m:.0}")).collect();
    let md = format!(
        "Soak: {seconds} s, {CONNECTIONS} connections × {EVENTS_PER_REQUEST} events, 1 request in {MALFORMED_EVERY} malformed.\n\n\
         - requests: {}, malformed: {} (answered 400: {}), good requests failed: {}\n\
         - events acknowledged: {} ({:.0}/s); stored: {rows}; lost: {}; duplicated: {}; unexpected rows: {}\n\
         - gateway RSS (MiB) over time: {}; peak {peak:.0} MiB\n",
        report["requests"],
        tally.malformed,
        tally.malformed_answered_400,
        tally.failed,
        tally.acknowledged,
        num(&report["events_per_second"]),
        report["lost"],
        report["duplicated_ids"],
        report["unexpected_rows"],
        curve.join(", "),
    );
    (report, md)
}
