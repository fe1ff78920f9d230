//! The admission and budget-hold scripts' side of [`RedisState`]: a call (or a lease of calls)
//! counted in every window or in none, and an estimate (or a slice) held against every budget
//! or against none.

use std::time::Duration;

use super::{RedisState, ttl_ms};
use crate::{Admit, BudgetReq, Held, SharedError, WindowReq};

/// Prunes, checks and (only if all fit) records, on Redis's clock. KEYS: windows. ARGV: member
/// id, then (limit, per_ms) per window, then (for a lease) its calls and ms. Returns
/// {1, remaining..., granted} or {0, index, free_in_ms}.
pub(super) const ADMIT: &str = concat!(
    include_str!("../scripts/window.lua"),
    include_str!("../scripts/admit.lua")
);

impl RedisState {
    /// The admission script: check every window and count the call (or a lease's calls) in
    /// all of them, or in none.
    pub(super) async fn run_admit(
        &self,
        windows: &[WindowReq],
        id: &str,
        lease: Option<crate::LeaseReq>,
    ) -> Result<(Admit, u32), SharedError> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(id);
        for w in windows {
            inv.key(self.key(&w.key));
            inv.arg(w.limit).arg(w.per.as_millis() as u64);
        }
        if let Some(l) = lease {
            inv.arg(l.calls.max(1))
                .arg(u64::try_from(l.within.as_millis()).unwrap_or(u64::MAX));
        }
        let mut conn = self.conn();
        let out: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        match out.as_slice() {
            [1, rest @ .., granted] => Ok((
                Admit::Admitted {
                    remaining: rest
                        .iter()
                        .map(|r| u64::try_from(*r).unwrap_or(0))
                        .collect(),
                },
                u32::try_from(*granted).unwrap_or(1).max(1),
            )),
            [0, index, free] => Ok((
                Admit::Refused {
                    index: usize::try_from(*index).unwrap_or(0),
                    free_in: Duration::from_millis(u64::try_from(*free).unwrap_or(0)),
                },
                0,
            )),
            other => Err(SharedError(format!("unexpected admit answer {other:?}"))),
        }
    }

    /// The hold script: `amount` (or, for a slice, up to `slice`) held against every budget,
    /// or none; answers what was held.
    pub(super) async fn run_hold(
        &self,
        budgets: &[BudgetReq],
        amount: u64,
        slice: Option<u64>,
    ) -> Result<(Held, u64), SharedError> {
        let mut inv = self.budget_hold.prepare_invoke();
        inv.arg(amount);
        for b in budgets {
            inv.key(self.key(&b.key));
            inv.arg(b.limit).arg(ttl_ms(b.ttl));
        }
        if let Some(want) = slice {
            inv.arg(want);
        }
        let mut conn = self.conn();
        let out: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        match out.as_slice() {
            [1, held, _] => Ok((Held::Held, u64::try_from(*held).unwrap_or(amount))),
            [0, index, spent] => Ok((
                Held::Over {
                    index: usize::try_from(*index).unwrap_or(0),
                    spent: u64::try_from(*spent).unwrap_or(0),
                },
                0,
            )),
            other => Err(SharedError(format!("unexpected hold answer {other:?}"))),
        }
    }
}
