//! Wires configuration → state → router and runs the gateway until shutdown, then drains:
//! readiness turns 503, the listener stops accepting, in-flight requests get their answers,
//! every queued row is flushed, and only then does `run` return.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{AdminToken, ApiKeys, AuthError};
use crate::clickhouse::ClickHouse;
use crate::clickhouse::breaker::Breaker;
use crate::clickhouse::fleet;
use crate::clickhouse::migrate::MigrateError;
use crate::clickhouse::refresh::Refresher;
use crate::clickhouse::writer::Writer;
use crate::cluster::{Replica, Shards};
use crate::coalesce::{Coalescer, CoalescerTasks};
use crate::config::Config;
use crate::config::Topology;
use crate::health::Health;
use crate::http;
use crate::http::state::AppState;
use crate::idempotency::{Idempotency, StoreError};
use crate::ingest::{Parts, Pipeline};
use crate::journal::{Journal, Receipts, WalError};
use crate::kafka::{self, KafkaError};
use crate::metrics;
use crate::schema::SharedSchema;
use crate::schema::sharding::Placement;
use crate::shed::ShedState;
use crate::shed::budget::Budget;
use crate::shed::poller::Poller;
use crate::shutdown::Shutdown;
use crate::streams::{Stream, Streams};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the journal cannot be opened: {0}")]
    Journal(#[from] WalError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: clickhouse_url / clickhouse_cluster: {0}")]
    Topology(String),
}

/// What the process runs besides the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: the HTTP gateway.
    Serve,
    /// `consume`: the HTTP gateway and the Kafka consumer (`kafka_*` settings).
    Consume,
}

/// Binds `config.listen` and runs until `shutdown` trips.
pub async fn serve(config: Config, shutdown: Shutdown, role: Role) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: config.http.listen, source })?;
    run_as(config, listener, shutdown, role).await
}

/// Runs the gateway on an already bound listener (tests bind port 0).
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), ServeError> {
    run_as(config, listener, shutdown, Role::Serve).await
}

/// Runs the gateway, with the Kafka consumer when `role` says so.
pub async fn run_as(config: Config, listener: TcpListener, shutdown: Shutdown, role: Role) -> Result<(), ServeError> {
    // Before any task records a metric.
    let metrics = metrics::install();
    let config = Arc::new(config);
    let Some(topology) = topology(&config, &shutdown).await? else { return Ok(()) };
    refuse_removed_streams(&config).await?;
    let api_keys = ApiKeys::from_config(&config)?;
    if api_keys.enabled() {
        tracing::info!(keys = api_keys.len(), "producer API keys required");
    } else {
        tracing::warn!("no API keys configured: producer authentication is off");
    }
    if !config.journal_enabled() {
        tracing::warn!(
            "the journal is off: a 200 means the rows reached the Buffer's memory, not that they survive it"
        );
    }
    // One in-flight budget for every stream: it bounds the process's memory.
    let budget = Budget::new(config.http.max_inflight_bytes);
    let mut running = Vec::new();
    let mut streams = Vec::new();
    let configs = config.streams();
    let shared = configs.len() > 1;
    for stream_config in configs {
        let (stream, parts) = start_stream(stream_config, &topology, &budget, shared).await?;
        streams.push(Arc::new(stream));
        running.push(parts);
    }
    let streams = Arc::new(Streams::new(streams));
    let admin = AdminToken::new(&config.auth.admin_token);
    // One consumer per stream that topics write to, each in its own group.
    let mut fronts = Vec::new();
    if role == Role::Consume {
        for stream in streams.iter().filter(|s| !s.config.kafka_topics().is_empty()) {
            let front = kafka::Front::start(&stream.config, Arc::clone(&stream.ingest), Arc::clone(&stream.shed))?;
            fronts.push((stream.name.clone(), front));
        }
    }
    let kafka = fronts.iter().map(|(name, front)| (name.clone(), front.status())).collect();
    let state = Arc::new(AppState {
        config: Arc::clone(&config),
        streams: Arc::clone(&streams),
        api_keys,
        admin,
        metrics,
        kafka,
    });

    let local = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(
        listen = %local,
        streams = streams.len(),
        shards = topology.shards.len(),
        nodes = topology.nodes(),
        "buffergate serving"
    );
    let fronts: Vec<_> = fronts.into_iter().map(|(_, front)| stop_consuming(front, shutdown.clone())).collect();
    let stop_http =
        stop_accepting(shutdown, Arc::clone(&streams), Duration::from_millis(config.http.shutdown_delay_ms));
    http::conn::raise_open_files_limit(config.http.max_connections);
    let limits = http::conn::Limits {
        header_timeout: Duration::from_millis(config.http.header_timeout_ms),
        max_connections: config.http.max_connections,
    };
    http::conn::serve(listener, http::router(state), limits, stop_http).await;

    // The consumer commits what it delivered before the queues are drained under it.
    for front in fronts {
        let _ = front.await;
    }
    let within = Duration::from_millis(config.journal.shutdown_confirm_ms);
    futures_util::future::join_all(running.into_iter().map(|parts| parts.finish(within))).await;
    tracing::info!("drained; bye");
    Ok(())
}

