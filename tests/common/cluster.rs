//! A ClickHouse cluster on loopback: one ZooKeeper and shards × replicas clickhouse-servers, each
//! on free ports with a data directory of its own, stopped by pid. Every node knows the cluster
//! as `bg` (`remote_servers`, `internal_replication`, a weight per shard), its own `{shard}` and
//! `{replica}` macros, ZooKeeper for ReplicatedMergeTree and `ON CLUSTER`, and an interserver
//! port from which its shard's other replicas fetch parts.
//!
//! What ClickHouse 18.16 does with such a cluster, as found on it:
//! - There is no `optimize_skip_unused_shards` (nor any `%skip_unused%` setting): a query naming
//!   it fails with "Unknown setting" (code 115). A Distributed SELECT asks every shard.
//! - A Distributed INSERT places a row on the shard whose weight range holds
//!   `sharding_key % sum(weights)`, ranges laid out in config order: with weights 1 and 2, shard 1
//!   takes remainder 0 and shard 2 remainders 1 and 2 ([`ClickHouseCluster::shard_of`]). The
//!   INSERT is asynchronous: rows reach remote shards from a background queue, unless
//!   `insert_distributed_sync = 1`. With `internal_replication` a shard gets each row once, its
//!   other replicas then fetching the part.
//! - `system.clusters` has a row per replica (`cluster, shard_num, shard_weight, replica_num,
//!   host_name, host_address, port, is_local, user, default_database`); `is_local` is per shard: 1
//!   on both replicas' rows when this node is one of them.
//! - `system.processes`, `KILL QUERY … SYNC`, `uptime()` and `system.events` are per node.
//! - A replica SIGKILLed and started again before its ZooKeeper session expired finds itself
//!   "already active" and retries every 10 s; so nodes use a short session timeout and
//!   `restart()` after `kill()` first waits it out.
//! - `ON CLUSTER` waits for every node; with one down it waits `distributed_ddl_task_timeout`
//!   (180 s by default; a setting of the query, not of the statement), so [`ClickHouseCluster::ddl`]
//!   lowers it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{ClickHouseServer, Process, free_port, scratch, sweep_stale_scratch};

/// The cluster's name in every node's `remote_servers`.
pub const CLUSTER: &str = "bg";

/// ClickHouse's ZooKeeper session timeout (30 s by default). A SIGKILLed node's session, and
/// with it its replicas' `is_active` znodes, lives this long; a node started again before that
/// finds its replicas "already active" and 18.16 retries only every 10 s. Short, so a restart
/// waits little ([`RESTART_GRACE`]); long enough that a busy 2-core machine keeps sessions alive.
const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

/// How long after a kill a node's restart waits: the session timeout, plus ZooKeeper's expiry
/// granularity (a tick, 500 ms) and some margin.
const RESTART_GRACE: Duration = Duration::from_millis(5_000);

/// A private ZooKeeper (standalone, no admin server), killed by pid when dropped.
#[derive(Debug)]
pub struct ZooKeeper {
    pub port: u16,
    pub dir: PathBuf,
    process: Process,
}

impl ZooKeeper {
    pub fn start(name: &str) -> ZooKeeper {
        sweep_stale_scratch();
        ZooKeeper::start_in(&scratch(name))
    }

    /// A ZooKeeper whose files live in `dir`.
    fn start_in(dir: &Path) -> ZooKeeper {
        std::fs::create_dir_all(dir.join("data")).expect("zookeeper dir");
        for _attempt in 0..3 {
            let port = free_port();
            let config = dir.join("zoo.cfg");
            // A short tick bounds session timeouts (at most 20 ticks): a killed node's ephemeral
            // znodes go within seconds. forceSync=no: the tests' data is scratch, fsync only slows.
            let text = format!(
                "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=srvr\nforceSync=no\nmaxClientCnxns=0\n",
                dir.join("data").display()
            );
            std::fs::write(&config, text).expect("zoo.cfg");
            // The Debian jar's manifest brings its dependencies; slf4j-simple logs warnings to the
            // log file. Run in the foreground so the process is ours to kill.
            let mut cmd = Command::new("java");
            cmd.args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
                .args(["-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-Dzookeeper.jmx.log4j.disable=true"])
                .args(["-cp", "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar"])
                .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                .arg(&config);
            let process = Process::spawn(cmd, &dir.join("zookeeper.log"));
            if wait_serving(port, &process) {
                return ZooKeeper { port, dir: dir.to_path_buf(), process };
            }
        }
        panic!("zookeeper did not start; see {}", dir.display());
    }
}

