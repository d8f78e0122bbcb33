//! What every handler can reach: the ingestion path and the rest of the gateway's shared parts.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{AdminToken, ApiKeys};
use crate::config::Config;
use crate::ingest::Pipeline;
use crate::shed::ShedState;

#[derive(Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub ingest: Arc<Pipeline>,
    pub shed: Arc<ShedState>,
    pub api_keys: ApiKeys,
    pub admin: AdminToken,
    pub metrics: PrometheusHandle,
    /// The Kafka consumer's state, when this process runs one (`buffergate consume`).
    pub kafka: Option<Arc<crate::kafka::Status>>,
}
