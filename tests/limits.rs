//! The gateway's own bounds against a real ClickHouse: the concurrency limit answers 503
//! `overloaded` once a request has waited `admission_wait_ms` for a slot, while health and
//! readiness keep answering, the request timeout answers 503
//! `request_timeout`, and the admin API refuses a wrong token.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use common::{ClickHouseServer, Gateway, clickhouse, config, http, migrate};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request to `/v1/events` whose head and first body bytes are sent, the rest held back: it
/// stays in its handler, reading, until [`finish`] sends the rest.
async fn held_request(url: &str, body: &[u8]) -> TcpStream {
    let address = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..1]).await.unwrap();
    stream
}

/// Sends the rest of a held request's body and reads its status code.
async fn finish(mut stream: TcpStream, body: &[u8]) -> u16 {
    stream.write_all(&body[1..]).await.unwrap();
    let mut answer = vec![0; 1024];
    let n = stream.read(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

/// A gateway with one ingestion slot and `wait_ms` of admission wait, its slot taken by a
/// request held open: the gateway, that request's body and its connection.
async fn one_slot_held(ch: &ClickHouseServer, name: &str, wait_ms: u64) -> (Gateway, Vec<u8>, TcpStream) {
    let mut config = config(ch, &ch.fresh_database(name));
    config.http.max_concurrent_requests = 1;
    config.http.admission_wait_ms = wait_ms;
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    let body = json!([{"user_id": 1}]).to_string().into_bytes();
    let held = held_request(&gw.url, &body).await;
    // The held request has its slot once its handler runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (gw, body, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_answers_overloaded_and_health_keeps_answering() {
    let ch = clickhouse();
    let (gw, body, held) = one_slot_held(ch, "concurrency", 200).await;
    let response = http().post(format!("{}/v1/events", gw.url)).json(&json!([{"user_id": 2}])).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "overloaded");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let status = http().get(format!("{}{path}", gw.url)).send().await.unwrap().status().as_u16();
        assert_eq!(status, 200, "{path} answers while ingestion is at its limit");
    }
    assert_eq!(finish(held, &body).await, 200, "the held request completes");
    let (status, _) = gw.post_json(&json!([{"user_id": 3}])).await;
    assert_eq!(status, 200, "the slot is free again");
    gw.drain(ch).await;
    assert_eq!(ch.count(&gw.destination()).await, 2, "the refused request stored nothing");
    gw.stop().await;
}

/// A request that finds every slot taken waits for one (`admission_wait_ms`) instead of being
/// refused at once: freed within the wait, it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_slot_freed_within_the_admission_wait() {
    let ch = clickhouse();
    let (gw, body, held) = one_slot_held(ch, "admission", 10_000).await;
    let waiting = tokio::spawn(http().post(format!("{}/v1/events", gw.url)).json(&json!([{"user_id": 2}])).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the second request waits for the slot");
    assert_eq!(finish(held, &body).await, 200, "the held request completes");
    assert_eq!(waiting.await.unwrap().unwrap().status().as_u16(), 200, "then the waiting one is written");
    gw.drain(ch).await;
    assert_eq!(ch.count(&gw.destination()).await, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_is_answered_request_timeout() {
    let ch = clickhouse();
    let mut config = config(ch, &ch.fresh_database("reqtimeout"));
    config.http.request_timeout_ms = 400;
    config.http.body_timeout_ms = 30_000;
    // The answer waits for the unread body up to the drain's own timeout (docs/ingestion.md).
    config.http.body_drain_timeout_ms = 500;
    migrate(&config).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    let body = json!([{"user_id": 1}]).to_string().into_bytes();
    let mut held = held_request(&gw.url, &body).await;
    let mut answer = vec![0; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"error\":\"request_timeout\""), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    gw.drain(ch).await;
    assert_eq!(ch.count(&gw.destination()).await, 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_a_wrong_token_and_is_absent_without_one() {
    let ch = clickhouse();
    let mut config = config(ch, &ch.fresh_database("admintoken"));
    config.auth.admin_token = "right".into();
    migrate(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;
    let status = |gw_url: String, token: Option<&'static str>, admin: &'static str| async move {
        let request = if admin == "status" {
            http().get(format!("{gw_url}/v1/status"))
        } else {
            http().post(format!("{gw_url}/admin/flush"))
        };
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null)["error"].clone())
    };
    for admin in ["status", "flush"] {
        assert_eq!(status(gw.url.clone(), Some("wrong"), admin).await, (401, json!("unauthorized")), "{admin}");
        assert_eq!(status(gw.url.clone(), None, admin).await, (401, json!("unauthorized")), "{admin}");
        assert_eq!(status(gw.url.clone(), Some("right"), admin).await.0, 200, "{admin}");
    }
    gw.stop().await;
    config.auth.admin_token = String::new();
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    assert_eq!(
        status(gw.url.clone(), Some("right"), "status").await,
        (404, json!("not_found")),
        "no token: no admin API"
    );
    gw.stop().await;
}
