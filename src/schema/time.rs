//! Timestamps as producers send them: RFC 3339 strings, `YYYY-MM-DD hh:mm:ss[.fff]` (UTC),
//! `YYYY-MM-DD`, or integer Unix epoch milliseconds.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime};

/// A point in time: whole seconds since the Unix epoch and the nanoseconds past them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn from_epoch_millis(millis: i64) -> Self {
        Self { seconds: millis.div_euclid(1000), nanos: (millis.rem_euclid(1000) as u32) * 1_000_000 }
    }

    pub fn now() -> Self {
        let now = OffsetDateTime::now_utc();
        Self { seconds: now.unix_timestamp(), nanos: now.nanosecond() }
    }

    /// Ticks of `10^-precision` seconds, or `None` on overflow.
    pub fn ticks(self, precision: u32) -> Option<i64> {
        let scale = 10i64.checked_pow(precision)?;
        let fraction = i64::from(self.nanos) / 10i64.pow(9 - precision.min(9));
        self.seconds.checked_mul(scale)?.checked_add(fraction)
    }

    /// Days since 1970-01-01 (floor).
    pub fn days(self) -> i64 {
        self.seconds.div_euclid(86_400)
    }
}

/// Parses a timestamp string; naive forms are UTC.
pub fn parse(text: &str) -> Option<Timestamp> {
    let text = text.trim();
    if let Some(at) = parse_utc(text.as_bytes()) {
        return Some(at);
    }
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(Timestamp { seconds: t.unix_timestamp(), nanos: t.nanosecond() });
    }
    let naive = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    if let Ok(t) = PrimitiveDateTime::parse(text, naive) {
        let t = t.assume_utc();
        return Some(Timestamp { seconds: t.unix_timestamp(), nanos: t.nanosecond() });
    }
    let date = Date::parse(text, format_description!("[year]-[month]-[day]")).ok()?;
    Some(Timestamp { seconds: date.midnight().assume_utc().unix_timestamp(), nanos: 0 })
}

/// [`parse`] for text given as bytes (a JSON string's content, UTF-8 or not).
pub fn parse_bytes(text: &[u8]) -> Option<Timestamp> {
    parse_utc(text.trim_ascii()).or_else(|| parse(std::str::from_utf8(text).ok()?))
}

/// Whether a time text names its offset (`Z`, `+hh:mm`, `-hhmm` after the time of day): one
/// that does not is read in some time zone.
pub fn has_offset(text: &[u8]) -> bool {
    let text = text.trim_ascii();
    if text.len() <= 19 {
        return false;
    }
    if matches!(text.last(), Some(b'Z' | b'z')) {
        return true;
    }
    let tail = &text[19..];
    tail.iter().any(|&b| b == b'+' || b == b'-')
}

/// The forms nearly every producer sends, read by hand (the general parser costs several times
/// more): `YYYY-MM-DD[T ]hh:mm:ss[.f{1,9}][Z]`. `None` hands anything else, and anything out
/// of range, to the general parser, which decides.
fn parse_utc(b: &[u8]) -> Option<Timestamp> {
    let b = b.strip_suffix(b"Z").unwrap_or(b);
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| {
        b[range].iter().try_fold(0i64, |n, &d| d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0')))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let nanos = match &b[19..] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let n = num(20..b.len())?;
            (n * 10i64.pow(9 - digits.len() as u32)) as u32
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant): proleptic Gregorian, 1970-01-01 = 0.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(Timestamp { seconds: days * 86_400 + hour * 3600 + minute * 60 + second, nanos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let expect = Timestamp { seconds: 1_700_000_000, nanos: 123_000_000 };
        assert_eq!(parse("2023-11-14T22:13:20.123Z"), Some(expect));
        assert_eq!(parse("2023-11-15T00:13:20.123+02:00"), Some(expect));
        assert_eq!(parse("2023-11-14 22:13:20.123"), Some(expect));
        assert_eq!(parse("2023-11-14T22:13:20.123"), Some(expect));
        assert_eq!(parse("2023-11-14 22:13:20"), Some(Timestamp { nanos: 0, ..expect }));
        assert_eq!(parse("1970-01-02"), Some(Timestamp { seconds: 86_400, nanos: 0 }));
        assert_eq!(Timestamp::from_epoch_millis(1_700_000_000_123), expect);
        assert_eq!(Timestamp::from_epoch_millis(-1), Timestamp { seconds: -1, nanos: 999_000_000 });
    }

    /// The hand-written reader agrees with the general parser wherever it answers.
    #[test]
    fn fast_forms_agree_with_the_general_parser() {
        let general = |text: &str| {
            let naive = format_description!(
                version = 2,
                "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
            );
            OffsetDateTime::parse(text, &Rfc3339)
                .ok()
                .or_else(|| PrimitiveDateTime::parse(text, naive).ok().map(PrimitiveDateTime::assume_utc))
                .map(|t| Timestamp { seconds: t.unix_timestamp(), nanos: t.nanosecond() })
        };
        let mut checked = 0;
        for year in [1900, 1969, 1970, 2000, 2023, 2024, 2100, 2299] {
            for (month, day) in [(1, 1), (2, 28), (2, 29), (2, 30), (3, 1), (4, 31), (6, 30), (12, 31), (13, 1)] {
                for time in ["00:00:00", "23:59:59", "12:34:56.7", "01:02:03.123456789", "24:00:00", "10:60:00"] {
                    for (sep, suffix) in [("T", "Z"), (" ", ""), ("T", "")] {
                        let text = format!("{year:04}-{month:02}-{day:02}{sep}{time}{suffix}");
                        let fast = parse_utc(text.as_bytes());
                        if fast.is_some() {
                            checked += 1;
                            assert_eq!(fast, general(&text), "{text}");
                        }
                    }
                }
            }
        }
        assert!(checked > 300, "{checked}");
    }

    #[test]
    fn offsets_are_told_from_naive_times() {
        for text in ["2023-11-14T22:13:20Z", "2023-11-14 22:13:20.5+02:00", "2023-11-14T22:13:20-0130"] {
            assert!(has_offset(text.as_bytes()), "{text}");
        }
        for text in ["2023-11-14 22:13:20", "2023-11-14T22:13:20.123", "2023-11-14", "1700000000"] {
            assert!(!has_offset(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn rejected_forms() {
        for text in ["", "yesterday", "2023-13-01 00:00:00", "2023-11-14 25:00:00", "1700000000"] {
            assert_eq!(parse(text), None, "{text}");
        }
    }

    #[test]
    fn ticks_scale_and_truncate() {
        let t = Timestamp { seconds: 2, nanos: 123_456_789 };
        assert_eq!(t.ticks(0), Some(2));
        assert_eq!(t.ticks(3), Some(2_123));
        assert_eq!(t.ticks(9), Some(2_123_456_789));
        assert_eq!(Timestamp { seconds: i64::MAX / 10, nanos: 0 }.ticks(3), None);
    }
}
