//! The live shape of the Buffer table and the per-column encoders built from it.
//!
//! The gateway reads the table's columns from ClickHouse at start-up and whenever they may have
//! changed, and builds a [`TableSchema`]: the columns an INSERT may name, in order, each with
//! its parsed type. Events are validated and encoded against it field by field, straight into
//! RowBinary; a field that does not fit rejects its event alone.

pub mod encode;
mod fields;
pub mod native;
mod pattern;
pub mod sharding;
pub mod time;
pub mod types;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use crate::config::{InsertFormat, KeyFunction, TableSettings, UnknownFields};
pub use encode::Dialect;
pub use fields::EventFields;
pub(crate) use fields::{Content, Field};
use native::{NativeColumn, NativeError};
pub(crate) use pattern::KeyPattern;
pub use time::Timestamp;
pub use types::{ColumnType, UnsupportedType};

/// One row of `system.columns`, as ClickHouse reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub type_text: String,
    /// `""`, `DEFAULT`, `MATERIALIZED`, `ALIAS` or `EPHEMERAL`.
    #[serde(default)]
    pub default_kind: String,
}

/// How a column takes part in an INSERT.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Role {
    /// Written by the gateway; `default_bit` is set when it has a DEFAULT expression, which
    /// ClickHouse evaluates only if the column is left out of the INSERT.
    Written { ty: ColumnType, default_bit: Option<u8> },
    /// MATERIALIZED or ALIAS: computed by ClickHouse, never written.
    Computed(String),
    /// A type buffergate cannot encode: left out of every INSERT, so it takes its default.
    Unsupported(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub(crate) name: String,
    /// The name as an INSERT's column list writes it ([`quote_ident`]), quoted once: every
    /// INSERT's statement lists it.
    quoted: String,
    pub(crate) role: Role,
    /// The name as the scanner recognises it in a body.
    pub(crate) key: Option<KeyPattern>,
    /// A time column with a time zone of its own: whether that zone is UTC (a time without
    /// an offset is read in it under [`Dialect::ClickHouse`]).
    zone_is_utc: Option<bool>,
}

/// The reason given for a field the table lacks.
pub const UNKNOWN_FIELD: &str = "no such column in the table";
/// The reason given for a field of a column an INSERT's column list leaves out.
pub const UNLISTED_FIELD: &str = "not in the INSERT's column list";

/// Why an event was not accepted: the field (`None` for the event as a whole), the reason in
/// words, and the kind of reason as a stable code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub field: Option<String>,
    pub error: String,
    pub reason: Reason,
}

/// The kind of a rejection: a code that stays the same while the words change, for metric
/// labels, the quarantine and `replay --reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not JSON (a line of NDJSON that does not parse).
    Malformed,
    /// JSON, but not an event object (or, for a row of values, not an array of the right length).
    NotAnEvent,
    /// A field the table has no column for (or the INSERT does not list).
    UnknownField,
    /// A value its column cannot hold.
    InvalidValue,
    /// A timestamp outside the stream's window.
    OutOfWindow,
    /// A field of a column the gateway does not write (computed, unsupported type, a sharding
    /// key it cannot place by).
    UnwritableColumn,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Malformed,
        Reason::NotAnEvent,
        Reason::UnknownField,
        Reason::InvalidValue,
        Reason::OutOfWindow,
        Reason::UnwritableColumn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::NotAnEvent => "not_an_event",
            Reason::UnknownField => "unknown_field",
            Reason::InvalidValue => "invalid_value",
            Reason::OutOfWindow => "out_of_window",
            Reason::UnwritableColumn => "unwritable_column",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == code)
    }
}

impl Rejection {
    pub fn new(reason: Reason, field: Option<String>, error: impl Into<String>) -> Self {
        Self { field, error: error.into(), reason }
    }
}

/// Everything about the request an encoded row depends on besides the event itself.
#[derive(Debug, Clone)]
pub struct EncodeContext {
    /// Receive time, for events that omit the timestamp column.
    pub now: Timestamp,
    pub unknown_fields: UnknownFields,
    /// The times an event's timestamp may take.
    pub window: TimeWindow,
    /// How values are read.
    pub dialect: Dialect,
    /// The columns an INSERT lists, by column index (`None`: every column). A field of a
    /// column left out is an unknown field; the column takes its default.
    pub listed: Option<Arc<[bool]>>,
    /// Events given as arrays of values: the column of each position.
    pub order: Option<Arc<[usize]>>,
}

