//! Producer API keys and the admin token.
//!
//! Keys come from a file (a mounted Kubernetes Secret: one key per line, `name=key` or just
//! `key`, optionally followed by `streams=a,b` to restrict the key to those streams, `#`
//! comments) and/or `api_keys` (comma-separated, e.g. from a Secret through the environment;
//! no restrictions there, the comma is taken). Only their SHA-256 digests stay in memory, and a presented key is compared
//! with every digest in constant time. No keys configured: authentication is off.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read api_keys_file {path}: {source}")]
    File { path: String, source: std::io::Error },
    /// Keys were configured and none was read: starting would turn authentication off.
    #[error(
        "api_keys / api_keys_file are set but hold no key (empty, or only comments): refusing to start with producer authentication off; unset both to run without keys"
    )]
    NoKeys,
    /// A key's line says something that cannot be honoured; starting without it would widen
    /// or narrow that key's access silently.
    #[error("API key {line} (counting keys, not lines): {problem}")]
    Line { line: usize, problem: String },
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

/// Who a request comes from: the name of its key and the streams that key may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Shared: every request of the key carries it.
    pub name: Arc<str>,
    /// `None`: every stream.
    pub streams: Option<Arc<[String]>>,
}

impl Caller {
    pub fn may_write(&self, stream: &str) -> bool {
        self.streams.as_ref().is_none_or(|streams| streams.iter().any(|s| s == stream))
    }
}

#[derive(Debug)]
struct Key {
    caller: Caller,
    digest: [u8; 32],
    /// Shared by every key of one name (e.g. the old and new key during a rotation), so a
    /// name's traffic has one limit; `None` when there is no rate limit.
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
}

#[derive(Debug)]
pub struct ApiKeys {
    keys: Vec<Key>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equality that takes as long whatever the inputs.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a[..].ct_eq(&b[..]).into()
}

