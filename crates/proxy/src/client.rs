//! [`UpstreamClient`]: how one HTTP worker talks to upstreams.
//!
//! Each worker owns one, so its keep-alive connections live on that worker's runtime. Attempts
//! on OpenAI-compatible keys go over keypool's own HTTP/1.1 connections ([`crate::conn`]),
//! kept in a small pool of this worker's: `TCP_NODELAY`, TLS by rustls (ring) with the
//! platform's roots, no redirects, no retries of its own except a request that never left (a
//! pooled connection the server had just closed). A connection goes back to the pool when its
//! response body has been read to the end.
//!
//! Why not a library's client: reqwest's redirect and retry layers parse the URL again for
//! every response even when both are off (~8% of keypool's CPU per request); hyper-util's pool
//! hashes its key three times per request with SipHash and boxes every checkout (~7% of the
//! instructions of a request); and hyper's own connections run a task each, reached through a
//! channel (a task wake-up each way per request, ~15 KB a connection). reqwest stays for the
//! Replicate adapter's JSON calls and for outbound proxies (`HTTPS_PROXY` & co.). HTTP/2 to
//! upstreams is not used: one HTTP/1.1 connection per concurrent attempt, as nginx does to its
//! upstreams.
//!
//! Timeouts are the engine's (per key and per phase), not the client's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;

use crate::adapter::{TransportError, UpstreamResponse, body_of};
use crate::conn::{CONNECT_WITHIN, Origin, POOL_IDLE, POOL_MAX_IDLE, Pool, Reaping, reap_idle};
use crate::resolve::Addresses;

/// One worker's upstream client.
pub struct UpstreamClient {
    /// keypool's own HTTP/1.1 pool; `None` when an outbound proxy is configured.
    pub(crate) direct: Option<Arc<Pool>>,
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
        Self::with_pool(
            use_env_proxies,
            reaping,
            Addresses::system(),
            CONNECT_WITHIN,
        )
    }

    /// [`UpstreamClient::with_reaping`] with upstream names looked up by `addresses` and new
    /// connections open within `connect_within`.
    pub(crate) fn with_pool(
        use_env_proxies: bool,
        reaping: Reaping,
        addresses: Addresses,
        connect_within: Duration,
    ) -> Self {
        let direct =
            (!use_env_proxies).then(|| Arc::new(Pool::new(reaping, addresses, connect_within)));
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
        let to = Origin {
            key: target.origin,
            tls: target.tls,
            host: target.host,
            port: target.port,
        };
        pool.send(&to, &method, &target.path_and_query, &headers, &body)
            .await
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
    /// Origin-form request target: the endpoint's path, then `path`, then `?query`; visible
    /// ASCII only (it goes into the request line as it is).
    path_and_query: String,
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
        if !target.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the request target may hold visible ASCII only"));
        }
        Ok(Self {
            origin: &endpoint[..url::Position::BeforePath],
            tls,
            host,
            port,
            path_and_query: target,
        })
    }

    /// The whole URL (for reqwest).
    fn url(&self) -> String {
        format!("{}{}", self.origin, self.path_and_query)
    }
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

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
