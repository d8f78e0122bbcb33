//! `buffergate migrate`: creates the database, the destination MergeTree table and the Buffer
//! table in front of it, and the stream's quarantine table with its own Buffer, idempotently,
//! adapting the seed schema to what the server supports.

use super::drain::DrainError;
use super::drain::drain_table;
use super::{Capabilities, ClickHouse, ClickHouseError, quote_str};
use crate::config::Config;
use crate::schema::{ColumnInfo, quote_ident};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error(
        "the Buffer table {buffer} has columns that differ from its destination {destination}: {differences}. \
         ClickHouse casts or fails at flush time, losing rows; drain it (OPTIMIZE TABLE), drop it and run migrate again"
    )]
    ColumnsDiffer { buffer: String, destination: String, differences: String },
    #[error("{table} exists but is not a Buffer table (engine: {engine})")]
    NotABuffer { table: String, engine: String },
    #[error(transparent)]
    Drain(#[from] DrainError),
    #[error("the cluster: {0}")]
    Topology(String),
    #[error(
        "the stream {stream}'s destination {table} does not exist: a stream writes to a table you create \
         (any schema the gateway supports); create it, then run migrate to put its Buffer in front of it"
    )]
    NoDestination { stream: String, table: String },
    #[error("{node}: {error}")]
    OnNode { node: String, error: Box<MigrateError> },
}

/// What `migrate` did and what it adapted, one line each, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
}

/// The seed schema's columns, with the closest equivalents where the server lacks a type.
pub fn seed_columns(caps: &Capabilities) -> Vec<(&'static str, &'static str)> {
    vec![
        ("event_id", "UUID"),
        ("event_ts", if caps.datetime64 { "DateTime64(3)" } else { "DateTime" }),
        ("user_id", "UInt64"),
        ("event_type", "LowCardinality(String)"),
        ("payload", "String"),
        ("metadata", if caps.map { "Map(String, String)" } else { "String" }),
    ]
}

/// The quarantine table's columns (`ingest::QuarantineRow` writes them; `received` is the
/// receive time the pipeline fills).
pub fn quarantine_columns(caps: &Capabilities) -> Vec<(&'static str, &'static str)> {
    vec![
        ("quarantine_id", "UUID"),
        ("received", if caps.datetime64 { "DateTime64(3)" } else { "DateTime" }),
        ("stream", "LowCardinality(String)"),
        ("api_key", "String"),
        ("producer_id", "String"),
        ("event_index", "UInt32"),
        ("raw", "String"),
        ("raw_bytes", "UInt64"),
        ("field", "String"),
        ("reason", "LowCardinality(String)"),
        ("error", "String"),
        ("replayed", "UInt8"),
        ("updated", "UInt64"),
    ]
}

/// `CREATE TABLE IF NOT EXISTS` for a quarantine table (`config`: the quarantine stream's).
/// A ReplacingMergeTree by `updated`: a replay marks an event by writing a newer version of
/// its row, and reads with `FINAL` see the latest only.
pub fn quarantine_ddl(config: &Config, caps: &Capabilities) -> String {
    let columns: Vec<String> =
        quarantine_columns(caps).iter().map(|(name, ty)| format!("    {} {ty}", quote_ident(name))).collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{}\n(\n{}\n)\nENGINE = ReplacingMergeTree(updated)\nPARTITION BY toYYYYMM(received)\nORDER BY quarantine_id",
        quote_ident(&config.table.database),
        quote_ident(&config.table.destination_table),
        columns.join(",\n")
    )
}

/// `CREATE TABLE IF NOT EXISTS` for the destination MergeTree table.
pub fn destination_ddl(config: &Config, caps: &Capabilities) -> String {
    let columns: Vec<String> =
        seed_columns(caps).iter().map(|(name, ty)| format!("    {} {ty}", quote_ident(name))).collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{}\n(\n{}\n)\nENGINE = MergeTree()\nPARTITION BY toYYYYMM(event_ts)\nORDER BY (event_type, event_ts, user_id)",
        quote_ident(&config.table.database),
        quote_ident(&config.table.destination_table),
        columns.join(",\n")
    )
}

/// The `Buffer(...)` engine clause from configuration.
pub fn buffer_engine(config: &Config) -> String {
    format!(
        "Buffer({}, {}, {}, {}, {}, {}, {}, {}, {})",
        quote_str(&config.table.database),
        quote_str(&config.table.destination_table),
        config.table.buffer_num_layers,
        config.table.buffer_min_time,
        config.table.buffer_max_time,
        config.table.buffer_min_rows,
        config.table.buffer_max_rows,
        config.table.buffer_min_bytes,
        config.table.buffer_max_bytes
    )
}

/// `CREATE TABLE IF NOT EXISTS` for the Buffer table, with the destination's exact columns.
pub fn buffer_ddl(config: &Config) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{buffer} AS {db}.{destination} ENGINE = {engine}",
        db = quote_ident(&config.table.database),
        buffer = quote_ident(&config.table.buffer_table),
        destination = quote_ident(&config.table.destination_table),
        engine = buffer_engine(config)
    )
}

