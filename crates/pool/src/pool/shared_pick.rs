//! The shared state's side of a pick (`redis.lease` and replicas sharing Redis): choosing and
//! reserving among the candidates in one round trip, keeping what a lease reserved beyond
//! this pick (calls, and a token slice for a key with `tpm`), and asking for the next lease
//! ahead of need.

use std::sync::Arc;

use keypool_config::{LbPolicy, UpstreamKey};
use tokio::time::Instant;

use super::slice::TokenSlice;
use super::{PoolView, SharedTokens};
use crate::Pick;
use crate::select::Candidate;

/// What the shared state chose among the candidates.
pub(super) enum SharedPick {
    /// This candidate, its call counted (and its tokens reserved, when it has a tpm); for a
    /// session, whether it kept its key.
    Chosen(Candidate, Option<SharedTokens>, Option<crate::Stick>),
    /// None has room before this.
    Busy(Instant),
    /// The shared state is unavailable (already counted and logged).
    Failed,
}

/// Chooses and reserves among `cands` in the shared windows, in one round trip; with
/// `leasing` (this pick holds the turn to ask) a lease of several calls, kept for later picks.
pub(super) async fn shared_pick(
    shared: &Arc<dyn crate::SharedState>,
    view: &PoolView,
    cands: &[Candidate],
    pick: &Pick,
    id: String,
    now: Instant,
    leasing: Option<&Arc<super::PickLeasing>>,
) -> SharedPick {
    let ordered = script_order(view, cands.to_vec());
    let (windows, tokens) = script_windows(view, &ordered, pick.est_tokens);
    let least_used = view.policy == LbPolicy::LeastUsed;
    let asked = Instant::now();
    let one = crate::Granted {
        calls: 1,
        tokens: 0,
    };
    let picked = match (&pick.session, leasing) {
        (None, Some(l)) => shared
            .pick_leasing(&windows, &tokens, least_used, &id, l.req, now)
            .await
            .map(|(p, granted)| (p, None, granted)),
        (None, None) => shared
            .pick_reserving(&windows, &tokens, least_used, &id, now)
            .await
            .map(|p| (p, None, one)),
        (Some(session), Some(l)) => shared
            .pick_in_session_leasing(&windows, &tokens, least_used, &id, (session, l.req), now)
            .await
            .map(|(p, stick, granted)| (p, Some(stick), granted)),
        (Some(session), None) => shared
            .pick_in_session(&windows, &tokens, least_used, &id, session, now)
            .await
            .map(|(p, stick)| (p, Some(stick), one)),
    };
    match picked {
        Ok((crate::Picked::Index(i), stick, granted)) => {
            let i = i.min(ordered.len() - 1);
            let mut in_slice = None;
            if let (Some(l), true) = (leasing, granted.calls > 1) {
                let name = view.keys[ordered[i].order].key.name.clone();
                let window = Box::new([windows[i].clone()]);
                // a key with `tpm`: the lease holds an estimate per call there too, this
                // pick's among them
                let slice = slice_of(
                    shared,
                    tokens[i].as_ref(),
                    granted,
                    &id,
                    asked + l.req.within,
                );
                if let Some(slice) = &slice {
                    let each = granted.tokens / u64::from(granted.calls);
                    in_slice = slice.take(each).map(SharedTokens::Slice);
                }
                l.keep(name, window, (id.clone(), granted.calls, asked), slice);
            }
            let reserved = in_slice.or_else(|| {
                tokens[i].clone().map(|req| SharedTokens::Each {
                    state: shared.clone(),
                    req,
                    id,
                })
            });
            SharedPick::Chosen(ordered[i], reserved, stick)
        }
        Ok((crate::Picked::Busy(free_in), _, _)) => SharedPick::Busy(Instant::now() + free_in),
        Err(e) => {
            shared.failed(&e);
            SharedPick::Failed
        }
    }
}

