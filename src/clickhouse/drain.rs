//! `buffergate drain` (and `/admin/flush`, and `migrate`'s Buffer swap): flush a Buffer table
//! into its destination and wait until it is empty.

use super::{ClickHouse, ClickHouseError, quote_str};
use crate::config::Config;
use crate::schema::quote_ident;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error("the Buffer did not empty within 30 s (writers are still filling it?)")]
    Timeout,
}

/// Flushes the Buffer into its destination (`OPTIMIZE TABLE`) and waits until it is empty;
/// returns the rows moved: the Buffer's own row count where the server reports it (≈20.x+),
/// else how much the destination grew (which counts concurrent flushes too).
pub async fn drain(ch: &ClickHouse, config: &Config) -> Result<u64, DrainError> {
    drain_table(ch, config, &config.table.buffer_table).await
}

/// [`drain`] of a Buffer table by name (in the configured database).
pub(super) async fn drain_table(ch: &ClickHouse, config: &Config, table: &str) -> Result<u64, DrainError> {
    let (db, buffer, destination) =
        (quote_ident(&config.table.database), quote_ident(table), quote_ident(&config.table.destination_table));
    let per_table = ch.capabilities().await?.tables_total_bytes;
    let buffered = || async {
        #[derive(serde::Deserialize)]
        struct Row {
            rows: String,
        }
        let sql = format!(
            "SELECT toString(ifNull(total_rows, 0)) AS rows FROM system.tables WHERE database = {} AND name = {}",
            quote_str(&config.table.database),
            quote_str(table)
        );
        let rows: Vec<Row> = ch.fetch_json(&sql).await?;
        Ok::<u64, ClickHouseError>(rows.first().and_then(|r| r.rows.parse().ok()).unwrap_or(0))
    };
    let count = || async {
        #[derive(serde::Deserialize)]
        struct Row {
            n: String,
        }
        let rows: Vec<Row> = ch.fetch_json(&format!("SELECT toString(count()) AS n FROM {db}.{destination}")).await?;
        Ok::<u64, ClickHouseError>(rows.first().and_then(|r| r.n.parse().ok()).unwrap_or(0))
    };
    let before = if per_table { buffered().await? } else { count().await? };
    ch.execute(&format!("OPTIMIZE TABLE {db}.{buffer}")).await?;
    if !per_table {
        // OPTIMIZE on a Buffer flushes every layer before it returns.
        return Ok(count().await?.saturating_sub(before));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while buffered().await? > 0 {
        if tokio::time::Instant::now() > deadline {
            return Err(DrainError::Timeout);
        }
        ch.execute(&format!("OPTIMIZE TABLE {db}.{buffer}")).await?;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(before)
}