/// Differences in name, type or order between two column lists, or `None` when identical.
pub fn column_differences(buffer: &[ColumnInfo], destination: &[ColumnInfo]) -> Option<String> {
    let mut diffs = Vec::new();
    let max = buffer.len().max(destination.len());
    for i in 0..max {
        match (buffer.get(i), destination.get(i)) {
            (Some(b), Some(d)) if b.name == d.name && b.type_text == d.type_text => {}
            (Some(b), Some(d)) => diffs.push(format!(
                "#{} is {} {} in the buffer but {} {} in the destination",
                i + 1,
                b.name,
                b.type_text,
                d.name,
                d.type_text
            )),
            (Some(b), None) => {
                diffs.push(format!("{} {} is only in the buffer", b.name, b.type_text));
            }
            (None, Some(d)) => diffs.push(format!("{} {} is only in the destination", d.name, d.type_text)),
            (None, None) => {}
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// Creates what is missing and checks what exists.
pub async fn migrate(ch: &ClickHouse, config: &Config) -> Result<Report, MigrateError> {
    let caps = ch.capabilities().await?;
    let ch = if caps.low_cardinality_needs_setting {
        ch.with_setting("allow_experimental_low_cardinality_type", "1")
    } else {
        ch.clone()
    };
    let mut report = Report::default();
    report.lines.push(format!("ClickHouse {}", caps.version));
    ch.execute(&format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(&config.table.database))).await?;
    create_destination(&ch, config, &caps, &mut report).await?;
    create_buffer(&ch, config, &mut report).await?;
    create_fallback(&ch, config, &mut report).await?;
    reconcile_columns(&ch, config, &mut report).await?;
    if let Some(quarantine) = config.quarantine_stream() {
        create_quarantine(&ch, &quarantine, &caps, &mut report).await?;
        create_buffer(&ch, &quarantine, &mut report).await?;
        reconcile_columns(&ch, &quarantine, &mut report).await?;
    }
    Ok(report)
}

/// The destination MergeTree, with the seed columns adapted to the server.
async fn create_destination(
    ch: &ClickHouse,
    config: &Config,
    caps: &Capabilities,
    report: &mut Report,
) -> Result<(), MigrateError> {
    let (db, destination) = (&config.table.database, &config.table.destination_table);
    if ch.engine_full(db, destination).await?.is_some() {
        report.lines.push(format!("{db}.{destination} exists"));
        return Ok(());
    }
    // Only the default stream has a schema of its own to create (the seed's).
    if !config.stream.is_default() {
        return Err(MigrateError::NoDestination {
            stream: config.stream.to_string(),
            table: format!("{db}.{destination}"),
        });
    }
    if !caps.datetime64 {
        report.lines.push("this server has no DateTime64: event_ts is created as DateTime (whole seconds)".into());
    }
    if !caps.map {
        report.lines.push("this server has no Map: metadata is created as String holding JSON text".into());
    }
    if caps.low_cardinality_needs_setting {
        report.lines.push("LowCardinality created with allow_experimental_low_cardinality_type = 1".into());
    }
    ch.execute(&destination_ddl(config, caps)).await?;
    report.lines.push(format!("created {db}.{destination}"));
    Ok(())
}

/// The quarantine table (`config`: the quarantine stream's).
async fn create_quarantine(
    ch: &ClickHouse,
    config: &Config,
    caps: &Capabilities,
    report: &mut Report,
) -> Result<(), MigrateError> {
    let (db, table) = (&config.table.database, &config.table.destination_table);
    if ch.engine_full(db, table).await?.is_some() {
        report.lines.push(format!("{db}.{table} exists"));
        return Ok(());
    }
    ch.execute(&quarantine_ddl(config, caps)).await?;
    report.lines.push(format!("created quarantine table {db}.{table}"));
    Ok(())
}

/// The Buffer in front of the destination; an existing one must be a Buffer.
async fn create_buffer(ch: &ClickHouse, config: &Config, report: &mut Report) -> Result<(), MigrateError> {
    let (db, buffer) = (&config.table.database, &config.table.buffer_table);
    match ch.engine_full(db, buffer).await? {
        None => {
            ch.execute(&buffer_ddl(config)).await?;
            report.lines.push(format!("created {db}.{buffer} ENGINE = {}", buffer_engine(config)));
        }
        Some(engine) if !engine.starts_with("Buffer") => {
            return Err(MigrateError::NotABuffer { table: format!("{db}.{buffer}"), engine });
        }
        Some(engine) => {
            report.lines.push(format!("{db}.{buffer} exists: ENGINE = {engine}"));
            if normalize(&engine) != normalize(&buffer_engine(config)) {
                report.lines.push(format!(
                    "note: its engine differs from the configuration ({}); drain, drop and migrate again to apply it",
                    buffer_engine(config)
                ));
            }
        }
    }
    Ok(())
}

/// The fallback MergeTree, when one is configured.
async fn create_fallback(ch: &ClickHouse, config: &Config, report: &mut Report) -> Result<(), MigrateError> {
    let (db, fallback) = (&config.table.database, &config.shed.fallback_table);
    if fallback.is_empty() || ch.engine_full(db, fallback).await?.is_some() {
        return Ok(());
    }
    // `AS` copies the destination's columns and its MergeTree engine.
    ch.execute(&format!(
        "CREATE TABLE IF NOT EXISTS {0}.{1} AS {0}.{2}",
        quote_ident(db),
        quote_ident(fallback),
        quote_ident(&config.table.destination_table)
    ))
    .await?;
    report.lines.push(format!("created fallback table {db}.{fallback}"));
    Ok(())
}

/// Checks that the Buffer's columns are the destination's; when the destination only gained
/// columns, swaps in a Buffer with them.
async fn reconcile_columns(ch: &ClickHouse, config: &Config, report: &mut Report) -> Result<(), MigrateError> {
    let (db, buffer, destination) =
        (&config.table.database, &config.table.buffer_table, &config.table.destination_table);
    let differ = |differences| MigrateError::ColumnsDiffer {
        buffer: format!("{db}.{buffer}"),
        destination: format!("{db}.{destination}"),
        differences,
    };
    let buffer_columns = ch.columns(db, buffer).await?;
    let destination_columns = ch.columns(db, destination).await?;
    let Some(differences) = column_differences(&buffer_columns, &destination_columns) else { return Ok(()) };
    if !only_added(&buffer_columns, &destination_columns) {
        return Err(differ(differences));
    }
    let moved = swap_buffer(ch, config).await?;
    report.lines.push(format!(
        "{db}.{destination} gained columns ({differences}): replaced {db}.{buffer} with a Buffer of the new columns and drained {moved} rows from the old one"
    ));
    match column_differences(&ch.columns(db, buffer).await?, &destination_columns) {
        Some(differences) => Err(differ(differences)),
        None => Ok(()),
    }
}

/// Replaces the Buffer with one of the destination's columns; returns the rows drained from
/// the old one. Dropping a Buffer that writers can still reach races with their INSERTs (a row
/// can land after the final flush and vanish with the table); after the RENAME no INSERT can
/// reach the old one (RENAME waits for those running). Gateways retry the INSERTs that meet
/// no table in between, then pick the new columns up.
async fn swap_buffer(ch: &ClickHouse, config: &Config) -> Result<u64, MigrateError> {
    let (db, buffer, destination) =
        (&config.table.database, &config.table.buffer_table, &config.table.destination_table);
    let (fresh, old) = (format!("{buffer}__new"), format!("{buffer}__old"));
    let q = |table: &str| format!("{}.{}", quote_ident(db), quote_ident(table));
    ch.execute(&format!("DROP TABLE IF EXISTS {}", q(&fresh))).await?;
    ch.execute(&format!("CREATE TABLE {} AS {} ENGINE = {}", q(&fresh), q(destination), buffer_engine(config))).await?;
    ch.execute(&format!("RENAME TABLE {} TO {}, {} TO {}", q(buffer), q(&old), q(&fresh), q(buffer))).await?;
    let moved = drain_table(ch, config, &old).await?;
    ch.execute(&format!("DROP TABLE {}", q(&old))).await?;
    Ok(moved)
}

/// Whether every Buffer column is in the destination with the same type (the destination only
/// gained columns, the schema change `migrate` applies by itself).
fn only_added(buffer: &[ColumnInfo], destination: &[ColumnInfo]) -> bool {
    buffer.iter().all(|b| destination.iter().any(|d| d.name == b.name && d.type_text == b.type_text))
}

/// Engine clauses compared without quotes or spaces (servers print arguments differently).
fn normalize(engine: &str) -> String {
    engine.chars().filter(|c| !c.is_whitespace() && *c != '\'' && *c != '`').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_servers_get_the_closest_types() {
        let old = Capabilities {
            version: "18.16.1".into(),
            timezone: "UTC".into(),
            datetime64: false,
            map: false,
            low_cardinality_needs_setting: true,
            tables_total_bytes: false,
        };
        let ddl = destination_ddl(&Config::default(), &old);
        assert!(ddl.contains("`event_ts` DateTime,") && ddl.contains("`metadata` String\n"), "{ddl}");
        let ddl = destination_ddl(&Config::default(), &Capabilities::modern());
        assert!(ddl.contains("`event_ts` DateTime64(3)") && ddl.contains("`metadata` Map(String, String)"), "{ddl}");
    }

    #[test]
    fn engine_comparison_ignores_quoting() {
        let config = Config::default();
        assert_eq!(
            normalize("Buffer(analytics, events_raw, 16, 10, 60, 100000, 1000000, 10485760, 134217728)"),
            normalize(&buffer_engine(&config))
        );
    }

    #[test]
    fn differences_are_spelled_out() {
        let c = |n: &str, t: &str| ColumnInfo { name: n.into(), type_text: t.into(), default_kind: String::new() };
        assert_eq!(column_differences(&[c("a", "UInt8")], &[c("a", "UInt8")]), None);
        let d = column_differences(&[c("a", "UInt8")], &[c("a", "String"), c("b", "UInt8")]).unwrap();
        assert!(
            d.contains("a UInt8 in the buffer but a String") && d.contains("b UInt8 is only in the destination"),
            "{d}"
        );
    }
}