/// Waits until ZooKeeper on `port` answers `srvr` with its mode (it is serving, not just bound).
fn wait_serving(port: u16, process: &Process) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && process.is_alive() {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            // Asked too early, ZooKeeper may fail to close the socket: never wait long on it.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let mut answer = String::new();
            let _ = stream.write_all(b"srvr");
            let _ = stream.read_to_string(&mut answer);
            if answer.contains("Mode:") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Ports a node is started on, chosen before any node starts: every node's `remote_servers`
/// lists all TCP ports.
#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    tcp: u16,
    interserver: u16,
}

/// A sharded, replicated ClickHouse cluster named `bg`. Shards and replicas are numbered from 0
/// here; the `{shard}` macro and `system.clusters`' `shard_num` count from 1.
#[derive(Debug)]
pub struct ClickHouseCluster {
    /// `shards[s][r]`: replica `r` of shard `s`.
    shards: Vec<Vec<ClickHouseServer>>,
    weights: Vec<u64>,
    /// Declared last, so dropped last: the nodes stop before their ZooKeeper does.
    zookeeper: ZooKeeper,
}

impl ClickHouseCluster {
    /// `shards` shards of weight 1, each with `replicas` replicas.
    pub fn start(name: &str, shards: usize, replicas: usize) -> ClickHouseCluster {
        ClickHouseCluster::start_weighted(name, &vec![1; shards], replicas)
    }

    /// One shard per weight, in this order, each with `replicas` replicas. The servers start in
    /// parallel: one at a time, a 2×2 cluster would take four server start-ups.
    pub fn start_weighted(name: &str, weights: &[u64], replicas: usize) -> ClickHouseCluster {
        assert!(!weights.is_empty() && replicas > 0, "a cluster has a shard and a replica");
        sweep_stale_scratch();
        let dir = scratch(name);
        let zookeeper = ZooKeeper::start_in(&dir.join("zookeeper"));
        let ports: Vec<Vec<Ports>> = weights
            .iter()
            .map(|_| {
                (0..replicas).map(|_| Ports { http: free_port(), tcp: free_port(), interserver: free_port() }).collect()
            })
            .collect();
        let remote_servers = remote_servers(weights, &ports);
        let zk = zookeeper.port;
        let (dir, remote_servers) = (&dir, &remote_servers);
        let shards = std::thread::scope(|scope| {
            let starting: Vec<_> = (ports.iter().enumerate())
                .flat_map(|(s, shard)| shard.iter().enumerate().map(move |(r, &node)| (s, r, node)))
                .map(|(s, r, node)| scope.spawn(move || start_node(dir, zk, s, r, node, remote_servers)))
                .collect();
            let mut nodes = starting.into_iter().map(|node| node.join().expect("node start"));
            weights.iter().map(|_| nodes.by_ref().take(replicas).collect()).collect()
        });
        ClickHouseCluster { shards, weights: weights.to_vec(), zookeeper }
    }

    /// Every node, shard by shard.
    pub fn nodes(&self) -> impl Iterator<Item = &ClickHouseServer> {
        self.shards.iter().flatten()
    }

    /// Replica `replica` of shard `shard`, both from 0.
    pub fn node(&self, shard: usize, replica: usize) -> &ClickHouseServer {
        &self.shards[shard][replica]
    }

    /// The replicas of shard `shard` (from 0).
    pub fn shard(&self, shard: usize) -> &[ClickHouseServer] {
        &self.shards[shard]
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn weights(&self) -> &[u64] {
        &self.weights
    }

    /// The gateway's URL list: shards separated by `;`, a shard's replicas by `,`.
    pub fn urls_spec(&self) -> String {
        let shard = |nodes: &Vec<ClickHouseServer>| nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(",");
        self.shards.iter().map(shard).collect::<Vec<_>>().join(";")
    }

    pub fn cluster_name(&self) -> &'static str {
        CLUSTER
    }

