//! Noticing that the idempotency store forgot what it was told, and, for as long as that
//! matters, having the ids it calls fresh looked up in ClickHouse before they are written.
//!
//! Redis without persistence restarts empty; a failover to a lagging replica, or an eviction,
//! loses recent keys. Either way an id the store once committed reads as fresh, and a resend of
//! an event ClickHouse already holds would be written again. Three signs are read, for each id
//! group, on the primary that holds the group (so per primary on a Redis Cluster):
//!
//! - the **epoch**, a key `<prefix>{<tag>}e` beside the group's ids, written once with a random
//!   id. Gone, or replaced by one a first start wrote, it went with the ids around it.
//!   The reservation script reads it too, so the first reservation on an emptied store knows.
//! - the server's **`run_id`**: another process (a restart, or a replica promoted) may lack the
//!   last writes. A promoted replica (its `master_replid2` is the old primary's replid) is no
//!   loss when every write waited for a replica (`redis_wait_replicas`): that is what `WAIT`
//!   buys. A restart is one whatever its persistence: `appendfsync everysec` loses a second, an
//!   RDB snapshot minutes.
//! - **`evicted_keys`** growing: keys were dropped for memory.
//!
//! A loss opens a **look-up period** (`dedup_lookup_after_loss_ms`, at most the dedup window:
//! an id committed before the loss is deduplicated that long after its write, so a resend can
//! come that late). The period's end is written into the epoch (`<id>:<until ms>`), so every
//! gateway of the fleet, also one started later, looks up until the same time; gateways that
//! declare at once settle on the latest end. Between a loss and the check that reads it (every
//! [`CHECK_EVERY`]), a store call that failed, or a reservation that found an epoch gone, makes
//! the store **suspect**: ids are looked up until a check has passed since.
//!
//! A gateway keeps the epoch it knows in `<data_dir>/idempotency-epoch`, so a gateway restarted
//! together with an emptied Redis still tells the loss from a first start.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// How often each group's signs are read.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The epoch key's suffix, after a group's base name (`<prefix>{<tag>}`).
pub const EPOCH_SUFFIX: &[u8] = b"e";

/// Why the store is believed to have lost data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sign {
    /// A group's epoch is gone or was replaced: its keys went with it.
    EpochGone,
    /// The primary is another process than the one that took the writes (a restart).
    Restarted,
    /// A replica was promoted while writes did not wait for replicas.
    Failover,
    /// The primary evicted keys.
    Evicted,
}

impl Sign {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpochGone => "epoch_gone",
            Self::Restarted => "restarted",
            Self::Failover => "failover",
            Self::Evicted => "evicted",
        }
    }
}

/// The last loss noticed: when, and by which sign.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Loss {
    pub at_ms: u64,
    pub sign: Sign,
}

/// What the request path asks: must fresh ids be looked up? Shared by the store's calls (which
/// raise suspicion) and its check (which settles it).
#[derive(Debug, Default)]
pub struct Trust {
    /// End of the look-up period, ms since the epoch (0: none).
    lookup_until: AtomicU64,
    /// Suspicions raised, and the count a passed check had seen when it started: the store is
    /// suspect while the first is ahead.
    raised: AtomicU64,
    settled: AtomicU64,
    last: Mutex<Option<Loss>>,
}

impl Trust {
    /// Whether ids the store calls fresh must be looked up in ClickHouse.
    pub fn unsure(&self, now_ms: u64) -> bool {
        self.suspect() || now_ms < self.lookup_until.load(Ordering::Relaxed)
    }

    pub fn suspect(&self) -> bool {
        self.raised.load(Ordering::Acquire) > self.settled.load(Ordering::Acquire)
    }

    /// A store call failed, or found an epoch gone: look up until the next check has passed.
    pub fn raise(&self) {
        self.raised.fetch_add(1, Ordering::AcqRel);
    }

