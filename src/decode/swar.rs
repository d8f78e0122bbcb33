//! Eight bytes at a time: masks of the bytes that matter inside JSON strings.
//!
//! The scanner looks for the end of each string (a quote, a backslash or a control character
//! stops it) and, in a string with escapes, copies the text between them, which in the
//! JSON-in-a-string payloads producers send is a few bytes long. Both work a word at a time in
//! portable safe code, without a call per segment.

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
        assert_eq!(first_byte(string_special_bytes(u64::from_le_bytes(*b"ab\\cd\"ef"))), 2);
        assert_eq!(word_at(b"1234567", 0), None);
        assert_eq!(word_at(b"x12345678", 1), Some(u64::from_le_bytes(*b"12345678")));
    }
}