impl EncodeContext {
    /// Events received at `now`, their timestamps unbounded, read as the gateway's own API
    /// reads them.
    pub fn new(now: Timestamp, unknown_fields: UnknownFields) -> Self {
        Self {
            now,
            unknown_fields,
            window: TimeWindow::default(),
            dialect: Dialect::Gateway,
            listed: None,
            order: None,
        }
    }

    fn lists(&self, column: usize) -> bool {
        self.listed.as_ref().is_none_or(|listed| listed.get(column).copied().unwrap_or(false))
    }
}

/// How far an event's own timestamp may lie from its receive time, in whole seconds each way
/// (`None`: no bound). A Buffer flushes everything it holds as one block, and a modern server
/// refuses a block that spans more partitions than `max_partitions_per_insert_block` (100 by
/// default): one producer's stray timestamps would fail the flush for every producer. The
/// window keeps a request's rows within the partitions its time allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeWindow {
    pub max_age_s: Option<i64>,
    pub max_ahead_s: Option<i64>,
}

impl TimeWindow {
    /// The window a table's settings give (`timestamp_max_age_s`, `timestamp_max_ahead_s`;
    /// 0: no bound that way).
    pub fn of(table: &TableSettings) -> Self {
        let bound = |s: u64| (s > 0).then(|| i64::try_from(s).unwrap_or(i64::MAX));
        Self { max_age_s: bound(table.timestamp_max_age_s), max_ahead_s: bound(table.timestamp_max_ahead_s) }
    }

    /// Why a row of time `seconds`, received at `now`, is refused; `None` when it is inside.
    pub fn refuse(self, seconds: i64, now: i64) -> Option<String> {
        let shown = || {
            ::time::OffsetDateTime::from_unix_timestamp(seconds).map_or_else(|_| seconds.to_string(), |t| t.to_string())
        };
        if let Some(age) = self.max_age_s
            && seconds < now.saturating_sub(age)
        {
            return Some(format!("{} is more than {age} s before the receive time (timestamp_max_age_s)", shown()));
        }
        if let Some(ahead) = self.max_ahead_s
            && seconds > now.saturating_add(ahead)
        {
            return Some(format!("{} is more than {ahead} s after the receive time (timestamp_max_ahead_s)", shown()));
        }
        None
    }
}

/// What encoding a row tells besides its bytes: what the journal needs to recognise the row
/// in ClickHouse and to find it by time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Columns left to their DEFAULT expression (a bit each, see [`TableSchema::insert_sql`]).
    pub omitted: u64,
    /// The row's event id, as the id column holds it; `None` without one (or when NULL).
    pub id: Option<uuid::Uuid>,
    /// The row's timestamp in whole seconds since the epoch, when the table has one.
    pub seconds: Option<i64>,
    /// The row's sharding-key value, computed as the cluster's Distributed table computes it
    /// (when rows are placed by a column).
    pub shard_key: Option<u64>,
}

/// Names of the columns the gateway fills in itself.
#[derive(Debug, Clone)]
pub struct SpecialColumns {
    pub id: String,
    pub timestamp: String,
    pub partition_key: String,
    /// The column rows are placed on shards by, and how (`None`: one shard, or `rand()`).
    pub sharding: Option<(String, KeyFunction)>,
}

/// The Buffer table's columns and how to encode each.
#[derive(Debug)]
pub struct TableSchema {
    /// Increases by one each time the columns change.
    pub version: u64,
    /// `` `db`.`table` ``.
    pub table: String,
    columns: Vec<Column>,
    /// Indexes into `columns` of the written columns, in table order (the RowBinary order).
    written: Vec<usize>,
    by_name: HashMap<String, usize, FastHash>,
    id: Option<usize>,
    timestamp: Option<usize>,
    /// The column whose value picks the coalescer partition.
    partition: Option<usize>,
    /// The column whose value places a row on its shard, how, and its type.
    sharding: Option<ShardColumn>,
    infos: Vec<ColumnInfo>,
    /// The columns an INSERT without a column list writes ([`Self::insertable`]).
    insertable: Arc<[usize]>,
}

