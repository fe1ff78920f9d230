//! [`Leasing`] (`redis.lease`): calls of a shared rate budget reserved at once and spent by
//! this replica without a round trip. A decision that goes to the shared state reserves up to
//! `calls` calls there (a key's pick: [`SharedState::pick_leasing`]; a gateway's admission:
//! [`SharedState::admit_leasing`]); this replica spends the rest on its next decisions of the
//! same name (a key, a gateway), until `within` has passed since it asked. What is left then
//! goes back to the shared windows. One lease is asked for at a time: decisions that find none
//! left meanwhile wait for it once, then spend from it or reserve a single call. The shared
//! state counts leased calls from the latest moment they may be spent, so the limit holds in
//! every trailing period; the cost is slack: calls one replica holds unspent are refused to
//! the others until it spends or returns them (`calls - 1` per lease held, for at most one and
//! a half `within`: the lease's time, then the returner's half-period; a replica that dies
//! leaves its unspent calls counted until they leave the window). A holder that asks ahead of
//! need ([`Leasing::time_to_ask_ahead`]) holds up to a quarter more: the next lease lands
//! while a quarter of the current one is left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::flights::{Asking, Flights, Turn};
use crate::{LeaseReq, SharedState, WindowReq};

/// This replica's leased calls, by name (a name may hold several leases: decisions that found
/// none left may have asked at once). Each lease carries `M`, what its asker wants back with
/// every call spent from it (a gateway's rate headers; nothing for a key).
pub struct Leasing<M = ()> {
    pub req: LeaseReq,
    credits: Mutex<HashMap<Arc<str>, Vec<Credit<M>>>>,
    /// Where what lapses goes back to.
    shared: Arc<dyn SharedState>,
    /// The names a lease is being asked for: decisions of such a name that find none left
    /// meanwhile wait for it (once) instead of leasing `calls` each, so a burst does not
    /// reserve a lease per decision.
    asks: Flights,
    /// The task giving back what lapses runs (started with the first lease kept).
    returning: AtomicBool,
}

/// One lease's calls still to spend.
struct Credit<M> {
    /// The lease's id in the shared windows.
    id: String,
    windows: Box<[WindowReq]>,
    granted: u32,
    left: u32,
    /// When it must be given back (the ask's time plus `within`).
    until: Instant,
    meta: M,
}

/// A call spent from a lease: what it was spent on, the calls the lease has left after it,
/// and the lease's `M`.
pub struct Spend<T, M> {
    pub on: T,
    pub left: u32,
    pub meta: M,
}

impl<M: Clone + Send + 'static> Leasing<M> {
    /// Up to `calls` calls reserved at once in `shared`, spent within `within`.
    pub fn new(calls: u32, within: Duration, shared: Arc<dyn SharedState>) -> Self {
        Self {
            req: LeaseReq { calls, within },
            credits: Mutex::default(),
            shared,
            asks: Flights::default(),
            returning: AtomicBool::new(false),
        }
    }

    /// Asks for a lease of `name` now, or, while another decision is asking for one, waits
    /// until it has landed. (The pool asks under one name for all its keys.)
    pub async fn turn(&self, name: &str) -> Turn<'_> {
        self.asks.turn(name).await
    }

    /// Spends one leased call of the first of `items` (by name, in their order) that has one
    /// left in time; `None` when none has.
    pub fn spend<'a, T: Copy>(
        &self,
        items: &[T],
        name: impl Fn(&T) -> &'a str,
        now: Instant,
    ) -> Option<Spend<T, M>> {
        self.spend_where(items, name, now, |_| true)
    }

    /// [`Self::spend`] from a lease whose `M` also `takes` the call (a pick's token slice
    /// takes its estimate, or has no room for it).
    pub fn spend_where<'a, T: Copy>(
        &self,
        items: &[T],
        name: impl Fn(&T) -> &'a str,
        now: Instant,
        takes: impl Fn(&M) -> bool,
    ) -> Option<Spend<T, M>> {
        let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        items.iter().find_map(|&on| {
            let lease = credits
                .get_mut(name(&on))?
                .iter_mut()
                .find(|l| l.left > 0 && now < l.until && takes(&l.meta))?;
            lease.left -= 1;
            Some(Spend {
                on,
                left: lease.left,
                meta: lease.meta.clone(),
            })
        })
    }

    /// Puts back one call spent from `name`'s leases whose decision was refused after all (a
    /// gateway's other scope had no room): into a lease of `name` still in time that has
    /// spent one. Every call spent from a lease is counted in the shared windows, so the
    /// calls spent never exceed those counted; where the lease has lapsed (or was spent out
    /// and dropped) meanwhile, the call stays counted until it leaves the window, as an
    /// unspent one would.
    pub fn refund(&self, name: &str, now: Instant) {
        let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lease) = credits.get_mut(name).and_then(|leases| {
            leases
                .iter_mut()
                .find(|l| l.left < l.granted && now < l.until)
        }) {
            lease.left += 1;
        }
    }

    /// Keeps what a lease of `granted` calls in `windows`, asked at `asked`, left to spend
    /// (all but the asker's own call).
    pub fn keep(
        self: &Arc<Self>,
        name: Arc<str>,
        windows: Box<[WindowReq]>,
        (id, granted, asked): (String, u32, Instant),
        meta: M,
    ) {
        self.keep_left(name, windows, (id, granted, granted - 1, asked), meta);
    }

    /// Keeps a lease asked for ahead of need ([`Self::ask_ahead`]): all `granted` calls are
    /// this replica's to spend.
    pub fn keep_ahead(
        self: &Arc<Self>,
        name: Arc<str>,
        windows: Box<[WindowReq]>,
        (id, granted, asked): (String, u32, Instant),
        meta: M,
    ) {
        self.keep_left(name, windows, (id, granted, granted, asked), meta);
    }

    fn keep_left(
        self: &Arc<Self>,
        name: Arc<str>,
        windows: Box<[WindowReq]>,
        (id, granted, left, asked): (String, u32, u32, Instant),
        meta: M,
    ) {
        let credit = Credit {
            id,
            windows,
            granted,
            left,
            until: asked + self.req.within,
            meta,
        };
        self.credits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name)
            .or_default()
            .push(credit);
        if !self.returning.swap(true, Ordering::Relaxed) {
            self.start_returning();
        }
    }

    /// Whether a call spent leaving `left` in its lease is the one that asks for the next
    /// lease ahead of need: at a quarter of the lease left (never for leases under 8 calls),
    /// so that, under steady traffic, the next lease has landed before this one is spent and
    /// no decision waits for a round trip. Once per lease (`left` only falls).
    pub fn time_to_ask_ahead(&self, left: u32) -> bool {
        self.req.calls >= 8 && left == self.req.calls / 4
    }

    /// The ask for `name`'s next lease ahead of need, unless one is being asked for already.
    pub fn ask_ahead(&self, name: &str) -> Option<Asking<'_>> {
        self.asks.try_ask(name)
    }

    /// Takes out the leases whose time is up (and those spent), to give back what is left.
    fn lapsed(&self, now: Instant) -> Vec<Credit<M>> {
        let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for leases in credits.values_mut() {
            let (over, live): (Vec<_>, Vec<_>) = std::mem::take(leases)
                .into_iter()
                .partition(|c| c.left == 0 || now >= c.until);
            *leases = live;
            out.extend(over.into_iter().filter(|c| c.left > 0));
        }
        credits.retain(|_, leases| !leases.is_empty());
        out
    }

    /// Gives back, every half `within`, what lapsed leases left (until this is dropped).
    fn start_returning(self: &Arc<Self>) {
        every_half(self, self.req.within, |leasing| {
            let lapsed = leasing.lapsed(Instant::now());
            if !lapsed.is_empty() {
                give_back(&leasing.shared, lapsed);
            }
        });
    }
}

