//! What a 200 promises with this configuration and table, and the Distributed table reads of
//! a cluster go through.

use super::{Finding, Severity, finding};
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::config::Config;

/// The Distributed table reads go through, on one node.
pub(super) async fn cluster_tables(ch: &ClickHouse, config: &Config) -> Option<Finding> {
    let table = crate::clickhouse::fleet::distributed_table(config);
    match ch.engine_full(&config.table.database, &table).await {
        Ok(Some(engine)) if engine.starts_with("Distributed") => None,
        Ok(_) => Some(finding(
            "distributed_table",
            Severity::Warning,
            format!(
                "{}.{table} is missing or not a Distributed table: reads of the whole cluster have no table",
                config.table.database
            ),
            "run buffergate migrate with clickhouse_cluster set",
        )),
        Err(_) => None,
    }
}

/// What a 200 promises with this configuration and table: exactly once needs the journal and
/// an event id per row to look rows up by.
pub(super) async fn run(ch: &ClickHouse, config: &Config) -> Result<Option<Finding>, ClickHouseError> {
    if !config.journal_enabled() {
        return Ok(Some(finding(
            "journal",
            Severity::Warning,
            "the journal is off: acknowledged rows in the Buffer are lost if ClickHouse crashes, and an INSERT whose answer was lost is retried (at-least-once)",
            "set BUFFERGATE_JOURNAL=true and BUFFERGATE_DATA_DIR to a persistent volume",
        )));
    }
    let columns = ch.columns(&config.table.database, &config.table.buffer_table).await?;
    let has_id = columns.iter().any(|c| {
        c.name == config.table.id_column && crate::schema::ColumnType::parse(&c.type_text).is_ok_and(|ty| ty.is_uuid())
    });
    Ok((!has_id && !columns.is_empty()).then(|| {
        finding(
            "event_id",
            Severity::Warning,
            format!(
                "the table has no UUID column {}: after a ClickHouse crash or an INSERT whose answer was lost, journaled blocks cannot be checked row by row and are sent again whole (at-least-once)",
                config.table.id_column
            ),
            "add a UUID id column (and set id_column) for exactly-once delivery",
        )
    }))
}
