//! What the confirmer watches of its ClickHouse node between passes, and the one decision
//! drawn from it ([`doubt`]): whether every unconfirmed block must be looked for, because the
//! server restarted (its Buffers' memory is gone), a Buffer flush failed, or the first answer
//! since start-up comes from a server up for less time than blocks have been owed.

use std::time::Duration;

use tokio::time::Instant;

use super::Journal;
use crate::clickhouse::ClickHouseError;

/// A reason to doubt every unconfirmed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doubt {
    /// The server restarted: what its Buffers held is gone.
    Restart,
    /// A Buffer flush failed: it may have dropped rows.
    FlushError,
    /// The first answer since start-up, from a server up for less time than some blocks have
    /// been owed: it restarted since they were written.
    Unobserved,
}

/// What the confirmer knows of the server between passes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Watch {
    pub(super) mark: Option<ServerMark>,
    /// The last look got no answer (or there was none yet): the server may be thawing, with
    /// INSERTs it received but has not started; suspects wait one more pass.
    pub(super) unsure: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Self { mark: None, unsure: true }
    }
}

/// What the confirmer last saw of the server.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServerMark {
    pub(super) uptime: u64,
    pub(super) at: Instant,
    pub(super) flush_errors: u64,
    /// This process's row was still in the liveness table (`None`: it cannot be kept there).
    pub(super) marked: Option<bool>,
}

/// The decision of one look at the server: was there reason for doubt since the last? With
/// no earlier look to compare with (the first answer since start-up), blocks owed for longer
/// than the server has been up were written to a server that restarted since: they are
/// looked for.
pub(super) fn doubt(previous: Option<ServerMark>, now: ServerMark, oldest_owed: Option<Duration>) -> Option<Doubt> {
    // Up for longer than the oldest block has been owed: no restart lost any of them. Two
    // seconds of slack: a block's age counts from when it entered the ledger, after its INSERT
    // answered and its append was synced, so its rows may have landed a little earlier.
    let owed_longer_than_up = oldest_owed.is_some_and(|age| now.uptime <= age.as_secs() + 2);
    let Some(previous) = previous else {
        return owed_longer_than_up.then_some(Doubt::Unobserved);
    };
    let expected = previous.uptime + now.at.duration_since(previous.at).as_secs();
    // Uptime counts whole seconds, two of slack for rounding at both ends: a restart within
    // them is told by the liveness row, which a restart loses however quick.
    let row_lost = previous.marked.is_some() && now.marked == Some(false);
    if row_lost || now.uptime < previous.uptime || now.uptime + 2 < expected {
        Some(Doubt::Restart)
    } else if now.flush_errors > previous.flush_errors {
        Some(Doubt::FlushError)
    } else {
        None
    }
}

impl Journal {
    pub(super) async fn look(&self) -> Result<ServerMark, ClickHouseError> {
        let uptime = self.ch.uptime().await?;
        let flush_errors = self.ch.buffer_flush_errors().await?;
        let marked = match self.ch.still_marked(&self.places.liveness, &self.instance).await {
            Ok(marked) => Some(marked),
            // Without the right to create it, uptime alone tells restarts (to within seconds).
            Err(ClickHouseError::Server { .. }) => None,
            Err(error) => return Err(error),
        };
        Ok(ServerMark { uptime, at: Instant::now(), flush_errors, marked })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(uptime: u64, at: Instant, flush_errors: u64) -> ServerMark {
        ServerMark { uptime, at, flush_errors, marked: Some(true) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_or_a_failed_flush_is_a_doubt() {
        let t0 = Instant::now();
        let owed = |s| Some(Duration::from_secs(s));
        assert_eq!(doubt(None, mark(5, t0, 0), None), None, "nothing to compare with, nothing owed");
        assert_eq!(doubt(None, mark(50, t0, 0), owed(10)), None, "up since before the blocks were written");
        assert_eq!(doubt(None, mark(5, t0, 0), owed(10)), Some(Doubt::Unobserved), "restarted since they were");
        let young = Some(Duration::from_millis(1_500));
        assert_eq!(doubt(None, mark(4, t0, 0), young), None, "up 4 s, owed for 1.5 s: up since before");
        assert_eq!(doubt(None, mark(3, t0, 0), young), Some(Doubt::Unobserved), "within the slack");
        tokio::time::advance(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        assert_eq!(doubt(Some(mark(100, t0, 0)), mark(110, t1, 0), owed(1)), None, "uptime went on");
        assert_eq!(doubt(Some(mark(100, t0, 0)), mark(109, t1, 0), owed(1)), None, "rounding");
        assert_eq!(doubt(Some(mark(100, t0, 0)), mark(3, t1, 0), owed(1)), Some(Doubt::Restart));
        assert_eq!(
            doubt(Some(mark(1, t0, 0)), mark(4, t1, 0), owed(1)),
            Some(Doubt::Restart),
            "restarted since, up 4 s"
        );
        assert_eq!(doubt(Some(mark(100, t0, 2)), mark(110, t1, 3), owed(1)), Some(Doubt::FlushError));
        let lost = ServerMark { marked: Some(false), ..mark(1, t1, 0) };
        assert_eq!(
            doubt(Some(mark(0, t0, 0)), lost, Some(Duration::from_secs(1))),
            Some(Doubt::Restart),
            "a restart within a second: the row is gone"
        );
        let unknown = ServerMark { marked: None, ..mark(110, t1, 0) };
        assert_eq!(doubt(Some(mark(100, t0, 0)), unknown, owed(1)), None, "no liveness table: uptime decides");
    }
}
