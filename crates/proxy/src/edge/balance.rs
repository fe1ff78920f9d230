//! Which worker serves a new connection: the one that accepted it, unless another holds
//! fewer by over an eighth of its count, which then gets it through its inbox.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A connection handed to another worker.
pub(super) type Inbox = tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>;
pub(super) type Handed = tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>;

/// The connections every worker serves, and their inboxes. Each worker accepts on a listener
/// itself; one that holds more than another (by over an eighth) hands the connection over (a
/// hand-off per connection only while the workers are uneven, never a wait).
pub(super) struct Balance {
    /// Connections each worker has been given and not yet closed (counted by whoever
    /// accepted, taken off by the worker that closes).
    pub(super) assigned: Arc<[AtomicUsize]>,
    pub(super) inboxes: Arc<[Inbox]>,
    pub(super) me: usize,
}

impl Balance {
    /// Each of `workers` workers' share of the count, with its inbox.
    pub(super) fn for_workers(workers: usize) -> Vec<(Self, Handed)> {
        let assigned: Arc<[AtomicUsize]> = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        let (inboxes, handed): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let inboxes: Arc<[Inbox]> = inboxes.into();
        handed
            .into_iter()
            .enumerate()
            .map(|(me, handed)| {
                let balance = Self {
                    assigned: assigned.clone(),
                    inboxes: inboxes.clone(),
                    me,
                };
                (balance, handed)
            })
            .collect()
    }

    /// The worker that serves the next connection, counted as given to it: the one with the
    /// fewest when this one holds more than that by over an eighth of its own, else this one.
    /// A hand-off wakes the other worker's thread; the kernel's spread over per-worker
    /// listeners (or who woke first on a shared one) stays within the eighth without one.
    pub(super) fn pick(&self) -> usize {
        let load = |i: usize| {
            self.assigned
                .get(i)
                .map_or(usize::MAX, |n| n.load(Ordering::Relaxed))
        };
        let mine = load(self.me);
        let mut least = (mine, self.me);
        for i in 0..self.assigned.len() {
            if load(i) < least.0 {
                least = (load(i), i);
            }
        }
        let to = if mine > least.0 + mine / 8 {
            least.1
        } else {
            self.me
        };
        if let Some(n) = self.assigned.get(to) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        to
    }

    /// Hands `tcp` to worker `to` (a worker gone, stopping, drops it).
    pub(super) fn hand(&self, tcp: tokio::net::TcpStream, peer: SocketAddr, to: usize) {
        let handed = tcp.into_std().ok().and_then(|std| {
            self.inboxes
                .get(to)
                .and_then(|inbox| inbox.send((std, peer)).ok())
        });
        if handed.is_none()
            && let Some(n) = self.assigned.get(to)
        {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// One of this worker's connections closed.
    pub(super) fn release(&self) {
        if let Some(n) = self.assigned.get(self.me) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
