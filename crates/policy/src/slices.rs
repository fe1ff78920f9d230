//! Budget slices (`redis.lease`): with Redis, a hold that goes there for a set of USD budgets
//! (a gateway's and its caller's, or a key's) may hold a slice of them instead of one
//! request's estimate: up to `lease` estimates at once, at most a hundredth of the smallest
//! budget, and at most the room every budget has left (never less than the estimate itself:
//! [`SharedState::hold_slice`]). This replica then holds its next requests' estimates against
//! the slice without a round trip, and settles their real cost into it. When the slice lapses
//! (`lease_ms` after it was taken) or is used up, it takes no more requests, and once the last
//! of them has settled it is settled in Redis as one hold: the slice given back, what its
//! requests spent added, the 80%/100% alerts raised by that settlement.
//!
//! So a budget still admits a request only while what it spent plus what is held (slices
//! included) is under its amount, and requests overshoot it by at most their own estimates.
//! The cost is the rate leases' slack (a slice's unheld part is refused to the other replicas
//! until it lapses, at most `lease_ms` and a half) and lag: Redis's `spent` learns a slice's
//! spend when it is settled. A replica stopping gracefully settles its slices before it exits
//! ([`Slices::settle_all`]); one that dies holding a slice leaves it held, as it leaves
//! its requests' holds, until the budget's counters lapse (a day after its period; a `total`
//! budget's never): at most a hundredth of the budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use keypool_shared::{BudgetReq, Flights, Held, LeaseReq, SharedError, SharedState, Turn};
use tokio::time::Instant;

use crate::budget::{Wanted, alert_crossings};

/// A slice is at most this share of the smallest budget it holds against (1/100): what a
/// replica that dies holding one leaves held until the budget's period ends.
const SHARE: u64 = 100;

/// This replica's open slices, by the budgets they hold against.
pub(crate) struct Slices {
    /// Estimates held at once per slice (`lease`), and how long a slice takes requests.
    lease: LeaseReq,
    shared: Arc<dyn SharedState>,
    telemetry: keypool_telemetry::Telemetry,
    open: Mutex<HashMap<String, Arc<Slice>>>,
    /// One slice asked for at a time per set of budgets.
    asks: Flights,
    /// The task closing lapsed slices runs (started with the first slice).
    ticking: AtomicBool,
}

/// A slice of a set of budgets, held in the shared state.
pub(crate) struct Slice {
    reqs: Vec<BudgetReq>,
    wanted: Vec<Wanted>,
    /// What the shared state holds for it.
    size: u64,
    until: Instant,
    state: Mutex<SliceState>,
    shared: Arc<dyn SharedState>,
    telemetry: keypool_telemetry::Telemetry,
}

#[derive(Default)]
struct SliceState {
    /// Estimates of its requests in flight plus what its settled requests spent.
    used: u64,
    /// What its settled requests spent.
    spent: u64,
    in_flight: u32,
    /// It takes no more requests.
    closed: bool,
    /// It was settled in the shared state.
    settled: bool,
}

impl Slices {
    /// Slices of `lease.calls` estimates, taking requests for `lease.within`.
    pub(crate) fn new(
        lease: LeaseReq,
        shared: Arc<dyn SharedState>,
        telemetry: keypool_telemetry::Telemetry,
    ) -> Self {
        Self {
            lease,
            shared,
            telemetry,
            open: Mutex::default(),
            asks: Flights::default(),
            ticking: AtomicBool::new(false),
        }
    }

