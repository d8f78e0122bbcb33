//! Eight bytes at a time: masks of the bytes that matter inside JSON strings.
//!
//! The scanner looks for the end of each string (a quote, a backslash or a control character
//! stops it); unescaping copies the text between backslashes, which in the JSON-in-a-string
//! payloads producers send is a few bytes long. Both work a word at a time in portable safe
//! code, without a call per segment.

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGHS: u64 = !LOW7;

/// The little-endian word of `bytes[at..at + 8]`, when that many are left.
#[inline]
pub fn word_at(bytes: &[u8], at: usize) -> Option<u64> {
    let chunk = bytes.get(at..at + 8)?;
    let mut word = [0; 8];
    word.copy_from_slice(chunk);
    Some(u64::from_le_bytes(word))
}

/// The high bit of each byte of `word` equal to `byte`, and no other bit.
#[inline]
pub fn eq_mask(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    // (x & 0x7f) + 0x7f reaches the high bit unless the byte is zero; it never carries into
    // the next byte, which is what keeps the mask exact.
    !(((x & LOW7) + LOW7) | x) & HIGHS
}

/// The high bit of each byte of `word` that is `"`, `\` or below 0x20, plus possibly bits of
/// bytes above the first such byte (borrows propagate upwards only): the lowest set bit is
/// always a true one, which is all the scanner asks, in fewer operations than exact masks.
#[inline]
pub fn string_special_bytes(word: u64) -> u64 {
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word;
    (quote | backslash | control) & HIGHS
}

/// Index (0..8) of the byte of the lowest bit set in a non-zero mask.
#[inline]
pub fn first_byte(mask: u64) -> usize {
    (mask.trailing_zeros() / 8) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value at every position, against the obvious byte-wise answer.
    #[test]
    fn masks_are_exact() {
        for at in 0..8 {
            for value in 0..=255u8 {
                for filler in [b'a', 0x00, b'\\', 0x5b, 0x5d, 0xdc, 0xff] {
                    let mut bytes = [filler; 8];
                    bytes[at] = value;
                    let expect = bytes
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| **b == b'\\')
                        .fold(0u64, |m, (i, _)| m | 0x80 << (i * 8));
                    assert_eq!(eq_mask(u64::from_le_bytes(bytes), b'\\'), expect, "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn finds_special_bytes_at_every_position() {
        for at in 0..8 {
            for special in [b'"', b'\\', 0x01, 0x1f] {
                let mut word = *b"abcdefgh";
                word[at] = special;
                let found = string_special_bytes(u64::from_le_bytes(word));
                assert_eq!(found.trailing_zeros() / 8, at as u32, "{special:#x} at {at}");
            }
        }
        assert_eq!(string_special_bytes(u64::from_le_bytes(*b" ~\x7f\xc3\xa9AZ!")), 0);
    }

    #[test]
    fn steps() {
        let mask = eq_mask(u64::from_le_bytes(*b"ab\\cd\\ef"), b'\\');
        assert_eq!(first_byte(mask), 2);
        assert_eq!(word_at(b"1234567", 0), None);
        assert_eq!(word_at(b"x12345678", 1), Some(u64::from_le_bytes(*b"12345678")));
    }
}
