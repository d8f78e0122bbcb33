//! The cluster harness against ClickHouse 18.16: `ON CLUSTER` DDL reaches every node, a
//! Distributed INSERT places each row on the shard its key and the weights say, both replicas of a
//! shard converge (a killed and restarted one too), the Distributed table reads everything, and
//! the per-node views (processes, KILL QUERY, uptime, events) are per node. Then the gateway
//! on such a cluster: rows on the shard the Distributed table would choose, a replica killed
//! under load, a saturated shard.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use buffergate::clickhouse::fleet;
use buffergate::config::Config;
use buffergate::schema::sharding::int_hash64;
use common::cluster::ClickHouseCluster;
use common::{ClickHouseServer, Gateway, eventually, holding_buffer, http};
use serde_json::{Value, json};
use uuid::Uuid;

/// One cluster at a time: four servers and a ZooKeeper are what two cores can run.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A number ClickHouse printed, as JSONEachRow gives it (64-bit integers as strings).
fn number(value: &Value) -> u64 {
    value.as_u64().or_else(|| value.as_str().and_then(|s| s.parse().ok())).expect("a number")
}

/// Polls `sql`'s single value on `node` until it is `want`; replication and the Distributed
/// INSERT's background sends are asynchronous.
async fn converges(node: &ClickHouseServer, sql: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = number(&node.rows(&format!("SELECT ({sql}) AS v")).await[0]["v"]);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{} still answers {got}, not {want}, to {sql}", node.url);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_two_by_two_cluster_replicates_and_distributes() {
    let _serial = SERIAL.lock().await;
    let cluster = ClickHouseCluster::start_weighted("cluster", &[1, 2], 2);
    let first = cluster.node(0, 0);
    let url = |s, r| cluster.node(s, r).url.clone();
    assert_eq!(cluster.urls_spec(), format!("{},{};{},{}", url(0, 0), url(0, 1), url(1, 0), url(1, 1)));

    // Every node sees the same cluster: a row per replica, the weights, every node's TCP port.
    let layout = "SELECT shard_num, shard_weight, replica_num, port FROM system.clusters \
                  WHERE cluster = 'bg' ORDER BY shard_num, replica_num";
    for node in cluster.nodes() {
        let rows = node.rows(layout).await;
        let seen: Vec<(u64, u64, u64, u64)> = rows
            .iter()
            .map(|r| {
                (number(&r["shard_num"]), number(&r["shard_weight"]), number(&r["replica_num"]), number(&r["port"]))
            })
            .collect();
        let want: Vec<(u64, u64, u64, u64)> = (0..2)
            .flat_map(|s| (0..2).map(move |r| (s, r)))
            .map(|(s, r)| (s as u64 + 1, [1, 2][s], r as u64 + 1, u64::from(cluster.node(s, r).tcp_port())))
            .collect();
        assert_eq!(seen, want, "system.clusters on {}", node.url);
    }

    cluster.ddl("CREATE DATABASE x ON CLUSTER bg").await;
    cluster
        .ddl(
            "CREATE TABLE x.local ON CLUSTER bg (key String, n UInt64) \
             ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/x/local', '{replica}') ORDER BY key",
        )
        .await;
    cluster
        .ddl("CREATE TABLE x.dist ON CLUSTER bg AS x.local ENGINE = Distributed(bg, x, local, cityHash64(key))")
        .await;

    // 60 rows through the Distributed table; where each belongs, by ClickHouse's own hash.
    let values: Vec<String> = (0..60).map(|i| format!("('k{i}', {i})")).collect();
    first.exec(&format!("INSERT INTO x.dist VALUES {}", values.join(","))).await;
    let mut expected = [0u64; 2];
    let hashes = first.rows("SELECT cityHash64(concat('k', toString(number))) AS h FROM numbers(60)").await;
    for row in &hashes {
        expected[cluster.shard_of(number(&row["h"]))] += 1;
    }
    assert!(expected.iter().all(|&n| n > 0), "both shards get rows: {expected:?}");

    // Each replica of a shard holds exactly its shard's rows: the right count, none misplaced.
    let remainders = ["cityHash64(key) % 3 = 0", "cityHash64(key) % 3 IN (1, 2)"];
    for (s, (&want, belongs)) in expected.iter().zip(remainders).enumerate() {
        for node in cluster.shard(s) {
            converges(node, "SELECT count() FROM x.local", want).await;
            converges(node, &format!("SELECT count() FROM x.local WHERE NOT ({belongs})"), 0).await;
        }
    }
    for node in cluster.nodes() {
        converges(node, "SELECT count() FROM x.dist", 60).await;
    }

    // (a) 18.16 has no optimize_skip_unused_shards; a point query still finds its row.
    assert!(first.rows("SELECT name FROM system.settings WHERE name LIKE '%skip_unused%'").await.is_empty());
    let unknown =
        first.try_exec("SELECT * FROM x.dist WHERE key = 'k7' SETTINGS optimize_skip_unused_shards = 1").await;
    assert!(unknown.is_err_and(|e| e.contains("Unknown setting")), "the setting is unknown");
    let found = first.rows("SELECT n FROM x.dist WHERE key = 'k7'").await;
    assert_eq!(found.iter().map(|r| number(&r["n"])).collect::<Vec<_>>(), [7]);

    // A killed replica comes back with its cluster configuration and catches up.
    let (survivor, victim) = (cluster.node(1, 0), cluster.node(1, 1));
    victim.kill();
    survivor.exec("INSERT INTO x.local VALUES ('late', 1000)").await;
    victim.restart();
    converges(victim, "SELECT count() FROM x.local WHERE key = 'late'", 1).await;
    converges(first, "SELECT count() FROM x.dist", 61).await;

    // Per node: a query runs, is listed and is killed where it was sent, nowhere else.
    let busy = cluster.node(1, 1);
    let long = tokio::spawn(
        http().post(format!("{}/?query_id=long", busy.url)).body("SELECT count() FROM numbers(100000000000)").send(),
    );
    converges(busy, "SELECT count() FROM system.processes WHERE query_id = 'long'", 1).await;
    for node in cluster.nodes().filter(|n| n.url != busy.url) {
        converges(node, "SELECT count() FROM system.processes WHERE query_id = 'long'", 0).await;
    }
    first.exec("KILL QUERY WHERE query_id = 'long' SYNC").await;
    converges(busy, "SELECT count() FROM system.processes WHERE query_id = 'long'", 1).await;
    busy.exec("KILL QUERY WHERE query_id = 'long' SYNC").await;
    converges(busy, "SELECT count() FROM system.processes WHERE query_id = 'long'", 0).await;
    let answer = long.await.expect("task").expect("ClickHouse answers");
    assert!(!answer.status().is_success(), "the killed query fails");

    // uptime(): the restarted node has just started. system.events: only the node that took the
    // INSERT counts its rows as inserted by a query.
    let victim_uptime = number(&victim.rows("SELECT uptime() AS v").await[0]["v"]);
    let first_uptime = number(&first.rows("SELECT uptime() AS v").await[0]["v"]);
    assert!(victim_uptime <= first_uptime, "uptime {victim_uptime} after a restart, {first_uptime} without");
    let inserted = "SELECT toUInt64(sum(value)) AS v FROM system.events WHERE event = 'InsertedRows'";
    let counted = |rows: Vec<Value>| rows.first().map_or(0, |r| number(&r["v"]));
    assert!(counted(first.rows(inserted).await) >= 60, "the node that took the INSERT counts it");
    assert_eq!(counted(cluster.node(0, 1).rows(inserted).await), 0, "a replica that only fetched parts does not");
}

