//! buffergate: an HTTP ingestion gateway in front of a ClickHouse Buffer table.
//!
//! An event travels `http` (headers, body limits, the answer) → `ingest` (the steps of one
//! batch, in order) → `decode` (body → validated rows per partition) → `idempotency`
//! (reserve, commit, release) → `coalesce` (per-partition group commit) → `journal` (every
//! block on disk until the MergeTree holds it) → `clickhouse` (INSERT, retry, breaker). Beside the path: `schema` (column types and encoders), `rows`
//! (the row types the stages hand on), `shed` (Buffer fill, in-flight budget), `config`,
//! `metrics`, `health`, `auth`, `shutdown`. `server` wires them; `cli` and `check` are the
//! commands. `kafka` is a second front beside `http`: a consumer group member driving the same
//! `ingest` path (`buffergate consume`).

pub mod auth;
pub mod check;
pub mod cli;
pub mod clickhouse;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod decode;
pub mod flush;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod ingest;
pub mod journal;
pub mod kafka;
pub mod metrics;
pub mod rows;
pub mod schema;
pub mod server;
pub mod shed;
pub mod shutdown;

pub use config::Config;
pub use shutdown::Shutdown;
