//! Leased calls (`redis.lease`): a pick that goes to the shared state for a key with an rpm
//! budget (and no token budget, no session) reserves up to `calls` calls there at once; this
//! replica spends the rest on its next picks of that key, without a round trip, until `within`
//! has passed since it asked. What is left then goes back to the shared window. One lease is
//! asked for at a time: picks that find none left meanwhile wait for it once, then spend
//! from it or reserve a single call. The shared state counts leased calls from the latest moment they may be spent, so the limit holds in
//! every trailing period; the cost is slack: calls one replica holds unspent are refused to
//! the others until it spends or returns them (`calls - 1` per lease held, for at most one and
//! a half `within`: the lease's time, then the returner's half-period; a replica that dies
//! leaves its unspent calls counted until they leave the window).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::select::Candidate;
use crate::{LeaseReq, SharedState, WindowReq};

/// This replica's leased calls, by key name (a key may hold several leases: picks that found
/// none left may have asked at once).
pub struct Leasing {
    pub(super) req: LeaseReq,
    credits: Mutex<HashMap<Arc<str>, Vec<Credit>>>,
    /// A lease is being asked for: picks that find none left meanwhile wait for it (once)
    /// instead of leasing `calls` each, so a burst does not reserve a lease per pick.
    asking: AtomicBool,
    /// Wakes the picks waiting for the lease being asked for.
    landed: tokio::sync::Notify,
}

/// The one pick asking for a lease; when dropped (its lease kept, or the ask failed) the
/// picks waiting for it wake and the next may ask.
pub(super) struct Asking<'a>(&'a Leasing);

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0.asking.store(false, Ordering::Release);
        self.0.landed.notify_waiters();
    }
}

/// A pick's turn when it found no leased call: ask for a lease, or the one being asked for
/// has landed (spend from it, or reserve a single call).
pub(super) enum Turn<'a> {
    Ask(Asking<'a>),
    Landed,
}

/// One lease's calls still to spend.
struct Credit {
    /// The lease's id in the shared window.
    id: String,
    window: WindowReq,
    granted: u32,
    left: u32,
    /// When it must be given back (the ask's time plus `within`).
    until: Instant,
}

impl Leasing {
    /// Up to `calls` calls reserved at once, spent within `within`.
    pub fn new(calls: u32, within: Duration) -> Self {
        Self {
            req: LeaseReq { calls, within },
            credits: Mutex::default(),
            asking: AtomicBool::new(false),
            landed: tokio::sync::Notify::new(),
        }
    }

    /// Asks for a lease now, or, while another pick is asking, waits until it has landed.
    pub(super) async fn turn(&self) -> Turn<'_> {
        // registered before the flag is looked at, so a lease landing in between still wakes it
        let landed = self.landed.notified();
        tokio::pin!(landed);
        landed.as_mut().enable();
        if self
            .asking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return Turn::Ask(Asking(self));
        }
        landed.await;
        Turn::Landed
    }

    /// Spends one leased call of the first of `cands` (by name, in their order) that has one
    /// left in time; `None` when none has.
    pub(super) fn spend<'a>(
        &self,
        cands: &[Candidate],
        name: impl Fn(&Candidate) -> &'a Arc<str>,
        now: Instant,
    ) -> Option<Candidate> {
        let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        cands.iter().copied().find(|c| {
            credits.get_mut(name(c)).is_some_and(|leases| {
                leases
                    .iter_mut()
                    .find(|l| l.left > 0 && now < l.until)
                    .map(|l| l.left -= 1)
                    .is_some()
            })
        })
    }

    /// Keeps what a lease left to spend (`granted - 1`, asked at `asked`).
    pub(super) fn keep(
        &self,
        name: Arc<str>,
        window: WindowReq,
        id: String,
        granted: u32,
        asked: Instant,
    ) {
        let credit = Credit {
            id,
            window,
            granted,
            left: granted - 1,
            until: asked + self.req.within,
        };
        self.credits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name)
            .or_default()
            .push(credit);
    }

    /// Takes out the leases whose time is up (and those spent), to give back what is left.
    fn lapsed(&self, now: Instant) -> Vec<Credit> {
        let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for leases in credits.values_mut() {
            let (over, live): (Vec<Credit>, Vec<Credit>) = std::mem::take(leases)
                .into_iter()
                .partition(|c| c.left == 0 || now >= c.until);
            *leases = live;
            out.extend(over.into_iter().filter(|c| c.left > 0));
        }
        credits.retain(|_, leases| !leases.is_empty());
        out
    }

    /// Gives back, every half `within`, what lapsed leases left (runs until the runtime ends).
    pub fn start_returning(self: &Arc<Self>, shared: Arc<dyn SharedState>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let leasing = Arc::downgrade(self);
        let every = (self.req.within / 2).max(Duration::from_millis(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(leasing) = leasing.upgrade() else {
                    return;
                };
                let lapsed = leasing.lapsed(Instant::now());
                if !lapsed.is_empty() {
                    give_back(&shared, lapsed);
                }
            }
        });
    }
}

/// Returns the unspent calls of `credits` to the shared windows, in the background.
fn give_back(shared: &Arc<dyn SharedState>, credits: Vec<Credit>) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        for c in credits {
            if let Err(e) = shared
                .return_lease(&c.window, &c.id, c.granted, c.left)
                .await
            {
                shared.background_failed(&e);
            }
        }
    });
}
