//! buffergate: an HTTP ingestion gateway in front of a ClickHouse Buffer table.
//!
//! An event travels `http` (body, limits, errors) → `schema` (validate and encode against the
//! live table) → `coalesce` (per-partition group commit) → `clickhouse` (INSERT, retry). The
//! `server` module wires them; `config` and `shutdown` are shared by all.

pub mod auth;
pub mod check;
pub mod cli;
pub mod clickhouse;
pub mod coalesce;
pub mod config;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod schema;
pub mod server;
pub mod shed;
pub mod shutdown;

pub use config::Config;
pub use shutdown::Shutdown;
