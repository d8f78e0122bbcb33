//! The cluster harness against ClickHouse 18.16: `ON CLUSTER` DDL reaches every node, a
//! Distributed INSERT places each row on the shard its key and the weights say, both replicas of a
//! shard converge (a killed and restarted one too), the Distributed table reads everything, and
//! the per-node views (processes, KILL QUERY, uptime, events) are per node.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::{Duration, Instant};

use common::ClickHouseServer;
use common::cluster::ClickHouseCluster;
use serde_json::Value;

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
        common::http()
            .post(format!("{}/?query_id=long", busy.url))
            .body("SELECT count() FROM numbers(100000000000)")
            .send(),
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
