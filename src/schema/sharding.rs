//! Which shard of a ClickHouse cluster a row belongs to, computed exactly as the cluster's
//! Distributed table computes it, so that a query with `optimize_skip_unused_shards` finds
//! the rows the gateway wrote into the shards' local tables.
//!
//! A Distributed table evaluates its sharding key on each row, takes the value modulo the sum
//! of the shards' weights, and gives the row to the shard whose weight range holds the
//! remainder (shards in the cluster's order). The gateway supports the keys whose value it can
//! compute bit for bit from the encoded row: `cityHash64(col)` of a String column, and
//! `intHash64(col)` or the bare column of an unsigned integer column; and `rand()`, which
//! places nothing (the gateway picks a shard per request, one with room). The key itself is
//! parsed with the configuration ([`crate::config::ShardingKey`]).

use crate::config::KeyFunction;

/// ClickHouse's SQL `intHash64`: MurmurHash3's finaliser of the value xor a constant.
pub fn int_hash64(x: u64) -> u64 {
    let mut x = x ^ 0x4cf2_d2ba_ae6d_a887;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// ClickHouse's `cityHash64` of a string.
pub fn city_hash64(bytes: &[u8]) -> u64 {
    ch_cityhash102::cityhash64(bytes)
}

/// The column types a key function can be computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    String,
    /// An unsigned integer of this many bytes.
    Unsigned(usize),
}

/// The sharding-key value of a row whose key column, as RowBinary, starts `value`; `None`
/// when the bytes are short (never for a row the encoder wrote).
pub fn key_value(function: KeyFunction, ty: KeyType, value: &[u8]) -> Option<u64> {
    match (function, ty) {
        (KeyFunction::CityHash64, KeyType::String) => {
            let (len, used) = super::encode::read_len(value)?;
            let bytes = value.get(used..used.checked_add(usize::try_from(len).ok()?)?)?;
            Some(city_hash64(bytes))
        }
        (KeyFunction::Identity | KeyFunction::IntHash64, KeyType::Unsigned(size)) => {
            let mut le = [0u8; 8];
            le[..size].copy_from_slice(value.get(..size)?);
            let n = u64::from_le_bytes(le);
            Some(if function == KeyFunction::IntHash64 { int_hash64(n) } else { n })
        }
        _ => None,
    }
}

/// The shards' weights as a Distributed table uses them: `slots[v % slots.len()]` is the
/// shard of a row whose key value is `v`. Shared, not copied: every request placed by key
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    slots: std::sync::Arc<[usize]>,
    /// Each shard's weight, asked for on every `rand()` request.
    weights: std::sync::Arc<[usize]>,
}

impl Placement {
    /// Shards in the cluster's order, each with its weight (a weight of 0 takes no rows).
    pub fn new(weights: &[u64]) -> Self {
        let weights: std::sync::Arc<[usize]> = weights.iter().map(|&w| usize::try_from(w).unwrap_or(0)).collect();
        let slots =
            weights.iter().enumerate().flat_map(|(shard, &weight)| std::iter::repeat_n(shard, weight)).collect();
        Self { slots, weights }
    }

    pub fn shards(&self) -> usize {
        self.weights.len()
    }

    /// The shard of a row with key value `value`.
    pub fn shard_of(&self, value: u64) -> usize {
        match self.slots.len() {
            0 => 0,
            n => self.slots[(value % n as u64) as usize],
        }
    }

    /// The shards' weights, for picking one at random in proportion.
    pub fn weight(&self, shard: usize) -> usize {
        self.weights.get(shard).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values from ClickHouse 26.9 (`SELECT cityHash64('abc'), intHash64(12345), ...`); the
    // cluster tests check 18.16 places rows the same way.
    #[test]
    fn hashes_are_clickhouse_s() {
        assert_eq!(city_hash64(b"abc"), 4220206313085259313);
        assert_eq!(city_hash64(b""), 11160318154034397263);
        assert_eq!(city_hash64(&[b'x'; 100]), 8273723555210364035);
        assert_eq!(int_hash64(12345), 16722121143744093920);
    }

    #[test]
    fn key_values_are_read_from_row_binary() {
        assert_eq!(key_value(KeyFunction::CityHash64, KeyType::String, b"\x03abcrest"), Some(city_hash64(b"abc")));
        assert_eq!(key_value(KeyFunction::CityHash64, KeyType::String, b"\x05ab"), None, "short");
        assert_eq!(key_value(KeyFunction::Identity, KeyType::Unsigned(2), &[0x39, 0x30, 0xff]), Some(12345));
        assert_eq!(
            key_value(KeyFunction::IntHash64, KeyType::Unsigned(8), &12345u64.to_le_bytes()),
            Some(int_hash64(12345))
        );
        assert_eq!(
            key_value(KeyFunction::CityHash64, KeyType::Unsigned(8), &[0; 8]),
            None,
            "cityHash64 of a number is not supported"
        );
    }

    #[test]
    fn weights_make_ranges_in_shard_order() {
        let placement = Placement::new(&[1, 2]);
        assert_eq!((0..6).map(|v| placement.shard_of(v)).collect::<Vec<_>>(), [0, 1, 1, 0, 1, 1]);
        assert_eq!((placement.weight(0), placement.weight(1)), (1, 2));
        assert_eq!(Placement::new(&[0, 1]).shard_of(7), 1, "a weight of 0 takes nothing");
    }
}
