//! File descriptors: a proxied stream holds two (the client's connection and the upstream's).
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit, the log says how many
//! concurrent streams that allows, and each HTTP worker accepts at most its share of them
//! (connections past it wait in the listen backlog instead of failing midway for want of a
//! descriptor).

/// Descriptors kept for everything else: listeners, the store, Redis, the admin API and
/// console, the log and spill files.
const RESERVED: u64 = 256;

/// What the descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft limit now (`None`: unlimited).
    pub nofile: Option<u64>,
    /// Concurrent streams that fit (`None`: no limit from descriptors).
    pub streams: Option<u64>,
}

impl FdBudget {
    /// Connections one of `workers` may hold (actix's default, 25,000, when unlimited).
    pub fn per_worker(self, workers: usize) -> usize {
        let workers = u64::try_from(workers.max(1)).unwrap_or(1);
        self.streams.map_or(25_000, |s| {
            usize::try_from((s / workers).max(1)).unwrap_or(usize::MAX)
        })
    }
}

fn budget(nofile: Option<u64>) -> FdBudget {
    FdBudget {
        nofile,
        streams: nofile.map(|n| n.saturating_sub(RESERVED).max(2) / 2),
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
        assert_eq!(budget(Some(1024)).streams, Some(384));
        assert_eq!(budget(Some(1024)).per_worker(2), 192);
        assert_eq!(budget(Some(10)).streams, Some(1));
        assert_eq!(budget(None).per_worker(4), 25_000);
    }
}
