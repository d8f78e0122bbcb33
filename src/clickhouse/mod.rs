//! Everything that talks to ClickHouse: the HTTP client, INSERTs (Native blocks by default,
//! RowBinary on request), metadata queries and capability probes; beside it the writer with
//! its retry policy and circuit breaker, the schema watcher, `migrate` and `drain`.

pub mod breaker;
pub mod clusters;
pub mod drain;
pub mod fleet;
pub mod migrate;
pub mod presence;
pub mod refresh;
pub mod retry;
pub mod writer;

use std::time::Duration;

use bytes::Bytes;
use clickhouse::insert_formatted::CompressedData;
use serde::de::DeserializeOwned;

use crate::config::{self, Config};
use crate::rows::{BodyPart, PartData};
use crate::schema::{ColumnInfo, quote_ident};

/// A failure talking to ClickHouse, classified for the retry policy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClickHouseError {
    /// The server answered with an exception.
    #[error("ClickHouse error {code}: {message}")]
    Server { code: u32, message: String },
    /// Something between us and the server failed (connect, reset, proxy without a body).
    #[error("cannot reach ClickHouse: {0}")]
    Network(String),
    #[error("ClickHouse did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer could not be understood.
    #[error("unexpected answer from ClickHouse: {0}")]
    Protocol(String),
    /// Not sent: the circuit breaker is open after repeated failures.
    #[error("not sent: the INSERT circuit breaker is open")]
    CircuitOpen,
}

impl ClickHouseError {
    fn from_client(err: clickhouse::error::Error, timeout: Duration) -> Self {
        use clickhouse::error::Error as E;
        match err {
            E::BadResponse(text) => match parse_exception_code(&text) {
                Some(code) => Self::Server { code, message: text },
                None => Self::Network(text),
            },
            E::Network(e) => Self::Network(e.to_string()),
            E::TimedOut => Self::Timeout(timeout),
            other => Self::Protocol(other.to_string()),
        }
    }

    /// The server's exception code, if the server answered.
    pub fn code(&self) -> Option<u32> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `Code: 60. DB::Exception: ...` (current) or `Code: 60, e.displayText() = ...` (18.x).
fn parse_exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A client on the `clickhouse` crate's own kind of connection pool, plus `TCP_NODELAY`. An
/// INSERT body goes out in several writes (its parts, then the chunked encoding's last
/// chunk); with Nagle's algorithm a small write waits for the ACK of the previous one, which
/// the server may delay by 40 ms (measured here: requests' p50 ~9 → ~47 ms in some runs,
/// events/s cut by three quarters).
fn http_client() -> clickhouse::Client {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(false);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider());
    match tls {
        Ok(tls) => clickhouse::Client::with_http_client(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                // Below ClickHouse's keep-alive timeout (3 s by default), as the crate's own.
                .pool_idle_timeout(Duration::from_secs(2))
                .build(tls.https_or_http().enable_http1().wrap_connector(connector)),
        ),
        // Only if ring offered no safe TLS version.
        Err(error) => {
            tracing::warn!(%error, "TLS setup failed; the ClickHouse client runs without TCP_NODELAY");
            clickhouse::Client::default()
        }
    }
}

/// Version and feature probes of the server, for paths that differ between ClickHouse releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub version: String,
    /// The server's time zone (`timezone()`): where it reads a time given without an offset.
    pub timezone: String,
    /// `DateTime64` exists (20.1+).
    pub datetime64: bool,
    /// `Map` exists (21.x+).
    pub map: bool,
    /// `LowCardinality` columns need `allow_experimental_low_cardinality_type = 1` (18.x).
    pub low_cardinality_needs_setting: bool,
    /// `system.tables` has `total_bytes` (per-table Buffer size; ≈20.x+).
    pub tables_total_bytes: bool,
}

impl Capabilities {
    /// What a current ClickHouse (26.x) has.
    pub fn modern() -> Self {
        Self {
            version: "26".into(),
            timezone: "UTC".into(),
            datetime64: true,
            map: true,
            low_cardinality_needs_setting: false,
            tables_total_bytes: true,
        }
    }
}

