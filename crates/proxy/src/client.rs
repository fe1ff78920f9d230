//! [`UpstreamClient`]: how one HTTP worker talks to upstreams.
//!
//! Each worker owns one, so its pooled keep-alive connections live on that worker's runtime
//! (no cross-thread wakeups per request). Attempts on OpenAI-compatible keys go straight to
//! hyper's pooled client: `TCP_NODELAY`, TLS by rustls (ring) with the platform's roots,
//! HTTP/2 where the server offers it by ALPN, no redirects, no retries of its own except a
//! request that never left (a pooled connection the server had just closed). reqwest stays for
//! the Replicate adapter's JSON calls and for outbound proxies (`HTTPS_PROXY` & co.): its
//! redirect and retry layers parse the URL again for every response even when both are off,
//! which was ~8% of keypool's CPU per proxied request.
//!
//! Timeouts are the engine's (per key and per phase), not the client's.

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyDataStream, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::header::HeaderMap;

use crate::adapter::{BodyStream, TransportError, UpstreamResponse, body_of};

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
const POOL_MAX_IDLE: usize = 1024;

type Direct = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One worker's upstream client.
pub struct UpstreamClient {
    /// hyper's pooled client; `None` when an outbound proxy is configured.
    direct: Option<Direct>,
    /// reqwest: the Replicate adapter, and every attempt when a proxy is configured.
    reqwest: reqwest::Client,
}

impl UpstreamClient {
    /// A client; `use_env_proxies` when `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` is set
    /// (then every attempt goes through reqwest, which honours them and `NO_PROXY`).
    pub fn new(use_env_proxies: bool) -> Self {
        Self {
            direct: if use_env_proxies { None } else { direct() },
            reqwest: reqwest_client(use_env_proxies),
        }
    }

    /// The reqwest client (Replicate's predictions API).
    pub(crate) fn reqwest(&self) -> &reqwest::Client {
        &self.reqwest
    }

    /// Sends one request; resolves when the response head arrived.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let Some(direct) = &self.direct else {
            let resp = self
                .reqwest
                .request(method, url)
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
        let uri = hyper::Uri::try_from(url)
            .map_err(|e| TransportError::Connect(format!("invalid upstream URL: {e}")))?;
        let mut req = hyper::Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let resp = direct.request(req).await.map_err(|e| hyper_error(&e))?;
        let (head, body) = resp.into_parts();
        let body: BodyStream =
            Box::pin(BodyDataStream::new(body).map_err(|e| TransportError::Broken(e.to_string())));
        Ok(UpstreamResponse {
            status: head.status.as_u16(),
            headers: head.headers,
            body,
        })
    }
}

/// hyper's client; `None` (reqwest is used instead) if TLS cannot be set up.
fn direct() -> Option<Direct> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false); // https:// is the TLS layer's
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let https = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_platform_verifier(provider)
    {
        Ok(b) => b.https_or_http().enable_all_versions().wrap_connector(http),
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up TLS for upstreams; using reqwest");
            return None;
        }
    };
    Some(
        Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(https),
    )
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

/// A hyper client error as a transport failure. Its text never includes request headers.
fn hyper_error(e: &hyper_util::client::legacy::Error) -> TransportError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    if e.is_connect() {
        TransportError::Connect(text)
    } else {
        TransportError::Broken(text)
    }
}
