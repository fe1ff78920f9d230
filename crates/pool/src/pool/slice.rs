//! [`TokenSlice`]: the tokens a leased pick reserved in its key's shared token window
//! (`redis.lease` on a key with `tpm`): one estimate per call of the lease. The picks that
//! spend the lease's calls hold their own estimates against the slice without a round trip
//! ([`TokenSlice::take`]) and settle their real counts into it ([`SliceHold::settle`]). It
//! takes no more once its lease is spent or its time is up, and once the last of its
//! requests has settled it is settled in the shared window as one reservation: what its
//! requests used (the estimate of each that reported no count, as a lone reservation keeps).
//!
//! So the window still admits a call only while what it counts (settled use and what is held,
//! slices included) leaves room for the call's estimate, and requests overshoot it by at most
//! what they used beyond their estimates, as without leases. The cost is slack: a slice's
//! unheld tokens are refused to the other replicas until it is settled (at most `lease_ms`
//! after it was taken, and a tenth of the key's `tpm`); a replica that dies holding one
//! leaves it counted until it leaves the window.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use crate::TokenReq;

/// A slice of a key's token window, held in the shared state under `id`.
pub(crate) struct TokenSlice {
    /// The window, with `cost` the slice's size (the member the shared state holds).
    req: TokenReq,
    id: String,
    shared: Arc<dyn crate::SharedState>,
    state: Mutex<SliceState>,
}

#[derive(Default)]
struct SliceState {
    /// Estimates of its requests in flight plus what its settled requests used.
    held: u64,
    /// What its settled requests used.
    used: u64,
    in_flight: u32,
    /// It takes no more requests.
    closed: bool,
    /// It was settled in the shared state (or is on its way there).
    settled: bool,
}

/// One request's estimate held against a slice, settled with its real count (or, dropped
/// unsettled, with its estimate).
pub(crate) struct SliceHold {
    slice: Arc<TokenSlice>,
    est: u64,
    settled: bool,
}

impl TokenSlice {
    /// A slice of `req.cost` tokens reserved under `id`, taking requests until `until`.
    pub(crate) fn open(
        shared: Arc<dyn crate::SharedState>,
        req: TokenReq,
        id: String,
        until: Instant,
    ) -> Arc<Self> {
        let slice = Arc::new(Self {
            req,
            id,
            shared,
            state: Mutex::new(SliceState::default()),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            // holds the slice until then: the lease's holder may let go of it first (its
            // returner takes lapsed leases out), and the slice must still settle
            let closing = slice.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(until).await;
                closing.close();
            });
        }
        slice
    }

    /// Holds `est` against the slice, if it still takes requests and has room for it.
    pub(crate) fn take(self: &Arc<Self>, est: u64) -> Option<SliceHold> {
        let mut s = self.lock();
        if s.closed || s.held.saturating_add(est) > self.req.cost {
            return None;
        }
        s.held += est;
        s.in_flight += 1;
        Some(SliceHold {
            slice: self.clone(),
            est,
            settled: false,
        })
    }

    /// It takes no more requests; settled once the last has settled.
    pub(crate) fn close(&self) {
        let done = {
            let mut s = self.lock();
            s.closed = true;
            s.finished()
        };
        if let Some(used) = done {
            self.settle_shared(used);
        }
    }

    /// Closes it and, if its last request has settled (a graceful stop, once the server has
    /// drained), settles it in the shared state before answering.
    pub(crate) async fn settle_now(&self) {
        let done = {
            let mut s = self.lock();
            s.closed = true;
            s.finished()
        };
        if let Some(used) = done
            && let Err(e) = self.shared.settle_tokens(&self.req, &self.id, used).await
        {
            self.shared.background_failed(&e);
        }
    }

    fn settled_one(&self, est: u64, actual: u64) {
        let done = {
            let mut s = self.lock();
            s.held = s.held.saturating_sub(est).saturating_add(actual);
            s.used = s.used.saturating_add(actual);
            s.in_flight = s.in_flight.saturating_sub(1);
            s.finished()
        };
        if let Some(used) = done {
            self.settle_shared(used);
        }
    }

    /// Replaces the slice's reservation with what its requests used, off the request path.
    fn settle_shared(&self, used: u64) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (shared, req, id) = (self.shared.clone(), self.req.clone(), self.id.clone());
        tokio::spawn(async move {
            if let Err(e) = shared.settle_tokens(&req, &id, used).await {
                shared.background_failed(&e);
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SliceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SliceState {
    /// What its requests used, once it is closed and the last has settled (once).
    fn finished(&mut self) -> Option<u64> {
        if self.closed && self.in_flight == 0 && !self.settled {
            self.settled = true;
            return Some(self.used);
        }
        None
    }
}

impl SliceHold {
    /// Settles the request's real count into the slice.
    pub(crate) fn settle(mut self, actual: u64) {
        self.settled = true;
        self.slice.settled_one(self.est, actual);
    }
}

impl Drop for SliceHold {
    fn drop(&mut self) {
        if !self.settled {
            // no count reported: the estimate stays, as a lone reservation's does
            self.slice.settled_one(self.est, self.est);
        }
    }
}

impl std::fmt::Debug for SliceHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceHold")
            .field("slice", &self.slice.id)
            .field("est", &self.est)
            .finish_non_exhaustive()
    }
}
