//! What producers see when ClickHouse cannot take rows: a full queue answers 503 with
//! Retry-After instead of waiting forever; exhausted retries answer 503 and report nothing
//! accepted; both recover once ClickHouse does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use common::{ClickHouseServer, Gateway, clickhouse, config, migrate};
use serde_json::{Value, json};

fn batch(from: u64, n: u64) -> Value {
    Value::Array((from..from + n).map(|i| json!({"user_id": i})).collect())
}

/// INSERTs into `db`'s Buffer table that ClickHouse refused, as its query log has them: the
/// gateway must connect as the `logged` user (scripts/clickhouse-server.sh).
async fn refused_inserts(ch: &ClickHouseServer, db: &str) -> u64 {
    ch.exec("SYSTEM FLUSH LOGS").await;
    // type 3 and 4: ExceptionBeforeStart, ExceptionWhileProcessing.
    let sql = format!(
        "SELECT count() AS c FROM system.query_log WHERE user = 'logged' AND type IN (3, 4) \
         AND query LIKE 'INSERT INTO `{db}`.`events_buffer`%'"
    );
    let rows = ch.rows(&sql).await;
    let c = &rows[0]["c"];
    c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())).unwrap()
}

/// The gateway's own count of waiting rows per partition (`GET /v1/status`).
async fn queue_rows(gw: &Gateway) -> Value {
    gw.status().await["queue_rows"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after_and_recovers() {
    let ch = clickhouse();
    let db = ch.fresh_database("queue");
    let mut config = config(ch, &db);
    config.batching.partitions = 1;
    config.batching.queue_capacity = 1;
    config.batching.queue_timeout_ms = 300;
    config.clickhouse.insert_retries = 1000;
    config.clickhouse.circuit_failures = 0;
    // Its failed INSERTs are logged, so the test sees when the first batch is being retried.
    config.clickhouse.clickhouse_user = "logged".into();
    config.auth.admin_token = "admin".into();
    migrate(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;

    // The Buffer disappears (as during a migration): INSERTs fail with UNKNOWN_TABLE and the
    // partition keeps retrying the first batch.
    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;
    let first = {
        let gw_url = gw.url.clone();
        tokio::spawn(async move {
            let response = common::http().post(format!("{gw_url}/v1/events")).json(&batch(1, 10)).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        })
    };
    // An INSERT is only sent once its batch is closed: from the first refused one on, the
    // partition holds the first request and retries it, and its queue is empty.
    common::eventually(Duration::from_secs(20), "a refused INSERT of the first request", || async {
        refused_inserts(ch, &db).await > 0
    })
    .await;
    assert_eq!(queue_rows(&gw).await, json!([10]), "the first request's rows wait in the partition");
    // The one free queue slot takes the second request. Its 202 waits for the journal, which
    // its batch reaches once the first one's INSERT is done.
    let second = {
        let gw_url = gw.url.clone();
        tokio::spawn(async move {
            let url = format!("{gw_url}/v1/events?wait=false");
            let response = common::http().post(url).json(&batch(100, 5)).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        })
    };
    common::eventually(Duration::from_secs(10), "the second request queued", || async {
        queue_rows(&gw).await == json!([15])
    })
    .await;

    let response = common::http().post(format!("{}/v1/events", gw.url)).json(&batch(200, 5)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "queue_full", "{body}");
    assert_eq!(queue_rows(&gw).await, json!([15]), "the refused request queued nothing");

    migrate(&config).await;
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 10);
    let (status, body) = second.await.unwrap();
    assert_eq!((status, &body["accepted"]), (202, &json!(5)), "{body}");
    let table = gw.destination();
    common::eventually(Duration::from_secs(10), "both queued requests stored", || async {
        gw.drain(ch).await;
        ch.count(&table).await == 15
    })
    .await;
    let refused = ch.count(&format!("{table} WHERE user_id >= 200")).await;
    assert_eq!(refused, 0, "the refused request wrote nothing");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_answer_503_and_accept_nothing() {
    let ch = clickhouse();
    let db = ch.fresh_database("retries");
    let mut config = config(ch, &db);
    config.clickhouse.insert_retries = 2;
    config.clickhouse.circuit_failures = 0;
    // One partition: with two, the other partition's INSERT may still be retrying when this
    // request gives up, and land once the table is back (see docs/batching.md).
    config.batching.partitions = 1;
    migrate(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;
    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;

    let (status, body) = gw.post_json(&batch(1, 20)).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("flush_failed")), "{body}");
    assert!(body.get("accepted").is_none(), "{body}");
    assert!(body["message"].as_str().unwrap().contains("3 attempt"), "{body}");

    migrate(&config).await;
    let (status, body) = gw.post_json(&batch(1, 20)).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(20)), "{body}");
    gw.drain(ch).await;
    assert_eq!(ch.count(&gw.destination()).await, 20, "stored once, after the retry");
    gw.stop().await;
}

/// The first attempt of an INSERT sends the blocks its large requests made ahead; when it fails,
/// the retry sends all the rows again as one block made anew, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_insert_with_blocks_made_ahead_stores_every_row_once() {
    let ch = clickhouse();
    let db = ch.fresh_database("ahead_retry");
    let mut config = config(ch, &db);
    config.batching.partitions = 1;
    config.clickhouse.insert_retries = 1000;
    config.clickhouse.circuit_failures = 0;
    config.batching.flush_linger_ms = 200;
    migrate(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;
    ch.exec(&format!("DROP TABLE {db}.events_buffer")).await;
    // A request large enough for a block of its own, and a small one, in one batch; the
    // table comes back while the partition retries it.
    let (large, small) = (batch(1, 600), batch(5000, 7));
    let restore = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        migrate(&config).await;
    };
    let (large, small, ()) = tokio::join!(gw.post_json(&large), gw.post_json(&small), restore);
    for ((status, body), n) in [(large, 600), (small, 7)] {
        assert_eq!((status, body["accepted"].as_u64()), (200, Some(n)), "{body}");
    }
    gw.drain(ch).await;
    let table = gw.destination();
    assert_eq!(ch.count(&table).await, 607);
    assert_eq!(ch.count(&format!("(SELECT DISTINCT user_id FROM {table})")).await, 607, "no row twice");
    gw.stop().await;
}
