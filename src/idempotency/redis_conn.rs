//! The connection to Redis: one primary (a connection manager that reconnects by itself) or a
//! Redis Cluster (the crate's cluster client, which follows slot moves, rebuilt from the seeds
//! after a failover: see [`Cluster`]), behind one type the store's calls are written against,
//! and `WAIT` on the node that took a write.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::{Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::StoreError;
use super::groups::key_slot;

/// What `redis_url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One primary: `redis://`, `rediss://`, `unix://`.
    Single(String),
    /// `redis+cluster://[user:password@]h1:p1,h2:p2` (`rediss+cluster://` for TLS): the seed
    /// nodes, each as a plain node URL.
    Cluster(Vec<String>),
}

/// Reads `redis_url`. Sentinel is refused: it names a primary the crate would have to follow.
pub fn topology(url: &str) -> Result<Topology, StoreError> {
    // Errors quote the URL without its credentials, and never a URL that has no scheme (it
    // may begin with them).
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(StoreError::Config(
            "redis_url has no scheme: use redis://host:6379/0 for one primary or redis+cluster://host1:6379,host2:6379 for a Redis Cluster"
                .into(),
        ));
    };
    let node_scheme = match scheme {
        "redis" | "rediss" | "unix" | "redis+unix" if !url.contains(',') => return Ok(Topology::Single(url.into())),
        "redis" | "rediss" => {
            return Err(StoreError::Config(format!(
                "redis_url lists several hosts: for a Redis Cluster write {scheme}+cluster://{}",
                crate::config::redacted(url).split_once("://").map_or("", |(_, rest)| rest)
            )));
        }
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        other => {
            return Err(StoreError::Config(format!(
                "unsupported Redis URL scheme {other:?} (Sentinel is not supported): use redis://host:6379/0 for one \
                 primary or redis+cluster://host1:6379,host2:6379 for a Redis Cluster"
            )));
        }
    };
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
    let seeds: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|host| format!("{node_scheme}://{credentials}{host}"))
        .collect();
    if seeds.is_empty() {
        return Err(StoreError::Config(format!("{scheme} URL names no node: {scheme}://host1:6379,host2:6379")));
    }
    Ok(Topology::Cluster(seeds))
}

/// A node to read server facts from: the primary, or a cluster's first seed.
pub fn first_node(url: &str) -> Result<String, StoreError> {
    match topology(url)? {
        Topology::Single(url) => Ok(url),
        Topology::Cluster(seeds) => seeds.into_iter().next().ok_or_else(|| StoreError::Config("no seed".into())),
    }
}

/// A client whose TCP connections set `TCP_NODELAY` (the crate leaves Nagle's algorithm on).
/// Every call shares one multiplexed connection (per node), so commands are routinely written
/// while an earlier one is unacknowledged; Nagle would hold such a write back until the ACK, a
/// round trip on a real network.
pub fn client(url: &str) -> Result<Client, StoreError> {
    let info = url.into_connection_info().map_err(|e| StoreError::Config(e.to_string()))?.set_tcp_settings(nodelay());
    Client::open(info).map_err(|e| StoreError::Config(e.to_string()))
}

fn nodelay() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// The connection every store call clones (both kinds are multiplexed and cheap to clone).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A cluster connection, replaced by a fresh one from the seeds when a call fails in a way a
/// failover explains: the crate refreshes its slot map on `MOVED`, but after a connection error
/// it reconnects to the same address, and a killed primary that comes back as a replica would
/// be sent every write of its old slots (`READONLY`) for good.
pub struct Cluster {
    client: ClusterClient,
    config: ClusterConfig,
    current: ArcSwap<ClusterConnection>,
    rebuilt: Mutex<Instant>,
    /// Bound of one call, a little inside the store's own so that a stuck call is seen here.
    timeout: Duration,
}

/// Rebuilds are at most this often, however many calls fail at once.
const REBUILD_EVERY: Duration = Duration::from_millis(500);

/// The failures after which the slot map may be stale.
fn stale_topology(error: &RedisError) -> bool {
    matches!(error.code(), Some("READONLY" | "CLUSTERDOWN" | "MASTERDOWN" | "TRYAGAIN"))
        || error.detail().is_some_and(|detail| detail.contains("replica instances"))
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
}

impl Cluster {
    fn connection(&self) -> ClusterConnection {
        ClusterConnection::clone(&self.current.load())
    }

    fn recover(&self, error: &RedisError) {
        if !stale_topology(error) {
            return;
        }
        let mut rebuilt = self.rebuilt.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if rebuilt.elapsed() < REBUILD_EVERY {
            return;
        }
        *rebuilt = Instant::now();
        tracing::info!(%error, "rebuilding the Redis Cluster connection from the seed nodes");
        self.current.store(Arc::new(self.client.get_pending_async_connection_with_config(self.config.clone())));
    }

