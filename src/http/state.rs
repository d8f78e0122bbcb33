//! What every handler can reach: the streams and the rest of the gateway's shared parts.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{AdminToken, ApiKeys};
use crate::config::Config;
use crate::streams::Streams;

#[derive(Debug)]
pub struct AppState {
    /// The top-level configuration (a stream's own is [`crate::streams::Stream::config`]).
    pub config: Arc<Config>,
    pub streams: Arc<Streams>,
    pub api_keys: ApiKeys,
    pub admin: AdminToken,
    pub metrics: PrometheusHandle,
    /// The Kafka consumers' state, one per stream topics write to (`buffergate consume`).
    pub kafka: Vec<(crate::config::StreamName, Arc<crate::kafka::Status>)>,
}
