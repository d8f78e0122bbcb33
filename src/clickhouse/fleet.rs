//! `migrate` and `drain` across every node of a cluster, each finding named by its node.
//!
//! Each node gets the single-node layout — a local Buffer in front of a local destination —
//! with the destination a ReplicatedMergeTree when a shard has several replicas, and beside
//! them a Distributed table over the destinations for reads (never for writes: a Buffer over
//! a Distributed table loses and duplicates rows). With ZooKeeper and a named cluster the DDL
//! runs once `ON CLUSTER`; otherwise (and on 18.x, whose DDL worker drops the setting its
//! LowCardinality DDL needs) node by node, the same statements.

use super::migrate::{self, MigrateError, Report};
use super::{Capabilities, ClickHouse, ClickHouseError, quote_str};
use crate::config::{Config, Topology};
use crate::schema::quote_ident;

/// Where a replicated destination keeps its parts' log in ZooKeeper; `{shard}` and
/// `{replica}` are each server's macros.
pub const REPLICA_PATH: &str = "/clickhouse/tables/{shard}/{database}/{table}";

/// The topology `clickhouse_url` and `clickhouse_cluster` describe: the cluster read from
/// `system.clusters` of the first listed node that answers. `MigrateError::Topology` when the
/// configuration and the cluster disagree; a ClickHouse error when no node answered.
pub async fn resolve(config: &Config) -> Result<Topology, MigrateError> {
    let listed = Topology::parse(&config.clickhouse.clickhouse_url).map_err(MigrateError::Topology)?;
    let cluster = config.clickhouse.clickhouse_cluster.trim();
    if cluster.is_empty() {
        return Ok(listed);
    }
    let mut unanswered = ClickHouseError::Protocol("no ClickHouse node configured".into());
    for (_, _, url) in listed.each() {
        match ClickHouse::for_url(config, url).cluster_rows(cluster).await {
            Ok(rows) => return listed.clone().with_cluster(&rows).map_err(MigrateError::Topology),
            Err(error) => {
                tracing::warn!(%error, node = %crate::config::redacted(url), cluster, "cannot read the cluster from system.clusters");
                unanswered = error;
            }
        }
    }
    Err(unanswered.into())
}

/// The table reads go through (`distributed_table`, or the destination's name + `_all`).
pub fn distributed_table(config: &Config) -> String {
    config.distributed_table()
}

/// The destination's engine: replicated when a shard has several replicas.
fn destination_engine(config: &Config, replicated: bool) -> String {
    if !replicated {
        return "MergeTree()".into();
    }
    let path =
        REPLICA_PATH.replace("{database}", &config.table.database).replace("{table}", &config.table.destination_table);
    format!("ReplicatedMergeTree({}, '{{replica}}')", quote_str(&path))
}

/// `ON CLUSTER c` when the DDL runs once for every node.
fn on(cluster: Option<&str>) -> String {
    cluster.map(|c| format!(" ON CLUSTER {}", quote_ident(c))).unwrap_or_default()
}

/// The Distributed table's DDL (reads only).
pub fn distributed_ddl(config: &Config, cluster: &str, on_cluster: bool) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{all}{on} AS {db}.{destination} ENGINE = Distributed({cluster}, {db_str}, {destination_str}, {key})",
        db = quote_ident(&config.table.database),
        all = quote_ident(&distributed_table(config)),
        on = on(on_cluster.then_some(cluster)),
        destination = quote_ident(&config.table.destination_table),
        cluster = quote_ident(cluster),
        db_str = quote_str(&config.table.database),
        destination_str = quote_str(&config.table.destination_table),
        key = config.sharding().to_sql(),
    )
}

