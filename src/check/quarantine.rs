//! The quarantine: whether rejected events can be parked, and how many wait there.

use super::{Finding, Severity, finding};
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::config::Config;
use crate::schema::quote_ident;

/// Events parked in the last hour that make the check warn: producers or the table need a fix.
const RECENT_SECONDS: u64 = 3600;

pub async fn run(ch: &ClickHouse, config: &Config) -> Result<Vec<Finding>, ClickHouseError> {
    let Some(quarantine) = config.quarantine_stream() else {
        return Ok(vec![finding(
            "quarantine",
            Severity::Info,
            "quarantine = off: rejected events are only listed in the answers, and lost when producers do not read them",
            "set quarantine = \"table\" and run buffergate migrate",
        )]);
    };
    let (db, table) = (&quarantine.table.database, &quarantine.table.destination_table);
    if ch.engine_full(db, table).await?.is_none() {
        return Ok(vec![finding(
            "quarantine",
            Severity::Error,
            format!(
                "{db}.{table} does not exist: every request with a rejected event is refused 503 quarantine_unavailable"
            ),
            "run buffergate migrate",
        )]);
    }
    #[derive(serde::Deserialize)]
    struct Counts {
        reason: String,
        pending: u64,
        recent: u64,
    }
    let sql = format!(
        "SELECT toString(reason) AS reason, count() AS pending, countIf(received >= now() - {RECENT_SECONDS}) AS recent \
         FROM {}.{} FINAL WHERE replayed = 0 GROUP BY reason ORDER BY pending DESC",
        quote_ident(db),
        quote_ident(table)
    );
    let counts: Vec<Counts> = ch.with_setting("output_format_json_quote_64bit_integers", "0").fetch_json(&sql).await?;
    let pending: u64 = counts.iter().map(|c| c.pending).sum();
    let recent: u64 = counts.iter().map(|c| c.recent).sum();
    if pending == 0 {
        return Ok(Vec::new());
    }
    let by_reason: Vec<String> = counts.iter().map(|c| format!("{} {}", c.reason, c.pending)).collect();
    let look = format!(
        "look at them (SELECT reason, field, error, raw FROM {}.{} FINAL WHERE replayed = 0 ORDER BY received DESC LIMIT 20), \
         fix the producers or the table (ALTER TABLE … ADD COLUMN, then buffergate migrate), then run buffergate replay --stream {}",
        quote_ident(db),
        quote_ident(table),
        config.stream
    );
    let severity = if recent > 0 { Severity::Warning } else { Severity::Info };
    let message = format!(
        "{pending} rejected events wait in {db}.{table} ({}), {recent} of them parked in the last hour",
        by_reason.join(", ")
    );
    Ok(vec![finding("quarantine", severity, message, look)])
}