    /// Runs `call` on the current connection, bounded; a failure that may mean a failover
    /// rebuilds the connection for the calls after it.
    async fn run<T>(&self, call: impl AsyncFnOnce(ClusterConnection) -> RedisResult<T>) -> RedisResult<T> {
        let result = match tokio::time::timeout(self.timeout, call(self.connection())).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        };
        if let Err(error) = &result {
            self.recover(error);
        }
        result
    }
}

impl Connection {
    /// Connects lazily: the gateway starts even when Redis is down, and reconnects by itself.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let config = |e: RedisError| StoreError::Config(e.to_string());
        match topology(url)? {
            Topology::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2));
                let manager = ConnectionManager::new_lazy_with_config(client(&url)?, config)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                Ok(Self::Single(manager))
            }
            Topology::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds).tcp_settings(nodelay()).build().map_err(config)?;
                let config = ClusterConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout);
                let current = ArcSwap::from_pointee(client.get_pending_async_connection_with_config(config.clone()));
                let rebuilt = Mutex::new(Instant::now());
                Ok(Self::Cluster(Arc::new(Cluster { client, config, current, rebuilt, timeout: timeout * 9 / 10 })))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// `WAIT replicas timeout` on the primary that holds `key`, after the writes sent to it on
    /// this connection: how many replicas acknowledged them.
    pub async fn wait(&mut self, key: &[u8], replicas: u32, timeout: Duration) -> RedisResult<u32> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        let acked = Box::pin(self.on_primary_of(key, cmd)).await?;
        redis::from_redis_value(acked).map_err(|e| RedisError::from((redis::ErrorKind::Parse, "WAIT", e.to_string())))
    }

    /// `INFO server stats replication` of the primary that holds `key`.
    pub async fn info_of(&mut self, key: &[u8]) -> RedisResult<String> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server").arg("stats").arg("replication");
        let info = Box::pin(self.on_primary_of(key, cmd)).await?;
        redis::from_redis_value(info).map_err(|e| RedisError::from((redis::ErrorKind::Parse, "INFO", e.to_string())))
    }

    /// Runs `cmd` on the primary that holds `key`: the one primary, or on a cluster the
    /// primary of the key's slot (a command without keys would go to any node).
    ///
    /// Its callers box it: the cluster's routed command is a future of over a kilobyte, and
    /// every async layer that takes a future by value doubles what it holds; inline, it made
    /// each idempotency call's future ~9 KB and the ingestion handler's ~11 KB, copied into a
    /// box on every request.
    async fn on_primary_of(&mut self, key: &[u8], cmd: Cmd) -> RedisResult<Value> {
        match self {
            Self::Single(manager) => cmd.query_async(manager).await,
            Self::Cluster(cluster) => {
                let route = Route::new(key_slot(key), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                cluster
                    .run(async |mut c| match c.route_command(cmd, routing).await? {
                        // A refusal (sent to a node that has become a replica) as an error, so
                        // that it rebuilds a stale slot map.
                        Value::ServerError(refusal) => Err(refusal.into()),
                        value => Ok(value),
                    })
                    .await
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => Box::pin(c.run(async |mut c| c.req_packed_command(cmd).await)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => Box::pin(c.run(async move |mut c| c.req_packed_commands(cmd, offset, count).await)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.connection().get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_quote_credentials() {
        for url in ["redis://user:s3cret@a:6379,b:6379", "user:s3cret@a:6379", "sentinel://user:s3cret@a:26379"] {
            let Err(error) = topology(url) else { panic!("{url} is refused") };
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn urls_name_one_primary_or_a_cluster() {
        let single = |u: &str| Topology::Single(u.into());
        assert_eq!(topology("redis://127.0.0.1:6379/0").unwrap(), single("redis://127.0.0.1:6379/0"));
        assert_eq!(topology("unix:///run/redis.sock").unwrap(), single("unix:///run/redis.sock"));
        assert_eq!(
            topology("redis+cluster://a:7000,b:7001").unwrap(),
            Topology::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(
            topology("rediss+cluster://u:p@a:7000, b:7001/").unwrap(),
            Topology::Cluster(vec!["rediss://u:p@a:7000".into(), "rediss://u:p@b:7001".into()])
        );
        for bad in ["redis+sentinel://h:26379/mymaster", "redis://a:6379,b:6379", "redis+cluster://"] {
            assert!(matches!(topology(bad), Err(StoreError::Config(_))), "{bad}");
        }
        assert_eq!(first_node("redis+cluster://a:1,b:2").unwrap(), "redis://a:1");
    }

    #[test]
    fn connections_turn_nagle_off() {
        for url in ["redis://127.0.0.1:6379/0", "rediss://redis.example:6380/1"] {
            let client = client(url).unwrap();
            assert!(client.get_connection_info().tcp_settings().nodelay(), "{url}");
        }
    }
}
