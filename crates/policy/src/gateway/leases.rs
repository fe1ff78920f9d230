//! A gateway's rate limits leased from the shared state (`redis.lease`): one holder per scope,
//! the `ingress:` limits' calls under the gateway's name and the `secret:` limits' under each
//! caller's, so a gateway with both holds one `ingress:` lease per replica (not one per caller)
//! beside a lease per caller. An admission spends a call of each scope here; the scopes with
//! none left go to the shared state together, in one script, and what it leases is kept by
//! each scope's holder for its windows.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use keypool_config::Gateway;
use keypool_config::gateway::{LimitScope, RateLimit};
use keypool_shared::{Admit, Asking, LeaseReq, Leasing, SharedState, Turn, WindowReq};
use tokio::time::Instant;

use super::limits::{refusal, tightest_of, who, window};
use super::{GatewayRuntime, RateHeaders, Refused};
use crate::Caller;

/// The lease holders of a gateway's rate limits, one per scope it has (in the order
/// `ingress:`, `secret:`).
pub(crate) struct Leases {
    parts: Box<[Part]>,
}

/// The limits of one scope and their holder.
struct Part {
    scope: LimitScope,
    /// The spec's limits of this scope, in the spec's order.
    limits: Arc<[RateLimit]>,
    leasing: Arc<Leasing<RateHeaders>>,
}

/// Lease holders for `spec`'s rate limits when replicas share them and `lease` asks for more
/// than one call at a time: per scope, at most a tenth of the scope's smallest limit at once
/// (small limits stay shared out a call at a time: `ingress:100/minute` leases 10,
/// `ingress:19/minute` none, and then neither scope is leased: its admissions go to the shared
/// state anyway), spent within `lease.within` or the shortest window, whichever is shorter.
pub(crate) fn lease_for(
    spec: &Gateway,
    shared: Option<&Arc<dyn SharedState>>,
    lease: Option<LeaseReq>,
) -> Option<Arc<Leases>> {
    let (shared, lease) = (shared?, lease?);
    let all = &spec.rate_limits;
    // one time for every scope: a lease of both scopes is one reservation in the shared
    // windows, counted from the latest moment either holder may spend it
    let within = lease.within.min(all.iter().map(|l| l.per).min()?);
    let mut parts = Vec::new();
    for scope in [LimitScope::Ingress, LimitScope::Secret] {
        let limits: Arc<[RateLimit]> = all.iter().filter(|l| l.scope == scope).cloned().collect();
        let Some(smallest) = limits.iter().map(|l| l.limit).min() else {
            continue;
        };
        let calls = u32::try_from(smallest / 10).map_or(lease.calls, |c| c.min(lease.calls));
        if calls <= 1 {
            return None;
        }
        let leasing = Arc::new(Leasing::new(calls, within, shared.clone()));
        parts.push(Part {
            scope,
            limits,
            leasing,
        });
    }
    Some(Arc::new(Leases {
        parts: parts.into(),
    }))
}

impl Leases {
    /// What each scope leases at once.
    #[cfg(test)]
    pub(crate) fn reqs(&self) -> Vec<(LimitScope, LeaseReq)> {
        self.parts
            .iter()
            .map(|p| (p.scope, p.leasing.req))
            .collect()
    }

    /// Gives back every call leased and not spent, now (a graceful stop).
    pub(crate) async fn give_back_all(&self) {
        for p in &self.parts {
            p.leasing.give_back_all().await;
        }
    }
}

impl GatewayRuntime {
    /// The name `p`'s leases are kept under: the gateway's (`ingress:`) or the caller's.
    fn lease_name(&self, p: &Part, who: &Arc<str>) -> Arc<str> {
        match p.scope {
            LimitScope::Ingress => self.name.clone(),
            LimitScope::Secret => who.clone(),
        }
    }

    fn part_windows(&self, p: &Part, who: &str) -> Vec<WindowReq> {
        p.limits
            .iter()
            .map(|l| window(&self.spec.name, l, who))
            .collect()
    }

