//! [`UpstreamClient`]: how one HTTP worker talks to upstreams.
//!
//! Each worker owns one, so its keep-alive connections live on that worker's runtime (no
//! cross-thread wakeups per request). Attempts on OpenAI-compatible keys go over hyper's HTTP/1.1
//! connections kept in a small pool of this worker's ([`Pool`]): `TCP_NODELAY`, TLS by rustls
//! (ring) with the platform's roots, no redirects, no retries of its own except a request that
//! never left (a pooled connection the server had just closed). A connection goes back to the
//! pool when its response body has been read to the end.
//!
//! Why not a library's client: reqwest's redirect and retry layers parse the URL again for
//! every response even when both are off (~8% of keypool's CPU per request), and hyper-util's
//! pool hashes its key three times per request with SipHash and boxes every checkout (~7% of
//! the instructions of a request). reqwest stays for the Replicate adapter's JSON calls and for
//! outbound proxies (`HTTPS_PROXY` & co.). HTTP/2 to upstreams is not used: one HTTP/1.1
//! connection per concurrent attempt, as nginx does to its upstreams.
//!
//! Timeouts are the engine's (per key and per phase), not the client's.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http_body_util::{BodyDataStream, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

use crate::adapter::{TransportError, UpstreamResponse, body_of};

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream origin.
const POOL_MAX_IDLE: usize = 1024;
/// The most recently used idle connections per origin that wait the whole [`POOL_IDLE`]; the
/// others are a burst's surplus ([`Reaping`]).
const POOL_WARM: usize = 64;
/// How long a surplus idle connection waits before it is closed.
const SPARE_IDLE: Duration = Duration::from_secs(10);
/// How often a worker's pool closes what has waited too long.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// When a worker's idle connections are closed. A burst opens one connection per concurrent
/// attempt, and each holds ~35 KB (hyper's buffers and request channel, its task) for as long
/// as it waits: the `warm` most recently used wait up to [`POOL_IDLE`], as many as steady
/// traffic keeps busy; the rest are closed once idle `spare_idle`, so the memory of 2,000
/// connections opened for a burst goes back within seconds (not after 90 s).
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

/// One worker's upstream client.
pub struct UpstreamClient {
    /// keypool's own HTTP/1.1 pool; `None` when an outbound proxy is configured.
    direct: Option<Arc<Pool>>,
    /// reqwest: the Replicate adapter, and every attempt when a proxy is configured.
    reqwest: reqwest::Client,
}

impl UpstreamClient {
    /// A client; `use_env_proxies` when `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` is set
    /// (then every attempt goes through reqwest, which honours them and `NO_PROXY`).
    pub fn new(use_env_proxies: bool) -> Self {
        Self::with_reaping(use_env_proxies, Reaping::default())
    }

    /// [`UpstreamClient::new`] with its own idle-connection policy. Called on a worker (or in
    /// a runtime), the pool's reaper runs there; elsewhere idle connections are only checked
    /// when taken.
    pub(crate) fn with_reaping(use_env_proxies: bool, reaping: Reaping) -> Self {
        let direct = (!use_env_proxies).then(|| Arc::new(Pool::new(reaping)));
        if let Some(pool) = &direct {
            reap_idle(Arc::downgrade(pool));
        }
        Self {
            direct,
            reqwest: reqwest_client(use_env_proxies),
        }
    }

    /// The reqwest client (Replicate's predictions API).
    pub(crate) fn reqwest(&self) -> &reqwest::Client {
        &self.reqwest
    }

    /// Sends one request to `target`; resolves when the response head arrived.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        target: &Target<'_>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let Some(pool) = &self.direct else {
            let resp = self
                .reqwest
                .request(method, target.url())
                .headers(headers)
                .body(body)
                .send()
                .await
                .map_err(|e| TransportError::from_reqwest(&e))?;
            return Ok(UpstreamResponse {
                status: resp.status().as_u16(),
                headers: resp.headers().clone(),
                body: body_of(resp),
            });
        };
        let mut req = hyper::Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = target.path_and_query.clone();
        *req.headers_mut() = headers;
        pool.send(target, req).await
    }
}