    /// What a check notes before it reads the signs.
    fn mark(&self) -> u64 {
        self.raised.load(Ordering::Acquire)
    }

    /// A check that started at `mark` passed: suspicions raised before it are settled.
    fn settle(&self, mark: u64) {
        self.settled.fetch_max(mark, Ordering::AcqRel);
    }

    fn extend(&self, until_ms: u64) {
        self.lookup_until.fetch_max(until_ms, Ordering::AcqRel);
    }

    fn lost(&self, loss: Loss) {
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(loss);
    }

    /// The end of the look-up period, if it is still on.
    pub fn lookup_until(&self, now_ms: u64) -> Option<u64> {
        let until = self.lookup_until.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    pub fn last_loss(&self) -> Option<Loss> {
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What `INFO` says of the primary holding a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub run_id: String,
    pub replid: String,
    /// The replication id this node followed before it was promoted (zeros otherwise).
    pub replid2: String,
    pub evicted: u64,
}

impl NodeFacts {
    /// Reads the fields out of `INFO server stats replication`; `None` without a `run_id` (the
    /// command refused, or renamed away by a managed service): the epoch alone is read then.
    pub fn parse(info: &str) -> Option<Self> {
        let field = |name: &str| {
            info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).unwrap_or_default().trim()
        };
        let run_id = field("run_id");
        (!run_id.is_empty()).then(|| Self {
            run_id: run_id.into(),
            replid: field("master_replid").into(),
            replid2: field("master_replid2").into(),
            evicted: field("evicted_keys").parse().unwrap_or(0),
        })
    }
}

/// The policy for a primary: whether what it says now, against what it said at the last check,
/// means keys may be gone. `waited`: every write waited for a replica's acknowledgement.
pub fn node_loss(known: Option<&NodeFacts>, seen: &NodeFacts, waited: bool) -> Option<Sign> {
    let known = known?;
    if seen.run_id != known.run_id {
        let promoted = !known.replid.is_empty() && seen.replid2 == known.replid;
        return match (promoted, waited) {
            (true, true) => None,
            (true, false) => Some(Sign::Failover),
            (false, _) => Some(Sign::Restarted),
        };
    }
    (seen.evicted > known.evicted).then_some(Sign::Evicted)
}

/// A group's epoch: its id, and the end of the look-up period declared with it (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub id: String,
    pub until_ms: u64,
}

impl Epoch {
    pub fn parse(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let (id, until) = text.split_once(':')?;
        Some(Self { id: id.into(), until_ms: until.parse().ok()? })
    }

    pub fn value(&self) -> String {
        format!("{}:{}", self.id, self.until_ms)
    }

    fn fresh(until_ms: u64) -> Self {
        Self { id: format!("{:016x}", rand::random::<u64>()), until_ms }
    }
}

/// What a group's epoch says against the one the gateway knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochVerdict {
    /// The one known.
    Same,
    /// Another, to take on: the first the gateway sees, or one declared with a loss (its
    /// period perhaps over already: a loss while this gateway was away).
    Adopt(Epoch),
    /// None, and the gateway knows none: a first start.
    Fresh,
    /// Gone, or replaced by one declared with no loss: the store was emptied.
    Lost,
}

/// The policy for a group's epoch.
pub fn epoch_verdict(known: Option<&str>, seen: Option<Epoch>) -> EpochVerdict {
    match (known, seen) {
        (None, None) => EpochVerdict::Fresh,
        (Some(_), None) => EpochVerdict::Lost,
        (Some(known), Some(seen)) if seen.id == known => EpochVerdict::Same,
        // Only a first start writes an epoch with no period: one written over the known one
        // was written on a store that had lost it.
        (Some(_), Some(seen)) if seen.until_ms == 0 => EpochVerdict::Lost,
        (_, Some(seen)) => EpochVerdict::Adopt(seen),
    }
}