    /// [`Self::admit_everywhere`] with leases: a call of each scope spent here, or, for the
    /// scopes with none left, counted in the shared windows in one round trip that leases the
    /// next calls (one ask at a time per name: the admissions meanwhile wait for it once, then
    /// spend from it or count a single call). A scope's call spent here goes back to its lease
    /// when the other scope refuses the admission.
    pub(super) async fn admit_leased(
        &self,
        shared: &Arc<dyn SharedState>,
        leases: &Leases,
        (caller, client_ip): (&Caller, Option<IpAddr>),
        now: Instant,
    ) -> Result<Option<RateHeaders>, Refused> {
        let who = who(caller, client_ip);
        let parts = &leases.parts;
        let mut spent: [Option<RateHeaders>; 2] = [None, None];
        let mut ahead = [false; 2];
        let mut spend_here = |i: usize, spent: &mut [Option<RateHeaders>; 2]| {
            let p = &parts[i];
            if let Some((h, ask)) = Self::spend_leased(p, &self.lease_name(p, &who), now) {
                spent[i] = Some(h);
                ahead[i] = ask;
            }
        };
        for i in 0..parts.len() {
            spend_here(i, &mut spent);
        }
        // always in the order of the scopes, so two admissions never wait on each other
        let mut asks: [Option<Asking<'_>>; 2] = [None, None];
        for i in 0..parts.len() {
            if spent[i].is_none() {
                let p = &parts[i];
                match p.leasing.turn(&self.lease_name(p, &who)).await {
                    Turn::Ask(a) => asks[i] = Some(a),
                    Turn::Landed => spend_here(i, &mut spent),
                }
            }
        }
        let going: Vec<(usize, Vec<WindowReq>)> = (0..parts.len())
            .filter(|&i| spent[i].is_none())
            .map(|i| (i, self.part_windows(&parts[i], &who)))
            .collect();
        if going.is_empty() {
            self.ask_ahead_where(shared, parts, ahead, &who);
            return Ok(tightest(&spent));
        }
        // a lease only where this admission asks for every scope it counts in
        let leasing = going.iter().all(|(i, _)| asks[*i].is_some());
        let id = if leasing { lease_id() } else { String::new() };
        let decided = count_shared(shared, parts, &going, (&id, leasing), now).await;
        let refund = |spent: &[Option<RateHeaders>; 2]| {
            for (p, h) in parts.iter().zip(spent) {
                if h.is_some() {
                    p.leasing.refund(&self.lease_name(p, &who), now);
                }
            }
        };
        match decided {
            Err(e) => {
                refund(&spent);
                self.shared_failed(shared, &e, (caller, client_ip), now)
            }
            Ok((Admit::Refused { index, free_in }, _)) => {
                refund(&spent);
                let mut limits = going.iter().flat_map(|(i, _)| parts[*i].limits.iter());
                let l = limits.nth(index).unwrap_or(&parts[going[0].0].limits[0]);
                Err(refusal(l, free_in))
            }
            Ok((Admit::Admitted { remaining }, granted)) => {
                let mut rest = &remaining[..];
                for (i, windows) in going {
                    let p = &parts[i];
                    let (mine, after) = rest.split_at(p.limits.len().min(rest.len()));
                    rest = after;
                    let name = self.lease_name(p, &who);
                    spent[i] = keep(p, name, windows, (&id, granted, now), mine);
                }
                self.ask_ahead_where(shared, parts, ahead, &who);
                Ok(tightest(&spent))
            }
        }
    }

    /// One call of a lease `p`'s holder keeps for `name`, with the headers of its tightest
    /// limit (the calls left there once the lease was counted, plus what the lease has left),
    /// and whether it is the call that leaves a quarter of its lease, which asks for the next
    /// one ahead of need once the admission is known to be admitted (a call given back would
    /// leave that quarter again: a stream of refused calls must not ask each time).
    fn spend_leased(p: &Part, name: &Arc<str>, now: Instant) -> Option<(RateHeaders, bool)> {
        let l = &p.leasing;
        let s = l.spend(&[()], |()| name, now)?;
        let headers = RateHeaders {
            remaining: s.meta.remaining + u64::from(s.left),
            ..s.meta
        };
        Some((headers, l.time_to_ask_ahead(s.left)))
    }

    /// Asks ahead for the next lease of the parts whose calls `ahead` marks (the admission was
    /// admitted).
    fn ask_ahead_where(
        &self,
        shared: &Arc<dyn SharedState>,
        parts: &[Part],
        ahead: [bool; 2],
        who: &Arc<str>,
    ) {
        for (p, _) in parts.iter().zip(ahead).filter(|(_, a)| *a) {
            let windows = self.part_windows(p, who);
            ask_ahead(shared, p, self.lease_name(p, who), windows);
        }
    }
}

/// Counts a call in the windows of the `going` parts at once, in one round trip; with
/// `leasing`, reserving under `id` a lease of the smallest of their sizes.
async fn count_shared(
    shared: &Arc<dyn SharedState>,
    parts: &[Part],
    going: &[(usize, Vec<WindowReq>)],
    (id, leasing): (&str, bool),
    now: Instant,
) -> Result<(Admit, u32), keypool_shared::SharedError> {
    let windows: Cow<'_, [WindowReq]> = match going {
        [(_, w)] => Cow::Borrowed(w),
        _ => Cow::Owned(going.iter().flat_map(|(_, w)| w.clone()).collect()),
    };
    if !leasing {
        return shared.admit(&windows, now).await.map(|a| (a, 1));
    }
    let req = LeaseReq {
        calls: going
            .iter()
            .map(|(i, _)| parts[*i].leasing.req.calls)
            .min()
            .unwrap_or(1),
        within: parts[0].leasing.req.within,
    };
    shared.admit_leasing(&windows, id, req, now).await
}