/// Where a request goes: the origin of a key's endpoint (parsed once, at load) and the request
/// target under the endpoint's path.
pub(crate) struct Target<'a> {
    /// `scheme://host[:port]` as the endpoint spells it: the pool's key.
    origin: &'a str,
    tls: bool,
    host: &'a str,
    port: u16,
    /// Origin-form request target: the endpoint's path, then `path`, then `?query`.
    path_and_query: hyper::Uri,
}

impl<'a> Target<'a> {
    pub(crate) fn new(
        endpoint: &'a url::Url,
        path: &str,
        query: Option<&str>,
    ) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::Connect(format!("invalid upstream URL: {why}"));
        let tls = match endpoint.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = endpoint.host_str().ok_or_else(|| bad("no host"))?;
        let port = endpoint
            .port_or_known_default()
            .ok_or_else(|| bad("no port"))?;
        let base = endpoint.path().trim_end_matches('/');
        let mut target =
            String::with_capacity(1 + base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        target.push_str(base);
        target.push_str(path);
        if target.is_empty() {
            target.push('/');
        }
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        Ok(Self {
            origin: &endpoint[..url::Position::BeforePath],
            tls,
            host,
            port,
            path_and_query: hyper::Uri::try_from(target).map_err(|e| bad(&e.to_string()))?,
        })
    }

    /// The whole URL (for reqwest).
    fn url(&self) -> String {
        format!("{}{}", self.origin, self.path_and_query)
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// A connection waiting for its next request.
struct Idle {
    sender: Sender,
    since: Instant,
}

/// A worker's idle connections by origin (a handful of origins: a list, no hashing; an
/// origin keeps its slot for the worker's life).
struct Pool {
    /// Per origin, its idle connections, the most recently returned last.
    idle: Mutex<Vec<(String, Vec<Idle>)>>,
    /// TLS for `https://` upstreams; the reason when it could not be set up.
    tls: Result<tokio_rustls::TlsConnector, rustls::Error>,
    reaping: Reaping,
}

impl Pool {
    fn new(reaping: Reaping) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            tls: tls_connector(),
            reaping,
        }
    }

