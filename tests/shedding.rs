//! Load shedding against a real ClickHouse with a deliberately small Buffer (one layer, time
//! thresholds of an hour, 1 MB max_bytes) so rows stay in it: saturation turns answers into
//! 503 + Retry-After (or diverts to the fallback table), draining brings 200s back. Also the
//! in-flight byte budget, the circuit breaker and the stale-poll policy.
//!
//! 18.16 reports Buffer bytes server-wide, so each saturation test runs its own server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use buffergate::config::{OnStale, ShedMode};
use common::{ClickHouseServer, Gateway, clickhouse, config, eventually, http, migrate, small_buffer};
use serde_json::{Value, json};

/// The metrics recorder is process-wide: tests that read gauges run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 50 events of about 1 KB each.
fn batch(request: u64) -> Value {
    Value::Array((0..50).map(|i| json!({"user_id": request * 100 + i, "payload": "x".repeat(1000)})).collect())
}

/// Posts batches until one is shed; returns the events acknowledged before and the answer.
async fn fill_until_shed(gw: &Gateway) -> (u64, reqwest::Response) {
    let mut acknowledged = 0;
    for request in 0..60 {
        let response = http().post(format!("{}/v1/events", gw.url)).json(&batch(request)).send().await.unwrap();
        match response.status().as_u16() {
            200 => acknowledged += response.json::<Value>().await.unwrap()["accepted"].as_u64().unwrap(),
            503 => return (acknowledged, response),
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
        // Let the poller see each step.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the Buffer never saturated");
}

async fn get(url: String) -> (u16, String) {
    let response = http().get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_buffer_sheds_with_retry_after_until_drained() {
    let _serial = SERIAL.lock().await;
    let ch = ClickHouseServer::start("shed-reject");
    let config = small_buffer(&ch, "shed");
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let (acknowledged, response) = fill_until_shed(&gw).await;
    assert!(acknowledged >= 700, "sheds at 80% of 1 MB, not before: {acknowledged} events taken");
    let retry_after: u32 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "buffer_saturated", "{body}");

    // Health and metrics keep answering; readiness sends traffic elsewhere.
    assert_eq!(get(format!("{}/healthz", gw.url)).await.0, 200);
    let (status, metrics) = get(format!("{}/metrics", gw.url)).await;
    assert_eq!(status, 200);
    assert_eq!(common::sample_of(&metrics, "buffergate_shed_active", "default"), Some(1.0), "{metrics}");
    let fill = common::sample_of(&metrics, "buffergate_clickhouse_buffer_fill_ratio", "default").unwrap_or(0.0);
    assert!((0.8..1.0).contains(&fill), "{metrics}");
    assert_eq!(get(format!("{}/readyz", gw.url)).await.0, 503);

    gw.drain(&ch).await;
    eventually(Duration::from_secs(10), "ingestion to resume", || async { gw.post_json(&batch(1000)).await.0 == 200 })
        .await;
    assert_eq!(get(format!("{}/readyz", gw.url)).await.0, 200);
    gw.drain(&ch).await;
    assert_eq!(ch.count(&gw.destination()).await, acknowledged + 50, "every acknowledged event, once");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_mode_diverts_to_the_fallback_table_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let ch = ClickHouseServer::start("shed-fallback");
    let mut config = small_buffer(&ch, "fallback");
    config.shed.shed_mode = ShedMode::Fallback;
    config.shed.fallback_table = "events_fallback".into();
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let mut acknowledged = 0;
    for request in 0..30 {
        let (status, body) = gw.post_json(&batch(request)).await;
        assert_eq!(status, 200, "fallback mode never sheds a saturated Buffer: {body}");
        acknowledged += body["accepted"].as_u64().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let diverted = ch.count("fallback.events_fallback").await;
    assert!(diverted > 0, "some batches went to the fallback table");
    let (_, metrics) = get(format!("{}/metrics", gw.url)).await;
    assert!(
        metrics.contains(&format!("buffergate_events_total{{stream=\"default\",outcome=\"fallback\"}} {diverted}")),
        "{metrics}"
    );
    gw.drain(&ch).await;
    assert_eq!(ch.count(&gw.destination()).await + diverted, acknowledged);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_poll_fails_closed_or_open_as_configured() {
    let _serial = SERIAL.lock().await;
    let ch = ClickHouseServer::start("shed-stale");
    let mut closed = small_buffer(&ch, "stale");
    closed.shed.shed_stale_after_ms = 500;
    closed.clickhouse.circuit_failures = 0;
    closed.clickhouse.insert_retries = 0;
    migrate(&closed).await;
    let open = {
        let mut config = closed.clone();
        config.shed.shed_on_stale = OnStale::FailOpen;
        config
    };
    let (gw_closed, gw_open) = (Gateway::start(closed).await, Gateway::start(open).await);
    gw_closed.wait_ready().await;
    gw_open.wait_ready().await;
    ch.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, body) = gw_closed.post_json(&batch(1)).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("buffer_unknown")), "{body}");
    let (status, body) = gw_open.post_json(&batch(1)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "flush_failed", "fail_open lets the request reach ClickHouse: {body}");
    gw_closed.stop().await;
    gw_open.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_byte_budget_refuses_then_recovers() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let db = ch.fresh_database("budget");
    let mut config = config(ch, &db);
    config.batching.partitions = 1;
    config.http.max_body_bytes = 64 * 1024;
    config.http.max_decompressed_bytes = 64 * 1024;
    config.http.max_inflight_bytes = 200 * 1024;
    // Rows wait in the coalescer, holding their share of the budget; without the journal each
    // 202 comes at once rather than once its batch is journaled, after the linger.
    config.batching.flush_linger_ms = 3_000;
    config.journal.journal = false;
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let post = |request: u64| {
        let body = batch(request).to_string().into_bytes();
        let gw = &gw;
        async move { gw.post("/v1/events?wait=false", "application/json", None, body).await }
    };
    let mut acknowledged = 0;
    let mut refused = None;
    for request in 0..6 {
        let (status, body) = post(request).await;
        match status {
            202 => acknowledged += 50,
            503 => {
                refused = Some(body);
                break;
            }
            other => panic!("{other} {body}"),
        }
    }
    let refused = refused.expect("the budget refuses a request");
    assert_eq!(refused["error"], "overloaded", "{refused}");
    assert!(acknowledged >= 150, "{acknowledged}");
    eventually(Duration::from_secs(10), "the budget to free up after the flush", || async { post(99).await.0 == 202 })
        .await;
    acknowledged += 50;
    let table = gw.destination();
    eventually(Duration::from_secs(10), "every accepted row stored", || async {
        gw.drain(ch).await;
        ch.count(&table).await == acknowledged
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_opens_answers_at_once_and_closes_after_a_probe() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let db = ch.fresh_database("breaker");
    let mut config = config(ch, &db);
    config.clickhouse.insert_retries = 0;
    config.clickhouse.circuit_failures = 2;
    config.clickhouse.circuit_open_ms = 700;
    migrate(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;
    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;

    for _ in 0..2 {
        let (status, body) = gw.post_json(&json!([{"user_id": 1}])).await;
        assert_eq!((status, body["error"].as_str()), (503, Some("flush_failed")), "{body}");
    }
    let (status, body) = gw.post_json(&json!([{"user_id": 1}])).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("circuit_open")), "{body}");
    let metrics = get(format!("{}/metrics", gw.url)).await.1;
    assert_eq!(common::sample_of(&metrics, "buffergate_circuit_open", "default"), Some(1.0), "{metrics}");

    migrate(&config).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, body) = gw.post_json(&json!([{"user_id": 2}])).await;
    assert_eq!(status, 200, "the half-open probe succeeds and closes the circuit: {body}");
    let (status, _) = gw.post_json(&json!([{"user_id": 3}])).await;
    assert_eq!(status, 200);
    gw.drain(ch).await;
    assert_eq!(ch.count(&gw.destination()).await, 2);
    gw.stop().await;
}
