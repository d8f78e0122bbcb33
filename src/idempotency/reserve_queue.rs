//! Reservations on Redis, batched across concurrent requests: a single task takes everything
//! queued while earlier calls were in flight and sends it as script calls (group commit, up to
//! two batches in flight so Redis has the next one as soon as it finishes one), so Redis runs
//! one script per group of requests rather than one per request, and no request waits for a
//! timer.
//!
//! A script call touches the keys of the id groups it is given (see [`super::groups`]): on one
//! primary a batch is one call over all its groups; on a Redis Cluster it is one call per
//! group, each to its own slot, sent in parallel.
//!
//! The common case, an id nobody holds, costs one hash field written. An id held by another
//! token comes back with the value found, and [`super::redis_store`] settles it: the holder's
//! status key lives in another slot, so the script cannot read it.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::groups::group_of;
use super::redis_conn::Connection;
use super::trust::Trust;
use super::{StoreError, Terms};

/// Computes the slot (`floor(Redis TIME / window)`) and the value a reservation stores: the
/// token, then the end of its lease in Redis milliseconds (big-endian, 6 bytes; ~15 bytes more
/// per id than the token alone, for no write per token when reserving). Shared by both scripts;
/// `ARGV[1]` lease (ms), `ARGV[2]` window (ms).
const PRELUDE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local lease, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local slot = math.floor(now_ms / window)
local function be48(n)
  local bytes = {}
  for i = 6, 1, -1 do bytes[i] = n % 256; n = math.floor(n / 256) end
  return string.char(unpack(bytes))
end
local stamp = be48(now_ms + lease)
local function hash(base, s) return base .. 'h:' .. string.format('%.0f', s) end
-- A group's current slot hash; the first write of a slot removes the slot before the previous
-- one (UNLINK: freed off the main thread) and gives the new one a backstop expiry.
local function current(base)
  local name = hash(base, slot)
  if redis.call('EXISTS', name) == 0 then
    redis.call('UNLINK', hash(base, slot - 2))
    return name, true
  end
  return name, false
end
local function backstop(name) redis.call('PEXPIREAT', name, string.format('%.0f', (slot + 3) * window)) end
local function lease_over(value)
  local ends = 0
  for i = 11, 16 do ends = ends * 256 + (string.byte(value, i) or 0) end
  return ends <= now_ms
end
";