/// A stream's tasks: its coalescers, its nodes' pollers and journals, its schema watcher.
struct Running {
    partitions: CoalescerTasks,
    nodes: Nodes,
    watchers: Watchers,
    /// The tasks of the stream's quarantine, stopped after the stream's own.
    quarantine: Option<Box<Running>>,
}

impl Running {
    /// Flushes what is queued, settles what the journals can within `within`, then stops.
    async fn finish(self, within: Duration) {
        self.partitions.finish().await;
        self.nodes.finish(within).await;
        self.watchers.stop().await;
        if let Some(quarantine) = self.quarantine {
            Box::pin(quarantine.finish(within)).await;
        }
    }
}

/// Starts one stream (`shared`: other streams share the servers): its schema watcher, its nodes (writers, breakers, journals, pollers),
/// its idempotency namespace, its coalescers.
async fn start_stream(
    config: Arc<Config>,
    topology: &Topology,
    budget: &Arc<Budget>,
    shared: bool,
) -> Result<(Stream, Running), ServeError> {
    // The quarantine first: the stream's pipeline parks rejected events through it.
    let (quarantine, quarantine_running) = match config.quarantine_stream() {
        Some(q) => {
            let (q, running) = Box::pin(start_stream(Arc::new(q), topology, budget, true)).await?;
            (Some(q.ingest), Some(Box::new(running)))
        }
        None => (None, None),
    };
    let health = Arc::new(Health::default());
    let schema = Arc::new(SharedSchema::default());
    let shed = Arc::new(ShedState::default());
    let wake = Arc::new(Notify::new());
    let watchers = Watchers::start(&config, topology, &schema, &health, &wake).await;
    let receipts = Arc::new(Receipts::default());
    let nodes = Nodes::open(&config, topology, &shed, &wake, &receipts, shared).await?;
    let idempotency = Arc::new(Idempotency::from_config(&config)?);
    // The store's epoch read (or written) before the first request, so that a first start is
    // not taken for a loss. Not cancelled when it takes longer (a check cut between groups
    // would leave some without an epoch); a Redis that does not answer leaves it suspect.
    let first = tokio::spawn({
        let idempotency = Arc::clone(&idempotency);
        async move { idempotency.check_store().await }
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), first).await;
    idempotency.watch();
    if idempotency.is_embedded() && config.stream.is_default() {
        tracing::warn!(
            "no redis_url: idempotency keys and producer offsets live in this process only; \
             run one replica, or configure BUFFERGATE_REDIS_URL"
        );
    }
    let shards = Arc::clone(&nodes.shards);
    let (coalescer, partitions) = Coalescer::start(&config, &shards, &idempotency);
    let ingest = Pipeline::new(Parts {
        config: Arc::clone(&config),
        schema,
        health,
        coalescer,
        shards,
        idempotency,
        budget: Arc::clone(budget),
        receipts,
        quarantine,
    });
    tracing::info!(
        stream = %config.stream,
        table = %format!("{}.{}", config.table.database, config.table.buffer_table),
        partitions = ingest.coalescer().partitions(),
        "stream started"
    );
    let policy = crate::shed::Policy::of(&config);
    let stream = Stream { name: config.stream.clone(), ingest: Arc::new(ingest), shed, policy, config };
    Ok((stream, Running { partitions, nodes, watchers, quarantine: quarantine_running }))
}

/// Refuses to start while the journal of a stream no longer configured, or of the quarantine
/// of a stream that no longer parks events, holds unconfirmed blocks: nothing else would ever
/// settle them.
async fn refuse_removed_streams(config: &Config) -> Result<(), ServeError> {
    if !config.journal_enabled() {
        return Ok(());
    }
    let dir = std::path::Path::new(&config.journal.data_dir).join("streams");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !config.streams.contains_key(&name) {
                let whose = format!("the stream {name:?}, which is no longer configured");
                refuse_leftover(config, &entry.path(), &whose).await?;
                refuse_leftover(config, &entry.path().join("quarantine"), &format!("the quarantine of {whose}"))
                    .await?;
            }
        }
    }
    for stream in config.streams() {
        if stream.quarantine_stream().is_none() {
            let dir = std::path::Path::new(&stream.journal.data_dir).join("quarantine");
            let whose =
                format!("the quarantine of the stream {:?}, which has quarantine = off", stream.stream.as_str());
            refuse_leftover(config, &dir, &whose).await?;
        }
    }
    Ok(())
}

