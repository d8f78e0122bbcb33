//! The Buffer table, its destination, and their tuning against the server's cores, memory and
//! insert rate.

use super::{Finding, Options, Severity, finding};
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::config::Config;
use crate::shed::poller::{BufferParams, read_fill};

#[derive(serde::Deserialize)]
struct Value {
    v: String,
}

async fn scalar(ch: &ClickHouse, sql: &str) -> Result<Option<String>, ClickHouseError> {
    Ok(ch.fetch_json::<Value>(sql).await?.into_iter().next().map(|r| r.v))
}

/// CPU cores, from `max_threads` (`auto(N)` or `N`).
async fn cores(ch: &ClickHouse) -> Result<Option<u64>, ClickHouseError> {
    let text = scalar(ch, "SELECT toString(value) AS v FROM system.settings WHERE name = 'max_threads'").await?;
    Ok(text.and_then(|t| t.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()))
}

async fn memory(ch: &ClickHouse) -> Option<u64> {
    let sql = "SELECT toString(toUInt64(value)) AS v FROM system.asynchronous_metrics WHERE metric = 'OSMemoryTotal'";
    scalar(ch, sql).await.ok().flatten().and_then(|v| v.parse().ok())
}

/// Rows per second inserted on the server (all tables), over one second.
async fn measured_rate(ch: &ClickHouse) -> Result<f64, ClickHouseError> {
    let sql = "SELECT toString(value) AS v FROM system.events WHERE event = 'InsertedRows'";
    let read =
        || async { Ok::<f64, ClickHouseError>(scalar(ch, sql).await?.and_then(|v| v.parse().ok()).unwrap_or(0.0)) };
    let before = read().await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    Ok((read().await? - before).max(0.0))
}

/// The Buffer table, its destination, and their tuning: one finding per check that fails.
pub(super) async fn run(ch: &ClickHouse, config: &Config, options: Options) -> Result<Vec<Finding>, ClickHouseError> {
    let params = match buffer_params(ch, config).await? {
        Ok(params) => params,
        Err(finding) => return Ok(vec![finding]),
    };
    let rate = match options.rate {
        Some(rate) => Some(rate),
        None => measured_rate(ch).await.ok(),
    };
    let memory = options.server_memory.or(memory(ch).await);
    let mut out = Vec::new();
    out.extend(destination(ch, config, &params).await?);
    out.extend(destination_named(config, &params));
    out.extend(min_bytes(&params));
    out.extend(num_layers(&params, cores(ch).await?));
    out.extend(time_trigger(&params, rate));
    out.extend(flush_sizes(config, &params));
    out.extend(capacity(&params, memory));
    out.extend(materialized_views(ch, config, &params).await?);
    out.extend(fill(ch, config).await);
    Ok(out)
}

/// The Buffer's engine arguments, or the finding that there is no Buffer to check.
async fn buffer_params(ch: &ClickHouse, config: &Config) -> Result<Result<BufferParams, Finding>, ClickHouseError> {
    let (db, buffer) = (&config.table.database, &config.table.buffer_table);
    let Some(engine) = ch.engine_full(db, buffer).await? else {
        let missing = format!("{db}.{buffer} does not exist");
        return Ok(Err(finding("buffer_table", Severity::Error, missing, "run `buffergate migrate`")));
    };
    Ok(BufferParams::parse(&engine).ok_or_else(|| {
        finding(
            "buffer_table",
            Severity::Error,
            format!("{db}.{buffer} is not a Buffer table: {engine}"),
            "point buffer_table at the Buffer table, or drop this table and run `buffergate migrate`",
        )
    }))
}

/// The destination named in the engine (where rows go, whatever the configuration says)
/// exists, is not a Buffer, and has the Buffer's columns.
async fn destination(
    ch: &ClickHouse,
    config: &Config,
    params: &BufferParams,
) -> Result<Option<Finding>, ClickHouseError> {
    let (target_db, destination) = (&params.database, &params.table);
    Ok(match ch.engine_full(target_db, destination).await? {
        None => Some(finding(
            "destination",
            Severity::Error,
            format!(
                "the Buffer flushes into {target_db}.{destination}, which does not exist: ClickHouse silently drops the rows at flush"
            ),
            "create the destination (`buffergate migrate`) before writing",
        )),
        Some(dest_engine) if dest_engine.starts_with("Buffer") => Some(finding(
            "destination",
            Severity::Error,
            format!("the destination {target_db}.{destination} is itself a Buffer table"),
            "point the Buffer at a MergeTree table",
        )),
        Some(_) => {
            let b = ch.columns(&config.table.database, &config.table.buffer_table).await?;
            let d = ch.columns(target_db, destination).await?;
            crate::clickhouse::migrate::column_differences(&b, &d).map(|differences| finding(
                "columns",
                Severity::Error,
                format!("Buffer and destination columns differ ({differences}): values are cast or the flush fails and rows are lost"),
                "drain the Buffer (`buffergate drain`), drop it and run `buffergate migrate`",
            ))
        }
    })
}

