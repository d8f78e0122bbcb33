//! The rows of a request on their way to ClickHouse, as the stages hand them on: encoded by
//! `decode` into [`PartitionRows`], merged by `coalesce` into [`Groups`] of [`Pieces`], sent by
//! `clickhouse` as one INSERT body of [`BodyPart`]s. The types live here, in a leaf, so that
//! each stage imports them and no stage imports another for them.

use bytes::Bytes;
use clickhouse::insert_formatted::CompressedData;

use crate::schema::Encoded;

/// Rows encoded for one INSERT column list: `omitted` is the mask of columns left to their
/// DEFAULT expression (see [`crate::schema::TableSchema::insert_sql`]).
#[derive(Debug, Default)]
pub struct Chunk {
    pub omitted: u64,
    pub rows: usize,
    pub data: Vec<u8>,
    /// Where each row ends and which event it is.
    pub marks: RowMarks,
    /// The rows as their own part of an INSERT body (a compressed Native block), made once the
    /// request's rows are final ([`crate::clickhouse::writer::Writer::make_blocks`]); `data` stays for a retry.
    pub block: Option<BodyPart>,
}

/// Where each row of a chunk ends in its bytes, its event id and the span of its times: what
/// the journal keeps so that exactly the rows ClickHouse lacks can be sent again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowMarks {
    /// End offset of each row in the chunk's bytes.
    pub ends: Vec<u32>,
    /// Each row's event id, when the table has an id column (else empty).
    pub ids: Vec<uuid::Uuid>,
    /// The earliest and latest row time in whole seconds, when the table has a time column.
    pub seconds: Option<(i64, i64)>,
}

impl RowMarks {
    fn push(&mut self, end: usize, encoded: &Encoded) {
        self.ends.push(u32::try_from(end).unwrap_or(u32::MAX));
        if let Some(id) = encoded.id {
            self.ids.push(id);
        }
        if let Some(s) = encoded.seconds {
            self.seconds = Some(self.seconds.map_or((s, s), |(lo, hi)| (lo.min(s), hi.max(s))));
        }
    }
}

/// The rows of one request bound for one partition.
#[derive(Debug, Default)]
pub struct PartitionRows {
    pub chunks: Vec<Chunk>,
    /// The chunk the last row went to: the next row most likely has the same column list.
    last: usize,
    /// Bytes to reserve for the first chunk: growing a large one by doubling copies it about
    /// once more.
    expected_bytes: usize,
}

impl PartitionRows {
    /// No rows yet; about `expected_bytes` of them to come.
    pub fn with_expected_bytes(expected_bytes: usize) -> Self {
        Self { expected_bytes, ..Self::default() }
    }

    /// Encodes a row straight into the chunk of its column list, which `encode` reports only
    /// once it is done (the mask of columns left to their DEFAULT): the row is written into the
    /// chunk of the previous row and moved in the rare case its column list differs. Saves
    /// copying every row out of a scratch buffer. Returns where the row went (chunk index,
    /// byte range); on error nothing is left behind.
    pub fn encode<E>(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<Encoded, E>,
    ) -> Result<(usize, std::ops::Range<usize>, Encoded), E> {
        if self.chunks.is_empty() {
            self.chunks.push(Chunk { data: Vec::with_capacity(self.expected_bytes), ..Chunk::default() });
            self.last = 0;
        }
        let guess = self.last;
        let chunk = &mut self.chunks[guess];
        let start = chunk.data.len();
        let encoded = match encode(&mut chunk.data) {
            Ok(encoded) => encoded,
            Err(error) => {
                chunk.data.truncate(start);
                if chunk.rows == 0 {
                    // The chunk made for this row alone: never leave an empty one.
                    self.chunks.pop();
                }
                return Err(error);
            }
        };
        if chunk.rows == 0 || chunk.omitted == encoded.omitted {
            chunk.omitted = encoded.omitted;
            chunk.rows += 1;
            chunk.marks.push(chunk.data.len(), &encoded);
            return Ok((guess, start..chunk.data.len(), encoded));
        }
        let row = chunk.data.split_off(start);
        let (index, range) = self.push(&encoded, &row);
        self.last = index;
        Ok((index, range, encoded))
    }

    /// Appends an encoded row to the chunk of its column list; returns where it went
    /// (chunk index, byte range).
    pub fn push(&mut self, encoded: &Encoded, row: &[u8]) -> (usize, std::ops::Range<usize>) {
        let omitted = encoded.omitted;
        let index = match self.chunks.iter().position(|c| c.omitted == omitted) {
            Some(i) => i,
            None => {
                self.chunks.push(Chunk { omitted, ..Chunk::default() });
                self.chunks.len() - 1
            }
        };
        let chunk = &mut self.chunks[index];
        chunk.rows += 1;
        let start = chunk.data.len();
        chunk.data.extend_from_slice(row);
        chunk.marks.push(chunk.data.len(), encoded);
        (index, start..chunk.data.len())
    }

    pub fn rows(&self) -> usize {
        self.chunks.iter().map(|c| c.rows).sum()
    }

    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }
}

