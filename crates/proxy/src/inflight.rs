//! Requests holding an upstream connection, per worker, and the most its share of the open-files
//! limit allows. A request past it is answered `503 server_busy` with `Retry-After: 1` before
//! it holds anything, instead of failing midway when `connect` finds no descriptor left.
//!
//! Per worker, not per process: a worker's upstream connections (in use or idle in its pool,
//! which only keeps what it once used at once) stay within its share with one uncontended
//! counter, and connections are spread over the workers as they are accepted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keypool_types::{ApiError, ErrorKind};

/// One worker's count of requests that may hold an upstream connection.
#[derive(Debug)]
pub struct InFlight {
    now: AtomicUsize,
    cap: usize,
}

impl Default for InFlight {
    /// No limit.
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl InFlight {
    /// At most `cap` at once.
    pub fn new(cap: usize) -> Self {
        Self {
            now: AtomicUsize::new(0),
            cap,
        }
    }

    /// A slot, held until the request's answer has been relayed; `503 server_busy` when none
    /// is free.
    pub fn take(self: &Arc<Self>) -> Result<Slot, ApiError> {
        // one worker's requests: the count is only raced by slots dropped elsewhere
        if self.now.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.now.fetch_sub(1, Ordering::AcqRel);
            let mut busy = ApiError::new(
                ErrorKind::ServerBusy,
                "keypool is relaying as many requests as its open-files limit allows; retry shortly.",
            );
            busy.retry_after_secs = Some(1);
            return Err(busy);
        }
        Ok(Slot(self.clone()))
    }

    /// Slots held now.
    pub fn now(&self) -> usize {
        self.now.load(Ordering::Relaxed)
    }
}

/// A request's hold on an upstream connection; given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<InFlight>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_past_the_cap_are_refused_until_one_is_given_back() {
        let f = Arc::new(InFlight::new(2));
        let a = f.take().unwrap();
        let _b = f.take().unwrap();
        let busy = f.take().unwrap_err();
        assert_eq!(busy.kind, ErrorKind::ServerBusy);
        assert_eq!(busy.retry_after_secs, Some(1));
        assert_eq!(f.now(), 2);
        drop(a);
        assert_eq!(f.now(), 1);
        assert!(f.take().is_ok());
    }
}
