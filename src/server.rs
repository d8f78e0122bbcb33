//! Wires configuration → state → router and runs the gateway until shutdown, then drains:
//! readiness turns 503, the listener stops accepting, in-flight requests get their answers,
//! every queued row is flushed, and only then does `run` return.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{AdminToken, ApiKeys, AuthError};
use crate::clickhouse::ClickHouse;
use crate::clickhouse::breaker::Breaker;
use crate::clickhouse::refresh::Refresher;
use crate::clickhouse::writer::Writer;
use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::health::Health;
use crate::http;
use crate::http::state::AppState;
use crate::idempotency::{Idempotency, StoreError};
use crate::ingest::Ingest;
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
}

/// Binds `config.listen` and runs until `shutdown` trips.
pub async fn serve(config: Config, shutdown: Shutdown) -> Result<(), ServeError> {
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ServeError::Bind { addr: config.listen, source })?;
    run(config, listener, shutdown).await
}

/// Runs the gateway on an already bound listener (tests bind port 0).
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), ServeError> {
    // Before any task records a metric.
    let metrics = metrics::install();
    let config = Arc::new(config);
    let ch = ClickHouse::new(&config);
    let health = Arc::new(Health::default());
    let schema = Arc::new(SharedSchema::default());
    let wake = Arc::new(Notify::new());
    let refresher = Refresher {
        ch: ch.clone(),
        schema: Arc::clone(&schema),
        health: Arc::clone(&health),
        config: Arc::clone(&config),
        wake: Arc::clone(&wake),
    };
    // A first look before taking traffic; if ClickHouse is down the gateway still starts,
    // not ready, and keeps looking.
    refresher.refresh().await;
    let stop_watchers = CancellationToken::new();
    let refresh_task = tokio::spawn(refresher.run(stop_watchers.clone()));

    let shed = Arc::new(ShedState::default());
    let poller = Poller { ch: ch.clone(), state: Arc::clone(&shed), config: Arc::clone(&config) };
    let poll_task = tokio::spawn(poller.run(stop_watchers.clone()));

    let breaker = Arc::new(Breaker::new(config.circuit_failures, Duration::from_millis(config.circuit_open_ms)));
    let writer = Arc::new(Writer::new(ch.clone(), &config, wake, Arc::clone(&breaker)));
    let api_keys = ApiKeys::from_config(&config)?;
    if api_keys.enabled() {
        tracing::info!(keys = api_keys.len(), "producer API keys required");
    } else {
        tracing::warn!("no API keys configured: producer authentication is off");
    }
    let idempotency = Arc::new(Idempotency::from_config(&config)?);
    if idempotency.is_embedded() {
        tracing::warn!(
            "no redis_url: idempotency keys and producer offsets live in this process only; \
             run one replica, or configure BUFFERGATE_REDIS_URL"
        );
    }
    let (coalescer, partitions) = Coalescer::start(&config, &writer, &idempotency);
    let ingest = Ingest {
        config: Arc::clone(&config),
        schema,
        health: Arc::clone(&health),
        coalescer,
        writer,
        budget: Budget::new(config.max_inflight_bytes),
        breaker,
        idempotency,
    };
    let state = Arc::new(AppState {
        config: Arc::clone(&config),
        ingest,
        shed,
        api_keys,
        admin: AdminToken::new(&config.admin_token),
        ch,
        metrics,
    });

    let local = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(listen = %local, partitions = state.ingest.coalescer.partitions(), "buffergate serving");

    let drain_delay = Duration::from_millis(config.shutdown_delay_ms);
    let stop_http = {
        let health = Arc::clone(&health);
        async move {
            shutdown.triggered().await;
            health.start_draining();
            if !drain_delay.is_zero() {
                tracing::info!(?drain_delay, "not ready; waiting for load balancers to stop routing here");
                tokio::time::sleep(drain_delay).await;
            }
            tracing::info!("no longer accepting connections; answering in-flight requests");
        }
    };
    // Answers are one write each, but nothing gains from Nagle's algorithm holding one back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, http::router(state)).with_graceful_shutdown(stop_http).await;

    partitions.drain().await;
    stop_watchers.cancel();
    let _ = tokio::join!(refresh_task, poll_task);
    tracing::info!("drained; bye");
    result.map_err(ServeError::Serve)
}