/// The sharding-key column as the encoder reads it back from a row.
#[derive(Debug, Clone, Copy)]
struct ShardColumn {
    index: usize,
    function: KeyFunction,
    /// `None`: a type the key cannot be computed from; its events are refused.
    ty: Option<sharding::KeyType>,
}

/// The hasher of the two hashes on the request path: field names looked up in the table's
/// columns (every field of every event), and partition-key values. A fixed seed: SipHash's DoS
/// resistance buys nothing for a fixed table that requests only read, nor for a key's
/// partition, which only has to be stable within this process. foldhash measured ~30% faster
/// than FNV-1a on column names and ~3× on partition keys (`benches/hot_paths.rs`).
type FastHash = foldhash::fast::FixedState;

/// Columns with DEFAULT expressions that can be left out of an INSERT row by row (one bit each).
const MAX_DEFAULT_BITS: usize = 64;

impl TableSchema {
    /// Builds the encoders for a table's columns.
    pub fn new(version: u64, database: &str, table: &str, infos: Vec<ColumnInfo>, special: &SpecialColumns) -> Self {
        let mut columns = Vec::with_capacity(infos.len());
        let mut written = Vec::new();
        let mut bits = 0usize;
        for info in &infos {
            let role = match info.default_kind.as_str() {
                kind @ ("MATERIALIZED" | "ALIAS") => Role::Computed(kind.to_string()),
                kind => match ColumnType::parse(&info.type_text) {
                    Ok(ty) => {
                        let default_bit =
                            (matches!(kind, "DEFAULT" | "EPHEMERAL") && bits < MAX_DEFAULT_BITS).then(|| {
                                bits += 1;
                                (bits - 1) as u8
                            });
                        written.push(columns.len());
                        Role::Written { ty, default_bit }
                    }
                    Err(UnsupportedType(text)) => Role::Unsupported(text),
                },
            };
            let zone_is_utc = types::time_zone(&info.type_text).map(types::is_utc);
            columns.push(Column {
                name: info.name.clone(),
                quoted: quote_ident(&info.name),
                role,
                key: KeyPattern::new(&info.name),
                zone_is_utc,
            });
        }
        let by_name: HashMap<_, _, _> = columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        let find = |name: &str, pred: fn(&ColumnType) -> bool| {
            by_name.get(name).copied().filter(|&i| matches!(&columns[i].role, Role::Written { ty, .. } if pred(ty)))
        };
        let id = find(&special.id, ColumnType::is_uuid);
        let timestamp = find(&special.timestamp, ColumnType::is_time);
        let partition = by_name.get(&special.partition_key).copied();
        let sharding = special.sharding.as_ref().map(|(name, function)| {
            let index = by_name.get(name).copied();
            let ty = index.and_then(|i| match &columns[i].role {
                Role::Written { ty, .. } => key_type(ty),
                _ => None,
            });
            // A missing column: every event is refused with the reason, until the table has it.
            ShardColumn { index: index.unwrap_or(usize::MAX), function: *function, ty }
        });
        let insertable = (0..columns.len()).filter(|&i| !matches!(columns[i].role, Role::Computed(_))).collect();
        Self {
            insertable,
            version,
            table: format!("{}.{}", quote_ident(database), quote_ident(table)),
            written,
            id,
            timestamp,
            by_name,
            columns,
            partition,
            sharding,
            infos,
        }
    }

    /// Why events cannot be placed on shards with this table (the sharding-key column is
    /// missing or of a type the key cannot be computed from), if so.
    pub fn sharding_problem(&self) -> Option<String> {
        let shard = self.sharding?;
        match (self.columns.get(shard.index), shard.ty) {
            (None, _) => Some("the sharding-key column is not in the table".into()),
            (Some(column), None) => Some(format!(
                "the sharding-key column {} must be String (for cityHash64) or UInt8–UInt64 (for intHash64 or itself)",
                column.name
            )),
            _ => None,
        }
    }

    /// Every column, in table order (the scanner sorts fields into them).
    pub(crate) fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The columns an INSERT without a column list writes, in table order: all but the
    /// computed ones.
    pub fn insertable(&self) -> &Arc<[usize]> {
        &self.insertable
    }

    /// Index of the column called `name`.
    pub(crate) fn column_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Name of the id column, when the table has it with a UUID type.
    pub fn id_column(&self) -> Option<&str> {
        self.id.map(|i| self.columns[i].name.as_str())
    }

