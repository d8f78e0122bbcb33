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
use crate::clickhouse::refresh::Refresher;
use crate::clickhouse::writer::Writer;
use crate::coalesce::{Coalescer, CoalescerTasks};
use crate::config::Config;
use crate::health::Health;
use crate::http;
use crate::http::state::AppState;
use crate::idempotency::{Idempotency, StoreError};
use crate::ingest::Ingest;
use crate::journal::{Durable, JournalError};
use crate::kafka::{self, KafkaError};
use crate::metrics;
use crate::schema::SharedSchema;
use crate::shed::ShedState;
use crate::shed::budget::Budget;
use crate::shed::poller::Poller;
use crate::shutdown::Shutdown;

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
    Journal(#[from] JournalError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
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
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ServeError::Bind { addr: config.listen, source })?;
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
    let ch = ClickHouse::new(&config);
    let health = Arc::new(Health::default());
    let schema = Arc::new(SharedSchema::default());
    let shed = Arc::new(ShedState::default());
    let wake = Arc::new(Notify::new());
    let watchers = Watchers::start(&ch, &config, &schema, &health, &shed, &wake).await;
    let (ingest, partitions) = ingest(&config, &ch, schema, &health, wake).await?;
    let durable = ingest.durable.clone();
    let stop_durable = CancellationToken::new();
    let durable_task = durable.clone().map(|d| tokio::spawn(d.run(stop_durable.clone())));
    let api_keys = ApiKeys::from_config(&config)?;
    if api_keys.enabled() {
        tracing::info!(keys = api_keys.len(), "producer API keys required");
    } else {
        tracing::warn!("no API keys configured: producer authentication is off");
    }
    let admin = AdminToken::new(&config.admin_token);
    let ingest = Arc::new(ingest);
    let front = match role {
        Role::Serve => None,
        Role::Consume => {
            let front = kafka::Front::start(&config, Arc::clone(&ingest), ch.clone(), Arc::clone(&shed))?;
            Some(front)
        }
    };
    let kafka = front.as_ref().map(kafka::Front::status);
    let state = Arc::new(AppState { config: Arc::clone(&config), ingest, shed, api_keys, admin, ch, metrics, kafka });

    let local = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(listen = %local, partitions = state.ingest.coalescer.partitions(), "buffergate serving");
    let front = front.map(|front| stop_consuming(front, shutdown.clone()));
    let stop_http = stop_accepting(shutdown, health, Duration::from_millis(config.shutdown_delay_ms));
    let header_timeout = Duration::from_millis(config.header_timeout_ms);
    http::conn::serve(listener, http::router(state), header_timeout, stop_http).await;

    // The consumer commits what it delivered before the queues are drained under it.
    if let Some(front) = front {
        let _ = front.await;
    }
    partitions.drain().await;
    if let Some(durable) = &durable {
        durable.finish(Duration::from_millis(config.shutdown_confirm_ms)).await;
    }
    stop_durable.cancel();
    if let Some(task) = durable_task {
        let _ = task.await;
    }
    watchers.stop().await;
    tracing::info!("drained; bye");
    Ok(())
}

/// The tasks that watch ClickHouse off the request path: the schema refresher (also the
/// readiness probe) and the Buffer fill poller.
struct Watchers {
    stop: CancellationToken,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Watchers {
    async fn start(
        ch: &ClickHouse,
        config: &Arc<Config>,
        schema: &Arc<SharedSchema>,
        health: &Arc<Health>,
        shed: &Arc<ShedState>,
        wake: &Arc<Notify>,
    ) -> Self {
        let refresher = Refresher {
            ch: ch.clone(),
            schema: Arc::clone(schema),
            health: Arc::clone(health),
            config: Arc::clone(config),
            wake: Arc::clone(wake),
        };
        // A first look before taking traffic; if ClickHouse is down the gateway still starts,
        // not ready, and keeps looking.
        refresher.refresh().await;
        let stop = CancellationToken::new();
        let poller = Poller { ch: ch.clone(), state: Arc::clone(shed), config: Arc::clone(config) };
        let tasks = [tokio::spawn(refresher.run(stop.clone())), tokio::spawn(poller.run(stop.clone()))];
        Self { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The ingestion path and its running partitions.
async fn ingest(
    config: &Arc<Config>,
    ch: &ClickHouse,
    schema: Arc<SharedSchema>,
    health: &Arc<Health>,
    wake: Arc<Notify>,
) -> Result<(Ingest, CoalescerTasks), ServeError> {
    let breaker = Arc::new(Breaker::new(config.circuit_failures, Duration::from_millis(config.circuit_open_ms)));
    let writer = Arc::new(Writer::new(ch.clone(), config, wake, Arc::clone(&breaker)));
    let idempotency = Arc::new(Idempotency::from_config(config)?);
    if idempotency.is_embedded() {
        tracing::warn!(
            "no redis_url: idempotency keys and producer offsets live in this process only; \
             run one replica, or configure BUFFERGATE_REDIS_URL"
        );
    }
    let durable = if config.journal_enabled() {
        Some(Durable::open(config, ch.clone(), Arc::clone(&writer)).await?)
    } else {
        tracing::warn!(
            "the journal is off: a 200 means the rows reached the Buffer's memory, not that they survive it"
        );
        None
    };
    let (coalescer, partitions) = Coalescer::start(config, &writer, &idempotency, durable.as_ref());
    let ingest = Ingest {
        config: Arc::clone(config),
        schema,
        health: Arc::clone(health),
        coalescer,
        writer,
        budget: Budget::new(config.max_inflight_bytes),
        breaker,
        idempotency,
        durable,
    };
    Ok((ingest, partitions))
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
async fn stop_accepting(shutdown: Shutdown, health: Arc<Health>, delay: Duration) {
    shutdown.triggered().await;
    health.start_draining();
    if !delay.is_zero() {
        tracing::info!(?delay, "not ready; waiting for load balancers to stop routing here");
        tokio::time::sleep(delay).await;
    }
    tracing::info!("no longer accepting connections; answering in-flight requests");
}