/// Migrates every node: creates what is missing (once `ON CLUSTER` where it can), then checks
/// each node as a single node is checked.
pub async fn migrate_all(config: &Config, topology: &Topology) -> Result<Report, MigrateError> {
    if topology.nodes() == 1 {
        return migrate::migrate(&ClickHouse::new(config), config).await;
    }
    let first = ClickHouse::new(config);
    let caps = first.capabilities().await?;
    let replicated = topology.shards.iter().any(|s| s.replicas.len() > 1);
    let cluster = Some(config.clickhouse.clickhouse_cluster.trim()).filter(|c| !c.is_empty());
    let zookeeper = has_zookeeper(&first).await?;
    if replicated && !zookeeper {
        return Err(MigrateError::Topology(
            "a shard lists several replicas: their ReplicatedMergeTree needs ZooKeeper (or Keeper) on the servers"
                .into(),
        ));
    }
    let mut report = Report::default();
    report.lines.push(format!(
        "ClickHouse {} on {} nodes, {} shards",
        caps.version,
        topology.nodes(),
        topology.shards.len()
    ));
    if replicated {
        for (_, _, url) in topology.each() {
            check_macros(&node(config, url, &caps), url).await?;
        }
    }
    let engine = destination_engine(config, replicated);
    // 18.x's DDL worker runs ON CLUSTER statements without the query's settings, and its
    // LowCardinality DDL needs one: there, node by node.
    if cluster.is_some() && zookeeper && caps.low_cardinality_needs_setting {
        report.lines.push(
            "ClickHouse 18.x: the tables are created node by node (ON CLUSTER would drop the LowCardinality setting)"
                .into(),
        );
    }
    match cluster.filter(|_| zookeeper && !caps.low_cardinality_needs_setting) {
        Some(cluster) => {
            create(&node(config, topology.first(), &caps), config, &caps, &engine, Some(cluster)).await?;
            report.lines.push(format!("created the tables ON CLUSTER {cluster} (destination ENGINE = {engine})"));
        }
        None => {
            for (_, _, url) in topology.each() {
                create(&node(config, url, &caps), config, &caps, &engine, None).await?;
                report.lines.push(format!("{url}: created the tables (destination ENGINE = {engine})"));
            }
        }
    }
    for (_, _, url) in topology.each() {
        let single = migrate::migrate(&ClickHouse::for_url(config, url), config)
            .await
            .map_err(|e| MigrateError::OnNode { node: url.to_string(), error: Box::new(e) })?;
        report.lines.extend(single.lines.into_iter().skip(1).map(|line| format!("{url}: {line}")));
    }
    Ok(report)
}

/// A node's client, with the setting 18.x needs for LowCardinality DDL.
fn node(config: &Config, url: &str, caps: &Capabilities) -> ClickHouse {
    let ch = ClickHouse::for_url(config, url);
    if caps.low_cardinality_needs_setting {
        ch.with_setting("allow_experimental_low_cardinality_type", "1")
    } else {
        ch
    }
}

/// The database, the destination, the Buffer and (with a cluster) the Distributed table.
async fn create(
    ch: &ClickHouse,
    config: &Config,
    caps: &Capabilities,
    engine: &str,
    cluster: Option<&str>,
) -> Result<(), ClickHouseError> {
    for statement in statements(config, caps, engine, cluster) {
        ch.execute(&statement).await?;
    }
    Ok(())
}

/// The DDL [`create`] runs, `ON CLUSTER cluster` in each when given (run once for every node).
pub fn statements(config: &Config, caps: &Capabilities, engine: &str, cluster: Option<&str>) -> Vec<String> {
    let db = quote_ident(&config.table.database);
    let named = |table: &str| format!("{db}.{}", quote_ident(table));
    let mut out = vec![format!("CREATE DATABASE IF NOT EXISTS {db}{}", on(cluster))];
    let destination = named(&config.table.destination_table);
    // A named stream's destination is the user's own table, on every node already.
    if config.stream.is_default() {
        out.push(
            migrate::destination_ddl(config, caps)
                .replacen(&destination, &format!("{destination}{}", on(cluster)), 1)
                .replace("ENGINE = MergeTree()", &format!("ENGINE = {engine}")),
        );
    }
    let buffer = named(&config.table.buffer_table);
    out.push(migrate::buffer_ddl(config).replacen(&format!("{buffer} AS"), &format!("{buffer}{} AS", on(cluster)), 1));
    if let Some(name) = Some(config.clickhouse.clickhouse_cluster.trim()).filter(|c| !c.is_empty()) {
        out.push(distributed_ddl(config, name, cluster.is_some()));
    }
    out
}

