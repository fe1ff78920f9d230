//! keypool's HTTP/1.1 connections to upstreams and a worker's pool of them.
//!
//! A connection is driven by the request that uses it: the attempt's own future writes the
//! request and reads the response head, and the response body's stream reads the rest. No
//! task per connection and no channel between the request and its connection (hyper's client
//! had both: a task wake-up each way per request, and ~15 KB a connection for the channel).
//! An idle connection sits in its worker's [`Pool`] with nothing watching it; whether the
//! upstream closed it meanwhile is asked when it is taken ([`Io::is_open`]) and by the reaper.
//!
//! Memory while a stream waits for its next event: no read buffer of keypool's (room is made
//! once the socket is readable, over TLS once rustls has nothing decrypted left either); over
//! TLS rustls's own state (its 4 KB record buffer, the keys).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::Method;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::adapter::{TransportError, UpstreamResponse};
use crate::h1::{self, Chunked, Framing, Head};
use crate::resolve::{self, Addresses};

mod body;
use body::{Body, State};

/// Idle pooled connections are closed after this long.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream origin.
pub(crate) const POOL_MAX_IDLE: usize = 1024;
/// The most recently used idle connections per origin that wait the whole [`POOL_IDLE`]; the
/// others are a burst's surplus ([`Reaping`]).
const POOL_WARM: usize = 64;
/// How long a surplus idle connection waits before it is closed.
const SPARE_IDLE: Duration = Duration::from_secs(10);
/// How long a new upstream connection may take to open (lookup, TCP and TLS): a host that
/// does not answer fails the attempt over in seconds, not after the attempt's `timeout`.
pub(crate) const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// How often a worker's pool closes what has waited too long.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Room made for a read: most answers and every stream event fit in one.
const READ_SIZE: usize = 8 * 1024;
/// Bytes left over after a piece of body is handed out, up to this many, are moved out of the
/// read's allocation ([`Body::let_go`]).
const KEEP_SMALL: usize = 512;
/// A request body up to this size is written in one buffer with its head (one copy, one
/// write); a larger one is written from where it is, after the head.
const INLINE_BODY: usize = 16 * 1024;

/// When a worker's idle connections are closed. A burst opens one connection per concurrent
/// attempt: the `warm` most recently used wait up to [`POOL_IDLE`], as many as steady traffic
/// keeps busy; the rest are closed once idle `spare_idle`, so the sockets (and, over TLS,
/// rustls's buffers) of 2,000 connections opened for a burst go back within seconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reaping {
    pub(crate) warm: usize,
    pub(crate) spare_idle: Duration,
    pub(crate) every: Duration,
}

impl Default for Reaping {
    fn default() -> Self {
        Self {
            warm: POOL_WARM,
            spare_idle: SPARE_IDLE,
            every: REAP_EVERY,
        }
    }
}

