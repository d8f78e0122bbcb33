//! A column's name as it appears in a body, made once per schema so that the scanner can
//! recognise the field it expects next with two word comparisons.

/// A field name as it appears in a body, quotes included, held as two masked words: the
/// scanner recognises the field it expects next (producers send fields in table order) with
/// two word comparisons instead of reading a string, comparing it and maybe hashing it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyPattern {
    words: [u64; 2],
    masks: [u64; 2],
    /// Bytes of the quoted name.
    pub(crate) len: usize,
}

impl KeyPattern {
    /// The pattern of `name`; `None` when its quoted form is longer than 16 bytes or would
    /// need escapes (such names take the general path).
    pub(crate) fn new(name: &str) -> Option<Self> {
        let len = name.len() + 2;
        if len > 16 || name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            return None;
        }
        let mut bytes = [0u8; 16];
        bytes[0] = b'"';
        bytes[1..len - 1].copy_from_slice(name.as_bytes());
        bytes[len - 1] = b'"';
        let word = |at: usize| word_at(&bytes, at).unwrap_or_default();
        let mask = |n: usize| if n >= 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 };
        Some(Self { words: [word(0), word(8)], masks: [mask(len), mask(len.saturating_sub(8))], len })
    }

    /// Whether `b[at..]` starts with the quoted name. With fewer than 16 bytes left a text
    /// never matches; the general path reads those names.
    #[inline]
    pub(crate) fn matches(&self, b: &[u8], at: usize) -> bool {
        match (word_at(b, at), word_at(b, at + 8)) {
            (Some(first), Some(second)) => {
                (first ^ self.words[0]) & self.masks[0] == 0 && (second ^ self.words[1]) & self.masks[1] == 0
            }
            _ => false,
        }
    }
}

/// The little-endian word of `bytes[at..at + 8]`, when that many are left.
#[inline]
fn word_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_patterns_match_exactly_the_quoted_name() {
        for name in ["", "a", "ts", "event_id", "abcdefghijklmn"] {
            let pattern = KeyPattern::new(name).unwrap();
            let quoted = format!("\"{name}\"");
            let padding = ": 1, \"zzzzzzzzzzzzzzzz\": 2}";
            assert!(pattern.matches(format!("{quoted}{padding}").as_bytes(), 0), "{name}");
            assert!(pattern.matches(format!("  {quoted}{padding}").as_bytes(), 2), "{name}");
            for other in [format!("\"{name}x\""), format!("\"x{name}\""), format!("\"{name}\\\"\"")] {
                assert!(!pattern.matches(format!("{other}{padding}").as_bytes(), 0), "{name} vs {other}");
            }
            if let Some(shorter) = name.get(..name.len().saturating_sub(1)).filter(|_| !name.is_empty()) {
                assert!(!pattern.matches(format!("\"{shorter}\"{padding}").as_bytes(), 0), "{name}");
            }
            // Too close to the end to compare two words: the general path reads it.
            if quoted.len() < 16 {
                assert!(!pattern.matches(quoted.as_bytes(), 0), "{name}");
            }
        }
        assert!(KeyPattern::new("abcdefghijklmno").is_none(), "17 bytes quoted");
        assert!(KeyPattern::new("a\"b").is_none());
        assert!(KeyPattern::new("a\\b").is_none());
    }
}
