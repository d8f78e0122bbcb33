//! buffergate: an HTTP ingestion gateway in front of a ClickHouse Buffer table.
//!
//! An event travels `http` or `kafka` (the fronts: headers or messages into a request) →
//! `streams` (the stream it names, each with a whole path of its own below) →
//! `ingest` (the one sequence both run) → `decode` (body → validated rows per partition) →
//! `coalesce` (per-partition group commit) → `flush` (journal alongside the INSERT, failover,
//! the batch's outcome) → `journal` (every block on disk until the MergeTree holds it; the one
//! way an INSERT of unknown fate is settled) and `clickhouse` (INSERT, retry, breaker).
//! `idempotency` (reserve, commit, release) and `cluster` (shards, replicas) serve along the
//! path; `schema`, `rows`, `config`, `metrics`, `health`, `auth`, `shutdown` are the leaves.
//! Rejected events are parked by `ingest` in the stream's quarantine table and sent again by
//! `replay`. `server` wires them; `cli` and `check` are the commands.

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
pub mod replay;
pub mod rows;
pub mod schema;
pub mod server;
pub mod shed;
pub mod shutdown;
pub mod streams;

pub use config::Config;
pub use shutdown::Shutdown;