/// What the check reads of a group, and writes to it: the store implements it.
pub(crate) trait Groups {
    /// How many id groups there are.
    fn groups(&self) -> usize;
    /// The group's epoch (raw) and its primary's `INFO`.
    async fn read(&self, group: usize) -> Result<(Option<Vec<u8>>, String), super::StoreError>;
    /// Writes the group's epoch; `only_if_none`: unless it has one. Answers the one it holds.
    async fn write(&self, group: usize, epoch: &str, only_if_none: bool) -> Result<Vec<u8>, super::StoreError>;
}

/// The check's memory: the epoch known, each group's primary as last seen.
#[derive(Debug)]
pub(crate) struct Check {
    known: Option<String>,
    nodes: Vec<Option<NodeFacts>>,
    /// A loss declared whose epoch is not yet written everywhere.
    declaring: Option<Epoch>,
    /// Signs of loss seen and not yet declared (the declaration's writes failed).
    pending: Found,
    /// The last check failed (logged once, not every second).
    pub failing: bool,
    /// `<data_dir>/idempotency-epoch`, when there is a data directory.
    marker: Option<PathBuf>,
    /// The look-up period a loss opens.
    period: Duration,
    waited: bool,
}

/// What one check found: the signs of loss (empty: none).
pub type Found = Vec<Sign>;

impl Check {
    pub fn new(marker: Option<PathBuf>, period: Duration, waited: bool) -> Self {
        let known = marker.as_ref().and_then(|path| std::fs::read_to_string(path).ok()).and_then(|text| {
            let id = text.trim();
            (!id.is_empty()).then(|| id.to_string())
        });
        Self {
            known,
            nodes: Vec::new(),
            declaring: None,
            pending: Found::new(),
            failing: false,
            marker,
            period,
            waited,
        }
    }

    /// Reads every group's signs and acts on them: adopts an epoch, writes a first one, or
    /// declares a loss (a new epoch with the period's end, written to every group). A failed
    /// call leaves the store suspect.
    pub async fn run(&mut self, store: &impl Groups, trust: &Trust, now_ms: u64) -> Result<Found, super::StoreError> {
        let mark = trust.mark();
        let result = self.pass(store, trust, now_ms).await;
        match &result {
            Ok(_) => trust.settle(mark),
            Err(_) => trust.raise(),
        }
        result
    }