/// The gateway's configuration for `cluster`: every node listed, the cluster named, rows
/// placed by `intHash64(user_id)`, a journal of its own.
fn gateway_config(cluster: &ClickHouseCluster, db: &str) -> Config {
    let mut config = Config::default();
    config.clickhouse.clickhouse_url = cluster.urls_spec();
    config.clickhouse.clickhouse_cluster = cluster.cluster_name().into();
    config.clickhouse.sharding_key = "intHash64(user_id)".into();
    config.table.database = db.into();
    config.batching.partitions = 1;
    config.clickhouse.schema_refresh_interval_ms = 300;
    config.clickhouse.retry_initial_backoff_ms = 50;
    config.clickhouse.retry_max_backoff_ms = 200;
    config.auth.admin_token = ADMIN.into();
    config
}

const ADMIN: &str = "cluster-admin";

/// `buffergate migrate` on every node of the configured cluster (in-process).
async fn migrate_cluster(config: &Config) {
    let topology = fleet::resolve(config).await.expect("the cluster is readable");
    fleet::migrate_all(config, &topology).await.expect("migrate");
}

/// The shard (from 0) a user's rows belong to under `intHash64(user_id)` and equal weights.
fn shard_of(cluster: &ClickHouseCluster, user: u64) -> usize {
    cluster.shard_of(int_hash64(user))
}

