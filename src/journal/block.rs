//! A flushed batch as the journal keeps it: the table it went to and, per INSERT column list,
//! the statement, the rows (RowBinary) and their marks (where each row ends, its event id, the
//! span of its times). Enough to send again exactly the rows ClickHouse does not have, with
//! no schema at hand: the statement names its columns.
//!
//! A block shares its rows with the INSERT that sends them: its data is the batch's own
//! pieces (reference-counted [`Bytes`]), and [`Block::encode`] hands the journal those same
//! pieces behind a small header, so journaling a batch copies no row on the gateway's side.
//!
//! Encoding (little-endian): `u8 version (1)`, `u64 unix ms appended`, `str table`,
//! `str query id`, `u32 groups`, then per group `str statement`, `u32 rows`, `u8 has ids`, `u8 has times`,
//! `[i64 lo, i64 hi]` when it has times, `rows × u32 end`, `rows × 16 id bytes` when it has
//! ids, `u32 length + data`. `str` is `u32 length + UTF-8`.

use std::borrow::Cow;
use std::collections::HashSet;

use bytes::Bytes;
use uuid::Uuid;

use crate::clickhouse::writer::{WriteError, Writer};
use crate::rows::{Groups, RowMarks};
use crate::schema::TableSchema;

const VERSION: u8 = 1;

/// The rows of one INSERT column list.
#[derive(Debug, Clone)]
pub struct BlockGroup {
    /// `INSERT INTO … (columns) FORMAT RowBinary`.
    pub statement: String,
    /// Row ends count from the start of the pieces laid end to end.
    pub marks: RowMarks,
    /// The rows, in pieces of whole rows.
    pub data: Vec<Bytes>,
}

impl BlockGroup {
    /// Bytes of rows.
    pub fn bytes(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }

    /// The rows as one run of bytes: borrowed when there is one piece (a block read back from
    /// the journal always is), copied otherwise.
    pub fn joined(&self) -> Cow<'_, [u8]> {
        match self.data.as_slice() {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(one),
            many => Cow::Owned(many.concat()),
        }
    }

    /// The rows as one INSERT body: the piece itself when there is one.
    pub fn body(&self) -> Bytes {
        match self.data.as_slice() {
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }
}

/// Groups are equal when they hold the same rows, however the bytes are split.
impl PartialEq for BlockGroup {
    fn eq(&self, other: &Self) -> bool {
        self.statement == other.statement && self.marks == other.marks && self.joined() == other.joined()
    }
}

impl Eq for BlockGroup {}

/// One flushed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// `` `db`.`table` `` the rows were written to.
    pub table: String,
    /// The `query_id` its INSERTs run under (each attempt adds a suffix): a gateway that
    /// takes the block over stops any of them still running before looking for its rows.
    pub query_id: String,
    /// When the batch was appended, in Unix milliseconds.
    pub appended_ms: u64,
    pub groups: Vec<BlockGroup>,
}

