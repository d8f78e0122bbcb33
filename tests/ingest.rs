//! POST /v1/events end to end: a real ClickHouse, the gateway in-process, and assertions on the
//! exact rows stored in the destination table.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Gateway, clickhouse, config, eventually, migrate};
use serde_json::{Value, json};

async fn seeded_gateway(prefix: &str) -> Gateway {
    let ch = clickhouse();
    let config = config(ch, &ch.fresh_database(prefix));
    migrate(&config).await;
    Gateway::start(config).await
}

fn seed_event(i: u64) -> Value {
    json!({
        "event_id": format!("00000000-0000-4000-8000-{i:012}"),
        "event_ts": "2024-05-01T12:00:00.250Z",
        "user_id": i,
        "event_type": if i % 2 == 0 { "click" } else { "view" },
        "payload": {"page": format!("/p/{i}"), "n": i},
        "metadata": {"source": "test"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_array_lands_in_the_destination_exactly() {
    let ch = clickhouse();
    let gw = seeded_gateway("array").await;
    let events: Vec<Value> = (1..=50).map(seed_event).collect();
    let (status, body) = gw.post_json(&Value::Array(events)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"accepted": 50, "duplicates": 0, "rejected": []}));
    gw.drain(ch).await;
    let rows = ch
        .rows(&format!(
            "SELECT toString(event_id) AS id, toString(event_ts) AS ts, user_id, event_type, payload, metadata FROM {} ORDER BY user_id",
            gw.destination()
        ))
        .await;
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[6]["id"], "00000000-0000-4000-8000-000000000007");
    // 18.16 has no DateTime64: migrate created DateTime, so the time is stored to the second.
    assert_eq!(rows[6]["ts"], "2024-05-01 12:00:00");
    assert_eq!(rows[6]["user_id"].to_string().trim_matches('"'), "7");
    assert_eq!(rows[6]["event_type"], "view");
    assert_eq!(rows[6]["payload"], r#"{"n":7,"page":"/p/7"}"#);
    assert_eq!(rows[6]["metadata"], r#"{"source":"test"}"#);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_gzip_and_zstd_bodies() {
    let ch = clickhouse();
    let gw = seeded_gateway("formats").await;
    let ndjson: String = (1..=10).map(|i| format!("{}\n", seed_event(i))).collect();
    let (status, body) = gw.post("/v1/events", "application/x-ndjson", None, ndjson.into_bytes()).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(10)), "{body}");

    let array = Value::Array((11..=20).map(seed_event).collect()).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(array.as_bytes()).unwrap();
    let (status, body) = gw.post("/v1/events", "application/json", Some("gzip"), gz.finish().unwrap()).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(10)), "{body}");

    let ndjson: String = (21..=30).map(|i| format!("{}\r\n", seed_event(i))).collect();
    let packed = zstd::encode_all(ndjson.as_bytes(), 3).unwrap();
    let (status, body) = gw.post("/v1/events", "application/x-ndjson", Some("zstd"), packed).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(10)), "{body}");

    gw.drain(ch).await;
    let rows = ch.rows(&format!("SELECT user_id FROM {} ORDER BY user_id", gw.destination())).await;
    let ids: Vec<u64> = rows.iter().map(|r| r["user_id"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids, (1..=30).collect::<Vec<u64>>());
    gw.stop().await;
}