/// A connected stream to an upstream.
pub(crate) enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    /// Reads what has arrived onto `buf`'s end (`Ok(0)`: the upstream closed). On plain TCP
    /// the room is made only once the socket is readable, so a stream waiting for its next
    /// event holds no buffer; and a read shorter than its room clears the socket's readiness
    /// (tokio's `poll_read` does), which [`Io::is_open`] relies on.
    fn poll_fill(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        let make_room = |buf: &mut BytesMut| {
            if buf.capacity() - buf.len() < READ_SIZE / 4 {
                buf.reserve(READ_SIZE);
            }
        };
        match self {
            Self::Tcp(tcp) => {
                ready!(tcp.poll_read_ready(cx))?;
                make_room(buf);
                tokio_util::io::poll_read_buf(Pin::new(tcp), cx, buf)
            }
            Self::Tls(tls) => {
                let (tcp, conn) = tls.get_mut();
                // nothing decrypted waits in rustls (a read decrypts every whole record it
                // brings): wait for the socket before making room
                let drained = matches!(conn.reader().into_first_chunk(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock);
                if drained {
                    ready!(tcp.poll_read_ready(cx))?;
                }
                make_room(buf);
                tokio_util::io::poll_read_buf(Pin::new(tls.as_mut()), cx, buf)
            }
        }
    }

    /// Whether an idle connection can take a request: nothing has arrived on it since its last
    /// answer (neither the upstream's close nor stray bytes). Does not wait, and on plain TCP
    /// usually makes no system call: the socket's readiness says that nothing arrived (the
    /// answer's last read drained the socket and cleared it; a close would have set it, and
    /// tokio keeps a close's readiness until the socket is dropped).
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        match self {
            Self::Tcp(tcp) => {
                let nothing_arrived = std::pin::pin!(tcp.ready(Interest::READABLE))
                    .poll(&mut cx)
                    .is_pending();
                // readiness left from a read that filled its room: ask the socket
                nothing_arrived
                    || matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Self::Tls(tls) => {
                // through rustls, which handles what TLS sends by itself (session tickets)
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(tls.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    /// Writes `head` then `body`, and flushes.
    async fn write(&mut self, head: &[u8], body: &[u8]) -> io::Result<()> {
        async fn both<W: AsyncWrite + Unpin>(
            w: &mut W,
            head: &[u8],
            body: &[u8],
        ) -> io::Result<()> {
            w.write_all(head).await?;
            if !body.is_empty() {
                w.write_all(body).await?;
            }
            w.flush().await
        }
        match self {
            Self::Tcp(tcp) => both(tcp, head, body).await,
            Self::Tls(tls) => both(tls.as_mut(), head, body).await,
        }
    }
}

/// Why an exchange failed.
enum Failure {
    /// The request did not reach the upstream whole (its write failed): it may be sent again.
    Unsent,
    /// The upstream closed the connection after the request was written, before any byte of
    /// an answer. The request may have reached it: it is never sent again.
    Closed,
    /// The request may have reached the upstream: it is never sent again.
    Failed(TransportError),
}

/// Sends one request on `io`: `head` (with a small body inline) then `body`; resolves once the
/// response head has arrived, with the bytes read past it.
async fn exchange(
    io: &mut Io,
    head: &[u8],
    body: &[u8],
    method: &Method,
) -> Result<(Head, BytesMut), Failure> {
    if io.write(head, body).await.is_err() {
        return Err(Failure::Unsent);
    }
    let mut buf = BytesMut::new();
    loop {
        if !buf.is_empty()
            && let Some(head) = h1::parse_head(&mut buf, method).map_err(Failure::Failed)?
        {
            return Ok((head, buf));
        }
        match std::future::poll_fn(|cx| io.poll_fill(cx, &mut buf)).await {
            Ok(0) if buf.is_empty() => return Err(Failure::Closed),
            Ok(0) => {
                return Err(Failure::Failed(TransportError::Broken(
                    "the upstream closed the connection in the middle of its answer's head".into(),
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::Failed(TransportError::Broken(e.to_string()))),
        }
    }
}

/// A connection waiting for its next request.
struct Idle {
    io: Io,
    since: Instant,
}

/// A worker's idle connections by origin (a handful of origins: a list, no hashing; an
/// origin keeps its slot for the worker's life).
pub(crate) struct Pool {
    /// Per origin, its idle connections, the most recently returned last.
    idle: Mutex<Vec<(String, Vec<Idle>)>>,
    /// TLS for `https://` upstreams; the reason when it could not be set up.
    tls: Result<tokio_rustls::TlsConnector, rustls::Error>,
    /// The upstream hosts' addresses, looked up once and kept a while.
    pub(crate) addresses: Addresses,
    /// How long a new connection may take to open ([`CONNECT_WITHIN`]).
    connect_within: Duration,
    pub(crate) reaping: Reaping,
}

impl Pool {
    pub(crate) fn new(reaping: Reaping, addresses: Addresses, connect_within: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            tls: tls_connector(),
            addresses,
            connect_within,
            reaping,
        }
    }

    /// Closes the idle connections that are closed already, idle [`POOL_IDLE`], or beyond the
    /// `warm` most recent and idle `spare_idle`; answers how many are left.
    pub(crate) fn reap(&self) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut left = 0;
        for (_, list) in idle.iter_mut() {
            let spare = list.len().saturating_sub(self.reaping.warm);
            let mut i = 0;
            list.retain_mut(|c| {
                let waited = c.since.elapsed();
                let keep = waited < POOL_IDLE
                    && (i >= spare || waited < self.reaping.spare_idle)
                    && c.io.is_open();
                i += 1;
                keep
            });
            left += list.len();
        }
        left
    }

    /// Idle connections, all origins together.
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.iter().map(|(_, l)| l.len()).sum()
    }

    /// `origin`'s slot, and an idle connection to it that is still open, if any.
    fn checkout(&self, origin: &str) -> (usize, Option<Io>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = if let Some(slot) = idle.iter().position(|(o, _)| o == origin) {
            slot
        } else {
            idle.push((origin.to_owned(), Vec::new()));
            idle.len() - 1
        };
        let list = &mut idle[slot].1;
        while let Some(mut c) = list.pop() {
            if c.since.elapsed() < POOL_IDLE && c.io.is_open() {
                return (slot, Some(c.io));
            }
        }
        (slot, None)
    }

    /// Puts a connection whose last response was read to the end back into its slot.
    fn checkin(&self, slot: usize, io: Io) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = &mut idle[slot].1;
        if list.len() < POOL_MAX_IDLE {
            list.push(Idle {
                io,
                since: Instant::now(),
            });
        }
    }

    /// Sends a request to `origin` (`host`:`port`, TLS or not) on a pooled connection, or a
    /// new one. A request that never left a pooled connection (its write failed: the
    /// upstream had closed it) is sent once more on another. A request that was written is
    /// never sent again, even when a close raced the reuse: an upstream that read it and
    /// closed looks the same from here (the engine's failover decides; a pooled connection
    /// closed before any byte of an answer is [`TransportError::Stale`], not held against
    /// the key).
    pub(crate) async fn send(
        self: &Arc<Self>,
        to: &Origin<'_>,
        method: &Method,
        target: &str,
        headers: &reqwest::header::HeaderMap,
        body: &Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let head = h1::encode_request(method, target, headers, body, INLINE_BODY);
        let rest: &[u8] = if body.len() <= INLINE_BODY { &[] } else { body };
        loop {
            let (slot, (mut io, pooled)) = match self.checkout(to.key) {
                (slot, Some(io)) => (slot, (io, true)),
                // boxed: a new connection's future (TLS included) is ~3.5 KB, and inline it
                // would make every attempt's future that much larger, pooled or not
                (slot, None) => (slot, (Box::pin(self.connect(to)).await?, false)),
            };
            match exchange(&mut io, &head, rest, method).await {
                Ok((head, buf)) => {
                    let state = match head.framing {
                        Framing::Empty => State::Length(0),
                        Framing::Length(n) => State::Length(n),
                        Framing::Chunked => State::Chunked(Chunked::Size),
                        Framing::Close => State::Close,
                    };
                    let body = Body {
                        io: Some(io),
                        buf,
                        state,
                        back: head.keep_alive.then(|| (self.clone(), slot)),
                    };
                    return Ok(UpstreamResponse {
                        status: head.status,
                        headers: head.headers,
                        body: Box::pin(body),
                    });
                }
                Err(Failure::Unsent) if pooled => {}
                Err(Failure::Unsent) => {
                    return Err(TransportError::Broken(
                        "the upstream closed the new connection".into(),
                    ));
                }
                // the upstream's idle timeout crossed the reuse (its close was on the way, or
                // not yet seen by this busy worker): not the key's fault
                Err(Failure::Closed) if pooled => {
                    return Err(TransportError::Stale(
                        "the upstream closed a kept-alive connection as it was reused".into(),
                    ));
                }
                Err(Failure::Closed) => {
                    return Err(TransportError::Broken(
                        "the upstream closed the connection without answering".into(),
                    ));
                }
                Err(Failure::Failed(e)) => return Err(e),
            }
        }
    }

    /// A new connection (TLS for `https://`), `TCP_NODELAY`, to the first of the host's kept
    /// addresses that answers (`resolve`: when none does, the host is looked up again next
    /// time; the one that did is tried first from then on), open within `connect_within`
    /// (the lookup, TCP and TLS together): past it the attempt fails as a connect error and
    /// fails over, whatever its own timeout.
    async fn connect(&self, to: &Origin<'_>) -> Result<Io, TransportError> {
        let Ok(opened) = tokio::time::timeout(self.connect_within, self.open(to)).await else {
            let host = to.host.trim_start_matches('[').trim_end_matches(']');
            self.addresses.forget(host, to.port);
            return Err(TransportError::Connect(format!(
                "no connection within {} ms",
                self.connect_within.as_millis()
            )));
        };
        opened
    }

    async fn open(&self, to: &Origin<'_>) -> Result<Io, TransportError> {
        let connect = |e: &dyn std::fmt::Display| TransportError::Connect(e.to_string());
        let host = to.host.trim_start_matches('[').trim_end_matches(']');
        let addrs = self
            .addresses
            .of(host, to.port)
            .await
            .map_err(TransportError::Connect)?;
        let tcp = match resolve::connect_first(&addrs, resolve::STAGGER).await {
            Ok(tcp) => tcp,
            Err(e) => {
                self.addresses.forget(host, to.port);
                return Err(connect(&e));
            }
        };
        if let Ok(peer) = tcp.peer_addr()
            && addrs.first() != Some(&peer)
        {
            self.addresses.connected(host, to.port, peer);
        }
        tcp.set_nodelay(true).map_err(|e| connect(&e))?;
        if !to.tls {
            return Ok(Io::Tcp(tcp));
        }
        let tls = self.tls.as_ref().map_err(|e| connect(e))?;
        let name =
            rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| connect(&e))?;
        let stream = tls.connect(name, tcp).await.map_err(|e| connect(&e))?;
        Ok(Io::Tls(Box::new(stream)))
    }
}

/// Where a pooled request goes.
pub(crate) struct Origin<'a> {
    /// `scheme://host[:port]`: the pool's key.
    pub(crate) key: &'a str,
    pub(crate) tls: bool,
    pub(crate) host: &'a str,
    pub(crate) port: u16,
}

/// Runs `pool`'s reaper every `reaping.every` on this worker (or runtime) until the pool is
/// dropped; not at all outside a runtime.
pub(crate) fn reap_idle(pool: std::sync::Weak<Pool>) {
    let Some(every) = pool.upgrade().map(|p| p.reaping.every) else {
        return;
    };
    let reaper = async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            pool.reap();
        }
    };
    if actix_rt::Arbiter::try_current().is_some() {
        tokio::task::spawn_local(reaper);
    } else if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(reaper);
    }
}

/// rustls with ring and the platform's roots, HTTP/1.1 by ALPN.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(BuilderVerifierExt::with_platform_verifier)
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot set up TLS for https:// upstreams");
            e
        })?
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests;
