//! `buffergate replay`: asks a running gateway to replay (`POST /admin/replay`), since the
//! replay must go through the gateway's own pipeline, journal and deduplication.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;

/// The most of the gateway's answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// What the command asks for.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub stream: &'a str,
    pub reason: Option<&'a str>,
    pub since: Option<&'a str>,
    /// The gateway's base URL (default: its `listen` address on this host).
    pub gateway: Option<&'a str>,
}

/// Sends the replay request; returns the gateway's JSON answer, or why it failed.
pub async fn ask(config: &Config, ask: &Ask<'_>) -> Result<String, String> {
    if config.auth.admin_token.is_empty() {
        return Err("replay goes through a running gateway's admin API: set admin_token".into());
    }
    let base = ask.gateway.map_or_else(|| local(config.http.listen), |g| g.trim_end_matches('/').to_string());
    let mut query = vec![format!("stream={}", encode(ask.stream))];
    query.extend(ask.reason.map(|r| format!("reason={}", encode(r))));
    query.extend(ask.since.map(|s| format!("since={}", encode(s))));
    let uri = format!("{base}/admin/replay?{}", query.join("&"));
    let request = hyper::Request::post(&uri)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {}", config.auth.admin_token))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{uri}: {e}"))?;
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.map_err(|e| format!("{base}: {e}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("{base}: reading the answer: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() { Ok(text) } else { Err(format!("{base} answered {status}: {text}")) }
}

/// The gateway on this host: its listen address, or loopback when it listens on every address.
fn local(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { listen.ip() };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// A query value, percent-encoded (all but unreserved characters).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_and_the_local_address() {
        assert_eq!(encode("2026-12-07T10:00:00+01:00"), "2026-12-07T10%3A00%3A00%2B01%3A00");
        assert_eq!(local("0.0.0.0:8080".parse().unwrap()), "http://127.0.0.1:8080");
        assert_eq!(local("10.0.0.5:9000".parse().unwrap()), "http://10.0.0.5:9000");
    }
}
