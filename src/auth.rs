//! Producer API keys and the admin token.
//!
//! Keys come from a file (a mounted Kubernetes Secret: one key per line, `name=key` or just
//! `key`, `#` comments) and/or `api_keys` (comma-separated, e.g. from a Secret through the
//! environment). Only their SHA-256 digests stay in memory, and a presented key is compared
//! with every digest in constant time. No keys configured: authentication is off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read api_keys_file {path}: {source}")]
    File { path: String, source: std::io::Error },
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key that matches none.
    Unknown,
    /// Over the key's rate limit; retry after this many seconds.
    RateLimited(u32),
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct ApiKeys {
    keys: Vec<(String, [u8; 32])>,
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equality that takes as long whatever the inputs.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// `name=key`, where a name is `[A-Za-z0-9_.-]+`; a bare key may itself hold `=` (base64
/// padding), so `abc==` stays one key.
fn named(line: &str) -> Option<(&str, &str)> {
    let (name, key) = line.split_once('=')?;
    let (name, key) = (name.trim(), key.trim());
    let plausible = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    (plausible && !key.is_empty() && !key.starts_with('=')).then_some((name, key))
}

impl ApiKeys {
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let mut lines: Vec<String> = config.api_keys.split(',').map(str::to_string).collect();
        if !config.api_keys_file.is_empty() {
            let text = std::fs::read_to_string(&config.api_keys_file)
                .map_err(|source| AuthError::File { path: config.api_keys_file.clone(), source })?;
            lines.extend(text.lines().map(str::to_string));
        }
        let keys = lines
            .iter()
            .map(|line| line.trim())
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .enumerate()
            .map(|(i, line)| match named(line) {
                Some((name, key)) => (name.to_string(), digest(key)),
                None => (format!("key-{}", i + 1), digest(line)),
            })
            .collect();
        Ok(Self {
            keys,
            rate: config.api_key_rate_per_s,
            burst: f64::from(config.api_key_burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a request's bearer token; `Ok` with the key's name when allowed.
    pub fn check(&self, token: Option<&str>) -> Result<Option<String>, Denied> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = digest(token.ok_or(Denied::Missing)?);
        // Every digest is compared, so the time taken says nothing about which one matched.
        let mut found = None;
        for (name, key) in &self.keys {
            if constant_time_eq(&presented, key) && found.is_none() {
                found = Some(name.clone());
            }
        }
        let name = found.ok_or(Denied::Unknown)?;
        self.take_token(&name)?;
        Ok(Some(name))
    }

    fn take_token(&self, name: &str) -> Result<(), Denied> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(name.to_string()).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Denied::RateLimited(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u32))
        }
    }
}

/// The admin token, hashed; `None` when the admin API is disabled.
#[derive(Debug)]
pub struct AdminToken(Option<[u8; 32]>);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        Self((!token.is_empty()).then(|| digest(token)))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    pub fn allows(&self, token: Option<&str>) -> bool {
        match (&self.0, token) {
            (Some(expected), Some(token)) => constant_time_eq(expected, &digest(token)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(rate: f64) -> ApiKeys {
        let config = Config {
            api_keys: "alice=s3cret, bare-key, cGFkZGVk==".into(),
            api_key_rate_per_s: rate,
            api_key_burst: 2,
            ..Config::default()
        };
        ApiKeys::from_config(&config).unwrap()
    }

    #[test]
    fn named_and_bare_keys() {
        let keys = keys(0.0);
        assert_eq!(keys.check(Some("s3cret")), Ok(Some("alice".into())));
        assert_eq!(keys.check(Some("bare-key")), Ok(Some("key-2".into())));
        assert_eq!(keys.check(Some("cGFkZGVk==")), Ok(Some("key-3".into())), "base64 padding is not a name");
        assert_eq!(keys.check(Some("nope")), Err(Denied::Unknown));
        assert_eq!(keys.check(None), Err(Denied::Missing));
        assert!(ApiKeys::from_config(&Config::default()).unwrap().check(None).is_ok(), "no keys: auth off");
    }

    #[test]
    fn rate_limit_per_key() {
        let keys = keys(1.0);
        assert!(keys.check(Some("s3cret")).is_ok());
        assert!(keys.check(Some("s3cret")).is_ok());
        assert_eq!(keys.check(Some("s3cret")), Err(Denied::RateLimited(1)));
        assert!(keys.check(Some("bare-key")).is_ok(), "buckets are per key");
    }

    #[test]
    fn bearer_and_admin() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        let admin = AdminToken::new("t0k");
        assert!(admin.allows(Some("t0k")) && !admin.allows(Some("t0")) && !admin.allows(None));
        assert!(!AdminToken::new("").enabled());
    }
}