/// `KEYS`: the base name (`<prefix>{<tag>}`) of each group in the call. `ARGV[3]`: the number
/// of runs `R`, then per run its group (index into `KEYS`), token and number of ids, then the
/// ids, run by run; runs come sorted by group, so a group's ids are contiguous, and no id is
/// twice in a call ([`first_claims`]). Answers `{n, [position, lease over, holder]…}`: the
/// number of ids seen, then for each id another token holds its position among the call's ids
/// (from 0), `1` if that holder's lease is over (else `0`), and the value found. Tokens are 10
/// bytes. The count ends in `!` when a group's epoch (`<base>e`) is gone: the store lost what
/// it held there, and what it says of the ids cannot be trusted ([`super::trust`]).
///
/// Per group in the call: one `HMGET` of the current slot, one of the previous slot when that
/// exists, and one `HSET` (per 2,000 ids: Lua's `unpack` stops at about 8,000 values). A fresh
/// id adds nothing to the answer and nothing to any table but the `HSET`'s arguments: what the
/// script does per id is most of what Redis spends on it besides the hash itself.
const RESERVE: &str = r"
local CHUNK = 2000
local R = tonumber(ARGV[3])
local first = 4 + 3 * R
local answer = {tostring(#ARGV - first + 1)}
local r, at = 0, first
local lost = false
for k = 1, #KEYS do
  if redis.call('EXISTS', KEYS[k] .. 'e') == 0 then lost = true end
  local name, created = current(KEYS[k])
  local previous = hash(KEYS[k], slot - 1)
  -- Absent in a gateway's first window: not asking it then saves a nil per id.
  local old = redis.call('EXISTS', previous) == 1
  local to, e = at - 1, r
  while e < R and tonumber(ARGV[4 + 3 * e]) == k do
    to = to + tonumber(ARGV[6 + 3 * e])
    e = e + 1
  end
  -- What each id holds: the current slot's value, else the previous slot's.
  local found = {}
  for a = at, to, CHUNK do
    local b = math.min(a + CHUNK - 1, to)
    local now = redis.call('HMGET', name, unpack(ARGV, a, b))
    if old then
      local before = redis.call('HMGET', previous, unpack(ARGV, a, b))
      for j = a, b do found[j] = now[j - a + 1] or before[j - a + 1] end
    else
      for j = a, b do found[j] = now[j - a + 1] end
    end
  end
  local fresh, nf = {}, 0
  for run = r, e - 1 do
    local token, n = ARGV[5 + 3 * run], tonumber(ARGV[6 + 3 * run])
    local value = token .. stamp
    for j = at, at + n - 1 do
      local holder = found[j]
      if not holder then
        fresh[nf + 1] = ARGV[j]
        fresh[nf + 2] = value
        nf = nf + 2
      elseif string.sub(holder, 1, 10) ~= token then
        answer[#answer + 1] = tostring(j - first)
        answer[#answer + 1] = lease_over(holder) and '1' or '0'
        answer[#answer + 1] = holder
      end
    end
    at = at + n
  end
  for a = 1, nf, CHUNK do redis.call('HSET', name, unpack(fresh, a, math.min(a + CHUNK - 1, nf))) end
  if created and nf > 0 then backstop(name) end
  r = e
end
if lost then answer[1] = answer[1] .. '!' end
return answer
";

/// `KEYS[1]`: the id's group base; `ARGV[3..5]`: the id, the value it was found holding, the
/// token taking it over. Takes the id if it still holds that value (or nothing): 0; 1 if
/// another reservation got there first.
const TAKE_OVER: &str = r"
local id, expected, token = ARGV[3], ARGV[4], ARGV[5]
local name, created = current(KEYS[1])
local found = redis.call('HGET', name, id) or redis.call('HGET', hash(KEYS[1], slot - 1), id)
if found and found ~= expected then
  if string.sub(found, 1, 10) == token then return 0 end
  return 1
end
redis.call('HSET', name, id, token .. stamp)
if created then backstop(name) end
return 0
";

pub fn reserve_script() -> Script {
    Script::new(&format!("{PRELUDE}{RESERVE}"))
}

pub fn take_over_script() -> Script {
    Script::new(&format!("{PRELUDE}{TAKE_OVER}"))
}

/// Keys per batched reservation (a single request larger than this still goes alone), so one
/// script never holds Redis for long: a commit, and the next call, wait behind it. Calls of
/// 2,048 with two in flight gave ~20% more events/s than calls of 4,096 one at a time on large
/// batches with idempotency (docs/performance-history.md).
const MAX_BATCH_KEYS: usize = 2048;

/// Batches in flight at once: while Redis runs one the next is already queued behind it.
const MAX_CALLS_IN_FLIGHT: usize = 2;

/// Reservations waiting for the batching task; beyond this, requests wait to queue.
pub const MAX_QUEUED_JOBS: usize = 1024;

/// What the reservation call saw of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Ours now (or already ours).
    Reserved,
    /// Another token holds it: the value found (token + lease end), and whether the lease is over.
    Held { value: Vec<u8>, lease_over: bool },
}

pub type Answer = Result<Vec<Seen>, StoreError>;

/// One request's reservation, waiting for its batch.
pub struct ReserveJob {
    tokens: Vec<Vec<u8>>,
    /// The keys back to back: one allocation per request, not one per key.
    key_bytes: Vec<u8>,
    /// Per key: its token's index and where its bytes end in `key_bytes`.
    keys: Vec<(usize, usize)>,
    reply: oneshot::Sender<Answer>,
}

impl ReserveJob {
    pub fn new(tokens: &[Vec<u8>], keys: &[(usize, Vec<u8>)], reply: oneshot::Sender<Answer>) -> Self {
        let mut key_bytes = Vec::with_capacity(keys.iter().map(|(_, key)| key.len()).sum());
        let keys = keys
            .iter()
            .map(|(token, key)| {
                key_bytes.extend_from_slice(key);
                (*token, key_bytes.len())
            })
            .collect();
        Self { tokens: tokens.to_vec(), key_bytes, keys, reply }
    }

    /// The bytes of key `k`.
    fn key(&self, k: usize) -> &[u8] {
        let start = k.checked_sub(1).and_then(|before| self.keys.get(before)).map_or(0, |&(_, end)| end);
        let end = self.keys.get(k).map_or(start, |&(_, end)| end);
        self.key_bytes.get(start..end).unwrap_or_default()
    }

    fn token(&self, k: usize) -> &[u8] {
        self.keys.get(k).and_then(|&(t, _)| self.tokens.get(t)).map_or(&[], Vec::as_slice)
    }
}

/// A key of a batch: its group, job and index in the job. Sorting these groups a call's ids
/// by group, then job and token, which is how the script takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    group: usize,
    job: usize,
    token: usize,
    key: usize,
}

/// The batching task's settings.
pub struct ReserveQueue {
    pub connection: Connection,
    pub script: Script,
    pub timeout: Duration,
    pub terms: Terms,
    /// Base key name of each group: `<prefix>{<tag>}`.
    pub bases: Arc<Vec<Vec<u8>>>,
    /// Replicas to `WAIT` for after each call, and how long.
    pub wait: Option<(u32, Duration)>,
    /// Told when a call finds a group's epoch gone, before any request hears its answer.
    pub trust: Arc<Trust>,
}

impl ReserveQueue {
    pub async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<ReserveJob>) {
        let mut calls = JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
                job = queue.recv(), if calls.len() < MAX_CALLS_IN_FLIGHT => {
                    let Some(first) = job else { break };
                    let mut keys = first.keys.len();
                    let mut jobs = vec![first];
                    while keys < MAX_BATCH_KEYS {
                        match queue.try_recv() {
                            Ok(job) => {
                                keys += job.keys.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    calls.spawn(Arc::clone(&self).batch(jobs));
                }
            }
        }
        // Calls already sent still answer their requests.
        while calls.join_next().await.is_some() {}
    }

    /// One batch: its script calls (one, or one per group on a cluster) in parallel, then each
    /// request's share of the answers.
    async fn batch(self: Arc<Self>, jobs: Vec<ReserveJob>) {
        let groups = self.bases.len() as u16;
        let mut entries: Vec<Entry> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| {
                (0..job.keys.len()).map(move |k| Entry {
                    group: group_of(job.key(k), groups),
                    job: j,
                    token: job.keys[k].0,
                    key: k,
                })
            })
            .collect();
        entries.sort_unstable();
        let (entries, repeats) = first_claims(entries, |e| jobs[e.job].key(e.key));
        let calls: Vec<&[Entry]> = if self.connection.is_cluster() {
            entries.chunk_by(|a, b| a.group == b.group).collect()
        } else {
            vec![entries.as_slice()]
        };
        let answers = futures_util::future::try_join_all(calls.iter().map(|call| self.call(&jobs, call))).await;
        let mut seen: Vec<Vec<Seen>> = jobs.iter().map(|job| vec![Seen::Reserved; job.keys.len()]).collect();
        let answers = match answers {
            Ok(answers) => answers,
            Err(error) => return jobs.into_iter().for_each(|job| drop(job.reply.send(Err(error.clone())))),
        };
        for (call, (answer, lost)) in calls.iter().zip(answers) {
            if lost {
                self.trust.raise();
            }
            for (entry, state) in call.iter().zip(answer) {
                seen[entry.job][entry.key] = state;
            }
        }
        for (repeat, first) in repeats {
            let claim = &entries[first];
            seen[repeat.job][repeat.key] = repeated(&seen[claim.job][claim.key], jobs[claim.job].token(claim.key));
        }
        for (job, seen) in jobs.into_iter().zip(seen) {
            // The request may have given up waiting; its leases expire.
            let _ = job.reply.send(Ok(seen));
        }
    }

    /// One script call over `entries` (sorted): what it saw of each, in their order.
    async fn call(&self, jobs: &[ReserveJob], entries: &[Entry]) -> Result<(Vec<Seen>, bool), StoreError> {
        let runs: Vec<&[Entry]> =
            entries.chunk_by(|a, b| (a.group, a.job, a.token) == (b.group, b.job, b.token)).collect();
        let mut groups: Vec<usize> = runs.iter().map(|run| run[0].group).collect();
        groups.dedup();
        let mut invocation = self.script.prepare_invoke();
        for &g in &groups {
            invocation.key(self.bases[g].as_slice());
        }
        invocation.arg(self.terms.lease.as_millis() as u64).arg(self.terms.window.as_millis() as u64).arg(runs.len());
        for run in &runs {
            let k = groups.iter().position(|&g| g == run[0].group).unwrap_or_default() + 1;
            invocation.arg(k).arg(jobs[run[0].job].token(run[0].key)).arg(run.len());
        }
        for entry in entries {
            invocation.arg(jobs[entry.job].key(entry.key));
        }
        let mut connection = self.connection.clone();
        let call = async {
            let answer = invocation.invoke_async::<Vec<Vec<u8>>>(&mut connection).await?;
            if let Some((replicas, timeout)) = self.wait {
                let acked = connection.wait(&self.bases[groups[0]], replicas, timeout).await?;
                return Ok((answer, Some((acked, replicas))));
            }
            Ok::<_, redis::RedisError>((answer, None))
        };
        let (answer, replication) = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => return Err(StoreError::Backend(e.to_string())),
            Err(_) => return Err(StoreError::Timeout(self.timeout)),
        };
        if let Some((acked, wanted)) = replication {
            replicated(acked, wanted)?;
        }
        decode(answer, entries.len())
    }
}

/// A write that fewer replicas than asked acknowledged is reported failed.
pub fn replicated(acked: u32, wanted: u32) -> Result<(), StoreError> {
    if acked < wanted {
        return Err(StoreError::Replication { acked, wanted });
    }
    Ok(())
}

/// Splits a batch's entries, sorted, into the first request for each id, still sorted, and the
/// later ones, each with the index of the first it repeats: two requests of one batch may want
/// one id, and the script, which has no table of what it claimed, must see each id once.
/// An id has one group, so a repeat is always in its first's call.
fn first_claims<'a>(entries: Vec<Entry>, key: impl Fn(&Entry) -> &'a [u8]) -> (Vec<Entry>, Vec<(Entry, usize)>) {
    if entries.first().is_none_or(|first| entries.iter().all(|e| e.job == first.job)) {
        // One request's ids are distinct already (`reserve::first_of_each`).
        return (entries, Vec::new());
    }
    let mut firsts = Vec::with_capacity(entries.len());
    let mut repeats = Vec::new();
    let mut index = std::collections::HashMap::with_capacity(entries.len());
    for entry in entries {
        match index.entry(key(&entry)) {
            std::collections::hash_map::Entry::Occupied(at) => repeats.push((entry, *at.get())),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(firsts.len());
                firsts.push(entry);
            }
        }
    }
    (firsts, repeats)
}