/// Runs `tick` on `owner` every half `within` (at least every 5 ms) until `owner` is dropped:
/// what lapses of a lease holder, given back or settled.
pub fn every_half<T: Send + Sync + 'static>(
    owner: &Arc<T>,
    within: Duration,
    tick: impl Fn(&T) + Send + 'static,
) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let owner = Arc::downgrade(owner);
    let every = (within / 2).max(Duration::from_millis(5));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(owner) = owner.upgrade() else {
                return;
            };
            tick(&owner);
        }
    });
}

/// A lease holder going away (a gateway's policy replaced, the process ending) gives back
/// every call it has not spent, so they are not held until they leave the windows.
impl<M> Drop for Leasing<M> {
    fn drop(&mut self) {
        let credits = std::mem::take(
            self.credits
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let unspent: Vec<Credit<M>> = credits
            .into_values()
            .flatten()
            .filter(|c| c.left > 0)
            .collect();
        if !unspent.is_empty() {
            give_back(&self.shared, unspent);
        }
    }
}

impl<M> Leasing<M> {
    /// Gives back every call not spent, now, before answering (a graceful stop, once the
    /// server has drained); answers the `M` of every lease it took out, for the asker to
    /// settle what else they hold (a pick's token slice).
    pub async fn give_back_all(&self) -> Vec<M> {
        let credits =
            std::mem::take(&mut *self.credits.lock().unwrap_or_else(PoisonError::into_inner));
        let mut metas = Vec::new();
        let mut unspent = Vec::new();
        for c in credits.into_values().flatten() {
            if c.left > 0 {
                unspent.push((c.id, c.windows, c.granted, c.left));
            }
            metas.push(c.meta);
        }
        returning(&self.shared, unspent).await;
        metas
    }
}

/// Returns the unspent calls of `credits` to their shared windows, in the background.
fn give_back<M>(shared: &Arc<dyn SharedState>, credits: Vec<Credit<M>>) {
    if tokio::runtime::Handle::try_current().is_ok() {
        let credits = credits
            .into_iter()
            .map(|c| (c.id, c.windows, c.granted, c.left))
            .collect();
        tokio::spawn(returning(shared, credits));
    }
}

/// A lease's calls to give back: its id, its windows, the calls granted and those left.
type Unspent = (String, Box<[WindowReq]>, u32, u32);

/// The return of `credits`' unspent calls to their shared windows.
fn returning(
    shared: &Arc<dyn SharedState>,
    credits: Vec<Unspent>,
) -> impl Future<Output = ()> + Send + 'static {
    let shared = shared.clone();
    async move {
        for (id, windows, granted, left) in credits {
            for w in &*windows {
                if let Err(e) = shared.return_lease(w, &id, granted, left).await {
                    shared.background_failed(&e);
                }
            }
        }
    }
}