/// The configuration names the destination the Buffer flushes into.
fn destination_named(config: &Config, params: &BufferParams) -> Option<Finding> {
    let (target_db, destination) = (&params.database, &params.table);
    (*target_db != config.table.database || *destination != config.table.destination_table).then(|| {
        finding(
            "destination",
            Severity::Warning,
            format!(
                "the Buffer flushes into {target_db}.{destination}, the configuration names {}.{}",
                config.table.database, config.table.destination_table
            ),
            "make destination_table match the Buffer's engine",
        )
    })
}

fn min_bytes(params: &BufferParams) -> Option<Finding> {
    (params.min_bytes < 1024 * 1024).then(|| {
        finding(
            "min_bytes",
            Severity::Warning,
            format!("min_bytes is {} (< 1 MiB): flushes create many small parts", params.min_bytes),
            "raise min_bytes to at least 1 MiB (10 MiB is a good start)",
        )
    })
}

/// `num_layers` near the server's core count.
fn num_layers(params: &BufferParams, cores: Option<u64>) -> Option<Finding> {
    match cores {
        Some(cores) if params.num_layers > cores * 4 || params.num_layers * 4 < cores => Some(finding(
            "num_layers",
            Severity::Warning,
            format!("num_layers is {} on a server with {cores} cores", params.num_layers),
            format!("set num_layers near the core count ({cores})"),
        )),
        Some(_) => None,
        None => Some(finding(
            "num_layers",
            Severity::Info,
            "the server's core count is unknown",
            "compare num_layers with the cores yourself",
        )),
    }
}

/// At the observed insert rate, a size threshold (not `max_time`) triggers flushes.
fn time_trigger(params: &BufferParams, rate: Option<f64>) -> Option<Finding> {
    let Some(rate) = rate.filter(|r| *r > 0.0) else {
        return Some(finding(
            "time_trigger",
            Severity::Info,
            "no inserts observed: cannot tell which threshold triggers flushes",
            "run again under load, or pass --rate",
        ));
    };
    // Rows one layer collects before max_time forces a flush.
    let per_layer = rate * params.max_time as f64 / params.num_layers as f64;
    let by_size = per_layer >= params.max_rows as f64 || per_layer >= params.min_rows as f64;
    (!by_size).then(|| {
        finding(
            "time_trigger",
            Severity::Warning,
            format!(
                "at {rate:.0} rows/s over {} layers a layer collects ~{per_layer:.0} rows per max_time ({} s), below min_rows ({}) and max_rows ({}): every flush is triggered by max_time",
                params.num_layers, params.max_time, params.min_rows, params.max_rows
            ),
            "lower min_rows/min_bytes (or num_layers) so that the size thresholds trigger flushes",
        )
    })
}

/// The gateway's batches stay below the Buffer's maxima (larger INSERTs bypass the Buffer).
fn flush_sizes(config: &Config, params: &BufferParams) -> Option<Finding> {
    (config.batching.flush_max_rows as u64 >= params.max_rows || config.batching.flush_max_bytes as u64 >= params.max_bytes).then(|| {
        finding(
            "flush_sizes",
            Severity::Error,
            format!(
                "gateway batches (up to {} rows / {} bytes) reach the Buffer's max_rows ({}) or max_bytes ({}): such INSERTs bypass the Buffer and write parts directly",
                config.batching.flush_max_rows, config.batching.flush_max_bytes, params.max_rows, params.max_bytes
            ),
            "lower flush_max_rows / flush_max_bytes below the Buffer's maxima",
        )
    })
}