/// What a later request of a batch sees of an id an earlier one asked for: the same holder, or,
/// when the earlier one got it, that request's token, whose lease has just begun (pending).
fn repeated(first: &Seen, first_token: &[u8]) -> Seen {
    match first {
        Seen::Reserved => Seen::Held { value: first_token.to_vec(), lease_over: false },
        held => held.clone(),
    }
}

/// The script's answer as one [`Seen`] per id, and whether a group's epoch was gone.
fn decode(answer: Vec<Vec<u8>>, n: usize) -> Result<(Vec<Seen>, bool), StoreError> {
    let malformed = |what: &str| StoreError::Backend(format!("the reservation's answer: {what}"));
    let number = |part: &[u8]| std::str::from_utf8(part).ok().and_then(|text| text.parse::<usize>().ok());
    let mut parts = answer.into_iter();
    let count = parts.next().unwrap_or_default();
    let (count, lost) = match count.strip_suffix(b"!") {
        Some(count) => (count, true),
        None => (count.as_slice(), false),
    };
    if number(count) != Some(n) {
        return Err(malformed(&format!("not the count of the {n} ids asked")));
    }
    let mut seen = vec![Seen::Reserved; n];
    while let Some(position) = parts.next() {
        let (Some(over), Some(value)) = (parts.next(), parts.next()) else {
            return Err(malformed("a holder cut short"));
        };
        let Some(state) = number(&position).and_then(|at| seen.get_mut(at)) else {
            return Err(malformed("a position out of range"));
        };
        *state = Seen::Held { value, lease_over: over == b"1" };
    }
    Ok((seen, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_decode_in_order_with_their_holders() {
        let answer = vec![
            b"4".to_vec(),
            b"1".to_vec(),
            b"0".to_vec(),
            b"held".to_vec(),
            b"3".to_vec(),
            b"1".to_vec(),
            b"over".to_vec(),
        ];
        assert_eq!(
            decode(answer, 4).unwrap().0,
            [
                Seen::Reserved,
                Seen::Held { value: b"held".to_vec(), lease_over: false },
                Seen::Reserved,
                Seen::Held { value: b"over".to_vec(), lease_over: true },
            ]
        );
        assert_eq!(decode(vec![b"2".to_vec()], 2).unwrap(), (vec![Seen::Reserved, Seen::Reserved], false), "all fresh");
        assert!(decode(vec![b"2!".to_vec()], 2).unwrap().1, "an epoch gone");
        assert!(decode(vec![b"2".to_vec(), b"1".to_vec(), b"0".to_vec()], 2).is_err(), "a holder cut short");
        assert!(decode(vec![b"2".to_vec(), b"2".to_vec(), b"0".to_vec(), b"x".to_vec()], 2).is_err(), "out of range");
        assert!(decode(vec![b"1".to_vec()], 2).is_err(), "a count that is not the ids'");
        assert!(decode(Vec::new(), 2).is_err(), "no count");
        assert!(replicated(0, 1).is_err() && replicated(1, 1).is_ok());
    }

    #[test]
    fn an_id_two_requests_of_a_batch_want_is_asked_once_and_the_later_one_sees_it_pending() {
        let entry = |group, job, key| Entry { group, job, token: 0, key };
        let keys = [[&b"a"[..], b"b"], [b"b", b"c"]];
        let mut entries = vec![entry(0, 0, 0), entry(0, 0, 1), entry(0, 1, 0), entry(1, 1, 1)];
        entries.sort_unstable();
        let (firsts, repeats) = first_claims(entries, |e| keys[e.job][e.key]);
        assert_eq!(firsts, [entry(0, 0, 0), entry(0, 0, 1), entry(1, 1, 1)]);
        assert_eq!(repeats, [(entry(0, 1, 0), 1)], "job 1's b repeats job 0's");
        let one_job = vec![entry(0, 0, 0), entry(0, 0, 1)];
        assert_eq!(first_claims(one_job.clone(), |e| keys[e.job][e.key]), (one_job, Vec::new()));

        let token = b"0123456789";
        assert_eq!(repeated(&Seen::Reserved, token), Seen::Held { value: token.to_vec(), lease_over: false });
        let held = Seen::Held { value: b"other".to_vec(), lease_over: true };
        assert_eq!(repeated(&held, token), held);
    }
}