/// The rows of several requests for one INSERT column list, kept as the requests' own buffers:
/// the INSERT reads them in turn (transposing them into one Native block, or sending them
/// back to back), so merging requests copies nothing.
#[derive(Debug, Default)]
pub struct Pieces {
    pub omitted: u64,
    pub rows: usize,
    /// Shared with the journal's record of the batch (see [`crate::journal::block`]).
    pub pieces: Vec<Bytes>,
    /// Each piece's row marks, in the same order.
    pub marks: Vec<RowMarks>,
    /// Pieces whose block was made ahead: the INSERT's first attempt sends those as they are.
    pub built: Vec<Built>,
}

/// A piece's block made ahead of the INSERT.
#[derive(Debug)]
pub struct Built {
    /// Index of the piece in [`Pieces::pieces`].
    pub piece: usize,
    pub rows: usize,
    pub part: BodyPart,
}

/// Chunks grouped by column list, in order of first appearance.
#[derive(Debug, Default)]
pub struct Groups(pub Vec<Pieces>);

impl Groups {
    pub fn add(&mut self, chunk: Chunk) {
        let index = match self.0.iter().position(|g| g.omitted == chunk.omitted) {
            Some(i) => i,
            None => {
                self.0.push(Pieces { omitted: chunk.omitted, ..Pieces::default() });
                self.0.len() - 1
            }
        };
        let group = &mut self.0[index];
        group.rows += chunk.rows;
        if let Some(part) = chunk.block {
            group.built.push(Built { piece: group.pieces.len(), rows: chunk.rows, part });
        }
        group.pieces.push(Bytes::from(chunk.data));
        group.marks.push(chunk.marks);
    }
}

/// A part of an INSERT body, made before the INSERT (on the request's side, in parallel with
/// other requests) so that the partition's one INSERT at a time only sends bytes.
pub struct BodyPart {
    /// Uncompressed length.
    pub bytes: usize,
    pub(crate) data: PartData,
}

pub(crate) enum PartData {
    /// Sent as they are, or compressed by the client on the way when it compresses.
    Plain(Bytes),
    Compressed(CompressedData),
}

impl std::fmt::Debug for BodyPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.data {
            PartData::Plain(_) => "plain",
            PartData::Compressed(_) => "compressed",
        };
        f.debug_struct("BodyPart").field("bytes", &self.bytes).field("data", &kind).finish()
    }
}

impl BodyPart {
    /// Bytes the client sends as they are (compressing them on the way when it compresses).
    pub fn plain(data: Bytes) -> Self {
        Self { bytes: data.len(), data: PartData::Plain(data) }
    }

    /// Bytes compressed ahead, as the INSERT would compress them.
    pub(crate) fn compressed(bytes: usize, data: CompressedData) -> Self {
        Self { bytes, data: PartData::Compressed(data) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rows: &mut PartitionRows, bytes: &[u8], omitted: u64) -> Result<(usize, std::ops::Range<usize>), ()> {
        let id = uuid::Uuid::from_u64_pair(0, bytes.len() as u64);
        rows.encode(|out| {
            out.extend_from_slice(bytes);
            let encoded = Encoded { omitted, id: Some(id), seconds: Some(bytes.len() as i64), shard_key: None };
            if omitted == u64::MAX { Err(()) } else { Ok(encoded) }
        })
        .map(|(chunk, range, _)| (chunk, range))
    }

    #[test]
    fn encoded_rows_land_in_the_chunk_of_their_column_list() {
        let mut rows = PartitionRows::default();
        assert_eq!(row(&mut rows, b"bad", u64::MAX), Err(()));
        assert!(rows.chunks.is_empty(), "a rejected first row leaves no empty chunk");
        assert_eq!(row(&mut rows, b"aa", 0), Ok((0, 0..2)));
        assert_eq!(row(&mut rows, b"bbb", 0b10), Ok((1, 0..3)));
        assert_eq!(row(&mut rows, b"cc", 0b10), Ok((1, 3..5)));
        assert_eq!(row(&mut rows, b"x", u64::MAX), Err(()));
        assert_eq!(row(&mut rows, b"dd", 0), Ok((0, 2..4)));
        let chunks: Vec<_> = rows.chunks.iter().map(|c| (c.omitted, c.rows, c.data.as_slice())).collect();
        assert_eq!(chunks, vec![(0, 2, &b"aadd"[..]), (0b10, 2, &b"bbbcc"[..])]);
        // Each chunk knows where its rows end, which events they are, and their time span,
        // including the row moved to another chunk when its column list differed.
        let id = |n| uuid::Uuid::from_u64_pair(0, n);
        assert_eq!(rows.chunks[0].marks, RowMarks { ends: vec![2, 4], ids: vec![id(2), id(2)], seconds: Some((2, 2)) });
        assert_eq!(rows.chunks[1].marks, RowMarks { ends: vec![3, 5], ids: vec![id(3), id(2)], seconds: Some((2, 3)) });
    }
}