/// A ClickHouse HTTP endpoint with the gateway's credentials, compression and timeouts.
#[derive(Clone)]
pub struct ClickHouse {
    client: clickhouse::Client,
    timeout: Duration,
    compression: config::Compression,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl ClickHouse {
    /// The first node of `clickhouse_url` (the only one, unless it lists a cluster).
    pub fn new(config: &Config) -> Self {
        let first = config.clickhouse.clickhouse_url.split([';', ',']).next().unwrap_or_default().trim();
        Self::for_url(config, first)
    }

    /// The node at `url`, with the configuration's credentials and timeouts.
    pub fn for_url(config: &Config, url: &str) -> Self {
        let mut client = http_client()
            .with_url(url)
            .with_user(&config.clickhouse.clickhouse_user)
            .with_compression(match config.clickhouse.clickhouse_compression {
                config::Compression::Lz4 => clickhouse::Compression::Lz4,
                config::Compression::None => clickhouse::Compression::None,
            })
            .with_validation(false);
        if !config.clickhouse.clickhouse_password.is_empty() {
            client = client.with_password(&config.clickhouse.clickhouse_password);
        }
        Self { client, timeout: config.clickhouse_timeout(), compression: config.clickhouse.clickhouse_compression }
    }

    /// `data` as a part of a later INSERT's body: compressed now, as the INSERT would compress
    /// it, so the INSERT itself does not spend the time.
    pub fn body_part(&self, data: Vec<u8>) -> BodyPart {
        let bytes = data.len();
        if self.compression == config::Compression::Lz4
            && let Ok(compressed) = CompressedData::new(&data, clickhouse::Compression::Lz4)
        {
            return BodyPart::compressed(bytes, compressed);
        }
        BodyPart::plain(Bytes::from(data))
    }

    /// The same endpoint with one more setting on every statement.
    pub fn with_setting(&self, name: &str, value: &str) -> Self {
        Self { client: self.client.clone().with_setting(name, value), ..self.clone() }
    }

    async fn bounded<T>(&self, fut: impl Future<Output = clickhouse::error::Result<T>>) -> Result<T, ClickHouseError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| ClickHouseError::from_client(e, self.timeout)),
            Err(_) => Err(ClickHouseError::Timeout(self.timeout)),
        }
    }

    /// Runs a statement that returns nothing (DDL, OPTIMIZE).
    pub async fn execute(&self, sql: &str) -> Result<(), ClickHouseError> {
        self.bounded(self.client.query_raw(sql).execute()).await
    }

    /// Runs a query and parses its `JSONEachRow` answer.
    pub async fn fetch_json<T: DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, ClickHouseError> {
        let bytes = self
            .bounded(async {
                let mut cursor = self.client.query_raw(sql).fetch_bytes("JSONEachRow")?;
                cursor.collect().await
            })
            .await?;
        bytes
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).map_err(|e| ClickHouseError::Protocol(e.to_string())))
            .collect()
    }

    /// `SELECT 1`: is the server there and answering?
    pub async fn ping(&self) -> Result<(), ClickHouseError> {
        self.execute("SELECT 1").await
    }

    /// Sends one INSERT whose data is already encoded in the statement's format, as one body
    /// made of `parts` in turn.
    pub async fn insert(&self, sql: &str, parts: Vec<BodyPart>) -> Result<(), ClickHouseError> {
        self.insert_as(sql, parts, None).await
    }

    /// [`Self::insert`] under a `query_id` of ours, so that an INSERT whose answer was lost
    /// can be found and stopped on the server before its rows are looked for.
    pub async fn insert_as(
        &self,
        sql: &str,
        parts: Vec<BodyPart>,
        query_id: Option<&str>,
    ) -> Result<(), ClickHouseError> {
        let map = |e| ClickHouseError::from_client(e, self.timeout);
        let mut insert =
            self.client.insert_formatted_with(sql.to_string()).with_timeouts(Some(self.timeout), Some(self.timeout));
        if let Some(id) = query_id {
            insert = insert.with_setting("query_id", id);
        }
        for part in parts {
            match part.data {
                PartData::Plain(data) => insert.send(data).await,
                PartData::Compressed(data) => insert.send_compressed(data).await,
            }
            .map_err(map)?;
        }
        insert.end().await.map_err(map)
    }

    /// The table's columns in order (`DESCRIBE TABLE`, which every version orders by position);
    /// empty when the table does not exist.
    pub async fn columns(&self, database: &str, table: &str) -> Result<Vec<ColumnInfo>, ClickHouseError> {
        #[derive(serde::Deserialize)]
        struct Described {
            name: String,
            #[serde(rename = "type")]
            type_text: String,
            #[serde(default)]
            default_type: String,
        }
        let sql = format!("DESCRIBE TABLE {}.{}", quote_ident(database), quote_ident(table));
        match self.fetch_json::<Described>(&sql).await {
            Ok(rows) => Ok(rows
                .into_iter()
                .map(|d| ColumnInfo { name: d.name, type_text: d.type_text, default_kind: d.default_type })
                .collect()),
            Err(ClickHouseError::Server { code: 60 | 81, .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `engine_full` of a table, or `None` if it does not exist.
    pub async fn engine_full(&self, database: &str, table: &str) -> Result<Option<String>, ClickHouseError> {
        #[derive(serde::Deserialize)]
        struct Row {
            engine_full: String,
        }
        let rows: Vec<Row> = self
            .fetch_json(&format!(
                "SELECT engine_full FROM system.tables WHERE database = {} AND name = {}",
                quote_str(database),
                quote_str(table)
            ))
            .await?;
        Ok(rows.into_iter().next().map(|r| r.engine_full))
    }

    /// Probes the server for the features whose absence changes what the gateway does.
    pub async fn capabilities(&self) -> Result<Capabilities, ClickHouseError> {
        #[derive(serde::Deserialize)]
        struct Version {
            v: String,
            tz: String,
        }
        let (version, timezone) = self
            .fetch_json::<Version>("SELECT version() AS v, timezone() AS tz")
            .await?
            .into_iter()
            .next()
            .map(|r| (r.v, r.tz))
            .ok_or_else(|| ClickHouseError::Protocol("SELECT version(), timezone() gave no row".into()))?;
        let supported = |sql: &'static str| async move {
            match self.execute(sql).await {
                Ok(()) => Ok(true),
                Err(ClickHouseError::Server { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        };
        let datetime64 = supported(probes::DATETIME64).await?;
        let map = supported(probes::MAP).await?;
        let tables_total_bytes = supported(probes::TABLES_TOTAL_BYTES).await?;
        let low_cardinality_needs_setting = !supported_ddl_without_setting(&version);
        Ok(Capabilities { version, timezone, datetime64, map, low_cardinality_needs_setting, tables_total_bytes })
    }
}

/// Statements that succeed only on servers with a feature (public so that tests can run them
/// on an embedded modern ClickHouse too).
pub mod probes {
    pub const DATETIME64: &str = "SELECT CAST('2020-01-01 00:00:00' AS DateTime64(3))";
    pub const MAP: &str = "SELECT CAST(([], []), 'Map(String, String)')";
    pub const TABLES_TOTAL_BYTES: &str = "SELECT total_bytes FROM system.tables LIMIT 0";
}

/// Servers before 19.x refuse `LowCardinality` in DDL unless the experimental setting is on.
fn supported_ddl_without_setting(version: &str) -> bool {
    version.split('.').next().and_then(|major| major.parse::<u32>().ok()).is_some_and(|major| major >= 19)
}

/// Quotes a string literal for ClickHouse SQL.
pub fn quote_str(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_codes_of_old_and_new_servers() {
        assert_eq!(parse_exception_code("Code: 60, e.displayText() = DB::Exception: Table x doesn't exist."), Some(60));
        assert_eq!(parse_exception_code("Code: 241. DB::Exception: Memory limit exceeded"), Some(241));
        assert_eq!(parse_exception_code("502 Bad Gateway"), None);
    }

    #[test]
    fn low_cardinality_setting_by_version() {
        assert!(!supported_ddl_without_setting("18.16.1"));
        assert!(supported_ddl_without_setting("19.1.6"));
        assert!(supported_ddl_without_setting("26.9.1.1"));
        assert!(!supported_ddl_without_setting("garbage"));
    }
}
