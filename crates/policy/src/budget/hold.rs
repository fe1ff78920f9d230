//! [`Hold`]: what one request holds against its budgets, settled once.

use std::sync::Arc;

use super::{Budgets, Wanted};

/// What a request holds against its budgets: settled once with [`Hold::settle`], or released
/// (settled at 0) when dropped unsettled, so no path out of a request leaves a hold behind.
pub struct Hold {
    pub(super) wanted: Vec<Wanted>,
    pub(super) amount: u64,
    /// Held in this process's counters (the shared state was unavailable).
    pub(super) local: bool,
    /// Held against this replica's slice of the budgets (`redis.lease`), settled into it.
    pub(super) slice: Option<Arc<crate::slices::Slice>>,
    pub(super) owner: Arc<Budgets>,
    pub(super) settled: bool,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Hold({} budgets, {} nano-dollars)",
            self.wanted.len(),
            self.amount
        )
    }
}

impl Hold {
    /// The nano-dollars held.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Replaces the estimate by what the request spent, in the background (the request never
    /// waits), and alerts for a budget whose spend this crosses 80% or 100% of.
    pub fn settle(mut self, spent: u64) {
        self.settled = true;
        if let Some(slice) = self.slice.take() {
            slice.settle(self.amount, spent);
            return;
        }
        let (wanted, amount, local) = (std::mem::take(&mut self.wanted), self.amount, self.local);
        let owner = self.owner.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { owner.settle(wanted, amount, local, spent).await });
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.settled {
            let hold = Self {
                wanted: std::mem::take(&mut self.wanted),
                amount: self.amount,
                local: self.local,
                slice: self.slice.take(),
                owner: self.owner.clone(),
                settled: false,
            };
            hold.settle(0);
        }
    }
}
