//! The HTTP front: where it listens, what one request may hold, the bounds on connections, requests
//! and bytes in flight, and the shutdown delay.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid, positive};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    /// Largest request body accepted as sent on the wire (compressed or not).
    pub max_body_bytes: usize,
    /// Largest request body accepted after decompression (gzip-bomb guard).
    pub max_decompressed_bytes: usize,
    pub max_events_per_request: usize,
    /// Budget of bytes in flight: bodies being decoded plus encoded rows queued.
    pub max_inflight_bytes: usize,
    /// Ingestion requests handled at once; one more waits for a slot.
    pub max_concurrent_requests: usize,
    /// How long an ingestion request waits for a slot, in arrival order, before it gets 503
    /// `overloaded` (0: at once). Clients that resend a refusal at once cost a full request
    /// each; waiting costs an idle connection.
    pub admission_wait_ms: u64,
    /// An ingestion request still unanswered after this long gets 503.
    pub request_timeout_ms: u64,
    /// A request body not fully received after this long gets 408: a stalled upload must not
    /// hold a connection and an in-flight slot for the whole request timeout.
    pub body_timeout_ms: u64,
    /// Bytes of a refused request's body read and thrown away before the answer, so that a
    /// client that sends its whole body before reading gets the answer instead of a reset
    /// connection (0: never drain).
    pub body_drain_max_bytes: u64,
    /// How long that drain may take at most.
    pub body_drain_timeout_ms: u64,
    /// A connection whose request head (line and headers) has not arrived this long after the
    /// connection opened or its previous answer was sent is closed: slow-header clients, and
    /// idle keep-alive connections, hold no socket beyond it.
    pub header_timeout_ms: u64,
    /// Open client connections at most; a connection accepted beyond it is closed at once, so
    /// idle or slow clients can never take the file descriptors the gateway needs for
    /// ClickHouse, Redis and the journal. At start the soft open-files limit is raised (up to
    /// the hard one) to leave room for them.
    pub max_connections: usize,
    /// After SIGTERM, keep serving (not ready) this long so load balancers stop routing here.
    pub shutdown_delay_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            log_format: LogFormat::Text,
            max_body_bytes: 10 * 1024 * 1024,
            max_decompressed_bytes: 10 * 1024 * 1024,
            max_events_per_request: 10_000,
            max_inflight_bytes: 256 * 1024 * 1024,
            max_concurrent_requests: 1024,
            admission_wait_ms: 1_000,
            request_timeout_ms: 60_000,
            body_timeout_ms: 10_000,
            body_drain_max_bytes: 64 * 1024 * 1024,
            body_drain_timeout_ms: 10_000,
            header_timeout_ms: 75_000,
            max_connections: 4096,
            shutdown_delay_ms: 0,
        }
    }
}

impl HttpSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_decompressed_bytes", self.max_decompressed_bytes as u64),
            ("max_events_per_request", self.max_events_per_request as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("max_inflight_bytes", self.max_inflight_bytes as u64),
            ("max_concurrent_requests", self.max_concurrent_requests as u64),
            ("max_connections", self.max_connections as u64),
        ] {
            positive(key, value)?;
        }
        if self.max_inflight_bytes < self.max_body_bytes + self.max_decompressed_bytes {
            return Err(invalid(
                "max_inflight_bytes",
                "must hold at least one request (max_body_bytes + max_decompressed_bytes)",
            ));
        }
        Ok(())
    }
}
