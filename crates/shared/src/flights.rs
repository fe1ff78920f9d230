//! [`Flights`]: one ask at a time per name. A decision that needs something from the shared
//! state that several could share (a lease of calls, a slice of a budget) asks for it while
//! the others of the same name wait for it to land, then use it or go on alone; so a burst
//! asks once, not once per decision.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

/// The names being asked for, and the wake-up of those waiting.
#[derive(Default)]
pub struct Flights {
    asking: Mutex<HashSet<Box<str>>>,
    landed: tokio::sync::Notify,
}

/// The one decision asking for a name; when dropped (what it asked for kept, or the ask
/// failed) the decisions waiting for that name wake and the next may ask.
pub struct Asking<'a>(&'a Flights, Box<str>);

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0
            .asking
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
        self.0.landed.notify_waiters();
    }
}

/// A decision's turn: ask now, or what another asked for under its name has landed (use it,
/// or go on alone).
pub enum Turn<'a> {
    Ask(Asking<'a>),
    Landed,
}

impl Flights {
    /// Asks for `name` now unless another decision is asking for it (then `None`: nothing to
    /// wait for, the ask is theirs). For asks ahead of need, which never wait.
    pub fn try_ask(&self, name: &str) -> Option<Asking<'_>> {
        let mut asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
        asking
            .insert(Box::from(name))
            .then(|| Asking(self, Box::from(name)))
    }

    /// Asks for `name` now, or, while another decision is asking for it, waits until that
    /// has landed.
    pub async fn turn(&self, name: &str) -> Turn<'_> {
        let mut waited = false;
        loop {
            // registered before the set is looked at, so a landing in between still wakes it
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            {
                let mut asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
                if !asking.contains(name) {
                    if waited {
                        return Turn::Landed;
                    }
                    asking.insert(Box::from(name));
                    return Turn::Ask(Asking(self, Box::from(name)));
                }
            }
            // woken by another name's landing: this name's is still being asked for
            landed.await;
            waited = true;
        }
    }
}
