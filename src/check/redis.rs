//! The idempotency store, when Redis is configured.

use super::{Finding, Severity, finding};
use crate::config::{Config, DedupMode};
use crate::idempotency;

/// The idempotency store, when Redis is configured: reachable, recent enough for the
/// reservation script, and set up so that remembered ids are neither evicted nor freed on
/// Redis's main thread.
pub(super) async fn run(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if config.idempotency.redis_url.is_empty() || config.idempotency.dedup == DedupMode::Off {
        return out;
    }
    let timeout = std::time::Duration::from_millis(config.idempotency.redis_timeout_ms.max(1000));
    let unreachable = |error: &dyn std::fmt::Display| {
        finding(
            "redis",
            Severity::Error,
            format!("cannot reach Redis: {error}"),
            "start Redis or fix redis_url; meanwhile every ingestion request is refused (dedup_on_store_error = reject) or written without deduplication (accept)",
        )
    };
    let primaries = match idempotency::primaries_facts(&config.idempotency.redis_url, timeout).await {
        Ok(primaries) => primaries,
        Err(error) => return vec![unreachable(&error)],
    };
    // A Redis Cluster: every primary is checked, each finding names its node.
    let cluster = config.idempotency.redis_url.contains("+cluster://");
    for (node, facts) in primaries {
        let findings = match facts {
            Ok(facts) => redis_facts(&facts),
            Err(error) => vec![unreachable(&error)],
        };
        out.extend(findings.into_iter().map(|f| Finding { node: cluster.then(|| node.clone()), ..f }));
    }
    out
}

/// What one Redis server's settings mean for the idempotency keys it holds.
fn redis_facts(facts: &idempotency::ServerFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    if facts.version().is_none_or(|version| version < (4, 0)) {
        out.push(finding(
            "redis_version",
            Severity::Error,
            format!("Redis {:?}: the reservation script needs 4.0 or later (UNLINK, many-field HSET)", facts.version),
            "upgrade Redis (any maintained release)",
        ));
    }
    match (facts.maxmemory, facts.maxmemory_policy.as_deref()) {
        (Some(limit), Some(policy)) if limit > 0 && policy != "noeviction" => out.push(finding(
            "redis_eviction",
            Severity::Warning,
            format!("maxmemory-policy is {policy} with maxmemory {limit}: when Redis is full it evicts remembered ids (their events are written again) or pending reservations"),
            "CONFIG SET maxmemory-policy noeviction (a full Redis then refuses writes and the gateway answers 503), and size maxmemory as in docs/delivery-guarantees.md",
        )),
        (_, None) => out.push(finding(
            "redis_eviction",
            Severity::Info,
            "cannot read Redis's maxmemory-policy (CONFIG GET refused)",
            "make sure the server does not evict keys (maxmemory-policy noeviction)",
        )),
        _ => {}
    }
    match facts.lazyfree_lazy_expire.as_deref() {
        Some("yes") => {}
        Some(_) => out.push(finding(
            "redis_lazyfree",
            Severity::Warning,
            "lazyfree-lazy-expire is no: a slot's hash of remembered ids that expires by its TTL (after a pause in traffic longer than the dedup window) is freed on Redis's main thread, stalling every client while millions of fields are freed",
            "CONFIG SET lazyfree-lazy-expire yes (and in redis.conf)",
        )),
        None => out.push(finding(
            "redis_lazyfree",
            Severity::Info,
            "cannot read Redis's lazyfree-lazy-expire (CONFIG GET refused)",
            "make sure it is yes",
        )),
    }
    out
}