    /// Holds `amount` against `wanted`'s budgets: from this replica's slice of them, else by
    /// asking for a slice (one ask at a time per set of budgets), else alone. Answers the
    /// shared state's verdict and the slice it came from (`None`: a hold of its own).
    pub(crate) async fn hold(
        self: &Arc<Self>,
        wanted: &[Wanted],
        reqs: &[BudgetReq],
        amount: u64,
    ) -> Result<(Held, Option<Arc<Slice>>), SharedError> {
        let want = reqs
            .iter()
            .map(|r| r.limit / SHARE)
            .min()
            .unwrap_or(0)
            .min(amount.saturating_mul(u64::from(self.lease.calls)));
        if want <= amount {
            return hold_alone(&self.shared, reqs, amount).await;
        }
        let name = reqs
            .iter()
            .map(|r| r.key.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        if let Some(s) = self.take(&name, amount) {
            return Ok((Held::Held, Some(s)));
        }
        let _asking = match self.asks.turn(&name).await {
            Turn::Ask(a) => a,
            Turn::Landed => {
                if let Some(s) = self.take(&name, amount) {
                    return Ok((Held::Held, Some(s)));
                }
                return hold_alone(&self.shared, reqs, amount).await;
            }
        };
        // asked in a task of its own: a request given up while it waits (the client went
        // away) must not lose a slice Redis already holds; the task keeps it for the others
        let ask = self
            .clone()
            .ask(name, wanted.to_vec(), reqs.to_vec(), amount, want);
        let (held, slice) = surviving(&self.shared, reqs, amount, ask).await?;
        match slice {
            Some(s) if s.take(amount, Instant::now()) => Ok((held, Some(s))),
            // spent by the others before this request's turn: a hold of its own
            Some(_) => hold_alone(&self.shared, reqs, amount).await,
            None => Ok((held, None)),
        }
    }

    /// Asks the shared state for a slice of `want` (at least `amount`) and keeps it open
    /// under `name`; answers the verdict and the slice, `None` where the shared state refused
    /// or had room for no more than `amount` (then held as a hold of its own).
    async fn ask(
        self: Arc<Self>,
        name: String,
        wanted: Vec<Wanted>,
        reqs: Vec<BudgetReq>,
        amount: u64,
        want: u64,
    ) -> Result<(Held, Option<Arc<Slice>>), SharedError> {
        let (held, size) = self.shared.hold_slice(&reqs, amount, want).await?;
        if held != Held::Held || size <= amount {
            return Ok((held, None));
        }
        let slice = Arc::new(Slice {
            reqs,
            wanted,
            size,
            until: Instant::now() + self.lease.within,
            state: Mutex::default(),
            shared: self.shared.clone(),
            telemetry: self.telemetry.clone(),
        });
        let replaced = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, slice.clone());
        if let Some(old) = replaced {
            old.close();
        }
        if !self.ticking.swap(true, Ordering::Relaxed) {
            self.start_ticking();
        }
        Ok((held, Some(slice)))
    }

    /// `amount` from the open slice of `name`, if it has room and time left; a slice that has
    /// not is closed.
    fn take(&self, name: &str, amount: u64) -> Option<Arc<Slice>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let slice = open.get(name)?;
        if slice.take(amount, Instant::now()) {
            return Some(slice.clone());
        }
        if let Some(s) = open.remove(name) {
            s.close();
        }
        None
    }

    /// Closes, every half `lease_ms`, the slices whose time is up (until this is dropped).
    fn start_ticking(self: &Arc<Self>) {
        keypool_shared::every_half(self, self.lease.within, |slices| {
            let now = Instant::now();
            let mut lapsed = Vec::new();
            slices
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, s| {
                    let over = now >= s.until;
                    if over {
                        lapsed.push(s.clone());
                    }
                    !over
                });
            for s in lapsed {
                s.close();
            }
        });
    }
}

impl Slices {
    /// Closes every open slice and settles, before answering, those with no request in flight
    /// (all of them once the server has drained): a replica stopping gracefully leaves nothing
    /// of its slices held.
    pub(crate) async fn settle_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(PoisonError::into_inner));
        for settlement in open.values().filter_map(|s| s.close_idle()) {
            settlement.await;
        }
    }
}

