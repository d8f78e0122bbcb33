//! Streams against a real ClickHouse: several destinations with their own schemas behind one
//! gateway, each isolated (its own rows, dedup namespace, shed verdict), keys restricted to
//! streams, and the stream listing with its completeness watermark.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use buffergate::Config;
use common::{ClickHouseServer, Gateway, clickhouse, config, eventually, http, migrate};
use serde_json::{Value, json};

/// A `logs` stream (level, message) and an `audit` stream (actor, action, amount) beside the
/// default one, in `db`; their destinations created as a user would, their Buffers by migrate.
async fn three_streams(ch: &ClickHouseServer, db: &str) -> Config {
    let mut config = config(ch, db);
    config.auth.admin_token = "admin".into();
    // Blocks are looked for in the destination once the Buffer must have flushed them
    // (buffer_max_time + confirm_grace_ms): short here, so the watermark moves within a test.
    config.journal.confirm_grace_ms = 200;
    config.table.buffer_min_time = 1;
    config.table.buffer_max_time = 2;
    config.add_stream("logs", |s| {
        s.table.destination_table = "logs".into();
        s.table.buffer_table = "logs_buffer".into();
        s.table.partition_key = "host".into();
    });
    config.add_stream("audit", |s| {
        s.table.database = format!("{db}_audit");
        s.table.destination_table = "audit".into();
        s.table.buffer_table = "audit_buffer".into();
        s.table.partition_key = String::new();
    });
    migrate(&config.streams()[0]).await;
    ch.exec(&format!(
        "CREATE TABLE `{db}`.logs (event_id UUID, event_ts DateTime, host String, level String, message String) \
         ENGINE = MergeTree ORDER BY (event_ts, event_id)"
    ))
    .await;
    ch.exec(&format!("CREATE DATABASE `{db}_audit`")).await;
    ch.exec(&format!(
        "CREATE TABLE `{db}_audit`.audit (event_id UUID, event_ts DateTime, actor String, action String, amount Int64) \
         ENGINE = MergeTree ORDER BY (event_ts, event_id)"
    ))
    .await;
    for stream in config.streams().iter().skip(1) {
        migrate(stream).await;
    }
    config
}

async fn post(gw: &Gateway, stream: &str, body: &Value) -> (u16, Value) {
    gw.post(&format!("/v1/streams/{stream}/events"), "application/json", None, body.to_string().into_bytes()).await
}

