//! An upstream host's addresses, looked up once and kept by a worker ([`Addresses`]).
//!
//! A new upstream connection needs its host's addresses. tokio looks a name up with the
//! system resolver on its blocking pool: a hand-off to another thread, a thread of its own
//! while the lookup waits and, for a name not in `/etc/hosts`, a DNS round trip (in
//! Kubernetes, with `ndots: 5`, several). Per connection, that is added to the first byte of
//! every request that finds no idle connection, and a burst of new connections (streams,
//! thousands of clients at once) made as many lookups at once, each on a thread.
//!
//! So a worker keeps each host's addresses for [`FRESH`]. After that the first new connection
//! looks up again while the others go on with the addresses known; the first lookups of a
//! host wait for one; a failed lookup is answered again for [`FAILED`] without asking; a
//! connect that failed on every known address makes them stale. IP literals are not looked
//! up. getaddrinfo gives no TTLs, so [`FRESH`] stands in for them (DECISIONS: "Upstream
//! addresses kept").

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

/// How long a host's looked-up addresses are used before they are looked up again.
pub(crate) const FRESH: Duration = Duration::from_secs(30);
/// How long a failed lookup is answered again without asking.
pub(crate) const FAILED: Duration = Duration::from_secs(1);

/// How a name is looked up: the system resolver, or a test's own.
pub(crate) type Lookup =
    Box<dyn Fn(String, u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// A worker's upstream hosts and their addresses (a handful of hosts: a list, no hashing).
pub(crate) struct Addresses {
    hosts: Mutex<Vec<Arc<Host>>>,
    lookup: Lookup,
}

/// One `host:port` and what is known of it.
struct Host {
    name: String,
    port: u16,
    known: Mutex<Known>,
    /// Held by the one lookup in progress: the first lookups of a host wait on it, later
    /// connections only try it (and go on with the addresses known when it is taken).
    asking: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Known {
    /// The addresses and until when they are fresh.
    addrs: Option<(Arc<[SocketAddr]>, Instant)>,
    /// The last lookup's failure and when it happened, until a lookup succeeds.
    failed: Option<(Instant, Arc<str>)>,
}

impl Addresses {
    /// Names looked up with the system resolver (tokio's `lookup_host`).
    pub(crate) fn system() -> Self {
        Self::with_lookup(Box::new(|name, port| {
            Box::pin(async move {
                tokio::net::lookup_host((name.as_str(), port))
                    .await
                    .map(Iterator::collect)
            })
        }))
    }

    pub(crate) fn with_lookup(lookup: Lookup) -> Self {
        Self {
            hosts: Mutex::new(Vec::new()),
            lookup,
        }
    }

    /// `host`'s addresses with `port`, looked up only when none are fresh (module docs).
    /// `host` is as an endpoint spells it: an IPv6 literal without its brackets.
    pub(crate) async fn of(&self, host: &str, port: u16) -> Result<Arc<[SocketAddr]>, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Arc::new([SocketAddr::new(ip, port)]));
        }
        let host = self.host(host, port);
        let stale = match host.fresh_or_stale() {
            (Some(addrs), true) => return Ok(addrs),
            (stale, _) => stale,
        };
        if let Some(stale) = stale {
            // another connection is looking up, or the last lookup failed: go on with these
            if host.failed_lately().is_some() {
                return Ok(stale);
            }
            let Ok(_asking) = host.asking.try_lock() else {
                return Ok(stale);
            };
            return Ok(self.ask(&host).await.unwrap_or(stale));
        }
        let _asking = host.asking.lock().await;
        // the lookup waited for may have answered
        if let (Some(addrs), _) = host.fresh_or_stale() {
            return Ok(addrs);
        }
        if let Some(failed) = host.failed_lately() {
            return Err(failed.to_string());
        }
        self.ask(&host).await
    }

    /// A connect failed on every address of `host`: the next connection looks it up again.
    pub(crate) fn forget(&self, host: &str, port: u16) {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = hosts.iter().find(|h| h.name == host && h.port == port) {
            let mut known = h.known.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, until)) = &mut known.addrs {
                *until = Instant::now();
            }
        }
    }

    fn host(&self, name: &str, port: u16) -> Arc<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = hosts.iter().find(|h| h.name == name && h.port == port) {
            return Arc::clone(h);
        }
        let h = Arc::new(Host {
            name: name.to_owned(),
            port,
            known: Mutex::new(Known::default()),
            asking: tokio::sync::Mutex::new(()),
        });
        hosts.push(Arc::clone(&h));
        h
    }

    /// Looks `host` up and keeps what it answered (or that it failed).
    async fn ask(&self, host: &Host) -> Result<Arc<[SocketAddr]>, String> {
        let answer = (self.lookup)(host.name.clone(), host.port).await;
        let mut known = host.known.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                let addrs: Arc<[SocketAddr]> = addrs.into();
                known.addrs = Some((Arc::clone(&addrs), now + FRESH));
                known.failed = None;
                Ok(addrs)
            }
            answer => {
                let why: Arc<str> = match answer {
                    Err(e) => format!("looking up {}: {e}", host.name),
                    Ok(_) => format!("looking up {}: no addresses", host.name),
                }
                .into();
                known.failed = Some((now, Arc::clone(&why)));
                Err(why.to_string())
            }
        }
    }
}

impl Host {
    /// The addresses known, and whether they are fresh.
    fn fresh_or_stale(&self) -> (Option<Arc<[SocketAddr]>>, bool) {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        match &known.addrs {
            Some((addrs, until)) => (Some(Arc::clone(addrs)), Instant::now() < *until),
            None => (None, false),
        }
    }

    /// Why the last lookup failed, if it failed within [`FAILED`].
    fn failed_lately(&self) -> Option<Arc<str>> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .failed
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FAILED)
            .map(|(_, why)| Arc::clone(why))
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