/// A token bucket of `burst` requests refilled at `rate_per_s`, as a GCRA quota; `None` for
/// no limit (a rate of 0, or one too high for a nanosecond clock to tell apart from none).
fn quota(rate_per_s: f64, burst: u32) -> Option<Quota> {
    if rate_per_s.is_nan() || rate_per_s <= 0.0 {
        return None;
    }
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    // governor counts time in u64 nanoseconds and panics past that: a period so long that a
    // full burst of it would come near the end of that range is cut short. Only rates below
    // one request in about a year and a half, at the default burst of 100, are affected.
    let longest = Duration::from_nanos(u64::MAX / 4 / u64::from(burst.get()));
    let period = Duration::try_from_secs_f64(1.0 / rate_per_s).map_or(longest, |p| p.min(longest));
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

/// Whole seconds to wait, rounded up and at least one: `Retry-After` takes integers, and an
/// answer of 0 would invite an immediate retry that is refused again.
fn retry_after_s(wait: Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX).max(1)
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

/// The streams a key may write; `None`: every stream.
type Allowed = Option<Arc<[String]>>;

/// A line of the keys file: the key (with its name) and, after whitespace, `streams=a,b`.
fn restricted(line: &str) -> Result<(&str, Allowed), String> {
    let Some((key, list)) = line.rsplit_once(char::is_whitespace).and_then(|(key, last)| {
        let list = last.strip_prefix("streams=")?;
        Some((key.trim_end(), list))
    }) else {
        return Ok((line, None));
    };
    let names: Vec<String> = list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
    if let Some(bad) = names.iter().find(|n| crate::config::StreamName::parse(n).is_none()) {
        return Err(format!("{bad:?} is not a stream name"));
    }
    if names.is_empty() {
        return Err("streams= names no stream".into());
    }
    Ok((key, Some(names.into())))
}

/// The name of a key given without one: from its digest, so that it does not change when
/// other keys are added or removed (its offsets and `Idempotency-Key`s are kept under it).
fn bare_name(digest: &[u8; 32]) -> String {
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

impl ApiKeys {
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let mut lines: Vec<String> = config.auth.api_keys.split(',').map(str::to_string).collect();
        // A comma separates keys there, so `streams=a,b` cannot be read: refused rather than
        // split into a restricted key and a key named by the text after the comma.
        if let Some(at) = lines.iter().position(|l| l.trim().contains(char::is_whitespace)) {
            return Err(AuthError::Line {
                line: at + 1,
                problem: "api_keys holds keys only; restrict keys to streams in api_keys_file".into(),
            });
        }
        if !config.auth.api_keys_file.is_empty() {
            let text = std::fs::read_to_string(&config.auth.api_keys_file)
                .map_err(|source| AuthError::File { path: config.auth.api_keys_file.clone(), source })?;
            lines.extend(text.lines().map(str::to_string));
        }
        let known = config.stream_names();
        let quota = quota(config.auth.api_key_rate_per_s, config.auth.api_key_burst);
        let mut limiters: HashMap<String, Arc<DefaultDirectRateLimiter>> = HashMap::new();
        let mut keys = Vec::new();
        for (i, line) in
            lines.iter().map(|line| line.trim()).filter(|l| !l.is_empty() && !l.starts_with('#')).enumerate()
        {
            // The line number only: the line holds a secret.
            let (key, streams) = restricted(line).map_err(|problem| AuthError::Line { line: i + 1, problem })?;
            if let Some(unknown) = streams.iter().flat_map(|s| s.iter()).find(|s| !known.contains(s)) {
                return Err(AuthError::Line {
                    line: i + 1,
                    problem: format!("the stream {unknown:?} is not configured"),
                });
            }
            let (name, digest) = match named(key) {
                Some((name, _)) if name.starts_with("key-") => {
                    return Err(AuthError::Line {
                        line: i + 1,
                        problem: "names starting with `key-` are those of keys given without a name".into(),
                    });
                }
                Some((name, key)) => (name.to_string(), digest(key)),
                None => {
                    let digest = digest(key);
                    (bare_name(&digest), digest)
                }
            };
            let limiter = quota.map(|quota| {
                Arc::clone(limiters.entry(name.clone()).or_insert_with(|| Arc::new(RateLimiter::direct(quota))))
            });
            keys.push(Key { caller: Caller { name: Arc::from(name), streams }, digest, limiter });
        }
        // An empty or commented-out keys file (a Secret mounted before it was filled) must not
        // open the gateway to everyone.
        let configured = !config.auth.api_keys.trim().is_empty() || !config.auth.api_keys_file.is_empty();
        if configured && keys.is_empty() {
            return Err(AuthError::NoKeys);
        }
        Ok(Self { keys })
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

    /// Checks a request's bearer token; `Ok` with its key's caller when allowed, `None` when
    /// authentication is off.
    pub fn check(&self, token: Option<&str>) -> Result<Option<Caller>, Denied> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = digest(token.ok_or(Denied::Missing)?);
        // Every digest is compared, so the time taken says nothing about which one matched.
        let mut found = None;
        for key in &self.keys {
            if constant_time_eq(&presented, &key.digest) && found.is_none() {
                found = Some(key);
            }
        }
        let key = found.ok_or(Denied::Unknown)?;
        if let Some(limiter) = &key.limiter {
            limiter.check().map_err(|not_until| {
                Denied::RateLimited(retry_after_s(not_until.wait_time_from(limiter.clock().now())))
            })?;
        }
        Ok(Some(key.caller.clone()))
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
        let config = {
            let mut config = Config::default();
            config.auth.api_keys = "alice=s3cret, bare-key, cGFkZGVk==".into();
            config.auth.api_key_rate_per_s = rate;
            config.auth.api_key_burst = 2;
            config
        };
        ApiKeys::from_config(&config).unwrap()
    }

    #[test]
    fn named_and_bare_keys() {
        let keys = keys(0.0);
        let name = |token| keys.check(Some(token)).map(|c| c.map(|c| c.name.to_string()));
        assert_eq!(name("s3cret"), Ok(Some("alice".into())));
        assert_eq!(name("bare-key"), Ok(Some(bare_name(&digest("bare-key")))), "named by its digest");
        assert_eq!(name("cGFkZGVk=="), Ok(Some(bare_name(&digest("cGFkZGVk==")))), "base64 padding is not a name");
        assert!(bare_name(&digest("bare-key")).starts_with("key-") && bare_name(&digest("x")).len() == 20);
        assert_eq!(keys.check(Some("nope")), Err(Denied::Unknown));
        assert_eq!(keys.check(None), Err(Denied::Missing));
        assert!(ApiKeys::from_config(&Config::default()).unwrap().check(None).is_ok(), "no keys: auth off");
    }

    #[test]
    fn keys_restricted_to_streams() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# comment\nops=k1 streams=logs,audit\nall=k2\nbare==\n").unwrap();
        let mut config = Config::default();
        config.auth.api_keys_file = file.display().to_string();
        for name in ["logs", "audit"] {
            config.add_stream(name, |s| {
                s.table.buffer_table = format!("{name}_buffer");
                s.table.destination_table = name.into();
            });
        }
        let keys = ApiKeys::from_config(&config).unwrap();
        let ops = keys.check(Some("k1")).unwrap().unwrap();
        assert!(ops.may_write("logs") && ops.may_write("audit") && !ops.may_write("default"));
        assert!(keys.check(Some("k2")).unwrap().unwrap().may_write("default"));
        assert!(keys.check(Some("bare==")).unwrap().unwrap().may_write("logs"));
        std::fs::write(&file, "ops=k1 streams=nope\n").unwrap();
        let error = ApiKeys::from_config(&config).unwrap_err().to_string();
        assert!(error.contains("\"nope\" is not configured") && !error.contains("k1"), "{error}");
        std::fs::write(&file, "ops = k1\nspaced = k2   streams=logs\n").unwrap();
        let keys = ApiKeys::from_config(&config).unwrap();
        assert_eq!(&*keys.check(Some("k1")).unwrap().unwrap().name, "ops", "spaces around = as before");
        assert!(!keys.check(Some("k2")).unwrap().unwrap().may_write("audit"));
        std::fs::write(&file, "key-1=k1\n").unwrap();
        assert!(
            ApiKeys::from_config(&config).unwrap_err().to_string().contains("key-"),
            "a bare key's name is not given"
        );
        // In api_keys a comma separates keys: a restriction there is refused, not split.
        config.auth.api_keys_file.clear();
        config.auth.api_keys = "ops=k1 streams=logs,audit".into();
        let error = ApiKeys::from_config(&config).unwrap_err().to_string();
        assert!(error.contains("api_keys_file") && !error.contains("k1"), "{error}");
    }

    #[test]
    fn keys_configured_but_none_read_refuse() {
        let mut config = Config::default();
        config.auth.api_keys = " , ,".into();
        assert!(matches!(ApiKeys::from_config(&config), Err(AuthError::NoKeys)));
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
    fn slow_rates_and_names_shared_by_keys() {
        let config = {
            let mut config = Config::default();
            config.auth.api_keys = "team=old-key, team=new-key, other=x".into();
            config.auth.api_key_rate_per_s = 0.25;
            config.auth.api_key_burst = 1;
            config
        };
        let keys = ApiKeys::from_config(&config).unwrap();
        assert_eq!(keys.check(Some("old-key")).map(|c| c.map(|c| c.name.to_string())), Ok(Some("team".into())));
        assert_eq!(keys.check(Some("new-key")), Err(Denied::RateLimited(4)), "one limit per name, 4 s per request");
        assert!(keys.check(Some("x")).is_ok());
    }

    #[test]
    fn extreme_rates_and_waits() {
        assert!(quota(0.0, 10).is_none() && quota(-1.0, 10).is_none() && quota(f64::NAN, 10).is_none());
        assert!(quota(1e12, 10).is_none(), "faster than the clock ticks: no limit");
        // A period beyond what governor's clock holds is cut short instead of panicking.
        let limiter = RateLimiter::direct(quota(1e-30, u32::MAX).unwrap());
        assert!(limiter.check().is_ok());
        assert_eq!(retry_after_s(Duration::ZERO), 1);
        assert_eq!(retry_after_s(Duration::from_millis(999)), 1);
        assert_eq!(retry_after_s(Duration::from_nanos(1_000_000_001)), 2);
        assert_eq!(retry_after_s(Duration::from_secs(u64::MAX)), u32::MAX);
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
