//! `GET /metrics` as Prometheus sees it: `promtool check metrics` accepts the exposition, and a
//! real Prometheus scraping the gateway reports the event counts this test produced.
//!
//! One test in its own binary: the metrics recorder is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Gateway, Process, clickhouse, config, eventually, free_port, http, migrate};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_prometheus_scrapes_the_counts() {
    let ch = clickhouse();
    let db = ch.fresh_database("metrics");
    let config = config(ch, &db);
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let good: Vec<Value> = (0..30).map(|i| json!({"user_id": i})).collect();
    let (status, _) = gw.post_json(&Value::Array(good)).await;
    assert_eq!(status, 200);
    let (status, body) = gw.post_json(&json!([{"user_id": -1}, {"user_id": 7}, {"nope": 1}])).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(1)));
    let (status, _) = gw.post("/v1/events", "text/plain", None, b"x".to_vec()).await;
    assert_eq!(status, 415);

    let metrics_url = format!("{}/metrics", gw.url);
    // The Buffer gauges appear with the poller's first reading.
    eventually(Duration::from_secs(10), "the first Buffer poll", || async {
        http()
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("buffergate_clickhouse_buffer_bytes")
    })
    .await;
    let exposition = http().get(&metrics_url).send().await.unwrap().text().await.unwrap();
    for name in [
        "buffergate_http_requests_total",
        "buffergate_http_request_duration_seconds_bucket",
        "buffergate_events_total",
        "buffergate_flushes_total",
        "buffergate_flush_rows_bucket",
        "buffergate_flush_bytes_bucket",
        "buffergate_flush_duration_seconds_bucket",
        "buffergate_coalescer_queue_rows",
        "buffergate_inflight_bytes",
        "buffergate_clickhouse_buffer_bytes",
        "buffergate_clickhouse_buffer_capacity_bytes",
        "buffergate_clickhouse_buffer_fill_ratio",
        "buffergate_shed_active",
    ] {
        assert!(exposition.contains(name), "{name} missing from\n{exposition}");
    }
    assert!(
        exposition.contains(r#"buffergate_http_requests_total{route="/v1/events",status="415"} 1"#),
        "{exposition}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/install-deps.sh installs it)");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = common::scratch("prometheus");
    let target = gw.url.trim_start_matches("http://");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: buffergate\n    static_configs:\n      - targets: ['{target}']\n"),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let _prometheus = Process::spawn(cmd, &dir.join("prometheus.log"));
    let query = |q: &'static str| {
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        async move {
            let response = http().get(url).query(&[("query", q)]).send().await.ok()?;
            let body: Value = response.json().await.ok()?;
            body["data"]["result"][0]["value"][1].as_str().map(str::to_string)
        }
    };
    eventually(Duration::from_secs(30), "Prometheus to scrape the accepted count", || async {
        query(r#"buffergate_events_total{outcome="accepted"}"#).await.as_deref() == Some("31")
    })
    .await;
    assert_eq!(query(r#"buffergate_events_total{outcome="rejected"}"#).await.as_deref(), Some("2"));
    gw.stop().await;
}