/// The Buffer's capacity against the server's RAM.
fn capacity(params: &BufferParams, memory: Option<u64>) -> Option<Finding> {
    let capacity = params.capacity();
    match memory {
        Some(memory) if capacity > memory / 2 => Some(finding(
            "capacity",
            Severity::Error,
            format!(
                "the Buffer can hold {capacity} bytes (num_layers × max_bytes), more than half the server's {memory} bytes of RAM"
            ),
            "lower max_bytes or num_layers",
        )),
        Some(memory) if capacity > memory / 4 => Some(finding(
            "capacity",
            Severity::Warning,
            format!("the Buffer can hold {capacity} bytes, over a quarter of the server's {memory} bytes of RAM"),
            "lower max_bytes or num_layers",
        )),
        Some(_) => None,
        None => Some(finding(
            "capacity",
            Severity::Info,
            format!("the Buffer can hold {capacity} bytes; the server's memory is unknown"),
            "pass --server-memory to compare",
        )),
    }
}

/// Materialized views that read FROM the Buffer (they fire per insert, not per flush).
async fn materialized_views(
    ch: &ClickHouse,
    config: &Config,
    params: &BufferParams,
) -> Result<Vec<Finding>, ClickHouseError> {
    #[derive(serde::Deserialize)]
    struct View {
        database: String,
        name: String,
        create_table_query: String,
    }
    let views: Vec<View> = ch
        .fetch_json("SELECT database, name, create_table_query FROM system.tables WHERE engine = 'MaterializedView'")
        .await?;
    let (db, buffer) = (&config.table.database, &config.table.buffer_table);
    Ok(views
        .into_iter()
        .filter(|view| reads_from(&view.create_table_query, &view.database, db, buffer))
        .map(|view| {
            finding(
                "materialized_views",
                Severity::Warning,
                format!(
                    "materialized view {}.{} reads FROM the Buffer table: it fires on every insert, not per flush",
                    view.database, view.name
                ),
                format!("recreate it to read FROM {}.{}", params.database, params.table),
            )
        })
        .collect())
}

/// How full the Buffer is now, against the configured shed and resume thresholds.
async fn fill(ch: &ClickHouse, config: &Config) -> Option<Finding> {
    let per_table = match ch.capabilities().await {
        Ok(caps) => caps.tables_total_bytes,
        Err(error) => return Some(unreadable_fill(&error)),
    };
    let reading = match read_fill(ch, config, per_table).await {
        Ok(reading) if reading.capacity > 0 => reading,
        Ok(_) => return None,
        Err(error) => return Some(unreadable_fill(&error)),
    };
    let fill = reading.bytes as f64 / reading.capacity as f64;
    let (shed, resume) = (config.shed.shed_threshold * 100.0, config.shed.shed_resume * 100.0);
    let (severity, what) = if fill >= config.shed.shed_threshold {
        (Severity::Error, format!("at or above the {shed:.0}% shed threshold"))
    } else if fill >= config.shed.shed_resume {
        (Severity::Warning, format!("above the {resume:.0}% resume threshold"))
    } else {
        return None;
    };
    Some(finding(
        "fill",
        severity,
        format!("the Buffer is {:.0}% full ({} of {} bytes), {what}", fill * 100.0, reading.bytes, reading.capacity),
        "drain it (`buffergate drain`) and look at the destination's merges and flush errors",
    ))
}

fn unreadable_fill(error: &ClickHouseError) -> Finding {
    finding(
        "fill",
        Severity::Warning,
        format!("cannot read the Buffer's fill: {error}"),
        "check the gateway user's access to system tables",
    )
}

/// Whether a view's query reads FROM `db.buffer` (or FROM `buffer` inside `db`).
fn reads_from(query: &str, view_db: &str, db: &str, buffer: &str) -> bool {
    let normalized = query.replace('`', "").to_lowercase();
    let words: Vec<&str> = normalized
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let (qualified, bare) = (format!("{db}.{buffer}").to_lowercase(), buffer.to_lowercase());
    words.windows(2).any(|w| w[0] == "from" && (w[1] == qualified || (view_db == db && w[1] == bare)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_reading_from_the_buffer() {
        let q = "CREATE MATERIALIZED VIEW a.mv TO a.agg AS SELECT count() FROM a.events_buffer GROUP BY x";
        assert!(reads_from(q, "a", "a", "events_buffer"));
        assert!(reads_from(
            "CREATE MATERIALIZED VIEW a.mv AS SELECT * FROM `events_buffer`",
            "a",
            "a",
            "events_buffer"
        ));
        assert!(!reads_from("CREATE MATERIALIZED VIEW a.mv AS SELECT * FROM a.events_raw", "a", "a", "events_buffer"));
        assert!(!reads_from("CREATE MATERIALIZED VIEW b.mv AS SELECT * FROM events_buffer", "b", "a", "events_buffer"));
    }
}
