//! Asking ClickHouse what it holds, for the journal: which of a block's event ids a table has,
//! whether the server restarted, whether the Buffer failed to flush, and stopping an INSERT
//! whose answer was lost before its rows are looked for.

use std::collections::HashSet;

use uuid::Uuid;

use super::{ClickHouse, ClickHouseError, quote_str};
use crate::schema::quote_ident;

/// Ids asked about per query: bounded statements, answers of a few hundred KiB at most.
const IDS_PER_QUERY: usize = 2_000;

/// Between two looks for rows: rows a Buffer is flushing are, for the moment of the flush, in
/// neither its memory nor the destination, so an id missed once is looked for again.
pub const RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Where to look for ids: the table, its id column and, to prune by time, its time column.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// `` `db`.`table` ``.
    pub table: &'a str,
    pub id_column: &'a str,
    pub time_column: Option<&'a str>,
}

impl ClickHouse {
    /// Which of `ids` the table holds; `seconds` (the rows' time span) prunes the search
    /// to the partitions and index ranges of those times.
    pub async fn present(
        &self,
        lookup: Lookup<'_>,
        ids: &[Uuid],
        seconds: Option<(i64, i64)>,
    ) -> Result<HashSet<Uuid>, ClickHouseError> {
        #[derive(serde::Deserialize)]
        struct Row {
            id: String,
        }
        let mut found = HashSet::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let rows: Vec<Row> = self.fetch_json(&presence_sql(lookup, chunk, seconds)).await?;
            found.extend(rows.iter().filter_map(|r| Uuid::parse_str(&r.id).ok()));
        }
        Ok(found)
    }

    /// [`Self::present`], looking again after [`RECHECK_PAUSE`] for the ids missed the first time.
    /// Each query holds a permit of `gate` (not the pause between them): callers that look up
    /// many batches at once bound the SELECTs they send.
    pub async fn present_twice(
        &self,
        lookup: Lookup<'_>,
        ids: &[Uuid],
        seconds: Option<(i64, i64)>,
        gate: &tokio::sync::Semaphore,
    ) -> Result<HashSet<Uuid>, ClickHouseError> {
        let closed = |_| ClickHouseError::Protocol("the look-up gate is closed".into());
        let mut found = {
            let _permit = gate.acquire().await.map_err(closed)?;
            self.present(lookup, ids, seconds).await?
        };
        if found.len() < ids.len() {
            tokio::time::sleep(RECHECK_PAUSE).await;
            let missing: Vec<Uuid> = ids.iter().filter(|id| !found.contains(id)).copied().collect();
            let _permit = gate.acquire().await.map_err(closed)?;
            found.extend(self.present(lookup, &missing, seconds).await?);
        }
        Ok(found)
    }

    /// Seconds since the server started: a value lower than expected means it restarted.
    pub async fn uptime(&self) -> Result<u64, ClickHouseError> {
        self.scalar("SELECT toString(uptime()) AS v").await.map(|v| v.unwrap_or(0))
    }

    /// Whether this process's row is still in `table`, a Memory table: its rows live in the
    /// server's RAM as a Buffer's do, so a row gone means the server lost its memory (a
    /// restart) since it was written. The row is written again when missing; the table is
    /// created when missing.
    pub async fn still_marked(&self, table: &str, instance: &str) -> Result<bool, ClickHouseError> {
        self.execute(&format!("CREATE TABLE IF NOT EXISTS {table} (instance String) ENGINE = Memory")).await?;
        let count = format!("SELECT toString(count()) AS v FROM {table} WHERE instance = {}", quote_str(instance));
        if self.scalar(&count).await?.unwrap_or(0) > 0 {
            return Ok(true);
        }
        self.execute(&format!("INSERT INTO {table} (instance) VALUES ({})", quote_str(instance))).await?;
        Ok(false)
    }

    /// Buffer flushes that failed since the server started (`StorageBufferErrorOnFlush`; the
    /// event is absent until it first happens).
    pub async fn buffer_flush_errors(&self) -> Result<u64, ClickHouseError> {
        self.scalar("SELECT toString(value) AS v FROM system.events WHERE event = 'StorageBufferErrorOnFlush'")
            .await
            .map(|v| v.unwrap_or(0))
    }

    /// Stops every query of a block, the one with id `query_id` and those whose id derives from
    /// it (`{query_id}-…`: attempts, failovers, resends), and waits until none runs: an INSERT
    /// whose answer was lost must not land after its rows were looked for.
    pub async fn stop_queries(&self, query_id: &str) -> Result<(), ClickHouseError> {
        let filter = queries_of(query_id);
        self.execute(&format!("KILL QUERY WHERE {filter} SYNC")).await?;
        let running = format!("SELECT toString(count()) AS v FROM system.processes WHERE {filter}");
        match self.scalar(&running).await? {
            Some(0) | None => Ok(()),
            Some(n) => Err(ClickHouseError::Protocol(format!("{n} queries of {query_id} still run after KILL QUERY"))),
        }
    }

    async fn scalar(&self, sql: &str) -> Result<Option<u64>, ClickHouseError> {
        #[derive(serde::Deserialize)]
        struct Row {
            v: String,
        }
        let rows: Vec<Row> = self.fetch_json(sql).await?;
        Ok(rows.first().and_then(|r| r.v.parse().ok()))
    }
}

/// The queries of a block: its own id, or one under it with a delimiter. A bare prefix would
/// also take other blocks' (`bg-x-5` is a prefix of `bg-x-50` and `bg-x-512`).
fn queries_of(query_id: &str) -> String {
    let under = format!("{}-%", query_id.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
    format!("(query_id = {} OR query_id LIKE {})", quote_str(query_id), quote_str(&under))
}

fn presence_sql(lookup: Lookup<'_>, ids: &[Uuid], seconds: Option<(i64, i64)>) -> String {
    let id = quote_ident(lookup.id_column);
    let list: Vec<String> = ids.iter().map(|u| format!("'{u}'")).collect();
    let mut sql = format!("SELECT toString({id}) AS id FROM {} WHERE {id} IN ({})", lookup.table, list.join(","));
    if let (Some(column), Some((lo, hi))) = (lookup.time_column, seconds) {
        let column = quote_ident(column);
        sql.push_str(&format!(" AND {column} >= toDateTime({lo}) AND {column} < toDateTime({})", hi.saturating_add(1)));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_s_queries_are_its_id_and_the_ids_under_it() {
        assert_eq!(queries_of("bg-x-5"), "(query_id = 'bg-x-5' OR query_id LIKE 'bg-x-5-%')");
        assert_eq!(queries_of("a_b%"), r"(query_id = 'a_b%' OR query_id LIKE 'a\\_b\\%-%')");
    }

    #[test]
    fn presence_is_asked_by_id_and_pruned_by_time() {
        let lookup = Lookup { table: "`db`.`t`", id_column: "event_id", time_column: Some("event_ts") };
        let id = Uuid::from_u64_pair(1, 2);
        assert_eq!(
            presence_sql(lookup, &[id], Some((10, 20))),
            format!(
                "SELECT toString(`event_id`) AS id FROM `db`.`t` WHERE `event_id` IN ('{id}') AND `event_ts` >= toDateTime(10) AND `event_ts` < toDateTime(21)"
            )
        );
        let untimed = Lookup { time_column: None, ..lookup };
        assert!(!presence_sql(untimed, &[id], Some((10, 20))).contains("event_ts"));
    }
}
