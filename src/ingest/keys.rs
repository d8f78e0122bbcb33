//! A request-level idempotency key (`Idempotency-Key`): claimed before the rows are handed
//! on, its answer recorded once they are delivered (replayed to a retry of the same body),
//! forgotten when the request failed (nothing was accepted, so the retry must run).

use super::{IngestError, Pipeline};
use crate::idempotency::RequestState;

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
