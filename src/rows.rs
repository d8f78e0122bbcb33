//! The rows of a request on their way to ClickHouse, as the stages hand them on: encoded by
//! `decode` into [`PartitionRows`], merged by `coalesce` into [`Groups`] of [`Pieces`], sent by
//! `clickhouse` as one INSERT body of [`BodyPart`]s. The types live here, in a leaf, so that
//! each stage imports them and no stage imports another for them.

use bytes::Bytes;
use clickhouse::insert_formatted::CompressedData;

/// Rows encoded for one INSERT column list: `omitted` is the mask of columns left to their
/// DEFAULT expression (see [`crate::schema::TableSchema::insert_sql`]).
#[derive(Debug, Default)]
pub struct Chunk {
    pub omitted: u64,
    pub rows: usize,
    pub data: Vec<u8>,
    /// The rows as their own part of an INSERT body (a compressed Native block), made once the
    /// request's rows are final ([`crate::clickhouse::writer::Writer::make_blocks`]); `data` stays for a retry.
    pub block: Option<BodyPart>,
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
        encode: impl FnOnce(&mut Vec<u8>) -> Result<u64, E>,
    ) -> Result<(usize, std::ops::Range<usize>), E> {
        if self.chunks.is_empty() {
            self.chunks.push(Chunk { data: Vec::with_capacity(self.expected_bytes), ..Chunk::default() });
            self.last = 0;
        }
        let guess = self.last;
        let chunk = &mut self.chunks[guess];
        let start = chunk.data.len();
        let omitted = match encode(&mut chunk.data) {
            Ok(omitted) => omitted,
            Err(error) => {
                chunk.data.truncate(start);
                if chunk.rows == 0 {
                    // The chunk made for this row alone: never leave an empty one.
                    self.chunks.pop();
                }
                return Err(error);
            }
        };
        if chunk.rows == 0 || chunk.omitted == omitted {
            chunk.omitted = omitted;
            chunk.rows += 1;
            return Ok((guess, start..chunk.data.len()));
        }
        let row = chunk.data.split_off(start);
        let (index, range) = self.push(omitted, &row);
        self.last = index;
        Ok((index, range))
    }

    /// Appends an encoded row to the chunk of its column list; returns where it went
    /// (chunk index, byte range).
    pub fn push(&mut self, omitted: u64, row: &[u8]) -> (usize, std::ops::Range<usize>) {
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
    pub pieces: Vec<Vec<u8>>,
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
        group.pieces.push(chunk.data);
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
        rows.encode(|out| {
            out.extend_from_slice(bytes);
            if omitted == u64::MAX { Err(()) } else { Ok(omitted) }
        })
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
    }
}
