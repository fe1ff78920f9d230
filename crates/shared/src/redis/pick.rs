//! The pick script's side of [`RedisState`]: choosing and reserving among candidates in one
//! round trip (with a lease, several calls at once), and giving back a lease's unspent calls.

use std::time::Duration;

use super::RedisState;
use crate::{Picked, SessionReq, SharedError, Stick, TokenReq, WindowReq};

/// Chooses and reserves in one step. KEYS: per candidate, in preference order, its request
/// window and its token window. ARGV: member id, `least` or `first`, then per candidate
/// (limit, per_ms, token_limit, token_cost); a limit of 0 means unbudgeted, a token limit of 0
/// no token budget; then the calls wanted as a lease (1: none) and its ms; for a session's
/// pick its key and ttl come last. Returns {1, index, stick, granted, tokens} or
/// {0, free_in_ms} (pick.lua says more).
///
/// A budgeted window is exact (a sorted set of admission times, bounded by its limit). An
/// unbudgeted one only ranks, so it is two per-window counters (this window and the last one,
/// weighted by how much of the last still overlaps): O(1), whatever the traffic. A token window
/// is a sorted set of `id:tokens` members with a running sum beside it (`<key>:sum`): members
/// leaving the window are subtracted once, so the check is O(1) amortised.
pub(super) const PICK: &str = concat!(
    include_str!("../scripts/window.lua"),
    include_str!("../scripts/pick.lua")
);

/// Gives back a lease's unspent calls: KEYS[1] the window; ARGV: limit, lease id, granted,
/// unspent.
pub(super) const LEASE_RETURN: &str = concat!(
    include_str!("../scripts/window.lua"),
    include_str!("../scripts/lease_return.lua")
);

impl RedisState {
    /// The pick script: choose, reserve and (for a session) remember, in one round trip.
    pub(super) async fn run_pick(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        session: Option<&SessionReq>,
        lease: Option<crate::LeaseReq>,
    ) -> Result<(Picked, Stick, crate::Granted), SharedError> {
        let mut inv = self.pick_script.prepare_invoke();
        inv.arg(id);
        inv.arg(if least_used { "least" } else { "first" });
        for (i, w) in candidates.iter().enumerate() {
            inv.key(self.key(&w.key));
            // unbudgeted (u64::MAX): 0 tells the script to count approximately
            let limit = if w.limit == u64::MAX { 0 } else { w.limit };
            inv.arg(limit).arg(w.per.as_millis() as u64);
            if let Some(Some(t)) = tokens.get(i) {
                inv.key(self.key(&t.key));
                inv.arg(t.limit).arg(t.cost);
            } else {
                // no token budget: a placeholder key the script never touches
                inv.key(self.key(&format!("{}:tok", w.key)));
                inv.arg(0).arg(0);
            }
        }
        match lease {
            Some(l) => inv
                .arg(l.calls.max(1))
                .arg(u64::try_from(l.within.as_millis()).unwrap_or(u64::MAX)),
            None => inv.arg(1).arg(0),
        };
        if let Some(s) = session {
            inv.key(self.key(&s.key));
            inv.arg(u64::try_from(s.ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        let mut conn = self.conn();
        let out: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        match out.as_slice() {
            [1, i, stick, granted, tokens] => {
                let stick = match stick {
                    1 => Stick::Hit,
                    3 => Stick::Moved,
                    _ => Stick::Miss,
                };
                let granted = crate::Granted {
                    calls: u32::try_from(*granted).unwrap_or(1).max(1),
                    tokens: u64::try_from(*tokens).unwrap_or(0),
                };
                Ok((
                    Picked::Index(usize::try_from(*i).unwrap_or(0)),
                    stick,
                    granted,
                ))
            }
            [0, free] => Ok((
                Picked::Busy(Duration::from_millis(u64::try_from(*free).unwrap_or(0))),
                Stick::Moved,
                crate::Granted {
                    calls: 0,
                    tokens: 0,
                },
            )),
            other => Err(SharedError(format!("unexpected pick answer {other:?}"))),
        }
    }

    /// Gives back `unused` of the `granted` calls of lease `id` in `window`.
    pub(super) async fn run_return_lease(
        &self,
        window: &WindowReq,
        id: &str,
        granted: u32,
        unused: u32,
    ) -> Result<u32, SharedError> {
        let mut inv = self.lease_return.prepare_invoke();
        inv.key(self.key(&window.key))
            .arg(window.limit)
            .arg(id)
            .arg(granted)
            .arg(unused);
        let mut conn = self.conn();
        let back: i64 = self.run(inv.invoke_async(&mut conn)).await?;
        Ok(u32::try_from(back).unwrap_or(0))
    }
}