/// A record that is not a block this version can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable journal block: {0}")]
pub struct BlockError(&'static str);

impl Block {
    /// The batch about to be sent: its groups' pieces, shared with the INSERT, and their marks,
    /// taken from `groups` (the INSERT does not need them).
    pub fn of(schema: &TableSchema, table: &str, groups: &mut Groups, query_id: String, appended_ms: u64) -> Self {
        let groups = groups
            .0
            .iter_mut()
            .map(|group| {
                let mut marks = RowMarks::default();
                let mut base = 0u32;
                for (piece, piece_marks) in group.pieces.iter().zip(std::mem::take(&mut group.marks)) {
                    marks.ends.extend(piece_marks.ends.iter().map(|end| base + end));
                    marks.ids.extend_from_slice(&piece_marks.ids);
                    marks.seconds = span(marks.seconds, piece_marks.seconds);
                    base += piece.len() as u32;
                }
                BlockGroup {
                    statement: schema.insert_sql_into(table, group.omitted),
                    marks,
                    data: group.pieces.clone(),
                }
            })
            .collect();
        Self { table: table.to_string(), query_id, appended_ms, groups }
    }

    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.marks.ends.len()).sum()
    }

    /// Bytes of the rows, as sent.
    pub fn bytes(&self) -> usize {
        self.groups.iter().map(BlockGroup::bytes).sum()
    }

    /// Every row's event id; empty when the table has no id column.
    pub fn ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.groups.iter().flat_map(|g| g.marks.ids.iter().copied())
    }

    /// Whether every row carries an id, so that presence can be asked row by row.
    pub fn identified(&self) -> bool {
        self.groups.iter().all(|g| g.marks.ids.len() == g.marks.ends.len())
    }

    /// A few ids that stand for the block: the first and last row of each group. A Buffer
    /// layer takes a block whole and is flushed whole, so these are found in the destination
    /// exactly when the block is.
    pub fn samples(&self) -> Vec<Uuid> {
        let mut out: Vec<Uuid> = Vec::new();
        for group in &self.groups {
            out.extend(group.marks.ids.first());
            if group.marks.ids.len() > 1 {
                out.extend(group.marks.ids.last());
            }
        }
        out
    }

    /// The earliest and latest row time, when the table has a time column.
    pub fn seconds(&self) -> Option<(i64, i64)> {
        self.groups.iter().fold(None, |acc, g| span(acc, g.marks.seconds))
    }

    /// The same block with only the rows whose id is not in `present` (every row of a group
    /// without ids: such rows cannot be told apart, so they are sent again).
    pub fn without(&self, present: &HashSet<Uuid>) -> Self {
        let groups = self
            .groups
            .iter()
            .filter_map(|group| {
                if group.marks.ids.len() != group.marks.ends.len() {
                    return Some(group.clone());
                }
                let rows = group.joined();
                let (mut data, mut marks) = (Vec::new(), RowMarks::default());
                let mut start = 0usize;
                for (&end, id) in group.marks.ends.iter().zip(&group.marks.ids) {
                    let end = end as usize;
                    if !present.contains(id) {
                        data.extend_from_slice(rows.get(start..end)?);
                        marks.ends.push(data.len() as u32);
                        marks.ids.push(*id);
                    }
                    start = end;
                }
                marks.seconds = group.marks.seconds;
                let kept = BlockGroup { statement: group.statement.clone(), marks, data: vec![Bytes::from(data)] };
                (!kept.marks.ends.is_empty()).then_some(kept)
            })
            .collect();
        Self { table: self.table.clone(), query_id: self.query_id.clone(), appended_ms: self.appended_ms, groups }
    }

    /// Sends the groups through `writer` in order, group `n` under `{query_id}-{n}` (as
    /// RowBinary, as they were journaled); stops at the first failure, with the number of
    /// groups written before it.
    pub async fn send(&self, writer: &Writer, query_id: &str) -> Result<(), (usize, WriteError)> {
        for (n, group) in self.groups.iter().enumerate() {
            let rows = group.marks.ends.len();
            let id = format!("{query_id}-{n}");
            writer.write_group(&group.statement, group.body(), rows, &id).await.map_err(|error| (n, error))?;
        }
        Ok(())
    }

    /// The journal record: headers and marks made here, the rows as the block's own pieces.
    pub fn encode(&self) -> Vec<Bytes> {
        let marks: usize = self.groups.iter().map(|g| g.marks.ends.len() * 20 + g.statement.len() + 40).sum();
        let mut parts = Vec::with_capacity(self.groups.iter().map(|g| g.data.len() + 1).sum());
        let mut out = Vec::with_capacity(marks + self.table.len() + 32);
        out.push(VERSION);
        out.extend(self.appended_ms.to_le_bytes());
        put_str(&mut out, &self.table);
        put_str(&mut out, &self.query_id);
        out.extend((self.groups.len() as u32).to_le_bytes());
        for group in &self.groups {
            let marks = &group.marks;
            put_str(&mut out, &group.statement);
            out.extend((marks.ends.len() as u32).to_le_bytes());
            let has_ids = marks.ids.len() == marks.ends.len() && !marks.ids.is_empty();
            out.push(u8::from(has_ids));
            out.push(u8::from(marks.seconds.is_some()));
            if let Some((lo, hi)) = marks.seconds {
                out.extend(lo.to_le_bytes());
                out.extend(hi.to_le_bytes());
            }
            for end in &marks.ends {
                out.extend(end.to_le_bytes());
            }
            if has_ids {
                for id in &marks.ids {
                    out.extend_from_slice(id.as_bytes());
                }
            }
            out.extend((group.bytes() as u32).to_le_bytes());
            parts.push(Bytes::from(std::mem::take(&mut out)));
            parts.extend(group.data.iter().cloned());
        }
        if !out.is_empty() {
            parts.push(Bytes::from(out));
        }
        parts
    }

    /// Reads a record back; the groups' rows are slices of `bytes`, not copies.
    pub fn decode(bytes: &Bytes) -> Result<Self, BlockError> {
        let mut r = Reader(bytes.as_ref());
        if r.u8()? != VERSION {
            return Err(BlockError("unknown version"));
        }
        let appended_ms = r.u64()?;
        let table = r.str()?;
        let query_id = r.str()?;
        let count = r.u32()? as usize;
        let mut groups = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let statement = r.str()?;
            let rows = r.u32()? as usize;
            let (has_ids, has_times) = (r.u8()? == 1, r.u8()? == 1);
            let seconds = if has_times { Some((r.u64()? as i64, r.u64()? as i64)) } else { None };
            let ends = (0..rows).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            let ids = if has_ids {
                (0..rows)
                    .map(|_| r.take(16).and_then(|b| Uuid::from_slice(b).map_err(|_| BlockError("id"))))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            let length = r.u32()? as usize;
            let data = bytes.slice_ref(r.take(length)?);
            if ends.last().is_some_and(|&end| end as usize != data.len()) {
                return Err(BlockError("row ends do not match the data"));
            }
            groups.push(BlockGroup { statement, marks: RowMarks { ends, ids, seconds }, data: vec![data] });
        }
        Ok(Self { table, query_id, appended_ms, groups })
    }
}

