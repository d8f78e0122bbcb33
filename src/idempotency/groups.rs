//! Where an event id lives in Redis: ids are spread over a fixed number of *groups*
//! (`redis_key_groups`), each group's keys carrying one hash tag, so that in a Redis Cluster a
//! group is one slot and a reservation script touches one slot only.
//!
//! The tags are picked so that group `g`'s slot falls in the `g`-th equal share of the 16,384
//! slots: a cluster whose primaries hold equal contiguous slot ranges (what `redis-cli
//! --cluster create` makes) then holds an equal number of groups on each primary whenever the
//! groups are a multiple of the primaries.

/// Redis Cluster's slots.
pub const SLOTS: u16 = 16384;

/// CRC-16/XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (0..8)
            .fold(crc ^ (u16::from(byte) << 8), |crc, _| if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 })
    })
}

/// What Redis hashes a key by: the text between its first `{` and the next `}` when that is
/// not empty, else the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else { return key };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

/// The cluster slot of `key`.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

/// The group of an event key (its UUID bytes or text): CRC-32 of the key, so stable across
/// versions and processes.
pub fn group_of(key: &[u8], groups: u16) -> usize {
    (crc32fast::hash(key) % u32::from(groups.max(1))) as usize
}

/// The hash tag of each group: the first decimal number, counting up, whose slot falls in the
/// group's share of the slots.
pub fn tags(groups: u16) -> Vec<String> {
    let groups = usize::from(groups.clamp(1, SLOTS));
    let mut tags: Vec<Option<String>> = vec![None; groups];
    let mut missing = groups;
    let mut n = 0u64;
    while missing > 0 {
        let tag = n.to_string();
        let share = usize::from(key_slot(tag.as_bytes())) * groups / usize::from(SLOTS);
        if tags[share].is_none() {
            tags[share] = Some(tag);
            missing -= 1;
        }
        n += 1;
    }
    tags.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
    }

    #[test]
    fn group_tags_spread_evenly_over_the_slots() {
        for groups in [1u16, 3, 16, 64] {
            let tags = tags(groups);
            assert_eq!(tags.len(), usize::from(groups));
            for (g, tag) in tags.iter().enumerate() {
                let slot = usize::from(key_slot(tag.as_bytes()));
                assert_eq!(slot * usize::from(groups) / usize::from(SLOTS), g, "group {g}'s tag {tag}");
            }
        }
        assert_eq!(tags(16), tags(16), "deterministic");
    }

    #[test]
    fn ids_spread_over_groups() {
        let mut seen = [0usize; 16];
        for i in 0..1600u32 {
            seen[group_of(&i.to_le_bytes(), 16)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