    /// The columns this schema was built from.
    pub fn column_infos(&self) -> &[ColumnInfo] {
        &self.infos
    }

    /// Columns that cannot be written (unsupported types), to warn about at load.
    pub fn unsupported_columns(&self) -> impl Iterator<Item = (&str, &str)> {
        self.columns.iter().filter_map(|c| match &c.role {
            Role::Unsupported(text) => Some((c.name.as_str(), text.as_str())),
            _ => None,
        })
    }

    /// The INSERT statement for rows encoded with `omitted` (a mask of default bits): every
    /// written column except those whose DEFAULT expression ClickHouse should evaluate.
    pub fn insert_sql(&self, omitted: u64) -> String {
        self.insert_sql_into(&self.table, omitted)
    }

    /// [`Self::insert_sql`] into another table with the same columns (`` `db`.`t` ``).
    pub fn insert_sql_into(&self, table: &str, omitted: u64) -> String {
        self.statement(table, omitted, "RowBinary")
    }

    fn statement(&self, table: &str, omitted: u64, format: &str) -> String {
        let mut sql =
            String::with_capacity(64 + table.len() + self.columns.iter().map(|c| c.quoted.len() + 2).sum::<usize>());
        sql.push_str("INSERT INTO ");
        sql.push_str(table);
        sql.push_str(" (");
        for (n, i) in self.insert_columns(omitted).enumerate() {
            if n > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&self.columns[i].quoted);
        }
        sql.push_str(") FORMAT ");
        sql.push_str(format);
        sql
    }

    /// Indexes of the columns an INSERT of rows encoded with `omitted` names, in order.
    fn insert_columns(&self, omitted: u64) -> impl Iterator<Item = usize> + '_ {
        self.written.iter().copied().filter(move |&i| {
            !matches!(self.columns[i].role, Role::Written { default_bit: Some(bit), .. } if omitted & (1 << bit) != 0)
        })
    }

    /// The statement and body of an INSERT into `table` of `rows` rows encoded with `omitted`,
    /// given as consecutive pieces of whole rows: a Native block when `format` asks for one and
    /// every column can be transcoded, otherwise the RowBinary as encoded.
    pub fn insert(
        &self,
        table: &str,
        omitted: u64,
        rows: usize,
        pieces: &[bytes::Bytes],
        format: InsertFormat,
    ) -> (String, bytes::Bytes) {
        if format == InsertFormat::Native
            && let Some(block) = self.native_block(omitted, rows, pieces)
        {
            return (self.native_insert_sql(table, omitted), bytes::Bytes::from(block));
        }
        let data = match pieces {
            [one] => one.clone(),
            many => bytes::Bytes::from(many.concat()),
        };
        (self.insert_sql_into(table, omitted), data)
    }

    /// The statement of an INSERT into `table` of Native blocks of rows encoded with `omitted`.
    pub fn native_insert_sql(&self, table: &str, omitted: u64) -> String {
        self.statement(table, omitted, "Native")
    }

    /// The Native block of `rows` rows encoded with `omitted` (pieces of whole rows), or `None`
    /// when a column's type is not transcoded.
    pub fn native_block<P: AsRef<[u8]>>(&self, omitted: u64, rows: usize, pieces: &[P]) -> Option<Vec<u8>> {
        let columns: Vec<NativeColumn<'_>> = self
            .insert_columns(omitted)
            .filter_map(|i| match &self.columns[i].role {
                Role::Written { ty, .. } => {
                    Some(NativeColumn { name: &self.columns[i].name, type_text: &self.infos[i].type_text, ty })
                }
                _ => None,
            })
            .collect();
        match native::transcode(&columns, rows, pieces) {
            Ok(block) => Some(block),
            Err(NativeError::Unsupported(_)) => None,
            // A bug of ours: ClickHouse gets the rows as encoded and says what it thinks.
            Err(error) => {
                tracing::warn!(%error, "rows not transcoded to Native; sent as RowBinary");
                None
            }
        }
    }

    /// Validates one event and appends its RowBinary row to `out`. Returns the mask of columns
    /// left to their DEFAULT expression and the row's id and time; on rejection `out` is left
    /// as it was.
    pub fn encode_fields(
        &self,
        fields: &EventFields,
        ctx: &EncodeContext,
        out: &mut Vec<u8>,
    ) -> Result<Encoded, Rejection> {
        self.encode_fields_with_id(fields, ctx, None, out)
    }

    /// As [`Self::encode_fields`], giving an event without an id `missing_id` rather than a
    /// fresh UUIDv7 (ids derived from the event's origin, so that a replay is recognised).
    pub fn encode_fields_with_id(
        &self,
        fields: &EventFields,
        ctx: &EncodeContext,
        missing_id: Option<uuid::Uuid>,
        out: &mut Vec<u8>,
    ) -> Result<Encoded, Rejection> {
        let start = out.len();
        let result = self.encode_into(fields, ctx, missing_id, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_into(
        &self,
        fields: &EventFields,
        ctx: &EncodeContext,
        missing_id: Option<uuid::Uuid>,
        out: &mut Vec<u8>,
    ) -> Result<Encoded, Rejection> {
        if !fields.is_object {
            return Err(Rejection::new(Reason::NotAnEvent, None, "an event must be a JSON object"));
        }
        if let Some(problem) = &fields.problem {
            return Err(problem.clone());
        }
        let mut omitted = 0u64;
        let (mut id_at, mut time_at, mut shard_at) = (None, None, None);
        for &i in &self.written {
            let column = &self.columns[i];
            let Role::Written { ty, default_bit } = &column.role else {
                continue;
            };
            if Some(i) == self.id {
                id_at = Some((out.len(), ty));
            } else if Some(i) == self.timestamp {
                time_at = Some((out.len(), ty));
            }
            if self.sharding.is_some_and(|s| s.index == i) {
                shard_at = Some((out.len(), *default_bit));
            }
            let reject = |error: String| Rejection::new(Reason::InvalidValue, Some(column.name.clone()), error);
            let mut field = fields.field(i);
            if field.is_some() && !ctx.lists(i) {
                if ctx.unknown_fields == UnknownFields::Reject {
                    return Err(Rejection::new(Reason::UnknownField, Some(column.name.clone()), UNLISTED_FIELD));
                }
                field = None;
            }
            let dialect = match (ctx.dialect, column.zone_is_utc) {
                (Dialect::ClickHouse { .. }, Some(naive_utc)) => Dialect::ClickHouse { naive_utc },
                (dialect, _) => dialect,
            };
            match field {
                Some(field) if field.raw != "null" || matches!(ty.unwrapped(), ColumnType::Nullable(_)) => {
                    encode::encode_raw(ty, field.raw, fields.string(field), dialect, out).map_err(reject)?;
                }
                _ if Some(i) == self.id => {
                    encode::write_uuid_column(ty, missing_id.unwrap_or_else(uuid::Uuid::now_v7), out);
                }
                _ if Some(i) == self.timestamp => {
                    encode::encode_time(ty, ctx.now, out).map_err(reject)?;
                }
                _ => match default_bit {
                    Some(bit) => omitted |= 1 << bit,
                    None => encode::encode_default(ty, out),
                },
            }
        }
        let id = id_at.and_then(|(at, ty)| encode::read_uuid(ty, out.get(at..)?));
        let seconds = time_at.and_then(|(at, ty)| encode::read_seconds(ty, out.get(at..)?));
        if let Some(problem) = seconds.and_then(|s| ctx.window.refuse(s, ctx.now.seconds)) {
            let field = self.timestamp.and_then(|i| self.columns.get(i)).map(|c| c.name.clone());
            return Err(Rejection::new(Reason::OutOfWindow, field, problem));
        }
        let shard_key = match self.sharding {
            None => None,
            Some(shard) => Some(self.shard_key(shard, shard_at, omitted, out)?),
        };
        Ok(Encoded { omitted, id, seconds, shard_key })
    }

    /// The row's sharding-key value, read back from its encoded bytes; an event whose value
    /// ClickHouse would compute itself (a DEFAULT left to the server) cannot be placed.
    fn shard_key(
        &self,
        shard: ShardColumn,
        at: Option<(usize, Option<u8>)>,
        omitted: u64,
        out: &[u8],
    ) -> Result<u64, Rejection> {
        let name = self.columns.get(shard.index).map(|c| c.name.clone());
        let refuse = |error: &str| Rejection::new(Reason::UnwritableColumn, name.clone(), error);
        let (at, bit) = at.ok_or_else(|| refuse("the sharding-key column cannot be written"))?;
        if bit.is_some_and(|bit| omitted & (1 << bit) != 0) {
            return Err(refuse("the sharding-key field is required: its DEFAULT would be computed by ClickHouse"));
        }
        let ty = shard.ty.ok_or_else(|| refuse("the sharding-key column's type cannot place rows"))?;
        sharding::key_value(shard.function, ty, out.get(at..).unwrap_or_default())
            .ok_or_else(|| refuse("the sharding-key value could not be read"))
    }

    /// The event's own id (the id column's string), when it sent one.
    pub fn event_id<'a>(&self, fields: &EventFields<'a>) -> Option<std::borrow::Cow<'a, str>> {
        fields.text(self.id?)
    }

    /// A hash of the event's partition-key value; `fallback` when the event has none.
    pub fn partition_hash(&self, fields: &EventFields, fallback: u64) -> u64 {
        let Some(field) = self.partition.and_then(|i| fields.field(i)) else { return fallback };
        // The value's text is hashed, a string's content rather than its literal: 5 and "5"
        // (or "\u0035") are one key and go to one partition, and nothing is parsed on the
        // request path. SipHash was ~4% of encoding a small event.
        let bytes = match fields.string(field) {
            Some(content) => content,
            None if field.raw == "null" => return fallback,
            None => field.raw.as_bytes(),
        };
        FastHash::with_seed(0).hash_one(bytes)
    }
}

