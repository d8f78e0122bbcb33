//! SIGTERM on the real binary while requests are in flight: every request gets its answer,
//! every acknowledged event is stored, the process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use common::{Process, clickhouse, command, config, migrate};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_queued_rows() {
    let ch = clickhouse();
    let db = ch.fresh_database("sigterm");
    let mut config = config(ch, &db);
    let port = common::free_port();
    config.http.listen = format!("127.0.0.1:{port}").parse().unwrap();
    // Batches linger so requests are still waiting for their flush when SIGTERM arrives.
    config.batching.flush_linger_ms = 2_000;
    migrate(&config).await;
    let dir = common::scratch("sigterm");
    let gateway = Process::spawn(command(&config, &["serve"]), &dir.join("gateway.log"));
    let url = format!("http://127.0.0.1:{port}");
    common::eventually(Duration::from_secs(20), "the gateway to be ready", || {
        let url = format!("{url}/readyz");
        async move { common::http().get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;

    let mut requests = Vec::new();
    for r in 0..8u64 {
        let url = format!("{url}/v1/events{}", if r % 4 == 3 { "?wait=false" } else { "" });
        let events: Vec<Value> = (0..50).map(|i| json!({"user_id": r * 1000 + i})).collect();
        requests.push(tokio::spawn(async move {
            let response = common::http().post(url).json(&events).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.signal(libc::SIGTERM);

    let mut acknowledged = 0;
    for (r, request) in requests.into_iter().enumerate() {
        let (status, body) = request.await.unwrap();
        // wait=false answers once queued, before the drain; the others once written by it.
        let expected = if r % 4 == 3 { 202 } else { 200 };
        assert_eq!((status, body["accepted"].as_u64()), (expected, Some(50)), "request {r}: {body}");
        acknowledged += body["accepted"].as_u64().unwrap();
    }
    assert_eq!(acknowledged, 400);
    let status = gateway.wait_exit(Duration::from_secs(30)).expect("the gateway exits");
    assert!(status.success(), "exit status {status:?}");
    ch.exec(&format!("OPTIMIZE TABLE {db}.events_buffer")).await;
    assert_eq!(ch.count(&format!("{db}.events_raw")).await, 400);
}