/// Refuses when a journal under `dir` (its own, or a node's) holds unconfirmed blocks.
async fn refuse_leftover(config: &Config, dir: &std::path::Path, whose: &str) -> Result<(), ServeError> {
    let mut journals = vec![dir.join("journal")];
    if let Ok(nodes) = std::fs::read_dir(dir.join("nodes")) {
        journals.extend(nodes.flatten().map(|n| n.path().join("journal")));
    }
    for journal in journals {
        let blocks = crate::journal::leftover(config, journal.clone()).await?;
        if blocks > 0 {
            return Err(ServeError::Topology(format!(
                "{} holds {blocks} unconfirmed blocks of {whose}: configure it again until they are settled, \
                 or move the directory away to give them up",
                journal.display()
            )));
        }
    }
    Ok(())
}

/// The ClickHouse servers to write to: `clickhouse_url`, with the weights (or, given one URL,
/// the nodes) of `clickhouse_cluster` from `system.clusters`. Waits for the first server to
/// answer when a cluster is named (any listed node will do): placing rows by wrong weights
/// would put them where the Distributed table does not look. `None` if shutdown came first.
async fn topology(config: &Config, shutdown: &Shutdown) -> Result<Option<Topology>, ServeError> {
    loop {
        match fleet::resolve(config).await {
            Ok(topology) => {
                tracing::info!(shards = topology.shards.len(), weights = ?topology.weights(), "ClickHouse topology");
                return Ok(Some(topology));
            }
            Err(MigrateError::Topology(problem)) => return Err(ServeError::Topology(problem)),
            // No node answered (each is logged): asked again until one does.
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.triggered() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// The tasks that watch ClickHouse off the request path: the schema refresher (also the
/// readiness probe), asking the nodes in turn; each node's fill poller lives with the node.
struct Watchers {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watchers {
    async fn start(
        config: &Arc<Config>,
        topology: &Topology,
        schema: &Arc<SharedSchema>,
        health: &Arc<Health>,
        wake: &Arc<Notify>,
    ) -> Self {
        let refresher = Refresher {
            shards: topology.shards.len(),
            nodes: topology.each().map(|(_, _, url)| ClickHouse::for_url(config, url)).collect(),
            schema: Arc::clone(schema),
            health: Arc::clone(health),
            config: Arc::clone(config),
            wake: Arc::clone(wake),
        };
        // A first look before taking traffic; if ClickHouse is down the gateway still starts,
        // not ready, and keeps looking.
        refresher.refresh().await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(refresher.run(stop.clone()));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Every ClickHouse node with its machinery (writer, breaker, journal, poller), and the tasks
/// that run for them.
struct Nodes {
    shards: Arc<Shards>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The journals' confirmers, stopped (`confirmers_stop`) before the passes at shutdown so
    /// that no block is settled by two passes at once.
    confirmers: Vec<tokio::task::JoinHandle<()>>,
    confirmers_stop: CancellationToken,
}

impl Nodes {
    async fn open(
        config: &Arc<Config>,
        topology: &Topology,
        shed: &Arc<ShedState>,
        wake: &Arc<Notify>,
        receipts: &Arc<Receipts>,
        shared: bool,
    ) -> Result<Self, ServeError> {
        let single = topology.nodes() == 1;
        if !single && config.journal_enabled() {
            refuse_orphaned_journals(config, topology).await?;
        }
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut confirmers = Vec::new();
        let confirmers_stop = stop.child_token();
        let mut shards = vec![Vec::new(); topology.shards.len()];
        for (shard, _, url) in topology.each() {
            let node_config = if single {
                Arc::clone(config)
            } else {
                Arc::new(config.for_node(url, node_dir(&config.journal.data_dir, url), topology.nodes()))
            };
            // One node: its verdict is the gateway's. Several: each its own, summed below.
            let node_shed = if single { Arc::clone(shed) } else { Arc::new(ShedState::default()) };
            let siblings = topology.shards[shard].replicas.len() > 1;
            let replica = replica(&node_config, url, siblings, node_shed, wake, receipts).await?;
            let poller = Poller {
                ch: replica.ch.clone(),
                state: Arc::clone(&replica.shed),
                config: node_config,
                journal: replica.journal.clone(),
                shared,
            };
            tasks.push(tokio::spawn(poller.run(stop.clone())));
            if let Some(journal) = &replica.journal {
                confirmers.push(tokio::spawn(Arc::clone(journal).run(confirmers_stop.clone())));
            }
            shards[shard].push(Arc::new(replica));
        }
        let shards = Arc::new(Shards {
            shards,
            placement: Placement::new(&topology.weights()),
            policy: crate::shed::Policy::of(config),
        });
        if !single {
            let interval = Duration::from_millis(config.shed.shed_poll_interval_ms);
            tasks.push(tokio::spawn(summarize(Arc::clone(&shards), Arc::clone(shed), interval, stop.clone())));
        }
        Ok(Self { shards, stop, tasks, confirmers, confirmers_stop })
    }

    /// Settles what each journal can before exit, then stops the nodes' tasks.
    async fn finish(self, within: Duration) {
        // A confirmer stops between passes, within the same budget as what follows. One still
        // in a pass at the deadline (a silent server) is left to finish it rather than cut
        // off: a pass holds suspect blocks taken out of the ledger, and one kept only in memory
        // would be lost with it.
        let deadline = tokio::time::Instant::now() + within;
        self.confirmers_stop.cancel();
        let stopping = self.confirmers.into_iter().map(|confirmer| tokio::time::timeout_at(deadline, confirmer));
        futures_util::future::join_all(stopping).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let finishing = self.shards.replicas().filter_map(|r| r.journal.clone()).map(|d| async move {
            d.finish(left).await;
        });
        futures_util::future::join_all(finishing).await;
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Refuses to start while a journal holds blocks for a node the topology no longer has: the
/// single node's journal (`<data_dir>/journal`) of a gateway now given a cluster, or a node
/// taken out of `clickhouse_url`. Only that node can say whether their rows landed.
async fn refuse_orphaned_journals(config: &Config, topology: &Topology) -> Result<(), ServeError> {
    let data = std::path::Path::new(&config.journal.data_dir);
    let mut dirs = vec![data.join("journal")];
    let known: Vec<String> = topology.each().map(|(_, _, url)| node_dir(&config.journal.data_dir, url)).collect();
    if let Ok(entries) = std::fs::read_dir(data.join("nodes")) {
        dirs.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| !known.iter().any(|k| std::path::Path::new(k) == p))
                .map(|p| p.join("journal")),
        );
    }
    for dir in dirs {
        let blocks = crate::journal::leftover(config, dir.clone()).await?;
        if blocks > 0 {
            return Err(ServeError::Topology(format!(
                "{} holds {blocks} unconfirmed blocks written to a node not in clickhouse_url: run a gateway with that \
                 node until they are settled (its /v1/status shows none unconfirmed), or move the directory away to give them up",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// A node's own directory under `data_dir` when there are several (each its own journal).
fn node_dir(data_dir: &str, url: &str) -> String {
    if data_dir.is_empty() {
        return String::new();
    }
    let name: String = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    std::path::Path::new(data_dir).join("nodes").join(name.trim_matches('_')).to_string_lossy().into_owned()
}

/// The writer, breaker and journal of the node at `url` (`siblings`: its shard has other
/// replicas to fail over to).
async fn replica(
    config: &Arc<Config>,
    url: &str,
    siblings: bool,
    shed: Arc<ShedState>,
    wake: &Arc<Notify>,
    receipts: &Arc<Receipts>,
) -> Result<Replica, ServeError> {
    let ch = ClickHouse::for_url(config, url);
    let breaker = Arc::new(Breaker::for_node(
        config.clickhouse.circuit_failures,
        Duration::from_millis(config.clickhouse.circuit_open_ms),
        url,
        config.stream.clone(),
    ));
    let writer =
        Arc::new(Writer::new(ch.clone(), config, Arc::clone(wake), Arc::clone(&breaker)).with_siblings(siblings));
    let journal = if config.journal_enabled() {
        Some(Journal::open(config, ch.clone(), Arc::clone(&writer), Arc::clone(receipts)).await?)
    } else {
        None
    };
    Ok(Replica { url: url.to_string(), ch, writer, breaker, journal, shed })
}

/// Publishes the cluster's verdict for the request path's first look (and the Kafka front):
/// shed once no shard takes rows; each batch is then checked against its own shards.
async fn summarize(shards: Arc<Shards>, into: Arc<ShedState>, interval: Duration, stop: CancellationToken) {
    loop {
        if let Some(summary) = shards.summary() {
            into.publish(summary.bytes, summary.capacity, summary.shedding, summary.retry_after_s);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Stops the consumer once shutdown trips, concurrently with the HTTP drain.
fn stop_consuming(front: kafka::Front, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        shutdown.triggered().await;
        front.stop().await;
    })
}

/// Resolves once the listener should stop accepting: on shutdown, readiness turns 503 first
/// and load balancers get `delay` to stop routing here.
async fn stop_accepting(shutdown: Shutdown, streams: Arc<Streams>, delay: Duration) {
    shutdown.triggered().await;
    streams.start_stopping();
    if !delay.is_zero() {
        tracing::info!(?delay, "not ready; waiting for load balancers to stop routing here");
        tokio::time::sleep(delay).await;
    }
    tracing::info!("no longer accepting connections; answering in-flight requests");
}