    /// Closes the idle connections that are closed already, idle [`POOL_IDLE`], or beyond the
    /// `warm` most recent and idle `spare_idle`; answers how many are left.
    fn reap(&self) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut left = 0;
        for (_, list) in idle.iter_mut() {
            let spare = list.len().saturating_sub(self.reaping.warm);
            let mut i = 0;
            list.retain(|c| {
                let waited = c.since.elapsed();
                let keep = !c.sender.is_closed()
                    && waited < POOL_IDLE
                    && (i >= spare || waited < self.reaping.spare_idle);
                i += 1;
                keep
            });
            left += list.len();
        }
        left
    }

    /// Idle connections, all origins together.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.iter().map(|(_, l)| l.len()).sum()
    }

    /// `origin`'s slot, and an idle connection to it that is still open, if any.
    fn checkout(&self, origin: &str) -> (usize, Option<Sender>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = if let Some(slot) = idle.iter().position(|(o, _)| o == origin) {
            slot
        } else {
            idle.push((origin.to_owned(), Vec::new()));
            idle.len() - 1
        };
        let list = &mut idle[slot].1;
        while let Some(c) = list.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < POOL_IDLE {
                return (slot, Some(c.sender));
            }
        }
        (slot, None)
    }

    /// Puts a connection whose last response was read to the end back into its slot.
    fn checkin(&self, slot: usize, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = &mut idle[slot].1;
        if list.len() < POOL_MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Sends `req` on a pooled connection to `target`, or a new one. A request that never left
    /// a pooled connection (the server had just closed it) is sent once more on a new one. A
    /// request that was written is never sent again, even when the close raced the reuse: an
    /// upstream that read it and closed looks the same from here (the engine's failover
    /// decides). A connection seen closed while idle is not reused at all.
    async fn send(
        self: &Arc<Self>,
        target: &Target<'_>,
        mut req: hyper::Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, TransportError> {
        loop {
            let (slot, (mut sender, pooled)) = match self.checkout(target.origin) {
                (slot, Some(s)) => (slot, (s, true)),
                // boxed: a new connection's future (TLS included) is ~3.5 KB, and inline it
                // would make every attempt's future that much larger, pooled or not
                (slot, None) => (slot, (Box::pin(self.connect(target)).await?, false)),
            };
            if sender.ready().await.is_err() {
                if pooled {
                    continue;
                }
                return Err(TransportError::Connect(
                    "the upstream closed the new connection".into(),
                ));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    let body = PooledBody {
                        body: BodyDataStream::new(body),
                        back: Some((self.clone(), slot, sender)),
                    };
                    return Ok(UpstreamResponse {
                        status: head.status.as_u16(),
                        headers: head.headers,
                        body: Box::pin(body),
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(TransportError::Broken(error_text(e.error()))),
                },
            }
        }
    }

    /// A new HTTP/1.1 connection (TLS for `https://`), driven by a task on this worker.
    async fn connect(&self, target: &Target<'_>) -> Result<Sender, TransportError> {
        let connect = |e: &dyn std::fmt::Display| TransportError::Connect(e.to_string());
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host, target.port))
            .await
            .map_err(|e| connect(&e))?;
        tcp.set_nodelay(true).map_err(|e| connect(&e))?;
        if target.tls {
            let tls = self.tls.as_ref().map_err(|e| connect(e))?;
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| connect(&e))?;
            handshake(tls.connect(name, tcp).await.map_err(|e| connect(&e))?).await
        } else {
            handshake(tcp).await
        }
    }
}

/// HTTP/1.1 on a connected stream; its connection task runs beside the requests ([`drive`]).
async fn handshake<IO>(io: IO) -> Result<Sender, TransportError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| TransportError::Connect(error_text(&e)))?;
    drive(conn);
    Ok(sender)
}

/// Runs a connection's task beside the requests that use it: on an actix worker, in the
/// worker's local task set (the handler and the connection then take turns in one scheduler;
/// measured ~10 µs less upstream time per request at one connection than a runtime task);
/// elsewhere, as a runtime task.
fn drive<F>(conn: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    if actix_rt::Arbiter::try_current().is_some() {
        tokio::task::spawn_local(conn);
    } else {
        tokio::spawn(conn);
    }
}

/// Runs `pool`'s reaper every `reaping.every` on this worker (or runtime) until the pool is
/// dropped; not at all outside a runtime.
fn reap_idle(pool: std::sync::Weak<Pool>) {
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

/// A response body that returns its connection to the pool once read to the end (a body
/// dropped early, or broken, closes the connection instead).
struct PooledBody {
    body: BodyDataStream<Incoming>,
    back: Option<(Arc<Pool>, usize, Sender)>,
}

impl Stream for PooledBody {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.body).poll_next(cx) {
            Poll::Ready(None) => {
                if let Some((pool, slot, sender)) = self.back.take() {
                    pool.checkin(slot, sender);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.back = None;
                Poll::Ready(Some(Err(TransportError::Broken(error_text(&e)))))
            }
            other => other.map(|o| o.map(|r| r.map_err(|e| TransportError::Broken(e.to_string())))),
        }
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

/// The reqwest client: no redirects (a 3xx is the client's to follow) and no retries (failover
/// is keypool's).
fn reqwest_client(use_env_proxies: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder();
    // proxy matching parses every request's URL again: skipped when no proxy is set
    let builder = if use_env_proxies {
        builder
    } else {
        builder.no_proxy()
    };
    builder
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never())
        .tcp_nodelay(true)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .pool_idle_timeout(POOL_IDLE)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// A hyper error's innermost cause. Its text never includes request headers.
fn error_text(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    text
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
