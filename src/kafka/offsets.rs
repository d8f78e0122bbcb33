//! Which offset of a partition may be committed. Messages are delivered concurrently and
//! finish in any order; the committed offset must only ever cover messages that are all done,
//! so it is one past the end of the *done prefix*: the run of finished messages from the
//! oldest one still tracked. Offsets need not be contiguous (compaction, transaction markers).

use std::collections::VecDeque;

/// One partition's messages between reading and committing.
#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Offsets handed to deliveries, ascending, each with whether it is done.
    pending: VecDeque<(i64, bool)>,
    /// The highest offset handed out so far.
    last: Option<i64>,
    /// One past the done prefix: what may be committed.
    done_up_to: Option<i64>,
    /// What was last committed (or found committed when the partition was assigned).
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// A partition whose group had committed `committed` (the next offset to read), if known.
    pub fn from_committed(committed: Option<i64>) -> Self {
        Self { committed, ..Self::default() }
    }

    /// A message at `offset` is handed to a delivery; `false` (and nothing tracked) if it was
    /// handed out before (a redelivery of an offset already in hand).
    pub fn start(&mut self, offset: i64) -> bool {
        if self.last.is_some_and(|last| offset <= last) {
            return false;
        }
        self.last = Some(offset);
        self.pending.push_back((offset, false));
        true
    }

    /// The delivery of `offset` is done: its rows are as safe as the commit policy asks.
    pub fn finish(&mut self, offset: i64) {
        if let Ok(at) = self.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            self.pending[at].1 = true;
        }
        while let Some(&(offset, true)) = self.pending.front() {
            self.done_up_to = Some(offset + 1);
            self.pending.pop_front();
        }
    }

    /// Messages handed out and not yet done.
    pub fn in_flight(&self) -> usize {
        self.pending.iter().filter(|(_, done)| !done).count()
    }

    /// The offset to commit now, if it moves the committed one forward.
    pub fn to_commit(&self) -> Option<i64> {
        let next = self.done_up_to?;
        self.committed.is_none_or(|committed| next > committed).then_some(next)
    }

    /// `offset` was committed.
    pub fn committed(&mut self, offset: i64) {
        self.committed = Some(self.committed.map_or(offset, |c| c.max(offset)));
    }

    /// The committed offset, if known.
    pub fn committed_offset(&self) -> Option<i64> {
        self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_done_prefix() {
        let mut p = PartitionOffsets::from_committed(Some(10));
        for offset in [10, 11, 12, 14] {
            assert!(p.start(offset));
        }
        assert_eq!(p.to_commit(), None, "nothing done yet");
        p.finish(12);
        p.finish(14);
        assert_eq!(p.to_commit(), None, "10 and 11 are still in flight");
        p.finish(10);
        assert_eq!(p.to_commit(), Some(11));
        p.committed(11);
        assert_eq!(p.to_commit(), None, "already committed");
        p.finish(11);
        assert_eq!(p.to_commit(), Some(15), "past the gap at 13, once 14 is done");
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn redeliveries_are_not_tracked_twice() {
        let mut p = PartitionOffsets::default();
        assert!(p.start(5));
        assert!(!p.start(5));
        assert!(!p.start(3));
        assert_eq!(p.in_flight(), 1);
        p.finish(5);
        assert_eq!(p.to_commit(), Some(6));
    }

    #[test]
    fn never_moves_backwards() {
        let mut p = PartitionOffsets::from_committed(Some(100));
        assert!(p.start(50));
        p.finish(50);
        assert_eq!(p.to_commit(), None, "51 is behind the committed 100");
        p.committed(40);
        assert_eq!(p.committed_offset(), Some(100));
    }
}