/// The key type a column's values are read as, for the sharding key.
fn key_type(ty: &ColumnType) -> Option<sharding::KeyType> {
    match ty.unwrapped() {
        ColumnType::String => Some(sharding::KeyType::String),
        ColumnType::UInt8 => Some(sharding::KeyType::Unsigned(1)),
        ColumnType::UInt16 => Some(sharding::KeyType::Unsigned(2)),
        ColumnType::UInt32 => Some(sharding::KeyType::Unsigned(4)),
        ColumnType::UInt64 => Some(sharding::KeyType::Unsigned(8)),
        _ => None,
    }
}

/// Quotes an identifier for ClickHouse SQL.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The schema currently in force, swapped atomically when the table changes; `None` until the
/// first load succeeds.
#[derive(Debug, Default)]
pub struct SharedSchema(ArcSwapOption<TableSchema>);

impl SharedSchema {
    pub fn get(&self) -> Option<Arc<TableSchema>> {
        self.0.load_full()
    }

    /// Installs `infos` if they differ from the current columns; returns the new version if so.
    pub fn update(&self, database: &str, table: &str, infos: Vec<ColumnInfo>, special: &SpecialColumns) -> Option<u64> {
        let current = self.get();
        if current.as_ref().is_some_and(|s| s.infos == infos) {
            return None;
        }
        let version = current.map_or(1, |s| s.version + 1);
        let schema = TableSchema::new(version, database, table, infos, special);
        for (name, ty) in schema.unsupported_columns() {
            tracing::warn!(
                column = name,
                r#type = ty,
                "column type not supported: the column is left out of INSERTs and takes its default"
            );
        }
        self.0.store(Some(Arc::new(schema)));
        Some(version)
    }
}

#[cfg(test)]
mod tests {
    use super::TimeWindow;

    #[test]
    fn the_window_bounds_each_side_when_set() {
        let window = TimeWindow { max_age_s: Some(100), max_ahead_s: Some(10) };
        assert_eq!(window.refuse(1_000, 1_000), None);
        assert_eq!(window.refuse(900, 1_000), None, "the bound itself is inside");
        assert_eq!(window.refuse(1_010, 1_000), None);
        assert!(window.refuse(899, 1_000).is_some_and(|why| why.contains("timestamp_max_age_s")));
        assert!(window.refuse(1_011, 1_000).is_some_and(|why| why.contains("timestamp_max_ahead_s")));
        let open = TimeWindow::default();
        assert_eq!(open.refuse(i64::MIN, 0), None);
        assert_eq!(open.refuse(i64::MAX, 0), None);
        let extreme = TimeWindow { max_age_s: Some(i64::MAX), max_ahead_s: Some(i64::MAX) };
        assert_eq!(extreme.refuse(i64::MIN, i64::MIN), None, "no overflow");
    }
}
