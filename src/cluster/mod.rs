//! The ClickHouse cluster as the gateway runs it: shards of replicas, each replica a node with
//! its own machinery, and the choice of a shard for a request and of a replica for a batch.
//! The topology it is built from is parsed with the configuration ([`crate::config::Topology`]);
//! how a row's key picks a shard is [`crate::schema::sharding`]'s.
//!
//! Every replica is a node with its own Buffer, so each has everything the single-node path
//! has: its own writer (INSERT permits, circuit breaker), its own journal and confirmer (the
//! journal knows the node its blocks were written to: only that node can say whether they
//! landed), and its own fill poller and shed verdict. A shard is available while one of its
//! replicas is; a batch goes to a usable replica, preferring one per partition so that a
//! replica's Buffer gets large blocks.

use std::sync::Arc;

use crate::clickhouse::ClickHouse;
use crate::clickhouse::breaker::Breaker;
use crate::clickhouse::writer::Writer;
use crate::journal::Journal;
use crate::schema::sharding::Placement;
use crate::shed::{Policy, ShedState, Verdict};

/// One ClickHouse node and the gateway's machinery for it.
#[derive(Debug)]
pub struct Replica {
    /// The node's URL, as configured (its name in logs, metrics and findings).
    pub url: String,
    /// Its client, for what is asked of every node (look-ups of replayed rows).
    pub ch: ClickHouse,
    pub writer: Arc<Writer>,
    pub breaker: Arc<Breaker>,
    pub journal: Option<Arc<Journal>>,
    pub shed: Arc<ShedState>,
}

impl Replica {
    /// The replica's shed verdict under `policy`.
    pub fn verdict(&self, policy: Policy) -> Verdict {
        policy.verdict(&self.shed)
    }

    /// Whether new rows may go here: not shed, breaker not open.
    pub fn usable(&self, policy: Policy) -> bool {
        self.verdict(policy) == Verdict::Pass && !self.breaker.is_open()
    }
}

/// The cluster as the coalescers see it: shards of replicas, and how rows are placed.
#[derive(Debug)]
pub struct Shards {
    pub shards: Vec<Vec<Arc<Replica>>>,
    /// The shards' weights; rows placed by a key follow it, `rand()` requests are spread by it.
    pub placement: Placement,
    pub policy: Policy,
}

impl Shards {
    /// Every replica of every shard.
    pub fn replicas(&self) -> impl Iterator<Item = &Arc<Replica>> {
        self.shards.iter().flatten()
    }

    /// Whether the shard takes new rows now, or when to come back (the soonest of its replicas).
    pub fn verdict(&self, shard: usize) -> Verdict {
        let Some(replicas) = self.shards.get(shard) else { return Verdict::Pass };
        shard_verdict(replicas.iter().map(|r| (r.verdict(self.policy), r.breaker.is_open())))
    }

    /// The cluster as one Buffer, for the request path's first look: bytes and capacity
    /// summed, shed once no shard takes rows. `None` while no replica's poll is fresh, so that
    /// the summary goes stale with them.
    pub fn summary(&self) -> Option<Summary> {
        let fresh = self.replicas().any(|r| r.shed.staleness().is_some_and(|age| age <= self.policy.stale_after));
        if !fresh {
            return None;
        }
        let verdicts: Vec<Verdict> = (0..self.shards.len()).map(|s| self.verdict(s)).collect();
        let shedding = verdicts.iter().all(|v| matches!(v, Verdict::Shed { .. }));
        let retry_after_s = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Shed { retry_after_s, .. } => Some(*retry_after_s),
                Verdict::Pass => None,
            })
            .min()
            .unwrap_or(1);
        Some(Summary {
            bytes: self.replicas().map(|r| r.shed.bytes()).sum(),
            capacity: self.replicas().map(|r| r.shed.capacity()).sum(),
            shedding,
            retry_after_s,
        })
    }

    /// A shard for a request that any shard may take (`rand()`): one with room, at random in
    /// proportion to the weights; `None` when none has room.
    pub fn pick_random(&self, draw: u64) -> Option<usize> {
        // Asked on every such request: the verdicts are atomics, nothing is collected.
        let open = (0..self.shards.len()).filter(|&s| self.verdict(s) == Verdict::Pass);
        pick_weighted(open, |s| self.placement.weight(s), draw)
    }
}

