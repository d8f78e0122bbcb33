//! Producer API keys and their rate limits, and the admin API's token.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// Bearer token of the admin API (`/admin/flush`, `/v1/status`); empty disables it.
    pub admin_token: String,
    /// Producer API keys, comma-separated (`name=key` or `key`); with `api_keys_file`, both
    /// count. None: producer authentication is off.
    pub api_keys: String,
    /// A file of API keys, one per line (e.g. a mounted Kubernetes Secret).
    pub api_keys_file: String,
    /// Requests per second allowed per API key (0: unlimited)...
    pub api_key_rate_per_s: f64,
    /// ...with bursts of this many.
    pub api_key_burst: u32,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            admin_token: String::new(),
            api_keys: String::new(),
            api_keys_file: String::new(),
            api_key_rate_per_s: 0.0,
            api_key_burst: 100,
        }
    }
}

impl AuthSettings {
    /// Checks this section's values on their own (relations with other sections are
    /// [`super::Config::validate`]'s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
