//! Timestamps as producers send them: RFC 3339 strings, `YYYY-MM-DD hh:mm:ss[.fff]` (UTC),
//! `YYYY-MM-DD`, or integer Unix epoch milliseconds.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime};

/// A point in time: whole seconds since the Unix epoch and the nanoseconds past them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant {
    pub seconds: i64,
    pub nanos: u32,
}

impl Instant {
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
pub fn parse(text: &str) -> Option<Instant> {
    let text = text.trim();
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(Instant { seconds: t.unix_timestamp(), nanos: t.nanosecond() });
    }
    let naive = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    if let Ok(t) = PrimitiveDateTime::parse(text, naive) {
        let t = t.assume_utc();
        return Some(Instant { seconds: t.unix_timestamp(), nanos: t.nanosecond() });
    }
    let date = Date::parse(text, format_description!("[year]-[month]-[day]")).ok()?;
    Some(Instant { seconds: date.midnight().assume_utc().unix_timestamp(), nanos: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let expect = Instant { seconds: 1_700_000_000, nanos: 123_000_000 };
        assert_eq!(parse("2023-11-14T22:13:20.123Z"), Some(expect));
        assert_eq!(parse("2023-11-15T00:13:20.123+02:00"), Some(expect));
        assert_eq!(parse("2023-11-14 22:13:20.123"), Some(expect));
        assert_eq!(parse("2023-11-14T22:13:20.123"), Some(expect));
        assert_eq!(parse("2023-11-14 22:13:20"), Some(Instant { nanos: 0, ..expect }));
        assert_eq!(parse("1970-01-02"), Some(Instant { seconds: 86_400, nanos: 0 }));
        assert_eq!(Instant::from_epoch_millis(1_700_000_000_123), expect);
        assert_eq!(Instant::from_epoch_millis(-1), Instant { seconds: -1, nanos: 999_000_000 });
    }

    #[test]
    fn rejected_forms() {
        for text in ["", "yesterday", "2023-13-01 00:00:00", "2023-11-14 25:00:00", "1700000000"] {
            assert_eq!(parse(text), None, "{text}");
        }
    }

    #[test]
    fn ticks_scale_and_truncate() {
        let t = Instant { seconds: 2, nanos: 123_456_789 };
        assert_eq!(t.ticks(0), Some(2));
        assert_eq!(t.ticks(3), Some(2_123));
        assert_eq!(t.ticks(9), Some(2_123_456_789));
        assert_eq!(Instant { seconds: i64::MAX / 10, nanos: 0 }.ticks(3), None);
    }
}
