//! Producer authentication: whether it is on at all.

use super::{Finding, Severity, finding};
use crate::config::Config;

/// Auth off is legitimate behind a trusted network, so it informs rather than fails.
pub(super) fn run(config: &Config) -> Option<Finding> {
    let auth = &config.auth;
    let configured = !auth.api_keys.trim().is_empty() || !auth.api_keys_file.is_empty();
    (!configured).then(|| {
        finding(
            "api_keys",
            Severity::Info,
            "producer authentication is off: anyone who reaches the gateway can write events and write or read any producer's offsets",
            "set BUFFERGATE_API_KEYS or BUFFERGATE_API_KEYS_FILE (docs/configuration.md), unless only trusted producers can reach it",
        )
    })
}