/// `p`'s call counted in the shared windows, `remaining` left in each of them: the headers of
/// its tightest limit; a lease of `granted` calls (the asker's own among them) kept by `p`'s
/// holder for `name` in `windows`.
fn keep(
    p: &Part,
    name: Arc<str>,
    windows: Vec<WindowReq>,
    (id, granted, asked): (&str, u32, Instant),
    remaining: &[u64],
) -> Option<RateHeaders> {
    let h = tightest_of(&p.limits, remaining)?;
    if granted <= 1 {
        return Some(h);
    }
    let kept = (id.to_owned(), granted, asked);
    p.leasing
        .keep(name, windows.into_boxed_slice(), kept, h.clone());
    Some(RateHeaders {
        remaining: h.remaining + u64::from(granted - 1),
        ..h
    })
}

/// Asks for `name`'s next lease of `p`'s limits in the background, unless an ask for it is
/// under way: under steady traffic it lands before the current lease is spent, so no
/// admission waits for the round trip. A refusal or an unavailable shared state leaves nothing
/// kept (the next admission that finds no lease asks, and decides, itself).
fn ask_ahead(shared: &Arc<dyn SharedState>, p: &Part, name: Arc<str>, windows: Vec<WindowReq>) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let (shared, l, limits) = (shared.clone(), p.leasing.clone(), p.limits.clone());
    tokio::spawn(async move {
        let Some(_asking) = l.ask_ahead(&name) else {
            return;
        };
        let (id, asked) = (lease_id(), Instant::now());
        match shared.admit_leasing(&windows, &id, l.req, asked).await {
            Ok((Admit::Admitted { remaining }, granted)) => {
                if let Some(h) = tightest_of(&limits, &remaining) {
                    let windows = windows.into_boxed_slice();
                    l.keep_ahead(name.clone(), windows, (id, granted, asked), h);
                }
            }
            Ok((Admit::Refused { .. }, _)) => {}
            Err(e) => shared.background_failed(&e),
        }
    });
}

/// The tightest of the scopes' headers: the fewest calls left (of those the longest to reset).
fn tightest(spent: &[Option<RateHeaders>]) -> Option<RateHeaders> {
    spent
        .iter()
        .flatten()
        .min_by_key(|h| (h.remaining, std::cmp::Reverse(h.reset)))
        .cloned()
}

/// A lease's id in the shared windows.
fn lease_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
