//! What the journal knows in memory about its segments and blocks: which blocks are still
//! unconfirmed, and for each confirmed one, which segment holds the confirmation it relies on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::BlockId;

/// One segment file, named by `u64` (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Segment {
    /// Bytes in the file.
    pub size: u64,
    /// Bytes of confirmations carried forward into it from deleted segments. They do not count
    /// toward its fill, so that a segment full of carried confirmations still takes new blocks
    /// (and carrying them never makes the journal roll over and over).
    pub carried: u64,
    /// Every block it holds, confirmed or not.
    pub blocks: Vec<BlockId>,
    /// How many of `blocks` are unconfirmed.
    pub unconfirmed: usize,
    /// Blocks of *other* segments whose confirmation lives here. Entries go stale when the
    /// confirmation is carried elsewhere or the block's segment is deleted; readers check them
    /// against [`Book::confirmed`].
    pub holds: Vec<BlockId>,
}

impl Segment {
    /// Bytes written into it other than carried confirmations.
    pub fn fill(&self) -> u64 {
        self.size.saturating_sub(self.carried)
    }
}

#[derive(Debug)]
struct Pending {
    segment: u64,
    since: Instant,
}

#[derive(Debug)]
struct Confirmed {
    /// Where the block is.
    segment: u64,
    /// Where its (latest) confirmation is.
    holder: u64,
}

#[derive(Debug, Default)]
pub(super) struct Book {
    segments: BTreeMap<u64, Segment>,
    /// By id, which is also append order: the first entry is the oldest.
    unconfirmed: BTreeMap<BlockId, Pending>,
    /// Confirmed blocks of segments still on disk (a deleted segment's blocks are forgotten).
    confirmed: HashMap<BlockId, Confirmed>,
}

impl Book {
    pub fn add_segment(&mut self, name: u64) {
        self.segments.entry(name).or_default();
    }

    pub fn segment(&self, name: u64) -> Option<&Segment> {
        self.segments.get(&name)
    }

    /// Counts `bytes` more in segment `name`'s file; `carried` when they are confirmations
    /// carried forward.
    pub fn grow(&mut self, name: u64, bytes: u64, carried: bool) {
        if let Some(segment) = self.segments.get_mut(&name) {
            segment.size += bytes;
            if carried {
                segment.carried += bytes;
            }
        }
    }

    pub fn add_block(&mut self, segment: u64, id: BlockId, since: Instant) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.blocks.push(id);
            s.unconfirmed += 1;
            self.unconfirmed.insert(id, Pending { segment, since });
        }
    }

    /// Records that a confirmation of `id` is in segment `holder`. A block not known (never
    /// appended, or its segment already deleted) is ignored; for a block confirmed before, the
    /// newer confirmation becomes the one it relies on.
    pub fn confirm(&mut self, id: BlockId, holder: u64) {
        let segment = if let Some(pending) = self.unconfirmed.remove(&id) {
            if let Some(s) = self.segments.get_mut(&pending.segment) {
                s.unconfirmed -= 1;
            }
            self.confirmed.insert(id, Confirmed { segment: pending.segment, holder });
            pending.segment
        } else if let Some(confirmed) = self.confirmed.get_mut(&id) {
            confirmed.holder = holder;
            confirmed.segment
        } else {
            return;
        };
        if segment != holder
            && let Some(s) = self.segments.get_mut(&holder)
        {
            s.holds.push(id);
        }
    }

    /// The ids among `ids` that are unconfirmed, sorted, each once.
    pub fn unconfirmed_among(&self, ids: &[BlockId]) -> Vec<BlockId> {
        let mut fresh: Vec<BlockId> = ids.iter().copied().filter(|id| self.unconfirmed.contains_key(id)).collect();
        fresh.sort_unstable();
        fresh.dedup();
        fresh
    }

    /// Whether the active segment `name` is worth closing so it can be deleted: it held
    /// blocks, all are confirmed, and it is at least `threshold` long — and longer than what
    /// was carried into it, so that each roll writes at least as many new bytes as it carries.
    pub fn is_spent(&self, name: u64, threshold: u64) -> bool {
        self.segments
            .get(&name)
            .is_some_and(|s| !s.blocks.is_empty() && s.unconfirmed == 0 && s.fill() >= threshold.max(s.carried))
    }

    /// Segments other than `active` whose blocks are all confirmed.
    pub fn deletable(&self, active: u64) -> BTreeSet<u64> {
        self.segments.iter().filter(|&(&name, s)| name != active && s.unconfirmed == 0).map(|(&name, _)| name).collect()
    }

    /// Confirmations that deleting `doomed` would lose and that still matter: those whose
    /// block is in a segment that stays. They must be written again before the deletion.
    pub fn still_needed(&self, doomed: &BTreeSet<u64>) -> Vec<BlockId> {
        let mut needed = Vec::new();
        for name in doomed {
            let Some(segment) = self.segments.get(name) else { continue };
            for id in &segment.holds {
                if let Some(c) = self.confirmed.get(id)
                    && c.holder == *name
                    && !doomed.contains(&c.segment)
                {
                    needed.push(*id);
                }
            }
        }
        needed.sort_unstable();
        needed
    }

    /// Forgets segment `name` and its blocks.
    pub fn remove_segment(&mut self, name: u64) -> Option<Segment> {
        let segment = self.segments.remove(&name)?;
        for id in &segment.blocks {
            self.confirmed.remove(id);
            self.unconfirmed.remove(id);
        }
        Some(segment)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn unconfirmed_count(&self) -> usize {
        self.unconfirmed.len()
    }

    pub fn oldest_unconfirmed(&self) -> Option<Instant> {
        self.unconfirmed.first_key_value().map(|(_, pending)| pending.since)
    }

    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segment 1 keeps an unconfirmed block (1) and a confirmed one (2) whose confirmation is
    /// in segment 3; segment 3's own block is confirmed there too.
    fn book() -> Book {
        let now = Instant::now();
        let mut book = Book::default();
        for name in [1, 3, 5] {
            book.add_segment(name);
        }
        book.add_block(1, 1, now);
        book.add_block(1, 2, now);
        book.add_block(3, 3, now);
        book.confirm(2, 3);
        book.confirm(3, 3);
        book
    }

    #[test]
    fn a_confirmation_of_a_block_that_stays_is_needed() {
        let book = book();
        let doomed = book.deletable(5);
        assert_eq!(doomed, BTreeSet::from([3]));
        assert_eq!(book.still_needed(&doomed), vec![2]);
    }

    #[test]
    fn a_carried_confirmation_moves_and_the_old_holder_no_longer_counts() {
        let mut book = book();
        book.confirm(2, 5);
        assert!(book.still_needed(&BTreeSet::from([3])).is_empty());
        assert_eq!(book.still_needed(&BTreeSet::from([5])), vec![2]);
        // Once block 2's own segment goes, its confirmation matters no more.
        book.confirm(1, 5);
        assert_eq!(book.deletable(5), BTreeSet::from([1, 3]));
        assert!(book.still_needed(&BTreeSet::from([1, 3])).is_empty());
        book.remove_segment(1);
        assert!(book.still_needed(&BTreeSet::from([5])).is_empty());
    }

    #[test]
    fn unknown_and_repeated_ids_are_ignored() {
        let mut book = book();
        assert_eq!(book.unconfirmed_among(&[9, 1, 1, 2]), vec![1]);
        book.confirm(9, 5);
        assert_eq!(book.unconfirmed_count(), 1);
    }
}
