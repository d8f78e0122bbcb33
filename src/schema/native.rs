//! Native blocks transcoded from the RowBinary rows the request path encodes.
//!
//! Rows are encoded as RowBinary because a row is what an event is: it can be rejected,
//! deduplicated or carried to another batch on its own. ClickHouse, though, reads Native (one
//! column after another) with far less work: measured on 18.16, an INSERT of seed-shaped rows
//! into the Buffer table cost the server ~0.95 s of CPU per million rows as RowBinary and
//! ~0.35 s as Native (RowBinary is read value by value through virtual calls, with a memory
//! tracker call per string growth; Native reads each column in one loop). So each batch is
//! transposed once, just before its INSERT: one pass over bytes that are already in cache.
//!
//! The block layout is the one `clickhouse-client` and the server itself write over HTTP (no
//! block info): column count, row count, then per column its name, its type as `DESCRIBE`
//! spells it, and its values in bulk:
//! - fixed-size types: the values back to back, exactly their RowBinary bytes;
//! - `String`: length-prefixed values, as in RowBinary;
//! - `Nullable(T)`: one null byte per row, then T for every row (a default where NULL);
//! - `Array(T)`: cumulative end offsets (UInt64), then T for all elements;
//! - `Map(K, V)`: as `Array(Tuple(K, V))`: offsets, then every key, then every value;
//! - `LowCardinality(T)` (T a String or fixed-size type, top-level only): the serialization
//!   version (1), then one granule with its own dictionary ("additional keys", the type's
//!   default first, as the server writes it) and the rows' positions in it.
//!
//! Anything else (`LowCardinality` of a Nullable or inside a container) is reported as
//! unsupported and the batch goes as RowBinary.

use std::collections::HashMap;

use super::encode::{self, write_len};
use super::types::ColumnType;

/// Why a batch could not be transcoded; it is then sent as RowBinary unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NativeError {
    #[error("column type {0} is not transcoded to Native")]
    Unsupported(String),
    #[error("the RowBinary rows end early or run over ({0})")]
    Malformed(&'static str),
}

/// One column of a block: its name, its type as the server spells it, and the parsed type.
#[derive(Debug, Clone, Copy)]
pub struct NativeColumn<'s> {
    pub name: &'s str,
    pub type_text: &'s str,
    pub ty: &'s ColumnType,
}

/// The Native block holding the `rows` RowBinary rows of `pieces` (each a run of whole rows),
/// whose values follow `columns` in order.
pub fn transcode<P: AsRef<[u8]>>(
    columns: &[NativeColumn<'_>],
    rows: usize,
    pieces: &[P],
) -> Result<Vec<u8>, NativeError> {
    if columns.is_empty() {
        return Err(NativeError::Unsupported("an INSERT without columns".into()));
    }
    let mut builders = columns.iter().map(|c| Builder::new(c.ty, true)).collect::<Result<Vec<_>, _>>()?;
    let bytes: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
    // No String column holds more than the rows' bytes beyond their fixed-size values: growing
    // each column from empty instead cost ~2% of the gateway's CPU in reallocation copies. The
    // excess capacity is never touched, so it is address space, not memory.
    let fixed: usize = columns.iter().filter_map(|c| c.ty.fixed_size()).sum();
    let strings = bytes.saturating_sub(fixed * rows);
    for builder in &mut builders {
        builder.reserve(rows, strings);
    }
    let mut read = 0;
    for piece in pieces {
        let mut input = piece.as_ref();
        while !input.is_empty() {
            if read == rows {
                return Err(NativeError::Malformed("bytes after the last row"));
            }
            for builder in &mut builders {
                builder.read(&mut input)?;
            }
            read += 1;
        }
    }
    if read < rows {
        return Err(NativeError::Malformed("fewer rows than announced"));
    }
    let mut out = Vec::with_capacity(bytes + 64 * columns.len() + rows * 2);
    write_len(&mut out, columns.len());
    write_len(&mut out, rows);
    for (column, builder) in columns.iter().zip(&builders) {
        write_len(&mut out, column.name.len());
        out.extend_from_slice(column.name.as_bytes());
        write_len(&mut out, column.type_text.len());
        out.extend_from_slice(column.type_text.as_bytes());
        builder.write(&mut out);
    }
    Ok(out)
}

/// What one value is made of in RowBinary, for the leaves of the type tree.
#[derive(Debug, Clone, Copy)]
enum Leaf {
    Fixed(usize),
    String,
}

impl Leaf {
    fn of(ty: &ColumnType) -> Option<Self> {
        match ty {
            ColumnType::String => Some(Self::String),
            _ => ty.fixed_size().map(Self::Fixed),
        }
    }

    /// Takes one value off `input`: its RowBinary bytes (length prefix included).
    fn take<'a>(self, input: &mut &'a [u8]) -> Result<&'a [u8], NativeError> {
        let len = match self {
            Self::Fixed(size) => size,
            Self::String => {
                // Peeked, not consumed: the value keeps its prefix.
                let (len, prefix) = read_len(&mut &input[..])?;
                len.checked_add(prefix).ok_or(NativeError::Malformed("a length overflows"))?
            }
        };
        if input.len() < len {
            return Err(NativeError::Malformed("a value runs past the end"));
        }
        let (value, rest) = input.split_at(len);
        *input = rest;
        Ok(value)
    }

    /// Appends the type's default value (zeros, or the empty string).
    fn push_default(self, out: &mut Vec<u8>) {
        match self {
            Self::Fixed(size) => out.resize(out.len() + size, 0),
            Self::String => out.push(0),
        }
    }
}

