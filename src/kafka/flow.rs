//! When the consumer pauses its partitions and when it resumes them: the Kafka form of the
//! HTTP front's 503s. The same signals shed HTTP producers (the Buffer past the shed threshold,
//! with the poller's hysteresis; the circuit breaker), plus the journal's bound and the
//! consumer's own bound on messages in flight, each with hysteresis of its own.
//!
//! The bound on messages in flight pauses the partitions only once it has held for a while
//! (`in_flight_stalled`): a librdkafka pause drops the messages already fetched and a resume
//! fetches them again, which, done several times a second, capped one-event messages near
//! 2,000/s. A brief stop at the bound is the poll loop's: it waits for deliveries to finish
//! without polling.

/// What the gateway looks like right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signals {
    /// The Buffer is saturated (the shed poller's verdict, hysteresis included) and rows are
    /// not diverted to a fallback table.
    pub buffer_saturated: bool,
    pub circuit_open: bool,
    /// The journal has room for a pause margin / for twice that (resume).
    pub journal_room: bool,
    pub journal_resume_room: bool,
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// `in_flight` has been at the bound long enough to pause for it.
    pub in_flight_stalled: bool,
}

/// Why the partitions are paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    BufferSaturated,
    CircuitOpen,
    JournalFull,
    InFlight,
}

impl Pause {
    pub fn label(self) -> &'static str {
        match self {
            Self::BufferSaturated => "buffer_saturated",
            Self::CircuitOpen => "circuit_open",
            Self::JournalFull => "journal_full",
            Self::InFlight => "in_flight",
        }
    }
}

/// The pause to be in given the current one: running partitions pause on any pressure;
/// paused ones resume only once every signal is below its resume mark.
pub fn decide(paused: Option<Pause>, s: &Signals) -> Option<Pause> {
    if s.buffer_saturated {
        return Some(Pause::BufferSaturated);
    }
    if s.circuit_open {
        return Some(Pause::CircuitOpen);
    }
    let (journal_ok, in_flight_ok) = match paused {
        None => (s.journal_room, s.in_flight < s.max_in_flight || !s.in_flight_stalled),
        Some(_) => (s.journal_resume_room, s.in_flight <= s.max_in_flight / 2),
    };
    if !journal_ok {
        Some(Pause::JournalFull)
    } else if !in_flight_ok {
        Some(Pause::InFlight)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calm() -> Signals {
        Signals {
            journal_room: true,
            journal_resume_room: true,
            in_flight: 0,
            max_in_flight: 100,
            ..Signals::default()
        }
    }

    #[test]
    fn pauses_on_any_pressure() {
        assert_eq!(decide(None, &calm()), None);
        assert_eq!(decide(None, &Signals { buffer_saturated: true, ..calm() }), Some(Pause::BufferSaturated));
        assert_eq!(decide(None, &Signals { circuit_open: true, ..calm() }), Some(Pause::CircuitOpen));
        let full = Signals { journal_room: false, journal_resume_room: false, ..calm() };
        assert_eq!(decide(None, &full), Some(Pause::JournalFull));
        assert_eq!(decide(None, &Signals { in_flight: 100, ..calm() }), None, "at the bound: the loop waits");
        let stalled = Signals { in_flight: 100, in_flight_stalled: true, ..calm() };
        assert_eq!(decide(None, &stalled), Some(Pause::InFlight), "at the bound for long: paused");
    }

    #[test]
    fn resumes_with_hysteresis() {
        // The Buffer's hysteresis is the poller's: its verdict turns off below shed_resume.
        assert_eq!(decide(Some(Pause::BufferSaturated), &calm()), None);
        let between = Signals { journal_room: true, journal_resume_room: false, ..calm() };
        assert_eq!(decide(None, &between), None, "running: room for the margin is enough");
        assert_eq!(decide(Some(Pause::JournalFull), &between), Some(Pause::JournalFull), "paused: needs twice");
        let half = Signals { in_flight: 60, ..calm() };
        assert_eq!(decide(None, &half), None);
        assert_eq!(decide(Some(Pause::InFlight), &half), Some(Pause::InFlight), "resumes at half");
        assert_eq!(decide(Some(Pause::InFlight), &Signals { in_flight: 50, ..calm() }), None);
    }
}
