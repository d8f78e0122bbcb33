//! A request-level idempotency key (`Idempotency-Key`): claimed before the rows are handed
//! on, its answer recorded once they are delivered (replayed to a retry of the same body),
//! forgotten when the request failed (nothing was accepted, so the retry must run).

use serde::Serialize;

use super::{IngestError, IngestResponse, Pipeline};
use crate::decode::RejectedEvent;
use crate::idempotency::RequestState;

/// The most bytes of an answer kept for a repeated `Idempotency-Key`. An answer listing
/// thousands of refused events (each echo is bounded, their number is not: up to
/// `max_events_per_request`) would otherwise sit in the store for the whole window, per key.
pub const KEPT_ANSWER_BYTES: usize = 64 * 1024;

/// The answer kept for a request-level key: the answer itself, or, when it is larger than
/// [`KEPT_ANSWER_BYTES`], the same counts with the first refused events that fit and how many
/// more there were (`rejected_omitted`).
pub(super) fn kept_answer(response: &IngestResponse) -> Result<Vec<u8>, IngestError> {
    #[derive(Serialize)]
    struct Abridged<'a> {
        accepted: usize,
        duplicates: usize,
        rejected: &'a [RejectedEvent],
        rejected_omitted: usize,
    }
    let full = serde_json::to_vec(response).map_err(IngestError::internal)?;
    if full.len() <= KEPT_ANSWER_BYTES {
        return Ok(full);
    }
    // The counts and the field names take well under this.
    let mut room = KEPT_ANSWER_BYTES - 256;
    let mut kept = 0;
    for event in &response.rejected {
        let size = serde_json::to_vec(event).map_err(IngestError::internal)?.len() + 1;
        if size > room {
            break;
        }
        room -= size;
        kept += 1;
    }
    let abridged = Abridged {
        accepted: response.accepted,
        duplicates: response.duplicates,
        rejected: &response.rejected[..kept],
        rejected_omitted: response.rejected.len() - kept,
    };
    serde_json::to_vec(&abridged).map_err(IngestError::internal)
}

/// What the store said of a request-level idempotency key.
#[derive(Debug)]
pub(super) enum Claim {
    /// Ours: deliver, then record the answer (or forget the key on failure).
    Claimed,
    /// Answered before, with this status and body.
    Replay { status: u16, body: Vec<u8> },
    /// The store is down and the policy is to go on without it.
    Bypassed,
}

impl Pipeline {
    /// Claims a request-level idempotency key for a body, or says how it was answered before.
    pub(super) async fn claim_request(&self, key: &str, body_hash: &str) -> Result<Claim, IngestError> {
        match self.idempotency.begin_request(key, body_hash).await {
            Ok(RequestState::New) => Ok(Claim::Claimed),
            Ok(RequestState::InFlight { same_body: true }) => Err(IngestError::RequestInFlight),
            Ok(RequestState::InFlight { same_body: false } | RequestState::Done { same_body: false, .. }) => {
                Err(IngestError::IdempotencyKeyReused)
            }
            Ok(RequestState::Done { status, body, .. }) => Ok(Claim::Replay { status, body }),
            Err(error) => self.idempotency.tolerate(error).map(|()| Claim::Bypassed).map_err(IngestError::from),
        }
    }

    /// Records the answer to replay for a claimed key; on failure the answer is simply not
    /// replayable (the events are written).
    pub(super) async fn finish_request(&self, key: &str, body_hash: &str, status: u16, body: &[u8]) {
        let _ = self.idempotency.finish_request(key, body_hash, status, body).await;
    }

    /// Forgets a claimed key whose request failed: nothing was accepted, so a retry must run.
    pub(super) async fn abandon_request(&self, key: &str, body_hash: &str) {
        let _ = self.idempotency.abandon_request(key, body_hash).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_answer_is_kept_abridged() {
        let rejected = (0..2000).map(|i| RejectedEvent::for_test(i, "x".repeat(200))).collect();
        let response = IngestResponse { accepted: 3, duplicates: 1, rejected };
        let kept = kept_answer(&response).unwrap();
        assert!(kept.len() <= KEPT_ANSWER_BYTES, "{}", kept.len());
        let kept: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        let listed = kept["rejected"].as_array().unwrap().len();
        assert!(listed > 100, "as many as fit: {listed}");
        assert_eq!(kept["rejected_omitted"].as_u64().unwrap() as usize + listed, 2000);
        assert_eq!((kept["accepted"].as_u64(), kept["duplicates"].as_u64()), (Some(3), Some(1)));
        let small = IngestResponse { accepted: 1, duplicates: 0, rejected: Vec::new() };
        assert_eq!(kept_answer(&small).unwrap(), serde_json::to_vec(&small).unwrap(), "a small answer is kept whole");
    }
}
