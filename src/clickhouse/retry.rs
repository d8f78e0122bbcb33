//! Which ClickHouse failures are worth retrying, and how long to wait between attempts.
//!
//! A failure the server answered wrote nothing: it inserts a block into a Buffer layer
//! atomically, so sending the block again is safe. A failure without an answer is not: an
//! INSERT that timed out on our side, or whose connection broke after the body was sent, may
//! have been executed, and sending it again stores its rows twice. Block deduplication does not
//! work through a Buffer table, and idempotency keys are committed only after the write, so
//! neither prevents that; such a retry is at-least-once.

use std::time::Duration;

use super::ClickHouseError;

/// Server exception codes that describe a passing condition, not a bad request.
const RETRYABLE_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE (connection cut mid-request)
    60,  // UNKNOWN_TABLE: the Buffer is being recreated by a migration
    159, // TIMEOUT_EXCEEDED
    160, // TOO_SLOW
    164, // READONLY (replica temporarily read-only)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
    999, // KEEPER_EXCEPTION
];

/// Codes that mean the table no longer has the columns a block was encoded for.
const SCHEMA_CODES: &[u32] = &[
    8,  // THERE_IS_NO_COLUMN
    10, // NOT_FOUND_COLUMN_IN_BLOCK
    16, // NO_SUCH_COLUMN_IN_TABLE
    27, // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33, // CANNOT_READ_ALL_DATA
    53, // TYPE_MISMATCH
    60, // UNKNOWN_TABLE
];

/// Whether the same request may succeed if sent again.
pub fn is_retryable(err: &ClickHouseError) -> bool {
    match err {
        ClickHouseError::Network(_) | ClickHouseError::Timeout(_) => true,
        ClickHouseError::Server { code, .. } => RETRYABLE_CODES.contains(code),
        ClickHouseError::Protocol(_) | ClickHouseError::CircuitOpen => false,
    }
}

/// Whether a failed INSERT may have been executed all the same: it was sent and no answer came
/// back (our timeout, a connection cut mid-way), or the server says it cannot tell
/// (`UNKNOWN_STATUS_OF_INSERT`). Such a failure is resolved by asking which rows landed, never
/// by sending the INSERT again. A connection that could not be opened sent nothing.
pub fn is_ambiguous(err: &ClickHouseError) -> bool {
    match err {
        ClickHouseError::Timeout(_) => true,
        ClickHouseError::Network(message) => !message.contains("(Connect)"),
        ClickHouseError::Server { code, .. } => *code == 319,
        ClickHouseError::Protocol(_) | ClickHouseError::CircuitOpen => false,
    }
}

/// Whether the server could not be reached at all (the connection was refused or never
/// opened): nothing was sent, and another replica can take the INSERT at once.
pub fn is_unreachable(err: &ClickHouseError) -> bool {
    matches!(err, ClickHouseError::Network(message) if message.contains("(Connect)"))
}

/// Whether the failure suggests the table's columns changed (reload the schema).
pub fn is_schema_change(err: &ClickHouseError) -> bool {
    err.code().is_some_and(|code| SCHEMA_CODES.contains(&code))
}

/// Exponential backoff with jitter: attempt `n` waits a random time in `[d/2, d]` where
/// `d = min(max, initial × 2^n)`, so that many gateways do not retry in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The configured bounds (`retry_initial_backoff_ms`, `retry_max_backoff_ms`).
    pub fn of(settings: &crate::config::ClickHouseSettings) -> Self {
        Self {
            initial: Duration::from_millis(settings.retry_initial_backoff_ms),
            max: Duration::from_millis(settings.retry_max_backoff_ms),
        }
    }

    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(2u32.saturating_pow(attempt.min(16))).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let server = |code| ClickHouseError::Server { code, message: String::new() };
        assert!(is_retryable(&ClickHouseError::Network("reset".into())));
        assert!(is_retryable(&ClickHouseError::Timeout(Duration::from_secs(1))));
        assert!(is_retryable(&server(241)));
        assert!(is_retryable(&server(60)) && is_schema_change(&server(60)));
        assert!(!is_retryable(&server(16)) && is_schema_change(&server(16)));
        assert!(!is_retryable(&server(62)), "a syntax error will not heal");
        assert!(!is_retryable(&ClickHouseError::Protocol("x".into())));
    }

    #[test]
    fn what_may_have_landed() {
        assert!(is_ambiguous(&ClickHouseError::Timeout(Duration::from_secs(1))));
        assert!(is_ambiguous(&ClickHouseError::Network(
            "network error: connection closed before message completed".into()
        )));
        assert!(!is_ambiguous(&ClickHouseError::Network("network error: client error (Connect)".into())), "never sent");
        assert!(is_ambiguous(&ClickHouseError::Server { code: 319, message: String::new() }));
        assert!(
            !is_ambiguous(&ClickHouseError::Server { code: 241, message: String::new() }),
            "answered: nothing written"
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        for attempt in 0..20 {
            let d = b.delay(attempt);
            let ceiling = Duration::from_millis(100 * 2u64.pow(attempt.min(5))).min(Duration::from_secs(2));
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }
}
