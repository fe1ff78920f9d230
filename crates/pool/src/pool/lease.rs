//! [`Lease`]: one reserved use of one key for one attempt, settled once (on drop at the latest).

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use keypool_config::UpstreamKey;
use tokio::time::Instant;

use crate::key::KeyActor;
use crate::messages::{Outcome, Settle};
use crate::tally::KeyTally;

/// A reserved use of one key for one attempt. Settle it with the attempt's [`Outcome`]; dropping
/// it unsettled (the client went away) settles it as [`Outcome::Cancelled`].
#[derive(Debug)]
pub struct Lease {
    /// The pool's id of the key (for [`crate::Pick::exclude`]).
    pub key_id: u64,
    pub key: Arc<UpstreamKey>,
    /// Shared with the pool's entry: an actix address's clone allocates, an `Arc`'s does not.
    pub(in crate::pool) addr: Arc<Addr<KeyActor>>,
    pub(in crate::pool) tally: Arc<KeyTally>,
    /// This reservation's id in the key's windows.
    pub(in crate::pool) id: u64,
    pub(in crate::pool) settled: bool,
    /// When the lease was taken: the attempt's start, for its latency.
    pub(in crate::pool) started: Instant,
    /// The tokens reserved in the shared token window (a `tpm` key with shared state), settled
    /// there to the real count after a success.
    pub(in crate::pool) shared_tokens: Option<SharedTokens>,
    /// For a session's pick: whether the session's key was kept, or it moved.
    pub affinity: Option<crate::Stick>,
}

/// A token reservation in the shared state, settled there with the real count.
pub(in crate::pool) enum SharedTokens {
    /// This attempt's own reservation.
    Each {
        state: Arc<dyn crate::SharedState>,
        req: crate::TokenReq,
        id: String,
    },
    /// Its estimate held against a leased pick's slice ([`super::slice::TokenSlice`]).
    Slice(super::slice::SliceHold),
}

impl std::fmt::Debug for SharedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Each { req, id, .. } => f
                .debug_struct("SharedTokens")
                .field("req", req)
                .field("id", id)
                .finish_non_exhaustive(),
            Self::Slice(hold) => hold.fmt(f),
        }
    }
}

impl Lease {
    /// Records the attempt's time to response headers (its key's TTFB histogram).
    pub fn observe_ttfb(&self, ttfb: Duration) {
        self.tally.metrics.ttfb.observe(ttfb.as_secs_f64());
        self.tally.observe_ttfb(ttfb);
    }

    pub fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.tally.returned();
        if let (
            Some(shared),
            Outcome::Success {
                tokens: Some(actual),
                ..
            },
        ) = (self.shared_tokens.take(), &outcome)
        {
            let actual = *actual;
            match shared {
                SharedTokens::Slice(hold) => hold.settle(actual),
                // off the response path: the count matters to the next picks, not to this one
                SharedTokens::Each { state, req, id } => {
                    tokio::spawn(async move {
                        if let Err(e) = state.settle_tokens(&req, &id, actual).await {
                            state.background_failed(&e);
                        }
                    });
                }
            }
        }
        let elapsed = self.started.elapsed();
        if matches!(outcome, Outcome::Timeout) {
            // no first byte in all that time: as slow as that, for `lb_policy: latency`
            self.tally.observe_ttfb(elapsed);
        }
        match outcome {
            // the common case changes only numbers that add up: the tally, no message
            Outcome::Success { tokens, latency }
                if self.key.tpm.is_none() && self.tally.quiet() =>
            {
                self.tally.success(latency, elapsed, tokens);
            }
            Outcome::Cancelled => cancelled(&self.key, &self.tally, elapsed),
            outcome => {
                self.tally.settle_sent();
                self.addr.do_send(Settle {
                    lease_id: self.id,
                    outcome,
                    elapsed,
                    admitted: self.started,
                });
            }
        }
    }
}

/// A lease given up unsettled (the client went away): not the key's fault, nothing for its
/// actor to apply; a tpm reservation keeps its estimate.
impl Lease {
    /// Where the key's attempts are counted and its alerts go.
    pub fn telemetry(&self) -> &keypool_telemetry::Telemetry {
        &self.tally.telemetry
    }
}

fn cancelled(key: &UpstreamKey, tally: &KeyTally, elapsed: Duration) {
    tally
        .telemetry
        .metrics()
        .attempt(&key.name, key.kind.as_str(), "cancelled", elapsed);
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            self.tally.returned();
            cancelled(&self.key, &self.tally, self.started.elapsed());
        }
    }
}
