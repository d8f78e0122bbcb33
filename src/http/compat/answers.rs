//! The read-only queries ClickHouse clients send when they connect, answered by the gateway
//! itself: `SELECT 1`, the server's version and time zone, and the settings it takes. Every
//! other query is refused: the gateway is not a ClickHouse server and never forwards a query
//! to one.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::VERSION;
use super::exception::Exception;
use crate::schema::encode::write_len;

/// The settings the protocol honours, as `system.settings` lists them to a client that reads
/// them (clickhouse-connect validates the settings it sends against this list).
pub const SETTINGS: [(&str, &str); 4] = [
    ("async_insert", "0"),
    ("wait_for_async_insert", "1"),
    ("input_format_skip_unknown_fields", "1"),
    ("insert_deduplication_token", ""),
];

/// A value in an answer.
#[derive(Debug, Clone)]
enum Cell {
    Text(String),
    Byte(u8),
}

/// A small result: its columns (name, ClickHouse type) and rows.
#[derive(Debug)]
struct Table {
    columns: Vec<(&'static str, &'static str)>,
    rows: Vec<Vec<Cell>>,
}

/// The answer to a query, given its normalised text, the format asked for and the server's
/// time zone; `Err` for a query the gateway does not answer.
pub fn answer(text: &str, format: &str, timezone: &str) -> Result<Response, Exception> {
    let text_cell = |s: &str| Cell::Text(s.to_string());
    let table = match text {
        "select 1" => Table { columns: vec![("1", "UInt8")], rows: vec![vec![Cell::Byte(1)]] },
        "select 1 as check" => Table { columns: vec![("check", "UInt8")], rows: vec![vec![Cell::Byte(1)]] },
        "select version()" => Table { columns: vec![("version()", "String")], rows: vec![vec![text_cell(VERSION)]] },
        "select timezone()" => Table { columns: vec![("timezone()", "String")], rows: vec![vec![text_cell(timezone)]] },
        "select version(), timezone()" => Table {
            columns: vec![("version()", "String"), ("timezone()", "String")],
            rows: vec![vec![text_cell(VERSION), text_cell(timezone)]],
        },
        settings if settings.starts_with("select name, value, readonly from system.settings") => Table {
            columns: vec![("name", "String"), ("value", "String"), ("readonly", "UInt8")],
            rows: SETTINGS.iter().map(|(name, value)| vec![text_cell(name), text_cell(value), Cell::Byte(0)]).collect(),
        },
        _ => {
            return Err(Exception::readonly(
                "buffergate answers INSERT … FORMAT JSONEachRow and the queries clients send when they connect; it runs no other query",
            ));
        }
    };
    let (body, content_type) = match format.to_ascii_lowercase().as_str() {
        "tabseparated" | "tsv" => (tab_separated(&table, false), "text/tab-separated-values; charset=UTF-8"),
        "tabseparatedwithnames" | "tsvwithnames" => {
            (tab_separated(&table, true), "text/tab-separated-values; charset=UTF-8")
        }
        "jsoneachrow" => (json_each_row(&table), "application/x-ndjson; charset=UTF-8"),
        "native" => (native(&table), "application/octet-stream"),
        _ => return Err(Exception::unknown_format(format)),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(format) {
        headers.insert("x-clickhouse-format", value);
    }
    Ok(response)
}

fn tab_separated(table: &Table, names: bool) -> Vec<u8> {
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<String>| {
        out.push_str(&cells.join("\t"));
        out.push('\n');
    };
    if names {
        line(&mut out, table.columns.iter().map(|(name, _)| escape_tsv(name)).collect());
    }
    for row in &table.rows {
        line(
            &mut out,
            row.iter()
                .map(|cell| match cell {
                    Cell::Text(s) => escape_tsv(s),
                    Cell::Byte(b) => b.to_string(),
                })
                .collect(),
        );
    }
    out.into_bytes()
}

fn escape_tsv(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n")
}

fn json_each_row(table: &Table) -> Vec<u8> {
    let mut out = Vec::new();
    for row in &table.rows {
        let object: serde_json::Map<String, serde_json::Value> = table
            .columns
            .iter()
            .zip(row)
            .map(|((name, _), cell)| {
                let value = match cell {
                    Cell::Text(s) => serde_json::Value::from(s.as_str()),
                    Cell::Byte(b) => serde_json::Value::from(*b),
                };
                ((*name).to_string(), value)
            })
            .collect();
        out.extend(serde_json::Value::Object(object).to_string().bytes());
        out.push(b'\n');
    }
    out
}

/// One Native block as ClickHouse's HTTP interface sends it (no block info): column and row
/// counts, then per column its name, its type and its values.
fn native(table: &Table) -> Vec<u8> {
    let mut out = Vec::new();
    write_len(&mut out, table.columns.len());
    write_len(&mut out, table.rows.len());
    for (i, (name, ty)) in table.columns.iter().enumerate() {
        write_string(&mut out, name.as_bytes());
        write_string(&mut out, ty.as_bytes());
        for row in &table.rows {
            match &row[i] {
                Cell::Text(s) => write_string(&mut out, s.as_bytes()),
                Cell::Byte(b) => out.push(*b),
            }
        }
    }
    out
}

fn write_string(out: &mut Vec<u8>, bytes: &[u8]) {
    write_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response) -> Vec<u8> {
        response.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn connect_time_queries() {
        let version = answer("select version(), timezone()", "TabSeparated", "Etc/UTC").unwrap();
        assert_eq!(body(version).await, format!("{VERSION}\tEtc/UTC\n").into_bytes());
        let one = answer("select 1", "JSONEachRow", "UTC").unwrap();
        assert_eq!(body(one).await, b"{\"1\":1}\n");
        let native = body(answer("select 1 as check", "Native", "UTC").unwrap()).await;
        assert_eq!(native, b"\x01\x01\x05check\x05UInt8\x01");
        assert_eq!(answer("select * from events", "TSV", "UTC").unwrap_err().code, 164);
        assert_eq!(answer("select 1", "Pretty", "UTC").unwrap_err().code, 73);
    }
}
