//! The timestamp parser: never a panic, the same answer for text as for its bytes, and a
//! parsed time is a valid one (nanoseconds below a second).
#![no_main]

use buffergate::schema::time::{parse, parse_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let from_bytes = parse_bytes(data);
    if let Ok(text) = std::str::from_utf8(data) {
        assert_eq!(from_bytes, parse(text), "{text:?}");
    }
    if let Some(at) = from_bytes {
        assert!(at.nanos < 1_000_000_000, "{at:?}");
    }
});