/// The calls window and token window (if any) of each of `ordered`'s keys, as the pick script
/// takes them, for a pick estimated at `est` tokens.
fn script_windows(
    view: &PoolView,
    ordered: &[Candidate],
    est: u64,
) -> (Vec<crate::WindowReq>, Vec<Option<crate::TokenReq>>) {
    ordered
        .iter()
        .map(|c| {
            let key = &view.keys[c.order].key;
            (calls_window(key), token_window(key, est))
        })
        .unzip()
}

/// A key's token window in the shared state, for a pick estimated at `est` tokens (`None`:
/// the key has no `tpm`).
fn token_window(key: &UpstreamKey, est: u64) -> Option<crate::TokenReq> {
    key.tpm.map(|limit| crate::TokenReq {
        key: format!("key:{}:tok", key.name),
        limit,
        cost: est,
    })
}

/// The token slice a lease reserved beside its calls in `window` (`None` when the key has no
/// token window), settled under the lease's `id` once it lapses at `until` or its calls are
/// spent, and its requests have settled.
fn slice_of(
    shared: &Arc<dyn crate::SharedState>,
    window: Option<&crate::TokenReq>,
    granted: crate::Granted,
    id: &str,
    until: Instant,
) -> Option<Arc<TokenSlice>> {
    let window = window.filter(|_| granted.tokens > 0)?;
    let req = crate::TokenReq {
        cost: granted.tokens,
        ..window.clone()
    };
    Some(TokenSlice::open(shared.clone(), req, id.to_owned(), until))
}

/// Candidates in the order the shared pick's script takes them: random and latency, the first
/// with room in their ranking; the others choose there by the shared counts, ties going to
/// config order.
fn script_order(view: &PoolView, mut cands: Vec<Candidate>) -> Vec<Candidate> {
    if !matches!(view.policy, LbPolicy::Random | LbPolicy::Latency) {
        cands.sort_by_key(|c| c.order);
    }
    cands
}

/// A key's calls window in the shared state (`u64::MAX`: unbudgeted, ranking only).
fn calls_window(key: &UpstreamKey) -> crate::WindowReq {
    crate::WindowReq {
        key: format!("key:{}:req", key.name),
        limit: key.rpm.map_or(u64::MAX, u64::from),
        per: crate::key::WINDOW,
    }
}

/// Asks for the next lease of picks in the background among `cands`' keys, unless an ask is
/// under way: under steady traffic it lands before the current lease is spent, so no pick
/// waits for the script. The key it is for is the one the script chooses now, as an in-line
/// ask would; a key with `tpm` gets a token slice of `est` (the triggering pick's estimate)
/// per call. A busy answer or an unavailable shared state keeps nothing (the next pick that
/// finds no lease asks itself).
pub(super) fn ask_ahead(
    shared: &Arc<dyn crate::SharedState>,
    l: &Arc<super::PickLeasing>,
    view: &PoolView,
    (cands, est): (&[Candidate], u64),
) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let ordered = script_order(view, cands.to_vec());
    if ordered.is_empty() {
        return;
    }
    let names: Vec<Arc<str>> = ordered
        .iter()
        .map(|c| view.keys[c.order].key.name.clone())
        .collect();
    let (windows, tokens) = script_windows(view, &ordered, est);
    let least_used = view.policy == LbPolicy::LeastUsed;
    let (shared, l) = (shared.clone(), l.clone());
    tokio::spawn(async move {
        let Some(_asking) = l.ask_ahead("") else {
            return;
        };
        let id = format!(
            "{}-ahead-{:016x}",
            keypool_shared::process_id(),
            fastrand::u64(..)
        );
        let asked = Instant::now();
        match shared
            .pick_leasing(&windows, &tokens, least_used, &id, l.req, asked)
            .await
        {
            Ok((crate::Picked::Index(i), granted)) => {
                let i = i.min(windows.len() - 1);
                let window = Box::new([windows[i].clone()]);
                let until = asked + l.req.within;
                let slice = slice_of(&shared, tokens[i].as_ref(), granted, &id, until);
                l.keep_ahead(names[i].clone(), window, (id, granted.calls, asked), slice);
            }
            Ok((crate::Picked::Busy(_), _)) => {}
            Err(e) => shared.background_failed(&e),
        }
    });
}
