//! Accepting connections and serving HTTP/1.1 on them. `axum::serve` gives hyper no timer, so
//! hyper's header read timeout never runs there: a client sending its request head a byte at
//! a time (or never) would hold its socket for ever. Here hyper gets a timer and
//! `header_timeout`, and the number of open connections is bounded: one accepted beyond
//! `max_connections` is closed at once (as Envoy's connection limit does), because idle or
//! slow clients must not take the file descriptors that ClickHouse, Redis and the journal need.
//! The rest is what `axum::serve` does (TCP_NODELAY, accept errors retried, graceful shutdown
//! that lets open requests finish).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics;

/// Descriptors the gateway keeps beyond its client connections: ClickHouse and Redis pools,
/// journal files, Kafka's sockets, the listener.
const RESERVED_DESCRIPTORS: u64 = 1024;

/// Raises the soft open-files limit (up to the hard one) so that `max_connections` clients and
/// the gateway's own descriptors fit; warns when even the hard limit is too low, since running
/// out fails ClickHouse and Redis connections and journal writes, not just new clients.
pub fn raise_open_files_limit(max_connections: usize) {
    let wanted = max_connections as u64 + RESERVED_DESCRIPTORS;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below max_connections + {RESERVED_DESCRIPTORS}: lower max_connections or raise the hard limit"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read or raise the open-files limit"),
    }
}

/// Pause after an accept error that is not about one connection (out of file descriptors):
/// retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What bounds the connections a client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The request head must arrive within this of the connection opening or of the previous
    /// answer.
    pub header_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop` resolves, then waits for open connections to
/// finish their requests.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: impl Future<Output = ()>) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => spawn_connection(&builder, &graceful, tcp, router.clone(), slot),
                    // Dropped: closed at once. Waiting for a slot instead would leave the client
                    // hanging in the accept queue; a closed connection is retried elsewhere.
                    Err(_) => metrics::connection_refused(),
                },
                Err(error) if per_connection(&error) => {}
                Err(error) => {
                    tracing::error!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            () = &mut stop => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one connection, holding its `slot` until it ends.
fn spawn_connection(
    builder: &http1::Builder,
    graceful: &GracefulShutdown,
    tcp: TcpStream,
    router: Router,
    slot: OwnedSemaphorePermit,
) {
    // Answers are one write each, but nothing gains from Nagle's algorithm holding one back.
    let _ = tcp.set_nodelay(true);
    let connection = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router));
    let connection = graceful.watch(connection);
    metrics::connections(1.0);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection ended with an error");
        }
        metrics::connections(-1.0);
        drop(slot);
    });
}

/// Accept errors that concern only the connection being accepted (as `axum::serve` tells them).
fn per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
