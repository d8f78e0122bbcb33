//! `buffergate check`: the tuning checklist, run against the live server and the gateway's own
//! configuration. Each finding has a severity and a concrete fix; warnings and errors make the
//! command exit 1.
//!
//! One file per area: `buffer` (the Buffer table, its destination and their tuning),
//! `delivery` (what exactly-once needs of the table, the cluster's Distributed table),
//! `redis` (the idempotency store), `kafka` (the Kafka front), `quarantine` (where rejected
//! events are parked, and how many wait there) and `auth` (whether producers need a key).

mod auth;
mod buffer;
mod delivery;
mod kafka;
mod quarantine;
mod redis;

use serde::Serialize;

use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable name of the check.
    pub check: &'static str,
    /// The ClickHouse node the finding is about (its URL), on a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The stream the finding is about, when several are configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// What the server cannot tell about itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Expected rows per second into the Buffer; measured (server-wide) when absent.
    pub rate: Option<f64>,
    /// The server's memory in bytes, where `system.asynchronous_metrics` does not say.
    pub server_memory: Option<u64>,
}

pub(crate) fn finding(
    check: &'static str,
    severity: Severity,
    message: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding { check, node: None, stream: None, severity, message: message.into(), fix: fix.into() }
}

/// Whether any finding should fail the command.
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity >= Severity::Warning)
}

/// Runs every check.
pub async fn run(ch: &ClickHouse, config: &Config, options: Options) -> Result<Vec<Finding>, ClickHouseError> {
    let mut out = buffer::run(ch, config, options).await?;
    out.extend(redis::run(config).await);
    out.extend(delivery::run(ch, config).await?);
    out.extend(quarantine::run(ch, config).await?);
    out.extend(kafka::run(config).await);
    out.extend(auth::run(config));
    Ok(out)
}

/// The checks of several streams: each stream's own ([`one_stream`]), then the process-wide
/// ones (the idempotency store, the API keys) once. Findings name their stream when `several`
/// streams are configured.
pub async fn run_streams(
    streams: &[std::sync::Arc<Config>],
    several: bool,
    topology: &crate::config::Topology,
    options: Options,
) -> Result<Vec<Finding>, String> {
    let mut out = Vec::new();
    for stream in streams {
        let found =
            one_stream(stream, topology, options).await.map_err(|e| format!("stream {}: {e}", stream.stream))?;
        out.extend(found.into_iter().map(|f| Finding { stream: several.then(|| stream.stream.to_string()), ..f }));
    }
    // The store is checked with a stream that uses it (one with `dedup = off` skips it).
    let store_user = streams.iter().find(|s| s.idempotency.dedup != crate::config::DedupMode::Off);
    if let Some(config) = store_user.or(streams.first()) {
        out.extend(redis::run(config).await);
    }
    if let Some(config) = streams.first() {
        out.extend(auth::run(config));
    }
    Ok(out)
}

/// One stream's checks on every node it writes to: the Buffer, the journal's needs and the
/// Distributed table per node (each finding naming its node on a cluster), and its Kafka
/// topics.
async fn one_stream(
    config: &Config,
    topology: &crate::config::Topology,
    options: Options,
) -> Result<Vec<Finding>, ClickHouseError> {
    if topology.nodes() == 1 {
        let ch = ClickHouse::new(config);
        let mut out = buffer::run(&ch, config, options).await?;
        out.extend(delivery::run(&ch, config).await?);
        out.extend(quarantine::run(&ch, config).await?);
        out.extend(kafka::run(config).await);
        return Ok(out);
    }
    let mut out = Vec::new();
    for (_, _, url) in topology.each() {
        let ch = ClickHouse::for_url(config, url);
        let mut node = buffer::run(&ch, config, options).await.unwrap_or_else(|error| {
            vec![finding(
                "clickhouse",
                Severity::Error,
                format!("cannot check this node: {error}"),
                "start it or fix clickhouse_url",
            )]
        });
        if let Ok(Some(f)) = delivery::run(&ch, config).await {
            node.push(f);
        }
        node.extend(delivery::cluster_tables(&ch, config).await);
        node.extend(quarantine::run(&ch, config).await.unwrap_or_else(|error| {
            vec![finding(
                "quarantine",
                Severity::Error,
                format!("cannot check the quarantine on this node: {error}"),
                "start it or fix clickhouse_url",
            )]
        }));
        out.extend(node.into_iter().map(|f| Finding { node: Some(crate::config::redacted(url)), ..f }));
    }
    out.extend(kafka::run(config).await);
    Ok(out)
}

/// Prints findings as a table for people.
pub fn render_text(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "ok: no findings\n".into();
    }
    let mut out = String::new();
    for f in findings {
        let stream = f.stream.as_deref().map(|s| format!("[stream {s}] ")).unwrap_or_default();
        let node = format!("{stream}{}", f.node.as_deref().map(|n| format!("[{n}] ")).unwrap_or_default());
        out.push_str(&format!(
            "{:<8} {:<19} {node}{}\n         fix: {}\n",
            format!("{:?}", f.severity).to_uppercase(),
            f.check,
            f.message,
            f.fix
        ));
    }
    out
}