fn event(id: u64, user: u64) -> Value {
    json!({"event_id": Uuid::from_u64_pair(0xc1, id).to_string(), "user_id": user, "event_type": "t", "payload": "p"})
}

/// Waits until no node's journal holds a suspect block (every doubt settled).
async fn suspects_settled(gw: &Gateway, within: Duration, what: &str) {
    let status_url = format!("{}/v1/status", gw.url);
    eventually(within, what, || {
        let url = status_url.clone();
        async move {
            let status: Value = http().get(url).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
            status["journal"]["suspect_blocks"].as_u64() == Some(0)
        }
    })
    .await;
}

/// `POST /admin/flush?drain=true`: every node's Buffer into its destination.
async fn drain_all(gw: &Gateway) {
    let response = http()
        .post(format!("{}/admin/flush?drain=true", gw.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
}

/// Ids stored on a node's destination, and how many rows it has.
async fn stored(node: &ClickHouseServer, db: &str) -> (u64, HashSet<String>) {
    let rows = node.rows(&format!("SELECT toString(event_id) AS id FROM `{db}`.events_raw")).await;
    let ids: HashSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap_or_default().to_string()).collect();
    (rows.len() as u64, ids)
}

/// Waits until the replicas of `shard` agree: the same row count on each, twice a second
/// apart, and nothing left in their replication queues.
async fn settled(cluster: &ClickHouseCluster, db: &str, shard: usize) {
    let table = format!("`{db}`.events_raw");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    loop {
        let mut counts = Vec::new();
        let mut queued = 0;
        for node in cluster.shard(shard) {
            counts.push(node.count(&table).await);
            queued += node.count("system.replication_queue").await;
        }
        let agreed = (counts.windows(2).all(|w| w[0] == w[1]) && queued == 0).then_some(counts[0]);
        if agreed.is_some() && agreed == last {
            return;
        }
        assert!(Instant::now() < deadline, "shard {shard}'s replicas do not agree: {counts:?}, {queued} queued");
        last = agreed;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until every replica of `shard` holds `expected` rows (replication is asynchronous).
async fn converged(cluster: &ClickHouseCluster, db: &str, shard: usize, expected: u64) {
    for node in cluster.shard(shard) {
        let table = format!("`{db}`.events_raw");
        eventually(
            Duration::from_secs(120),
            &format!("shard {shard}'s replica {} to hold {expected} rows", node.url),
            || {
                let table = table.clone();
                async move {
                    let count = node.count(&table).await;
                    if count != expected {
                        let queue =
                            node.rows("SELECT type, last_exception, num_tries FROM system.replication_queue").await;
                        eprintln!("{} has {count}; queue {:?}", node.url, queue.iter().take(3).collect::<Vec<_>>());
                    }
                    count == expected
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_on_the_shard_the_distributed_table_would_choose_and_read_back_through_it() {
    let _serial = SERIAL.lock().await;
    let cluster = ClickHouseCluster::start("cl-place", 2, 2);
    let db = "cl_place";
    let config = gateway_config(&cluster, db);
    migrate_cluster(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;

    let users: Vec<u64> = (0..400).map(|u| u * 7919 + 3).collect();
    let events: Vec<Value> = users.iter().enumerate().map(|(i, &u)| event(i as u64, u)).collect();
    for chunk in events.chunks(40) {
        let (status, body) = gw.post_json(&Value::Array(chunk.to_vec())).await;
        assert_eq!((status, body["accepted"].as_u64()), (200, Some(40)), "{body}");
    }
    drain_all(&gw).await;

    // Each shard holds exactly its users' rows, on both replicas.
    for shard in 0..2 {
        let expected = users.iter().filter(|&&u| shard_of(&cluster, u) == shard).count() as u64;
        assert!(expected > 100, "both shards get a fair share: {expected}");
        converged(&cluster, db, shard, expected).await;
        let foreign = format!("SELECT count() AS c FROM `{db}`.events_raw WHERE intHash64(user_id) % 2 != {shard}");
        assert_eq!(cluster.node(shard, 0).rows(&foreign).await[0]["c"].as_str(), Some("0"));
    }
    // The Distributed table reads all of them, once.
    let all = cluster
        .node(0, 0)
        .rows(&format!("SELECT count() AS c, uniqExact(event_id) AS u FROM `{db}`.events_raw_all"))
        .await;
    assert_eq!((all[0]["c"].as_str(), all[0]["u"].as_str()), (Some("400"), Some("400")), "{all:?}");

    // The same users inserted through a Distributed table of the same key land on the same
    // shards: the placement is the cluster's own.
    cluster
        .ddl(&format!(
            "CREATE TABLE `{db}`.probe ON CLUSTER bg (user_id UInt64) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{db}/probe', '{{replica}}') ORDER BY user_id"
        ))
        .await;
    cluster
        .ddl(&format!(
            "CREATE TABLE `{db}`.probe_all ON CLUSTER bg AS `{db}`.probe ENGINE = Distributed(bg, '{db}', 'probe', intHash64(user_id))"
        ))
        .await;
    let list: Vec<String> = users.iter().map(u64::to_string).collect();
    let insert = format!("INSERT INTO `{db}`.probe_all SELECT arrayJoin([{}]) AS user_id", list.join(","));
    cluster.node(1, 1).try_exec_with(&insert, &[("insert_distributed_sync", "1")]).await.unwrap();
    for shard in 0..2 {
        let node = cluster.node(shard, 0);
        let ours = node
            .rows(&format!(
                "SELECT groupArray(user_id) AS u FROM (SELECT user_id FROM `{db}`.events_raw ORDER BY user_id)"
            ))
            .await;
        // The Distributed INSERT reached one replica of the shard: wait for this one to have it.
        let expected = users.iter().filter(|&&u| shard_of(&cluster, u) == shard).count() as u64;
        let probe = format!("`{db}`.probe");
        eventually(Duration::from_secs(60), "the probe rows to replicate", || async {
            node.count(&probe).await == expected
        })
        .await;
        let theirs = node
            .rows(&format!("SELECT groupArray(user_id) AS u FROM (SELECT user_id FROM `{db}`.probe ORDER BY user_id)"))
            .await;
        assert_eq!(ours[0]["u"], theirs[0]["u"], "shard {shard}");
    }
    if cluster
        .node(0, 0)
        .rows("SELECT count() AS c FROM system.settings WHERE name = 'optimize_skip_unused_shards'")
        .await[0]["c"]
        .as_str()
        == Some("1")
    {
        let one = users[17];
        let found = cluster
            .node(0, 1)
            .rows(&format!("SELECT count() AS c FROM `{db}`.events_raw_all WHERE user_id = {one} SETTINGS optimize_skip_unused_shards = 1"))
            .await;
        assert_eq!(found[0]["c"].as_str(), Some("1"), "read from the one shard that holds it");
    }
    gw.stop().await;
}

/// Producers posting batches of fresh events until `stop`; returns the acknowledged ids.
async fn produce(gw_url: String, first: u64, wait: &'static str, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut acknowledged = Vec::new();
    let mut next = first;
    while !stop.load(Ordering::Relaxed) {
        let ids: Vec<u64> = (next..next + 20).collect();
        next += 20;
        let body = Value::Array(ids.iter().map(|&id| event(id, id * 31)).collect());
        let response = http().post(format!("{gw_url}/v1/events?wait={wait}")).json(&body).send().await;
        match response {
            Ok(r) if r.status().as_u16() == 200 || r.status().as_u16() == 202 => acknowledged.extend(ids),
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    acknowledged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sigkilled_under_load_and_restarted_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = ClickHouseCluster::start("cl-kill", 2, 2);
    let db = "cl_kill";
    // The Buffers keep their rows: the killed replica loses what it held, the journal must
    // send it again once the replica is back.
    let config = {
        let mut config = holding_buffer(gateway_config(&cluster, db));
        config.batching.partitions = 2;
        config
    };
    migrate_cluster(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = [(0, "true"), (1 << 32, "true"), (2 << 32, "false"), (3 << 32, "false")]
        .into_iter()
        .map(|(first, wait)| tokio::spawn(produce(gw.url.clone(), first, wait, Arc::clone(&stop))))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.node(0, 0).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.node(0, 0).restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = HashSet::new();
    for producer in producers {
        acknowledged.extend(producer.await.expect("producer"));
    }
    assert!(acknowledged.len() > 1000, "load went on around the kill: {}", acknowledged.len());

    // The killed replica's journal sees the restart and sends again what its Buffer lost.
    suspects_settled(&gw, Duration::from_secs(120), "every suspect block to be settled").await;
    let metrics = http().get(format!("{}/metrics", gw.url)).send().await.unwrap().text().await.unwrap();
    let restored: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("buffergate_journal_restored_rows_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(restored > 0.0, "the kill lost buffered rows, and the journal restored them:\n{metrics}");
    drain_all(&gw).await;
    let mut seen: HashMap<String, u64> = HashMap::new();
    for shard in 0..2 {
        // Both replicas converge (each fetches the parts the other was sent); either then
        // tells the shard's rows.
        settled(&cluster, db, shard).await;
        let (count, ids) = stored(cluster.node(shard, 1), db).await;
        assert_eq!(count, ids.len() as u64, "shard {shard}: no id twice");
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
    }
    let missing: Vec<&u64> =
        acknowledged.iter().filter(|id| !seen.contains_key(&Uuid::from_u64_pair(0xc1, **id).to_string())).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(seen.values().all(|&n| n == 1), "an id on two shards");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saturated_shard_leaves_the_other_ingesting() {
    let _serial = SERIAL.lock().await;
    let cluster = ClickHouseCluster::start("cl-shed", 2, 1);
    let db = "cl_shed";
    let mut config = holding_buffer(gateway_config(&cluster, db));
    // 18.16 reports Buffer bytes per server: each shard here is a server of its own.
    config.shed.buffer_capacity_bytes = 1_000_000;
    config.shed.shed_poll_interval_ms = 100;
    config.batching.flush_max_bytes = 200_000;
    migrate_cluster(&config).await;
    let gw = Gateway::start(config.clone()).await;
    gw.wait_ready().await;

    let on =
        |shard: usize, n: usize| -> Vec<u64> { (1u64..).filter(|&u| shard_of(&cluster, u) == shard).take(n).collect() };
    let heavy = |ids: &[u64], from: u64| -> Value {
        Value::Array(ids.iter().enumerate().map(|(i, &u)| json!({"event_id": Uuid::from_u64_pair(0x5e, from + i as u64).to_string(), "user_id": u, "payload": "x".repeat(1000)})).collect())
    };
    let first = on(0, 2000);
    // Fill shard 0's Buffer past the threshold with its own users' events.
    let mut sent = 0u64;
    let mut shed = None;
    for chunk in first.chunks(50) {
        let (status, body) = gw.post_json(&heavy(chunk, sent)).await;
        sent += chunk.len() as u64;
        if status == 503 {
            shed = Some(body);
            break;
        }
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = shed.expect("shard 0 saturates");
    assert_eq!(body["error"], "shard_saturated", "{body}");
    // Shard 1's users go on; shard 0's, alone or mixed in, wait with Retry-After.
    let second = on(1, 50);
    let (status, body) = gw.post_json(&heavy(&second, 100_000)).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(50)), "{body}");
    let mixed: Vec<u64> = second.iter().copied().take(5).chain(first.iter().copied().take(5)).collect();
    let response = http().post(format!("{}/v1/events", gw.url)).json(&heavy(&mixed, 200_000)).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "shard_saturated", "{body}");
    let status = gw.status().await;
    assert_eq!(status["nodes"][0]["shedding"], true, "{status}");
    assert_eq!(status["nodes"][1]["shedding"], false, "{status}");
    assert_eq!(status["shedding"], false, "the gateway as a whole takes rows: {status}");
    // Nothing of the refused mixed request was written.
    cluster.node(1, 0).exec(&format!("OPTIMIZE TABLE `{db}`.events_buffer")).await;
    let on_1 = cluster.node(1, 0).count(&format!("`{db}`.events_raw")).await;
    assert_eq!(on_1, 50, "only the accepted batch on shard 1");
    // Drained, shard 0 takes rows again.
    cluster.node(0, 0).exec(&format!("OPTIMIZE TABLE `{db}`.events_buffer")).await;
    eventually(Duration::from_secs(20), "shard 0 to take rows again", || {
        let (gw, body) = (&gw, heavy(&first[1900..1910], 300_000));
        async move { gw.post_json(&body).await.0 == 200 }
    })
    .await;
    gw.stop().await;
}

/// One shard of two replicas, each replica preferred by one of the two partitions.
async fn one_shard_of_two(name: &str, db: &str) -> (ClickHouseCluster, Config) {
    let cluster = ClickHouseCluster::start(name, 1, 2);
    let config = {
        let mut config = holding_buffer(gateway_config(&cluster, db));
        config.batching.partitions = 2;
        config.clickhouse.sharding_key = "rand()".into();
        config
    };
    migrate_cluster(&config).await;
    (cluster, config)
}

/// Ids stored over both replicas, each once (the replicas converged first).
async fn stored_once(cluster: &ClickHouseCluster, db: &str) -> HashSet<String> {
    settled(cluster, db, 0).await;
    let (count, ids) = stored(cluster.node(0, 1), db).await;
    assert_eq!(count, ids.len() as u64, "no id twice");
    ids
}

fn ids_of(range: std::ops::Range<u64>) -> HashSet<String> {
    range.map(|id| Uuid::from_u64_pair(0xc1, id).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_failed_over_at_once_and_what_was_acknowledged_is_stored_without_it() {
    let _serial = SERIAL.lock().await;
    let db = "cl_failover";
    let (cluster, config) = one_shard_of_two("cl-failover", db).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    // Dead while idle: nothing is in flight on it, every batch the partition of its own sends
    // it meets a refused connection (its breaker is closed, its fill not yet stale).
    cluster.node(0, 0).kill();
    for (request, wait) in (0..40u64).zip(["true", "false"].into_iter().cycle()) {
        let body = Value::Array((request * 10..request * 10 + 10).map(|id| event(id, id)).collect());
        let response = http().post(format!("{}/v1/events?wait={wait}", gw.url)).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        assert_eq!(
            status,
            if wait == "true" { 200 } else { 202 },
            "request {request}: {}",
            response.text().await.unwrap()
        );
    }
    // With the dead replica still down, the other holds every row: 200s and 202s alike
    // (their journal records moved with them) were sent there.
    let survivor = cluster.node(0, 1);
    let table = format!("`{db}`.events_raw");
    eventually(Duration::from_secs(30), "the surviving replica to hold every acknowledged row", || async {
        survivor.exec(&format!("OPTIMIZE TABLE `{db}`.events_buffer")).await;
        survivor.count(&table).await == 400
    })
    .await;
    let status = gw.status().await;
    assert_eq!(status["nodes"][0]["journal"]["unconfirmed_blocks"], 0, "nothing left for the dead one: {status}");
    cluster.node(0, 0).restart();
    assert_eq!(stored_once(&cluster, db).await, ids_of(0..400));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_s_inserts_are_settled_on_it_never_sent_to_the_other() {
    let _serial = SERIAL.lock().await;
    let db = "cl_frozen";
    let (cluster, mut config) = one_shard_of_two("cl-frozen", db).await;
    config.clickhouse.clickhouse_timeout_ms = 1_000;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;
    // Frozen, its INSERTs time out: they may land once it thaws, so they stay with it. (Thawed
    // within the harness's ZooKeeper session, 4 s, so that its replication carries on.)
    cluster.node(0, 0).signal(libc::SIGSTOP);
    let sends = (0..20u64).map(|request| {
        let body = Value::Array((request * 10..request * 10 + 10).map(|id| event(id, id)).collect());
        let url = format!("{}/v1/events?wait=false", gw.url);
        async move { http().post(url).json(&body).send().await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(sends).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.node(0, 0).signal(libc::SIGCONT);
    assert!(statuses.iter().all(|s| matches!(s, Ok(202))), "{statuses:?}");
    suspects_settled(&gw, Duration::from_secs(60), "the frozen replica's blocks to be settled").await;
    drain_all(&gw).await;
    assert_eq!(stored_once(&cluster, db).await, ids_of(0..200), "every event once");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_has_its_tables_on_every_node_and_its_rows_placed_by_its_own_key() {
    let _serial = SERIAL.lock().await;
    let cluster = ClickHouseCluster::start("cl-streams", 2, 1);
    let db = "cl_streams";
    let mut config = gateway_config(&cluster, db);
    config.add_stream("orders", |s| {
        s.table.destination_table = "orders".into();
        s.table.buffer_table = "orders_buffer".into();
        s.table.partition_key = "customer".into();
        s.sharding_key = "intHash64(customer)".into();
    });
    migrate_cluster(&config.streams()[0]).await;
    // A stream's destination is the user's table, on every node.
    for shard in 0..2 {
        cluster
            .node(shard, 0)
            .exec(&format!(
                "CREATE TABLE `{db}`.orders (event_id UUID, event_ts DateTime, customer UInt64, amount Int64) \
                 ENGINE = MergeTree ORDER BY (event_ts, event_id)"
            ))
            .await;
    }
    migrate_cluster(&config.streams()[1]).await;
    let gw = Gateway::start(config).await;
    gw.wait_ready().await;

    let customers: Vec<u64> = (0..300).map(|c| c * 104_729 + 11).collect();
    let orders: Vec<Value> = customers.iter().map(|&c| json!({"customer": c, "amount": 5})).collect();
    for chunk in orders.chunks(50) {
        let (status, body) = gw
            .post(
                "/v1/streams/orders/events",
                "application/json",
                None,
                Value::Array(chunk.to_vec()).to_string().into_bytes(),
            )
            .await;
        assert_eq!((status, body["accepted"].as_u64()), (200, Some(50)), "{body}");
    }
    drain_all(&gw).await;
    for shard in 0..2 {
        let node = cluster.node(shard, 0);
        let expected = customers.iter().filter(|&&c| shard_of(&cluster, c) == shard).count() as u64;
        assert!(expected > 100, "both shards get a fair share: {expected}");
        assert_eq!(node.count(&format!("`{db}`.orders")).await, expected, "shard {shard}");
        let foreign = format!("SELECT count() AS c FROM `{db}`.orders WHERE intHash64(customer) % 2 != {shard}");
        assert_eq!(node.rows(&foreign).await[0]["c"].as_str(), Some("0"), "shard {shard}");
        assert_eq!(node.count(&format!("`{db}`.events_raw")).await, 0, "nothing in the default stream's table");
    }
    let all = cluster.node(1, 0).rows(&format!("SELECT count() AS c FROM `{db}`.orders_all")).await;
    assert_eq!(all[0]["c"].as_str(), Some("300"), "the stream's Distributed table reads every shard");
    gw.stop().await;
}