/// One column's values being gathered, shaped like its type.
#[derive(Debug)]
enum Builder<'a> {
    /// Fixed-size values and strings alike: their RowBinary bytes back to back.
    Plain {
        leaf: Leaf,
        data: Vec<u8>,
    },
    Nullable {
        nulls: Vec<u8>,
        inner: Box<Builder<'a>>,
    },
    Array {
        offsets: Vec<u8>,
        total: u64,
        inner: Box<Builder<'a>>,
    },
    /// Each element a whole column in turn (a `Map` is `Array(Tuple(K, V))`).
    Tuple(Vec<Builder<'a>>),
    LowCardinality {
        leaf: Leaf,
        keys: Vec<&'a [u8]>,
        positions: HashMap<&'a [u8], u32>,
        rows: Vec<u32>,
    },
}

impl<'a> Builder<'a> {
    fn new(ty: &ColumnType, top: bool) -> Result<Self, NativeError> {
        let unsupported = || NativeError::Unsupported(ty.to_string());
        Ok(match ty {
            ColumnType::Nullable(inner) => {
                Self::Nullable { nulls: Vec::new(), inner: Box::new(Self::new(inner, false)?) }
            }
            ColumnType::Array(inner) => {
                Self::Array { offsets: Vec::new(), total: 0, inner: Box::new(Self::new(inner, false)?) }
            }
            ColumnType::Map(key, value) => Self::Array {
                offsets: Vec::new(),
                total: 0,
                inner: Box::new(Self::Tuple(vec![Self::new(key, false)?, Self::new(value, false)?])),
            },
            // Its serialization starts with a version word, which nested in a container would
            // have to come before the container's own data: only top-level columns here.
            ColumnType::LowCardinality(inner) if top => {
                let leaf = Leaf::of(inner).ok_or_else(unsupported)?;
                Self::LowCardinality { leaf, keys: Vec::new(), positions: HashMap::new(), rows: Vec::new() }
            }
            _ => Self::Plain { leaf: Leaf::of(ty).ok_or_else(unsupported)?, data: Vec::new() },
        })
    }

    /// Room for `rows` rows whose strings take at most `strings` bytes.
    fn reserve(&mut self, rows: usize, strings: usize) {
        match self {
            Self::Plain { leaf: Leaf::Fixed(size), data } => data.reserve(rows * *size),
            Self::Plain { leaf: Leaf::String, data } => data.reserve(strings),
            Self::Nullable { nulls, inner } => {
                nulls.reserve(rows);
                inner.reserve(rows, strings);
            }
            Self::LowCardinality { rows: positions, .. } => positions.reserve(rows),
            _ => {}
        }
    }

    /// Moves one RowBinary value from the front of `input` into the column.
    fn read(&mut self, input: &mut &'a [u8]) -> Result<(), NativeError> {
        match self {
            // The common sizes as fixed-size moves rather than a call to copy a few bytes.
            Self::Plain { leaf: Leaf::Fixed(4), data } => move_fixed::<4>(input, data)?,
            Self::Plain { leaf: Leaf::Fixed(8), data } => move_fixed::<8>(input, data)?,
            Self::Plain { leaf: Leaf::Fixed(16), data } => move_fixed::<16>(input, data)?,
            Self::Plain { leaf, data } => data.extend_from_slice(leaf.take(input)?),
            Self::Nullable { nulls, inner } => {
                let (&flag, rest) = input.split_first().ok_or(NativeError::Malformed("a null flag is missing"))?;
                *input = rest;
                nulls.push(flag);
                if flag == 0 {
                    inner.read(input)?;
                } else {
                    inner.push_default();
                }
            }
            Self::Array { offsets, total, inner } => {
                let (n, _) = read_len(input)?;
                for _ in 0..n {
                    inner.read(input)?;
                }
                *total += n as u64;
                offsets.extend_from_slice(&total.to_le_bytes());
            }
            Self::Tuple(elements) => {
                for element in elements {
                    element.read(input)?;
                }
            }
            Self::LowCardinality { leaf, keys, positions, rows, .. } => {
                let value = leaf.take(input)?;
                // Low cardinality is the point of the type: a short list is searched faster
                // than a value is hashed. The map has every key, for when the list grows.
                let found = if keys.len() <= 16 {
                    keys.iter().position(|&k| k == value).map(|i| i as u32 + 1)
                } else {
                    positions.get(value).copied()
                };
                let position = match found {
                    Some(position) => position,
                    None => {
                        keys.push(value);
                        positions.insert(value, keys.len() as u32);
                        keys.len() as u32
                    }
                };
                rows.push(position);
            }
        }
        Ok(())
    }