/// The span covering two spans of times (either may be absent).
pub(crate) fn span(a: Option<(i64, i64)>, b: Option<(i64, i64)>) -> Option<(i64, i64)> {
    match (a, b) {
        (Some((a_lo, a_hi)), Some((b_lo, b_hi))) => Some((a_lo.min(b_lo), a_hi.max(b_hi))),
        (one, None) | (None, one) => one,
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BlockError> {
        if self.0.len() < n {
            return Err(BlockError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, BlockError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, BlockError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| BlockError("u32"))?))
    }

    fn u64(&mut self) -> Result<u64, BlockError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| BlockError("u64"))?))
    }

    fn str(&mut self) -> Result<String, BlockError> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| BlockError("text"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rows: &[(&[u8], u64)], seconds: Option<(i64, i64)>) -> BlockGroup {
        let mut g = BlockGroup {
            statement: "INSERT INTO t (a) FORMAT RowBinary".into(),
            marks: RowMarks::default(),
            data: Vec::new(),
        };
        // One piece per row: a batch's rows come in pieces, a block read back in one.
        for (bytes, id) in rows {
            g.data.push(Bytes::copy_from_slice(bytes));
            g.marks.ends.push(g.bytes() as u32);
            g.marks.ids.push(Uuid::from_u64_pair(0, *id));
        }
        g.marks.seconds = seconds;
        g
    }

    #[test]
    fn round_trip_and_rows_not_present() {
        let block = Block {
            table: "`db`.`b`".into(),
            query_id: "bg-1".into(),
            appended_ms: 7,
            groups: vec![group(&[(b"aa", 1), (b"b", 2), (b"ccc", 3)], Some((10, 20))), group(&[(b"d", 4)], None)],
        };
        assert_eq!(Block::decode(&record(&block)), Ok(block.clone()));
        assert_eq!(block.rows(), 4);
        assert_eq!(block.samples(), [1, 3, 4].map(|n| Uuid::from_u64_pair(0, n)));
        assert_eq!(block.seconds(), Some((10, 20)));
        let present: HashSet<Uuid> = [2, 4].into_iter().map(|n| Uuid::from_u64_pair(0, n)).collect();
        let rest = block.without(&present);
        assert_eq!(rest.groups.len(), 1, "a group all present is dropped");
        assert_eq!(&*rest.groups[0].joined(), b"aaccc");
        assert_eq!(rest.groups[0].marks.ends, [2, 5]);
        assert!(Block::decode(&record(&block).slice(..20)).is_err(), "a cut record is refused");
    }

    #[test]
    fn rows_without_ids_are_all_sent_again() {
        let mut g = group(&[(b"aa", 1), (b"b", 2)], None);
        g.marks.ids.clear();
        let block = Block { table: "t".into(), query_id: "bg-2".into(), appended_ms: 0, groups: vec![g] };
        assert!(!block.identified());
        let present: HashSet<Uuid> = HashSet::new();
        assert_eq!(block.without(&present), block);
        assert_eq!(Block::decode(&record(&block)), Ok(block));
    }

    #[test]
    fn the_record_shares_the_rows_rather_than_copying_them() {
        let block = Block {
            table: "t".into(),
            query_id: "bg-3".into(),
            appended_ms: 0,
            groups: vec![group(&[(b"aa", 1), (b"b", 2)], None)],
        };
        let parts = block.encode();
        for piece in &block.groups[0].data {
            assert!(parts.iter().any(|part| part.as_ptr() == piece.as_ptr()), "a piece of rows was copied");
        }
    }

    fn record(block: &Block) -> Bytes {
        Bytes::from(block.encode().concat())
    }
}
