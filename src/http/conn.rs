//! Accepting connections and serving HTTP/1.1 on them. `axum::serve` gives hyper no timer, so
//! hyper's header read timeout never runs there: a client sending its request head a byte at
//! a time (or never) would hold its socket for ever. Here hyper gets a timer and
//! `header_timeout`; the rest is what `axum::serve` does (TCP_NODELAY, accept errors retried,
//! graceful shutdown that lets open requests finish).

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

/// Pause after an accept error that is not about one connection (out of file descriptors):
/// retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` resolves, then waits for open connections to
/// finish their requests.
pub async fn serve(listener: TcpListener, router: Router, header_timeout: Duration, stop: impl Future<Output = ()>) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => spawn_connection(&builder, &graceful, tcp, router.clone()),
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

fn spawn_connection(builder: &http1::Builder, graceful: &GracefulShutdown, tcp: TcpStream, router: Router) {
    // Answers are one write each, but nothing gains from Nagle's algorithm holding one back.
    let _ = tcp.set_nodelay(true);
    let connection = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router));
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection ended with an error");
        }
    });
}

/// Accept errors that concern only the connection being accepted (as `axum::serve` tells them).
fn per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
