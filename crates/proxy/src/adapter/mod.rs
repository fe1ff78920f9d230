//! Upstream adapters: one trait, one file per provider.
//!
//! An adapter turns one attempt into a request to its provider and hands back the answer in
//! OpenAI's wire format (status, headers, body bytes or SSE), so the forwarding engine never asks
//! which provider it is talking to. `openai` forwards as-is; `anthropic` forwards Messages
//! requests as they are, with Anthropic's key header; `azure` forwards OpenAI requests under the
//! model's deployment with Azure's key header; `replicate` translates to and from Replicate
//! predictions.

mod anthropic;
mod azure;
mod openai;
mod replicate;
pub mod translate;

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use keypool_config::{UpstreamKey, UpstreamKind};
use reqwest::header::HeaderMap;

pub use anthropic::AnthropicAdapter;
pub use azure::AzureAdapter;
pub use openai::OpenAiAdapter;

use crate::client::UpstreamClient;
pub use replicate::ReplicateAdapter;

/// A response body as it arrives.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, TransportError>> + Send>>;

/// One attempt, as the engine asks an adapter to send it.
pub struct AttemptRequest<'a> {
    pub method: reqwest::Method,
    /// Path after the `/v1` prefix: `/chat/completions`.
    pub path: &'a str,
    /// The request's model (Azure sends it to the model's deployment).
    pub model: &'a str,
    /// The client's query string, if any.
    pub query: Option<&'a str>,
    /// Client headers already filtered for forwarding (never the client's credentials).
    pub headers: &'a HeaderMap,
    /// The client's own `Authorization` value, for `sk: asis` keys only.
    pub client_authorization: Option<&'a reqwest::header::HeaderValue>,
    pub body: Bytes,
}

/// The upstream's answer, head first; the body streams.
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: BodyStream,
}

/// A failure below HTTP: the attempt got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream connection failed: {0}")]
    Broken(String),
    /// A kept-alive connection the upstream closed as it was reused, before any byte of an
    /// answer: the attempt fails over like [`Self::Broken`], the key is not blamed.
    #[error("the upstream connection failed: {0}")]
    Stale(String),
}

impl TransportError {
    pub(crate) fn from_reqwest(e: &reqwest::Error) -> Self {
        // the message of a reqwest error never includes request headers, so no secret leaks here
        let text = std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string);
        if e.is_connect() {
            Self::Connect(text)
        } else {
            Self::Broken(text)
        }
    }
}

/// The headers of a request to `key`'s endpoint: the client's (already filtered), the
/// endpoint's `Host` (HTTP/1.1 wants one; the origin-form request target carries none), and the
/// key's credential: the client's own `Authorization` for `sk: asis` keys, else `name` with
/// `prefix` and the secret, marked sensitive.
pub(crate) fn upstream_headers(
    key: &UpstreamKey,
    req: &AttemptRequest<'_>,
    name: reqwest::header::HeaderName,
    prefix: &str,
) -> Result<HeaderMap, TransportError> {
    use reqwest::header::{AUTHORIZATION, HOST, HeaderValue};
    // the client's, with room for the two added (a clone at its capacity would grow)
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
    for (name, value) in req.headers {
        headers.append(name.clone(), value.clone());
    }
    let authority = &key.endpoint_url[url::Position::BeforeHost..url::Position::AfterPort];
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(HOST, host);
    }
    if key.passthrough_auth {
        if let Some(v) = req.client_authorization {
            headers.insert(AUTHORIZATION, v.clone());
        }
        return Ok(headers);
    }
    let mut secret = String::with_capacity(prefix.len() + key.sk.expose().len());
    secret.push_str(prefix);
    secret.push_str(key.sk.expose());
    let mut value = HeaderValue::from_str(&secret)
        .map_err(|_| TransportError::Connect("the key is not a valid header value".into()))?;
    value.set_sensitive(true);
    headers.insert(name, value);
    Ok(headers)
}

/// A reqwest response body as a [`BodyStream`].
pub(crate) fn body_of(resp: reqwest::Response) -> BodyStream {
    use futures::TryStreamExt;
    Box::pin(
        resp.bytes_stream()
            .map_err(|e| TransportError::from_reqwest(&e)),
    )
}

/// Sends attempts to one kind of provider.
pub trait UpstreamAdapter: Send + Sync {
    /// Sends `req` to `key`'s endpoint. Resolves when the response head arrived; the caller
    /// bounds it with the key's timeout. `Err` means no HTTP answer at all.
    fn send<'a>(
        &'a self,
        client: &'a UpstreamClient,
        key: &'a UpstreamKey,
        req: AttemptRequest<'a>,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>>;
}

/// The adapter for each provider.
pub struct Adapters {
    openai: OpenAiAdapter,
    anthropic: AnthropicAdapter,
    azure: AzureAdapter,
    replicate: ReplicateAdapter,
}

impl Adapters {
    pub fn new() -> Self {
        Self {
            openai: OpenAiAdapter,
            anthropic: AnthropicAdapter,
            azure: AzureAdapter,
            replicate: ReplicateAdapter,
        }
    }

    pub fn for_kind(&self, kind: UpstreamKind) -> &dyn UpstreamAdapter {
        match kind {
            UpstreamKind::OpenAi => &self.openai,
            UpstreamKind::Anthropic => &self.anthropic,
            UpstreamKind::Azure => &self.azure,
            UpstreamKind::Replicate => &self.replicate,
        }
    }
}

impl Default for Adapters {
    fn default() -> Self {
        Self::new()
    }
}