    pub fn zookeeper(&self) -> &ZooKeeper {
        &self.zookeeper
    }

    /// The shard (from 0) a Distributed table places a row on whose sharding expression is
    /// `value`: the one whose weight range holds `value % sum(weights)`, in config order.
    pub fn shard_of(&self, value: u64) -> usize {
        let mut rest = value % self.weights.iter().sum::<u64>();
        for (shard, &weight) in self.weights.iter().enumerate() {
            if rest < weight {
                return shard;
            }
            rest -= weight;
        }
        unreachable!("the remainder is below the sum of the weights")
    }

    /// Runs an `ON CLUSTER` statement from the first node, waiting at most 30 s for every node
    /// to apply it (not 180 s, the default) so a node that is down fails the test soon.
    pub async fn ddl(&self, sql: &str) {
        let node = self.node(0, 0);
        if let Err(e) = node.try_exec_with(sql, &[("distributed_ddl_task_timeout", "30")]).await {
            panic!("{sql}\n→ {e}");
        }
    }
}

/// Starts replica `replica` of shard `shard`, its files under `dir`. A second try keeps the
/// ports: every node's configuration names them.
fn start_node(
    dir: &Path,
    zookeeper: u16,
    shard: usize,
    replica: usize,
    ports: Ports,
    remote: &str,
) -> ClickHouseServer {
    let name = replica_name(shard, replica);
    let node_dir = dir.join(&name);
    let config = dir.join(format!("{name}.xml"));
    std::fs::write(&config, node_config(zookeeper, shard, replica, ports.interserver, remote)).expect("node config");
    for _attempt in 0..2 {
        if let Some(mut server) = ClickHouseServer::launch(&node_dir, ports.http, ports.tcp, Some(config.clone())) {
            server.restart_grace = RESTART_GRACE;
            return server;
        }
    }
    let logs = ["stdout.log", "log/server.err.log"].map(|log| tail(&node_dir.join(log), 20)).join("\n");
    panic!("cluster node {name} did not start; see {}:\n{logs}", node_dir.display());
}

/// The last `lines` lines of a log, for a failure message that explains itself in CI.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text.lines().rev().take(lines).collect();
    format!("--- {}\n{}", path.display(), kept.into_iter().rev().collect::<Vec<_>>().join("\n"))
}

/// `s1r1`, `s1r2`, …: a replica's name in the `{replica}` macro and its directory, unique in the
/// cluster (ZooKeeper needs it unique only within its shard).
fn replica_name(shard: usize, replica: usize) -> String {
    format!("s{}r{}", shard + 1, replica + 1)
}

/// The `remote_servers` section every node shares.
fn remote_servers(weights: &[u64], ports: &[Vec<Ports>]) -> String {
    let mut xml = format!("<remote_servers><{CLUSTER}>");
    for (weight, shard) in weights.iter().zip(ports) {
        // internal_replication: a Distributed INSERT writes each row to one replica of its shard
        // and ReplicatedMergeTree copies it, rather than Distributed writing every replica.
        xml.push_str(&format!("<shard><weight>{weight}</weight><internal_replication>true</internal_replication>"));
        for node in shard {
            xml.push_str(&format!("<replica><host>127.0.0.1</host><port>{}</port></replica>", node.tcp));
        }
        xml.push_str("</shard>");
    }
    xml.push_str(&format!("</{CLUSTER}></remote_servers>"));
    xml
}

/// A node's config.d file: ZooKeeper, its macros, the cluster, the interserver port replicas fetch
/// parts from, and the queue `ON CLUSTER` statements go through.
fn node_config(zookeeper: u16, shard: usize, replica: usize, interserver: u16, remote_servers: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<yandex>
    <zookeeper>
        <node><host>127.0.0.1</host><port>{zookeeper}</port></node>
        <session_timeout_ms>{}</session_timeout_ms>
    </zookeeper>
    <macros><shard>{}</shard><replica>{}</replica></macros>
    {remote_servers}
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>{interserver}</interserver_http_port>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
</yandex>
"#,
        SESSION_TIMEOUT.as_millis(),
        shard + 1,
        replica_name(shard, replica)
    )
}