/// A hold of `amount` alone against `reqs`, in the shared state ([`surviving`]).
pub(crate) async fn hold_alone(
    shared: &Arc<dyn SharedState>,
    reqs: &[BudgetReq],
    amount: u64,
) -> Result<(Held, Option<Arc<Slice>>), SharedError> {
    let hold = {
        let (shared, reqs) = (shared.clone(), reqs.to_vec());
        async move { shared.hold(&reqs, amount).await.map(|h| (h, None)) }
    };
    surviving(shared, reqs, amount, hold).await
}

/// Runs `hold` (a hold of `amount` against `reqs`, or a slice's ask) in a task of its own and
/// answers it. A request given up before the answer (the client went away) would otherwise
/// leave what Redis already holds for it held until the budget's period ends: the task gives
/// a lone hold back (settled at 0), and a slice stays open for the next requests.
async fn surviving(
    shared: &Arc<dyn SharedState>,
    reqs: &[BudgetReq],
    amount: u64,
    hold: impl Future<Output = Result<(Held, Option<Arc<Slice>>), SharedError>> + Send + 'static,
) -> Result<(Held, Option<Arc<Slice>>), SharedError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (shared, reqs) = (shared.clone(), reqs.to_vec());
    tokio::spawn(async move {
        if let Err(Ok((Held::Held, None))) = tx.send(hold.await)
            && let Err(e) = shared.settle_budgets(&reqs, amount, 0).await
        {
            shared.background_failed(&e);
        }
    });
    rx.await
        .map_err(|_| SharedError("a budget hold's task ended early".into()))?
}

/// The process ending (or the gateways replaced whole): every open slice is closed, and
/// settled once its requests have.
impl Drop for Slices {
    fn drop(&mut self) {
        let open = std::mem::take(self.open.get_mut().unwrap_or_else(PoisonError::into_inner));
        for s in open.into_values() {
            s.close();
        }
    }
}

impl Slice {
    /// Holds `amount` against this slice if it is open, in time and has room.
    fn take(&self, amount: u64, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.closed || now >= self.until || st.used.saturating_add(amount) > self.size {
            return false;
        }
        st.used += amount;
        st.in_flight += 1;
        true
    }

    /// A request that held `held` of this slice spent `spent`; the slice is settled once it is
    /// closed and this was its last request.
    pub(crate) fn settle(&self, held: u64, spent: u64) {
        let settle = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.used = st.used.saturating_sub(held).saturating_add(spent);
            st.spent = st.spent.saturating_add(spent);
            st.in_flight = st.in_flight.saturating_sub(1);
            st.closed && st.in_flight == 0 && !std::mem::replace(&mut st.settled, true)
        };
        if settle {
            self.settle_shared();
        }
    }

    /// Takes no more requests; settled now (in the background) if none is in flight.
    fn close(&self) {
        if let Some(settlement) = self.close_idle()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            tokio::spawn(settlement);
        }
    }

    /// Gives the slice back to the shared budgets and adds what its requests spent, in the
    /// background.
    fn settle_shared(&self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(self.settlement());
        }
    }

    /// The settlement in the shared state: the slice given back, its requests' spend added;
    /// alerts for a budget it takes past 80% or 100%.
    fn settlement(&self) -> impl Future<Output = ()> + Send + 'static {
        let spent = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spent;
        let (reqs, wanted, size) = (self.reqs.clone(), self.wanted.clone(), self.size);
        let (shared, telemetry) = (self.shared.clone(), self.telemetry.clone());
        async move {
            match shared.settle_budgets(&reqs, size, spent).await {
                Ok(settled) => {
                    for (w, s) in wanted.iter().zip(settled) {
                        alert_crossings(&telemetry, w, s.before, s.after);
                    }
                }
                Err(e) => shared.background_failed(&e),
            }
        }
    }

    /// Closes it; answers its settlement when no request is in flight and it is not settled
    /// yet (the caller runs it).
    fn close_idle(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.closed = true;
        let idle = st.in_flight == 0 && !std::mem::replace(&mut st.settled, true);
        drop(st);
        idle.then(|| self.settlement())
    }
}
