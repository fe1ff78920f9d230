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
//!
//! A host's addresses are tried in order, the next one started beside the last when that has
//! not connected within [`STAGGER`] ([`connect_first`], RFC 8305's way), and the one that
//! connected is tried first from then on ([`Addresses::connected`]): an address that does not
//! answer (IPv6 without a way out that drops rather than refuses) costs the first connection
//! 250 ms, not every connection its attempt's timeout.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a host's looked-up addresses are used before they are looked up again.
pub(crate) const FRESH: Duration = Duration::from_secs(30);
/// How long a failed lookup is answered again without asking.
pub(crate) const FAILED: Duration = Duration::from_secs(1);
/// How long a connect to one address goes alone before the next address is tried beside it
/// (RFC 8305 recommends 250 ms).
pub(crate) const STAGGER: Duration = Duration::from_millis(250);

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
    /// The addresses, the one that last connected first, and until when they are fresh.
    addrs: Option<(Arc<[SocketAddr]>, Instant)>,
    /// The address that last connected, kept first when the host is looked up again.
    connected: Option<SocketAddr>,
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
        self.change(host, port, |known| {
            if let Some((_, until)) = &mut known.addrs {
                *until = Instant::now();
            }
        });
    }

    /// `addr` of `host` connected: it is tried first from now on.
    pub(crate) fn connected(&self, host: &str, port: u16, addr: SocketAddr) {
        self.change(host, port, |known| {
            known.connected = Some(addr);
            if let Some((addrs, _)) = &mut known.addrs {
                *addrs = first(addrs, addr);
            }
        });
    }

    /// Changes what is known of `name`:`port`, if it was ever asked for.
    fn change(&self, name: &str, port: u16, change: impl FnOnce(&mut Known)) {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = hosts.iter().find(|h| h.is(name, port)) {
            change(&mut h.known.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    fn host(&self, name: &str, port: u16) -> Arc<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = hosts.iter().find(|h| h.is(name, port)) {
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
                let mut addrs: Arc<[SocketAddr]> = addrs.into();
                if let Some(connected) = known.connected {
                    addrs = first(&addrs, connected);
                }
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

/// `addrs` with `addr` first, when it is among them.
fn first(addrs: &Arc<[SocketAddr]>, addr: SocketAddr) -> Arc<[SocketAddr]> {
    if addrs.first() == Some(&addr) || !addrs.contains(&addr) {
        return Arc::clone(addrs);
    }
    std::iter::once(addr)
        .chain(addrs.iter().copied().filter(|a| *a != addr))
        .collect()
}

/// Connects to the first of `addrs` that answers: each in order, the next started beside the
/// others when `stagger` passed without a connection or at once when one failed. The last
/// failure when none connects.
pub(crate) async fn connect_first(
    addrs: &[SocketAddr],
    stagger: Duration,
) -> io::Result<TcpStream> {
    if let [addr] = addrs {
        return TcpStream::connect(*addr).await;
    }
    let mut left = addrs.iter();
    let mut racing = FuturesUnordered::new();
    let mut failed = None;
    loop {
        if let Some(&addr) = left.next() {
            racing.push(TcpStream::connect(addr));
        }
        let answered = if left.as_slice().is_empty() {
            racing.next().await
        } else {
            match tokio::time::timeout(stagger, racing.next()).await {
                Ok(answered) => answered,
                // none connected yet: the next one beside them
                Err(_) => continue,
            }
        };
        match answered {
            Some(Ok(tcp)) => return Ok(tcp),
            Some(Err(e)) => failed = Some(e),
            None => {
                return Err(failed.unwrap_or_else(|| io::Error::other("no address to connect to")));
            }
        }
    }
}

impl Host {
    fn is(&self, name: &str, port: u16) -> bool {
        self.name == name && self.port == port
    }

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
pub(crate) mod tests;
