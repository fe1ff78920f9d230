//! File descriptors: a proxied stream holds two (the client's connection and the upstream's),
//! an idle keep-alive client one. At start the soft `RLIMIT_NOFILE` is raised to the hard
//! limit and what is left after [`RESERVED`] is split: 45% for upstream connections (the
//! concurrent streams, each worker its share, past which a request is answered `503
//! server_busy` with `Retry-After: 1`: [`keypool_proxy::inflight`]) and 55% for client
//! connections (each worker its share; connections past it wait in the listen backlog). The
//! client side is the larger so that a request past the streams limit can still be answered
//! instead of failing midway for want of a descriptor. The log says how many streams fit.

/// Descriptors kept for everything else: listeners, the store, Redis, the admin API and
/// console, the log and spill files.
const RESERVED: u64 = 256;

/// What the descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft limit now (`None`: unlimited).
    pub nofile: Option<u64>,
    /// Concurrent streams (upstream connections) that fit (`None`: no limit from descriptors).
    pub streams: Option<u64>,
    /// Client connections that fit.
    pub connections: Option<u64>,
}

impl FdBudget {
    /// Client connections one of `workers` may hold (actix's default, 25,000, when unlimited).
    pub fn connections_per_worker(self, workers: usize) -> usize {
        share(self.connections, workers).unwrap_or(25_000)
    }

    /// Streams one of `workers` may relay at once (`usize::MAX` when unlimited).
    pub fn streams_per_worker(self, workers: usize) -> usize {
        share(self.streams, workers).unwrap_or(usize::MAX)
    }
}

fn share(total: Option<u64>, workers: usize) -> Option<usize> {
    let workers = u64::try_from(workers.max(1)).unwrap_or(1);
    total.map(|t| usize::try_from((t / workers).max(1)).unwrap_or(usize::MAX))
}

fn budget(nofile: Option<u64>) -> FdBudget {
    let usable = nofile.map(|n| n.saturating_sub(RESERVED).max(2));
    let streams = usable.map(|u| (u * 45 / 100).max(1));
    FdBudget {
        nofile,
        streams,
        connections: usable.zip(streams).map(|(u, s)| u - s),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a failure is logged and the limit kept).
#[cfg(unix)]
pub fn raise_nofile() -> FdBudget {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return budget(now.maximum),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    budget(now.current)
}

#[cfg(not(unix))]
pub fn raise_nofile() -> FdBudget {
    budget(None)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let low = Rlimit {
            current: Some(512),
            maximum: before.maximum,
        };
        if before.maximum.is_none_or(|m| m > 512) {
            setrlimit(Resource::Nofile, low).unwrap();
        }
        let b = raise_nofile();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current, before.maximum);
        assert_eq!(b.nofile, before.maximum);
        let b = budget(Some(1024));
        assert_eq!((b.streams, b.connections), (Some(345), Some(423)));
        assert_eq!(b.streams_per_worker(2), 172);
        assert_eq!(b.connections_per_worker(2), 211);
        assert_eq!(budget(Some(10)).streams, Some(1));
        assert_eq!(budget(None).connections_per_worker(4), 25_000);
        assert_eq!(budget(None).streams_per_worker(4), usize::MAX);
    }
}