    async fn pass(&mut self, store: &impl Groups, trust: &Trust, now_ms: u64) -> Result<Found, super::StoreError> {
        let groups = store.groups();
        self.nodes.resize(groups, None);
        // Everything is read before anything is written, so a loss since the last pass is seen
        // even while an earlier declaration is still to be written.
        let mut facts = Vec::with_capacity(groups);
        let mut epochs = Vec::with_capacity(groups);
        for g in 0..groups {
            let (epoch, info) = store.read(g).await?;
            facts.push(NodeFacts::parse(&info));
            epochs.push(epoch.as_deref().and_then(Epoch::parse));
        }
        // Signs are kept until a loss is declared with them: a pass that fails after this point
        // loses none (the primaries' new facts are remembered from here on).
        for (g, seen) in facts.into_iter().enumerate() {
            if let Some(seen) = seen {
                self.pending.extend(node_loss(self.nodes[g].as_ref(), &seen, self.waited));
                self.nodes[g] = Some(seen);
            }
        }
        // Gateways declaring at once leave different epochs in different groups: every one
        // settles on the same, the latest period's (then the greatest id).
        let canonical = epochs.iter().flatten().max_by(|a, b| (a.until_ms, &a.id).cmp(&(b.until_ms, &b.id))).cloned();
        let missing = epochs.iter().any(Option::is_none);
        match canonical.clone() {
            None if self.known.is_none() => {
                self.first_start(store, trust).await?;
                return Ok(Found::new());
            }
            None => self.pending.push(Sign::EpochGone),
            Some(epoch) => {
                let knew = self.known.is_some();
                match epoch_verdict(self.known.as_deref(), Some(epoch.clone())) {
                    EpochVerdict::Same | EpochVerdict::Adopt(_) | EpochVerdict::Fresh => {
                        trust.extend(epoch.until_ms);
                        self.know(epoch.id);
                    }
                    EpochVerdict::Lost => self.pending.push(Sign::EpochGone),
                }
                if missing && knew {
                    // Some groups hold the fleet's epoch and these none: they lost it. A
                    // gateway that knew none may be watching a first start (or a declaration)
                    // write the groups one by one: it completes the copy below instead.
                    self.pending.push(Sign::EpochGone);
                }
            }
        }
        self.pending.sort();
        self.pending.dedup();
        let Some(&sign) = self.pending.first() else {
            if let Some(epoch) = canonical {
                for (g, held) in epochs.iter().enumerate() {
                    if held.as_ref() != Some(&epoch) {
                        store.write(g, &epoch.value(), false).await?;
                    }
                }
            }
            return Ok(Found::new());
        };
        let epoch = match self.declaring.clone() {
            Some(epoch) => epoch,
            None => {
                let until = now_ms.saturating_add(u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX));
                let epoch = Epoch::fresh(until);
                trust.extend(until);
                trust.lost(Loss { at_ms: now_ms, sign });
                self.declaring = Some(epoch.clone());
                epoch
            }
        };
        for g in 0..groups {
            store.write(g, &epoch.value(), false).await?;
        }
        self.declaring = None;
        self.know(epoch.id);
        Ok(std::mem::take(&mut self.pending))
    }

    /// No group has an epoch and the gateway knows none: group 0's is written unless another
    /// gateway starting at once got there first, and whichever it holds is copied to the other
    /// groups, so that gateways starting together agree on one.
    async fn first_start(&mut self, store: &impl Groups, trust: &Trust) -> Result<(), super::StoreError> {
        let fresh = Epoch::fresh(0).value();
        let mut held = store.write(0, &fresh, true).await?;
        if Epoch::parse(&held).is_none() {
            // Something else under the epoch's key: replaced, or every pass would fail here.
            held = store.write(0, &fresh, false).await?;
        }
        let Some(epoch) = Epoch::parse(&held) else {
            return Err(super::StoreError::Backend("the epoch written is not there".into()));
        };
        for g in 1..store.groups() {
            store.write(g, &epoch.value(), true).await?;
        }
        trust.extend(epoch.until_ms);
        self.know(epoch.id);
        Ok(())
    }

    fn know(&mut self, id: String) {
        if self.known.as_deref() == Some(id.as_str()) {
            return;
        }
        if let Some(path) = &self.marker {
            let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
                let temporary = path.with_extension("tmp");
                std::fs::write(&temporary, &id)?;
                std::fs::rename(&temporary, path)
            });
            if let Err(error) = written {
                tracing::warn!(%error, path = %path.display(), "cannot keep the idempotency store's epoch");
            }
        }
        self.known = Some(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(run_id: &str, replid: &str, replid2: &str, evicted: u64) -> NodeFacts {
        NodeFacts { run_id: run_id.into(), replid: replid.into(), replid2: replid2.into(), evicted }
    }

    #[test]
    fn info_is_read_for_the_four_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n# Stats\r\nevicted_keys:7\r\n\
                    # Replication\r\nmaster_replid:r1\r\nmaster_replid2:0000\r\n";
        assert_eq!(NodeFacts::parse(info), Some(facts("abc", "r1", "0000", 7)));
        assert_eq!(NodeFacts::parse(""), None, "INFO refused");
    }

    #[test]
    fn a_primary_has_lost_keys_when_restarted_evicting_or_promoted_without_waits() {
        let before = facts("a", "r1", "0", 3);
        assert_eq!(node_loss(None, &before, false), None, "first seen");
        assert_eq!(node_loss(Some(&before), &before, false), None);
        assert_eq!(node_loss(Some(&before), &facts("b", "r2", "0", 0), true), Some(Sign::Restarted));
        assert_eq!(node_loss(Some(&before), &facts("a", "r1", "0", 4), true), Some(Sign::Evicted));
        let promoted = facts("c", "r3", "r1", 0);
        assert_eq!(node_loss(Some(&before), &promoted, false), Some(Sign::Failover));
        assert_eq!(node_loss(Some(&before), &promoted, true), None, "every write waited for a replica");
    }

    #[test]
    fn an_epoch_gone_or_replaced_without_a_declared_loss_is_a_loss() {
        let epoch = |id: &str, until_ms| Some(Epoch { id: id.into(), until_ms });
        let adopt = |id: &str, until_ms| EpochVerdict::Adopt(Epoch { id: id.into(), until_ms });
        assert_eq!(epoch_verdict(None, None), EpochVerdict::Fresh);
        assert_eq!(epoch_verdict(None, epoch("x", 0)), adopt("x", 0));
        assert_eq!(epoch_verdict(Some("x"), epoch("x", 0)), EpochVerdict::Same);
        assert_eq!(epoch_verdict(Some("x"), None), EpochVerdict::Lost);
        assert_eq!(epoch_verdict(Some("x"), epoch("y", 0)), EpochVerdict::Lost, "started afresh on an emptied store");
        assert_eq!(epoch_verdict(Some("x"), epoch("y", 50)), adopt("y", 50), "a loss another gateway declared");
        assert_eq!(Epoch::parse(b"ab:12"), Some(Epoch { id: "ab".into(), until_ms: 12 }));
        assert_eq!(Epoch::parse(b"ab"), None);
    }

    /// Groups in memory, as a fake store.
    struct Fake {
        epochs: Mutex<Vec<Option<Vec<u8>>>>,
        infos: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new(groups: usize) -> Self {
            let info = "run_id:a\r\nmaster_replid:r\r\nevicted_keys:0\r\n".to_string();
            Self { epochs: Mutex::new(vec![None; groups]), infos: Mutex::new(vec![info; groups]) }
        }
    }

    impl Groups for Fake {
        fn groups(&self) -> usize {
            self.epochs.lock().unwrap().len()
        }
        async fn read(&self, group: usize) -> Result<(Option<Vec<u8>>, String), super::super::StoreError> {
            Ok((self.epochs.lock().unwrap()[group].clone(), self.infos.lock().unwrap()[group].clone()))
        }
        async fn write(
            &self,
            group: usize,
            epoch: &str,
            only_if_none: bool,
        ) -> Result<Vec<u8>, super::super::StoreError> {
            let mut epochs = self.epochs.lock().unwrap();
            if !(only_if_none && epochs[group].is_some()) {
                epochs[group] = Some(epoch.as_bytes().to_vec());
            }
            Ok(epochs[group].clone().unwrap_or_default())
        }
    }

    #[tokio::test]
    async fn a_group_emptied_opens_the_period_for_every_gateway_and_a_restarted_one() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("idempotency-epoch");
        let (store, period) = (Fake::new(3), Duration::from_secs(100));
        let (a_trust, b_trust) = (Trust::default(), Trust::default());
        let mut a = Check::new(Some(marker.clone()), period, false);
        let mut b = Check::new(None, period, false);
        assert_eq!(a.run(&store, &a_trust, 1_000).await.unwrap(), Found::new(), "a first start");
        assert_eq!(b.run(&store, &b_trust, 1_000).await.unwrap(), Found::new(), "the fleet's epoch adopted");
        assert!(!a_trust.unsure(1_000) && !b_trust.unsure(1_000));

        store.epochs.lock().unwrap()[1] = None;
        a_trust.raise();
        assert!(a_trust.unsure(2_000), "suspect until a check passed");
        assert_eq!(a.run(&store, &a_trust, 2_000).await.unwrap(), [Sign::EpochGone]);
        assert_eq!(a_trust.lookup_until(2_000), Some(102_000));
        assert_eq!(b.run(&store, &b_trust, 3_000).await.unwrap(), Found::new(), "B adopts the declared loss");
        assert_eq!(b_trust.lookup_until(3_000), Some(102_000));
        assert!(!b_trust.unsure(102_000), "the period ends");

        // A gateway restarted on its data directory during the period looks up until its end.
        let during = Trust::default();
        let mut again = Check::new(Some(marker.clone()), period, false);
        assert_eq!(again.run(&store, &during, 4_000).await.unwrap(), Found::new());
        assert_eq!(during.lookup_until(4_000), Some(102_000));

        // Two gateways declaring at once leave mixed epochs: both settle on the latest.
        store.epochs.lock().unwrap()[2] = Some(b"zz:103000".to_vec());
        assert_eq!(b.run(&store, &b_trust, 4_000).await.unwrap(), Found::new(), "another declaration adopted");
        assert_eq!(b_trust.lookup_until(4_000), Some(103_000));
        let epochs = store.epochs.lock().unwrap().clone();
        assert!(epochs.iter().all(|e| e.as_deref() == Some(&b"zz:103000"[..])), "rewritten to one: {epochs:?}");

        // A gateway restarted on its data directory while the store was emptied.
        *store.epochs.lock().unwrap() = vec![None; 3];
        let restarted = Trust::default();
        let mut c = Check::new(Some(marker), period, false);
        assert_eq!(c.run(&store, &restarted, 5_000).await.unwrap(), [Sign::EpochGone]);
        assert!(restarted.unsure(5_000));
        let first_start = Trust::default();
        assert_eq!(
            Check::new(None, period, false).run(&Fake::new(3), &first_start, 5_000).await.unwrap(),
            Found::new()
        );
        assert!(!first_start.unsure(5_000));
    }

    #[tokio::test]
    async fn a_first_start_seen_half_written_is_completed_not_declared() {
        let (store, period) = (Fake::new(3), Duration::from_secs(100));
        store.epochs.lock().unwrap()[0] = Some(b"a:0".to_vec());
        let trust = Trust::default();
        let mut newcomer = Check::new(None, period, false);
        assert_eq!(newcomer.run(&store, &trust, 1_000).await.unwrap(), Found::new());
        assert!(!trust.unsure(1_000), "no loss declared");
        let epochs = store.epochs.lock().unwrap().clone();
        assert!(epochs.iter().all(|e| e.as_deref() == Some(&b"a:0"[..])), "the copy completed: {epochs:?}");

        // Something that is no epoch under the key is replaced, not failed on forever.
        let garbled = Fake::new(1);
        garbled.epochs.lock().unwrap()[0] = Some(b"garbage".to_vec());
        let trust = Trust::default();
        assert_eq!(Check::new(None, period, false).run(&garbled, &trust, 1_000).await.unwrap(), Found::new());
        assert!(Epoch::parse(garbled.epochs.lock().unwrap()[0].as_deref().unwrap()).is_some());
    }

    #[tokio::test]
    async fn a_restarted_primary_is_a_loss() {
        let (store, trust) = (Fake::new(1), Trust::default());
        let mut check = Check::new(None, Duration::from_secs(10), true);
        check.run(&store, &trust, 0).await.unwrap();
        store.infos.lock().unwrap()[0] = "run_id:b\r\nmaster_replid:s\r\n".into();
        assert_eq!(check.run(&store, &trust, 1).await.unwrap(), [Sign::Restarted]);
        assert_eq!(trust.last_loss().map(|l| l.sign), Some(Sign::Restarted));
        assert_eq!(check.run(&store, &trust, 2).await.unwrap(), Found::new(), "noticed once");
        assert!(trust.unsure(2));
    }
}