/// The cluster's Buffers summed (see [`Shards::summary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub bytes: u64,
    pub capacity: u64,
    pub shedding: bool,
    pub retry_after_s: u32,
}

/// A shard's verdict from its replicas' (verdict, breaker open): it passes while one replica
/// passes with a closed breaker; otherwise it is shed for as long as the soonest replica says.
pub fn shard_verdict(replicas: impl Iterator<Item = (Verdict, bool)>) -> Verdict {
    let mut soonest: Option<Verdict> = None;
    for (verdict, open) in replicas {
        match (verdict, open) {
            (Verdict::Pass, false) => return Verdict::Pass,
            (Verdict::Pass, true) => {
                soonest.get_or_insert(Verdict::Shed { retry_after_s: 1, stale: false });
            }
            (Verdict::Shed { retry_after_s, stale }, _) => {
                let sooner = match soonest {
                    Some(Verdict::Shed { retry_after_s: seen, .. }) => retry_after_s < seen,
                    _ => true,
                };
                if sooner {
                    soonest = Some(Verdict::Shed { retry_after_s, stale });
                }
            }
        }
    }
    soonest.unwrap_or(Verdict::Pass)
}

/// One of `candidates`, chosen by `draw` in proportion to `weight`.
fn pick_weighted(
    mut candidates: impl Iterator<Item = usize> + Clone,
    weight: impl Fn(usize) -> usize,
    draw: u64,
) -> Option<usize> {
    let total: usize = candidates.clone().map(&weight).sum();
    if total == 0 {
        return candidates.next();
    }
    let mut at = (draw % total as u64) as usize;
    for c in candidates.clone() {
        let w = weight(c);
        if at < w {
            return Some(c);
        }
        at -= w;
    }
    candidates.last()
}

/// The replica a batch goes to next: the first usable one from `preferred` on that was not
/// tried yet; failing that, the first untried one whose breaker lets INSERTs through (a shed
/// replica still takes a batch admitted before the shed: the threshold leaves room).
pub fn choose_replica(usable: &[bool], allowed: &[bool], preferred: usize, tried: &[usize]) -> Option<usize> {
    let n = usable.len();
    let order = (0..n).map(|k| (preferred + k) % n).filter(|i| !tried.contains(i));
    let untried: Vec<usize> = order.collect();
    untried.iter().copied().find(|&i| usable[i]).or_else(|| untried.iter().copied().find(|&i| allowed[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHED: Verdict = Verdict::Shed { retry_after_s: 9, stale: false };

    #[test]
    fn a_shard_passes_while_one_replica_does() {
        assert_eq!(shard_verdict([(SHED, false), (Verdict::Pass, false)].into_iter()), Verdict::Pass);
        let soon = Verdict::Shed { retry_after_s: 2, stale: true };
        assert_eq!(shard_verdict([(SHED, false), (soon, false)].into_iter()), soon, "the soonest replica");
        assert_eq!(
            shard_verdict([(Verdict::Pass, true)].into_iter()),
            Verdict::Shed { retry_after_s: 1, stale: false },
            "a replica whose breaker is open takes nothing"
        );
    }

    #[test]
    fn replicas_are_chosen_usable_first_then_any_untried() {
        assert_eq!(choose_replica(&[true, true], &[true, true], 1, &[]), Some(1), "the partition's own");
        assert_eq!(choose_replica(&[true, false], &[true, true], 1, &[]), Some(0), "the usable one");
        assert_eq!(choose_replica(&[true, true], &[true, true], 0, &[0]), Some(1), "failover");
        assert_eq!(choose_replica(&[false, false], &[true, false], 1, &[]), Some(0), "shed but allowed");
        assert_eq!(choose_replica(&[true, true], &[true, true], 0, &[0, 1]), None, "all tried");
    }

    #[test]
    fn random_requests_follow_the_weights_of_shards_with_room() {
        let weight = |s: usize| [1, 2, 1][s];
        let picks: Vec<_> = (0..4).map(|d| pick_weighted(0..3, weight, d).unwrap()).collect();
        assert_eq!(picks, [0, 1, 1, 2]);
        assert_eq!(pick_weighted(2..3, weight, 7), Some(2), "only the one with room");
        assert_eq!(pick_weighted(0..0, weight, 7), None);
    }
}