/// Whether the server has ZooKeeper (or Keeper) configured.
async fn has_zookeeper(ch: &ClickHouse) -> Result<bool, ClickHouseError> {
    match ch.execute("SELECT name FROM system.zookeeper WHERE path = '/' LIMIT 1").await {
        Ok(()) => Ok(true),
        Err(ClickHouseError::Server { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Replicated tables name their shard and replica through the `{shard}` and `{replica}` macros.
async fn check_macros(ch: &ClickHouse, url: &str) -> Result<(), MigrateError> {
    #[derive(serde::Deserialize)]
    struct Row {
        #[serde(rename = "macro")]
        name: String,
    }
    let rows: Vec<Row> = ch.fetch_json("SELECT macro FROM system.macros").await?;
    let has = |m: &str| rows.iter().any(|r| r.name == m);
    if has("shard") && has("replica") {
        return Ok(());
    }
    Err(MigrateError::Topology(format!(
        "{url} has no {{shard}} and {{replica}} macros (<macros> in its configuration): its replicated table cannot be named"
    )))
}

/// Drains every node's Buffer; each node's outcome, in order.
pub async fn drain_all(config: &Config, topology: &Topology) -> Vec<(String, Result<u64, super::drain::DrainError>)> {
    let drains = topology.each().map(|(_, _, url)| async move {
        (url.to_string(), super::drain::drain(&ClickHouse::for_url(config, url), config).await)
    });
    futures_util::future::join_all(drains).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ddl() {
        let config = {
            let mut config = Config::default();
            config.clickhouse.clickhouse_cluster = "bg".into();
            config.clickhouse.sharding_key = "cityHash64(user_id)".into();
            config
        };
        assert_eq!(
            distributed_ddl(&config, "bg", true),
            "CREATE TABLE IF NOT EXISTS `analytics`.`events_raw_all` ON CLUSTER `bg` AS `analytics`.`events_raw` \
             ENGINE = Distributed(`bg`, 'analytics', 'events_raw', cityHash64(`user_id`))"
        );
        assert_eq!(
            destination_engine(&config, true),
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/analytics/events_raw', '{replica}')"
        );
        assert_eq!(destination_engine(&config, false), "MergeTree()");
    }

    #[test]
    fn on_cluster_ddl_names_the_cluster_in_every_statement() {
        let config = {
            let mut config = Config::default();
            config.clickhouse.clickhouse_cluster = "bg".into();
            config
        };
        let engine = destination_engine(&config, true);
        let ddl = statements(&config, &Capabilities::modern(), &engine, Some("bg"));
        assert_eq!(ddl.len(), 4);
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `analytics` ON CLUSTER `bg`");
        assert!(
            ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `analytics`.`events_raw` ON CLUSTER `bg`\n("),
            "{}",
            ddl[1]
        );
        assert!(ddl[1].contains(&format!("ENGINE = {engine}\nPARTITION BY")), "{}", ddl[1]);
        assert!(
            ddl[2].starts_with("CREATE TABLE IF NOT EXISTS `analytics`.`events_buffer` ON CLUSTER `bg` AS `analytics`.`events_raw` ENGINE = Buffer("),
            "{}",
            ddl[2]
        );
        assert!(ddl[3].contains("`events_raw_all` ON CLUSTER `bg` AS"), "{}", ddl[3]);
        // Node by node: the same statements without the clause.
        let each = statements(&config, &Capabilities::modern(), "MergeTree()", None);
        assert!(each.iter().all(|s| !s.contains("ON CLUSTER")), "{each:?}");
    }
}