    /// The value of a NULL row, which Native stores under the null map.
    fn push_default(&mut self) {
        match self {
            Self::Plain { leaf, data } => leaf.push_default(data),
            Self::Nullable { nulls, inner } => {
                nulls.push(1);
                inner.push_default();
            }
            Self::Array { offsets, total, .. } => offsets.extend_from_slice(&total.to_le_bytes()),
            Self::Tuple(elements) => elements.iter_mut().for_each(Builder::push_default),
            Self::LowCardinality { rows, .. } => rows.push(0),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Plain { data, .. } => out.extend_from_slice(data),
            Self::Nullable { nulls, inner } => {
                out.extend_from_slice(nulls);
                inner.write(out);
            }
            Self::Array { offsets, inner, .. } => {
                out.extend_from_slice(offsets);
                inner.write(out);
            }
            Self::Tuple(elements) => elements.iter().for_each(|element| element.write(out)),
            Self::LowCardinality { leaf, keys, rows, .. } => {
                const HAS_ADDITIONAL_KEYS: u64 = 1 << 9;
                const NEED_UPDATE_DICTIONARY: u64 = 1 << 10;
                // Key version 1: "shared dictionaries with additional keys".
                out.extend_from_slice(&1u64.to_le_bytes());
                let dictionary = keys.len() + 1;
                let (width, code) = match dictionary {
                    0..=0x100 => (1, 0u64),
                    0x101..=0x1_0000 => (2, 1),
                    _ => (4, 2),
                };
                out.extend_from_slice(&(code | HAS_ADDITIONAL_KEYS | NEED_UPDATE_DICTIONARY).to_le_bytes());
                out.extend_from_slice(&(dictionary as u64).to_le_bytes());
                leaf.push_default(out);
                for key in keys {
                    out.extend_from_slice(key);
                }
                out.extend_from_slice(&(rows.len() as u64).to_le_bytes());
                for &position in rows {
                    out.extend_from_slice(&position.to_le_bytes()[..width]);
                }
            }
        }
    }
}

/// Moves one `N`-byte value from the front of `input` to `data`.
#[inline]
fn move_fixed<const N: usize>(input: &mut &[u8], data: &mut Vec<u8>) -> Result<(), NativeError> {
    let (value, rest) = input.split_first_chunk::<N>().ok_or(NativeError::Malformed("a value runs past the end"))?;
    data.extend_from_slice(value);
    *input = rest;
    Ok(())
}