fn uuid(n: u64) -> String {
    format!("00000000-0000-7000-8000-{n:012}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_write_their_own_tables_once_each() {
    let ch = clickhouse();
    let db = ch.fresh_database("streams");
    let config = three_streams(ch, &db).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    // Each stream its own schema; one bad event in `logs` (a field its table lacks) is
    // rejected by index, the others of that request and of the other streams are stored.
    let logs: Vec<Value> = (0..10)
        .map(|i| json!({"event_id": uuid(i), "host": format!("h{}", i % 3), "level": "info", "message": format!("m{i}")}))
        .chain([json!({"event_id": uuid(99), "host": "h1", "level": "info", "user_id": 5})])
        .collect();
    let (status, answer) = post(&gw, "logs", &Value::Array(logs)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 10, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 10, "{answer}");
    assert_eq!(answer["rejected"][0]["field"], "user_id", "{answer}");
    let audit: Vec<Value> =
        (0..5).map(|i| json!({"event_id": uuid(i), "actor": "ann", "action": "refund", "amount": i})).collect();
    let (status, answer) = post(&gw, "audit", &Value::Array(audit)).await;
    assert_eq!((status, answer["accepted"].as_u64()), (200, Some(5)), "{answer}");
    // The same ids in the default stream are other events: stored too.
    let default: Vec<Value> = (0..5).map(|i| json!({"event_id": uuid(i), "user_id": i, "event_type": "x"})).collect();
    let (status, answer) = gw.post_json(&Value::Array(default.clone())).await;
    assert_eq!((status, answer["accepted"].as_u64()), (200, Some(5)), "{answer}");
    // Sent again, each stream knows its own ids.
    let (_, answer) = gw.post_json(&Value::Array(default)).await;
    assert_eq!((answer["accepted"].as_u64(), answer["duplicates"].as_u64()), (Some(0), Some(5)), "{answer}");
    let (_, answer) = post(&gw, "logs", &json!([{"event_id": uuid(3), "host": "h0", "level": "x"}])).await;
    assert_eq!(answer["duplicates"], 1, "{answer}");

    // Unknown streams and bad names: 404 unknown_stream, nothing written.
    let (status, answer) = post(&gw, "nope", &json!([{"a": 1}])).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("unknown_stream")), "{answer}");
    let (status, answer) = gw.post("/v1/streams/%FF/events", "application/json", None, b"[{}]".to_vec()).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("unknown_stream")), "not UTF-8: never the default");
    let long = "x".repeat(5000);
    let (status, answer) = post(&gw, &long, &json!([{"a": 1}])).await;
    assert_eq!(status, 404);
    assert!(answer["message"].as_str().unwrap().len() < 200, "the name is echoed bounded: {answer}");

    // The listing: each stream's columns and state.
    let list: Value = http().get(format!("{}/v1/streams", gw.url)).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = list["streams"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "audit", "logs"]);
    let audit = &list["streams"][1];
    let columns: Vec<&str> = audit["columns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["event_id", "event_ts", "actor", "action", "amount"], "{audit}");
    assert_eq!(audit["columns"][4]["type"], "Int64");
    assert_eq!(audit["state"]["ready"], true);

    for (buffer, table, rows) in [
        (format!("`{db}`.logs_buffer"), format!("`{db}`.logs"), 10),
        (format!("`{db}_audit`.audit_buffer"), format!("`{db}_audit`.audit"), 5),
        (format!("`{db}`.events_buffer"), gw.destination(), 5),
    ] {
        ch.exec(&format!("OPTIMIZE TABLE {buffer}")).await;
        assert_eq!(ch.count(&table).await, rows, "{table}");
        let unique = ch.rows(&format!("SELECT uniqExact(event_id) AS u FROM {table}")).await;
        assert_eq!(unique[0]["u"].to_string().trim_matches('"'), rows.to_string(), "{table}: each event once");
    }
    let logs = ch.rows(&format!("SELECT host, level, message FROM `{db}`.logs WHERE event_id = '{}'", uuid(7))).await;
    assert_eq!(logs, vec![json!({"host": "h1", "level": "info", "message": "m7"})]);

    // Confirmed in their destinations, the watermark passes the time the events were sent.
    let sent_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    eventually(Duration::from_secs(30), "the logs watermark to pass the events", || async {
        let list: Value = http().get(format!("{}/v1/streams", gw.url)).send().await.unwrap().json().await.unwrap();
        list["streams"][2]["state"]["watermark_ms"].as_u64().is_some_and(|w| w >= sent_ms)
    })
    .await;
    let status = gw.status().await;
    assert_eq!(status["streams"][2]["name"], "logs", "{status}");
    assert_eq!(status["streams"][2]["journal"]["unconfirmed_blocks"], 0, "{status}");

    // The admin flush takes one stream, or refuses an unknown one.
    let flush = |stream: &str| {
        http().post(format!("{}/admin/flush?stream={stream}&drain=true", gw.url)).bearer_auth("admin").send()
    };
    let answer: Value = flush("audit").await.unwrap().json().await.unwrap();
    assert_eq!(answer["flushed"], true, "{answer}");
    let response = flush("nope").await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "unknown_stream");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_stream_without_its_destination() {
    let ch = clickhouse();
    let db = ch.fresh_database("nodest");
    let mut config = config(ch, &db);
    config.add_stream("orphan", |s| {
        s.table.destination_table = "missing".into();
        s.table.buffer_table = "missing_buffer".into();
    });
    let stream = &config.streams()[1];
    let ch_client = buffergate::clickhouse::ClickHouse::new(stream);
    let error = buffergate::clickhouse::migrate::migrate(&ch_client, stream).await.unwrap_err().to_string();
    assert!(error.contains("orphan") && error.contains("missing does not exist"), "{error}");
    assert_eq!(ch.count(&format!("system.tables WHERE database = '{db}' AND name = 'missing_buffer'")).await, 0);
    // The command names the streams it knows when asked for another.
    let out = common::command(&config, &["--stream", "nope", "migrate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("default, orphan"), "{out:?}");
    // And migrating every stream stops at the orphan, naming it.
    let out = common::command(&config, &["migrate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stream orphan"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_waits_for_rows_not_yet_confirmed() {
    let ch = clickhouse();
    let db = ch.fresh_database("watermark");
    let mut config = three_streams(ch, &db).await;
    // The logs Buffer keeps its rows for 5 s: they are not looked for before.
    config.streams.get_mut("logs").unwrap().table.buffer_max_time = 5;
    config.streams.get_mut("logs").unwrap().table.buffer_min_time = 5;
    ch.exec(&format!("DROP TABLE `{db}`.logs_buffer")).await;
    migrate(&config.streams()[2]).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    let before_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (status, _) = post(&gw, "logs", &json!([{"host": "a", "level": "x"}])).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let list: Value = http().get(format!("{}/v1/streams", gw.url)).send().await.unwrap().json().await.unwrap();
    let logs = list["streams"][2]["state"]["watermark_ms"].as_u64().unwrap();
    assert!(logs <= before_ms + 1000, "held at the unconfirmed event ({logs} vs {before_ms})");
    let audit = list["streams"][1]["state"]["watermark_ms"].as_u64().unwrap();
    assert!(audit >= before_ms + 1000, "an idle stream's watermark is now");
    eventually(Duration::from_secs(30), "the watermark to move on once confirmed", || async {
        let list: Value = http().get(format!("{}/v1/streams", gw.url)).send().await.unwrap().json().await.unwrap();
        list["streams"][2]["state"]["watermark_ms"].as_u64().is_some_and(|w| w > before_ms + 1000)
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_stream_sheds_alone() {
    // Its own server: 18.16 counts every Buffer in one number, which this test must not share.
    let ch = ClickHouseServer::start("streams-shed");
    let db = ch.fresh_database("shed");
    let mut config = three_streams(&ch, &db).await;
    config.shed.shed_poll_interval_ms = 100;
    // The default stream's Buffer counted as small as the logs one: were a stream's fill the
    // server-wide total (every Buffer on 18.16), the logs rows would shed the default stream.
    config.shed.buffer_capacity_bytes = 1_000_000;
    let logs = config.streams.get_mut("logs").unwrap();
    logs.table.buffer_num_layers = 1;
    logs.table.buffer_min_time = 3600;
    logs.table.buffer_max_time = 3600;
    logs.table.buffer_min_rows = 10_000_000;
    logs.table.buffer_max_rows = 100_000_000;
    logs.table.buffer_min_bytes = 500_000;
    logs.table.buffer_max_bytes = 1_000_000;
    logs.flush_max_bytes = 200_000;
    ch.exec(&format!("DROP TABLE `{db}`.logs_buffer")).await;
    migrate(&config.streams()[2]).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let batch = |n: u64| -> Value {
        Value::Array(
            (0..50).map(|i| json!({"host": format!("h{}", n * 100 + i), "message": "x".repeat(1000)})).collect(),
        )
    };
    let mut shed = None;
    for n in 0..60 {
        let (status, answer) = post(&gw, "logs", &batch(n)).await;
        let (default, answer_default) = gw.post_json(&json!([{"user_id": n}])).await;
        assert_eq!(default, 200, "the default stream keeps answering: {answer_default}");
        match status {
            200 => {}
            503 => {
                shed = Some(answer);
                break;
            }
            other => panic!("{other}: {answer}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let shed = shed.expect("the logs Buffer never saturated");
    assert_eq!(shed["error"], "buffer_saturated", "{shed}");
    let response = http().post(format!("{}/v1/streams/logs/events", gw.url)).json(&batch(100)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    for i in 0..5 {
        assert_eq!(post(&gw, "audit", &json!([{"actor": "a", "amount": i}])).await.0, 200);
        assert_eq!(gw.post_json(&json!([{"user_id": i}])).await.0, 200);
    }
    let ready = http().get(format!("{}/readyz", gw.url)).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 200, "one saturated stream keeps the gateway in the load balancer");
    let status = gw.status().await;
    assert_eq!((status["streams"][2]["shedding"].as_bool(), status["shedding"].as_bool()), (Some(true), Some(false)));
    let metrics = http().get(format!("{}/metrics", gw.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("buffergate_shed_active{") && l.contains("stream=\"logs\"") && l.ends_with(" 1")),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_restricted_to_streams() {
    let ch = clickhouse();
    let db = ch.fresh_database("streamkeys");
    let mut config = three_streams(ch, &db).await;
    let keys = common::scratch("stream-keys").join("keys");
    std::fs::write(&keys, "ops=ops-secret streams=logs\nall=all-secret\n").unwrap();
    config.auth.api_keys_file = keys.display().to_string();
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    let send = |path: &str, key: &str| {
        http().post(format!("{}{path}", gw.url)).bearer_auth(key).json(&json!([{"host": "h", "user_id": 1}]))
    };
    let response = send("/v1/events", "ops-secret").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "stream_forbidden");
    let response = send("/v1/streams/audit/events", "ops-secret").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let response = http()
        .post(format!("{}/v1/streams/logs/events", gw.url))
        .bearer_auth("ops-secret")
        .json(&json!([{"host": "h"}]));
    assert_eq!(response.send().await.unwrap().status().as_u16(), 200);
    let response =
        http().post(format!("{}/v1/events", gw.url)).bearer_auth("all-secret").json(&json!([{"user_id": 1}]));
    assert_eq!(response.send().await.unwrap().status().as_u16(), 200);
    let get = |path: &str| http().get(format!("{}{path}", gw.url)).bearer_auth("ops-secret").send();
    let list: Value = get("/v1/streams").await.unwrap().json().await.unwrap();
    assert_eq!(list["streams"].as_array().unwrap().len(), 1, "a restricted key sees its own streams: {list}");
    assert_eq!(list["streams"][0]["name"], "logs");
    let response = http().get(format!("{}/v1/streams", gw.url)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // One key cannot move another's producer offset or replay its Idempotency-Key: each key
    // has its own. Event ids are the stream's (the journal finds rows by id).
    let logs = |key: &str, body: Value| {
        http().post(format!("{}/v1/streams/logs/events", gw.url)).bearer_auth(key.to_string()).json(&body)
    };
    let victim = uuid(500);
    let response = logs("all-secret", json!([{"event_id": victim, "host": "attacker"}]))
        .header("x-producer-id", "etl")
        .header("x-producer-offset", "9223372036854775807")
        .header("idempotency-key", "batch-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let response = logs("ops-secret", json!([{"event_id": victim, "host": "ops"}]))
        .header("x-producer-id", "etl")
        .header("x-producer-offset", "10")
        .header("idempotency-key", "batch-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers().get("idempotent-replayed").is_none(), "another key's Idempotency-Key");
    let answer: Value = response.json().await.unwrap();
    assert_eq!((answer["accepted"].as_u64(), answer["duplicates"].as_u64()), (Some(0), Some(1)), "{answer}");
    let offsets: Value = get("/v1/streams/logs/offsets/etl").await.unwrap().json().await.unwrap();
    assert_eq!(offsets["partitions"]["0"], 10, "its own offset, not the other key's: {offsets}");
    ch.exec(&format!("OPTIMIZE TABLE `{db}`.logs_buffer")).await;
    let hosts = ch.rows(&format!("SELECT host FROM `{db}`.logs WHERE event_id = '{victim}' ORDER BY host")).await;
    assert_eq!(hosts, vec![json!({"host": "attacker"})], "one event id, one row in the stream");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_committed_before_keys_had_their_own_are_read_back() {
    let ch = clickhouse();
    let redis = common::RedisServer::start("streams-legacy-offsets");
    let db = ch.fresh_database("legacy");
    let mut config = common::own_data_dir(config(ch, &db));
    config.idempotency.redis_url = redis.url.clone();
    config.idempotency.dedup_key_prefix = format!("{db}:");
    migrate(&config).await;
    let send = |url: String, key: Option<&'static str>, offset: u64| {
        let mut request = http()
            .post(format!("{url}/v1/events"))
            .header("x-producer-id", "etl")
            .header("x-producer-offset", offset.to_string())
            .json(&json!([{"user_id": offset}]));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    // Before keys: the producer's offset is the gateway's only one.
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;
    assert_eq!(send(gw.url.clone(), None, 7).await["accepted"], 1);
    gw.stop().await;
    // With keys: read back for the key until it has its own, then its own.
    let keys = common::scratch("legacy-keys").join("keys");
    std::fs::write(&keys, "etl-team=etl-secret\n").unwrap();
    config.auth.api_keys_file = keys.display().to_string();
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    let offsets = || async {
        let response = http().get(format!("{}/v1/offsets/etl", gw.url)).bearer_auth("etl-secret").send().await;
        response.unwrap().json::<Value>().await.unwrap()["partitions"]["0"].clone()
    };
    assert_eq!(offsets().await, 7, "resumed where it was");
    assert_eq!(send(gw.url.clone(), Some("etl-secret"), 5).await["duplicates"], 1, "an old batch is not written again");
    assert_eq!(send(gw.url.clone(), Some("etl-secret"), 9).await["accepted"], 1);
    assert_eq!(offsets().await, 9);
    gw.stop().await;
}

/// How many times each id is stored in `table`.
async fn stored_ids(ch: &ClickHouseServer, table: &str) -> std::collections::HashMap<String, u64> {
    let rows = ch.rows(&format!("SELECT toString(event_id) AS id, count() AS n FROM {table} GROUP BY id")).await;
    let number = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok()).unwrap();
    rows.iter().map(|r| (r["id"].as_str().unwrap().to_string(), number(&r["n"]))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_with_two_full_buffers_restores_each_stream_once() {
    let ch = ClickHouseServer::start("streams-kill");
    let db = ch.fresh_database("kill");
    let mut config = three_streams(&ch, &db).await;
    // Both Buffers keep their rows in memory: a SIGKILL loses them, the journals have them.
    config = common::holding_buffer(config);
    config.journal.confirm_grace_ms = 5_000;
    let default_table = config.table.clone();
    config.streams.get_mut("logs").unwrap().table = buffergate::config::TableSettings {
        database: db.clone(),
        buffer_table: "logs_buffer".into(),
        destination_table: "logs".into(),
        partition_key: "host".into(),
        ..default_table.clone()
    };
    for table in [format!("`{db}`.events_buffer"), format!("`{db}`.logs_buffer")] {
        ch.exec(&format!("DROP TABLE {table}")).await;
    }
    migrate(&config.streams()[0]).await;
    migrate(&config.streams()[2]).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let mut sent = (Vec::new(), Vec::new());
    for round in 0..10u64 {
        let ids: Vec<String> = (0..100).map(|i| uuid(round * 1000 + i)).collect();
        let body: Vec<Value> = ids.iter().map(|id| json!({"event_id": id, "user_id": 1})).collect();
        assert_eq!(gw.post_json(&Value::Array(body)).await.0, 200);
        sent.0.extend(ids.clone());
        let body: Vec<Value> = ids.iter().map(|id| json!({"event_id": id, "host": "h", "level": "x"})).collect();
        assert_eq!(post(&gw, "logs", &Value::Array(body)).await.0, 200);
        sent.1.extend(ids);
    }
    assert_eq!(ch.count(&gw.destination()).await, 0, "the rows are in the Buffers' memory only");
    // The confirmers have seen the server alive with these blocks owed: the kill is a restart.
    eventually(Duration::from_secs(20), "both journals to hold their blocks, settled", || async {
        let status = gw.status().await;
        status["streams"].as_array().is_some_and(|streams| {
            [0, 2].iter().all(|&i| {
                let journal = &streams[i]["journal"];
                journal["unconfirmed_blocks"].as_u64().is_some_and(|b| b > 0)
                    && journal["suspect_blocks"] == json!(0)
                    && journal["last_answer_s"].as_f64().is_some_and(|s| s < 1.0)
            })
        })
    })
    .await;
    ch.kill();
    ch.restart();
    for (buffer, destination, ids) in [
        (format!("`{db}`.events_buffer"), gw.destination(), &sent.0),
        (format!("`{db}`.logs_buffer"), format!("`{db}`.logs"), &sent.1),
    ] {
        eventually(Duration::from_secs(60), "the journal to restore the lost Buffer", || async {
            ch.count(&buffer).await >= ids.len() as u64
        })
        .await;
        ch.exec(&format!("OPTIMIZE TABLE {buffer}")).await;
        let stored = stored_ids(&ch, &destination).await;
        assert!(stored.values().all(|n| *n == 1), "{destination}: an event stored twice");
        assert!(ids.iter().all(|id| stored.contains_key(id)), "{destination}: an acknowledged event lost");
        assert_eq!(stored.len(), ids.len(), "{destination}: nothing else");
    }
    gw.stop().await;
}