/// A RowBinary length prefix (unsigned LEB128) off the front of `input`: the length and the
/// prefix's own size.
fn read_len(input: &mut &[u8]) -> Result<(usize, usize), NativeError> {
    let (value, used) = encode::read_len(input).ok_or(NativeError::Malformed("a length prefix is cut off"))?;
    let value = usize::try_from(value).map_err(|_| NativeError::Malformed("a length overflows"))?;
    *input = input.get(used..).unwrap_or_default();
    Ok((value, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::encode::encode_default;

    fn column<'s>(name: &'s str, type_text: &'s str, ty: &'s ColumnType) -> NativeColumn<'s> {
        NativeColumn { name, type_text, ty }
    }

    #[test]
    fn fixed_and_string_columns_are_transposed() {
        let (u, s) = (ColumnType::UInt16, ColumnType::String);
        let columns = [column("n", "UInt16", &u), column("s", "String", &s)];
        let rows = [1u8, 0, 2, b'h', b'i', 2, 0, 0];
        let block = transcode(&columns, 2, &[rows[..5].to_vec(), rows[5..].to_vec()]).unwrap();
        let mut want = vec![2, 2, 1, b'n', 6];
        want.extend_from_slice(b"UInt16");
        want.extend_from_slice(&[1, 0, 2, 0]);
        want.extend_from_slice(&[1, b's', 6]);
        want.extend_from_slice(b"String");
        want.extend_from_slice(&[2, b'h', b'i', 0]);
        assert_eq!(block, want);
    }

    #[test]
    fn nullable_array_and_map_put_their_parts_in_order() {
        let ty = ColumnType::parse("Map(String, Array(Nullable(UInt8)))").unwrap();
        // Row 1: {"a": [7, NULL]}; row 2: {}.
        let rows = [1, 1, b'a', 2, 0, 7, 1, 0];
        let mut builder = Builder::new(&ty, true).unwrap();
        let mut input = &rows[..];
        builder.read(&mut input).unwrap();
        builder.read(&mut input).unwrap();
        assert!(input.is_empty());
        let mut out = Vec::new();
        builder.write(&mut out);
        let mut want = Vec::new();
        for offset in [1u64, 1] {
            want.extend_from_slice(&offset.to_le_bytes()); // map offsets
        }
        want.extend_from_slice(&[1, b'a']); // keys
        want.extend_from_slice(&2u64.to_le_bytes()); // the array's offsets
        want.extend_from_slice(&[0, 1, 7, 0]); // null map, then values (a zero under the NULL)
        assert_eq!(out, want);
    }

    #[test]
    fn low_cardinality_carries_its_own_dictionary() {
        let ty = ColumnType::parse("LowCardinality(String)").unwrap();
        let mut builder = Builder::new(&ty, true).unwrap();
        let rows = [4, b'v', b'i', b'e', b'w', 1, b'x', 4, b'v', b'i', b'e', b'w', 0];
        let mut input = &rows[..];
        for _ in 0..4 {
            builder.read(&mut input).unwrap();
        }
        let mut out = Vec::new();
        builder.write(&mut out);
        let mut want = Vec::new();
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&0x600u64.to_le_bytes());
        want.extend_from_slice(&4u64.to_le_bytes());
        want.extend_from_slice(&[0, 4, b'v', b'i', b'e', b'w', 1, b'x', 0]);
        want.extend_from_slice(&4u64.to_le_bytes());
        want.extend_from_slice(&[1, 2, 1, 3]);
        assert_eq!(out, want);
    }

    /// Past 16 keys the dictionary is searched by hash: the same positions either way.
    #[test]
    fn large_dictionaries_keep_their_positions() {
        let ty = ColumnType::parse("LowCardinality(String)").unwrap();
        let values: Vec<Vec<u8>> = (0..100).map(|i| format!("v{}", i % 40).into_bytes()).collect();
        let mut rows = Vec::new();
        for v in &values {
            rows.push(v.len() as u8);
            rows.extend_from_slice(v);
        }
        let mut builder = Builder::new(&ty, true).unwrap();
        let mut input = &rows[..];
        for _ in 0..values.len() {
            builder.read(&mut input).unwrap();
        }
        let Builder::LowCardinality { keys, rows: positions, .. } = &builder else { unreachable!() };
        assert_eq!(keys.len(), 40);
        for (value, &position) in values.iter().zip(positions) {
            assert_eq!(&keys[position as usize - 1][1..], value.as_slice());
        }
    }

    #[test]
    fn what_is_not_transcoded_says_so() {
        for text in ["LowCardinality(Nullable(String))", "Array(LowCardinality(String))"] {
            let ty = ColumnType::parse(text).unwrap();
            let result = transcode::<Vec<u8>>(&[column("c", text, &ty)], 0, &[]);
            assert!(matches!(result, Err(NativeError::Unsupported(_))), "{text}: {result:?}");
        }
        let ty = ColumnType::String;
        let columns = [column("s", "String", &ty)];
        assert_eq!(transcode(&columns, 1, &[vec![5, b'a']]), Err(NativeError::Malformed("a value runs past the end")));
        assert_eq!(
            transcode(&columns, 1, &[vec![1, b'a'], vec![0]]),
            Err(NativeError::Malformed("bytes after the last row"))
        );
        assert_eq!(transcode(&columns, 2, &[vec![1, b'a']]), Err(NativeError::Malformed("fewer rows than announced")));
        assert_eq!(transcode(&columns, 1, &[vec![0x80]]), Err(NativeError::Malformed("a length prefix is cut off")));
    }

    /// NULL rows hold the inner type's default, the same bytes a missing field gets.
    #[test]
    fn null_rows_hold_defaults() {
        for text in ["Nullable(String)", "Nullable(UUID)", "Nullable(Decimal(20, 2))"] {
            let ty = ColumnType::parse(text).unwrap();
            let ColumnType::Nullable(inner) = &ty else { unreachable!() };
            let block = transcode(&[column("c", text, &ty)], 1, &[vec![1]]).unwrap();
            let mut default = Vec::new();
            encode_default(inner, &mut default);
            assert!(block.ends_with(&[[1].as_slice(), &default].concat()), "{text}");
        }
    }
}
