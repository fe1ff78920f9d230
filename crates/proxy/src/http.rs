//! The actix-web side: the per-worker [`Frontend`], and the engine's [`Reply`] as an HTTP
//! response. The one place where keypool's errors become HTTP responses. Requests go through
//! [`crate::pipeline`].

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder};
use keypool_policy::gateway::Gateways;
use keypool_types::{ApiError, Surface, UsageSink};

use crate::capture;
use crate::forward::{Engine, Reply};
use crate::headers::returns_to_client;

/// Names the key that served a response. Never the secret.
pub const UPSTREAM_HEADER: &str = "x-keypool-upstream";
/// [`UPSTREAM_HEADER`] as a header name, made once (from a `&str` it is parsed and copied
/// again for every response).
const UPSTREAM_NAME: HeaderName = HeaderName::from_static(UPSTREAM_HEADER);
/// The stream headers' names likewise.
const ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Per-worker state: the shared engine plus this worker's pooled upstream client.
///
/// The engine (config and pool) is swappable as a whole: a frontend replaces it when the
/// control plane pushes a new policy; a request keeps the one it started with.
pub struct Frontend {
    pub engine: Arc<arc_swap::ArcSwap<Engine>>,
    /// Every gateway: `default` (`/v1/*`) and the named ones (`/llm/api/{name}/v1/*`).
    pub gateways: Arc<Gateways>,
    pub sink: Arc<dyn UsageSink>,
    /// Pooled, keep-alive connections owned by this worker's runtime.
    pub client: crate::client::UpstreamClient,
    /// The upstreams' model lists for `GET /v1/models`, shared by every worker.
    pub models: Arc<crate::models::ModelCatalog>,
    /// Request body bytes being received now, by every worker.
    pub receiving: Arc<crate::pipeline::Receiving>,
    /// This worker's requests holding an upstream connection, and the most its share of the
    /// open-files limit allows.
    pub inflight: Arc<crate::inflight::InFlight>,
}

impl Frontend {
    /// The engine requests start with now.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.load_full()
    }
}

pub(crate) fn client_ip(
    req: &HttpRequest,
    config: &keypool_config::Config,
) -> Option<std::net::IpAddr> {
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    capture::client_ip(req.peer_addr().map(|a| a.ip()), forwarded_for, config)
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn copy_headers(builder: &mut HttpResponseBuilder, headers: &reqwest::header::HeaderMap) {
    for (name, value) in headers {
        let n = name.as_str();
        if !returns_to_client(n)
            || (n.starts_with("retry-after")
                && !value
                    .to_str()
                    .is_ok_and(|v| crate::cooldown::relayable(n, v)))
        {
            continue;
        }
        let value = crate::headers::actix_value(value.as_bytes())
            .or_else(|| HeaderValue::from_bytes(value.as_bytes()).ok());
        if let (Some(n), Some(v)) = (client_name(name), value) {
            builder.append_header((n, v));
        }
    }
}

/// An upstream answer's header name for the client's response (reqwest's `http` and actix's
/// are two crates' types). The common names and keypool's own are constants; only the others
/// are parsed, and copied when not standard.
fn client_name(name: &reqwest::header::HeaderName) -> Option<HeaderName> {
    const COST: HeaderName = HeaderName::from_static(crate::forward::COST_HEADER);
    let name = name.as_str();
    if name == crate::forward::COST_HEADER {
        return Some(COST);
    }
    crate::headers::actix_name(name).or_else(|| HeaderName::from_bytes(name.as_bytes()).ok())
}

/// The engine's reply as an HTTP response; keypool's own errors in `surface`'s shape.
pub(crate) fn respond(reply: Reply, surface: Surface) -> HttpResponse {
    match reply {
        Reply::Whole {
            status: code,
            headers,
            body,
            key,
            ..
        } => {
            let mut b = HttpResponse::build(status(code));
            copy_headers(&mut b, &headers);
            if let Some(key) = key {
                b.insert_header((UPSTREAM_NAME, &*key));
            }
            b.body(body)
        }
        Reply::Stream {
            status: code,
            headers,
            relay,
            key,
        } => {
            let mut b = HttpResponse::build(status(code));
            copy_headers(&mut b, &headers);
            b.insert_header((UPSTREAM_NAME, &*key))
                .insert_header((ACCEL_BUFFERING, HeaderValue::from_static("no")))
                .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")));
            b.streaming(Box::pin(relay.into_stream()))
        }
        Reply::Error { error, key } => error_response_for(&error, key.as_deref(), surface),
    }
}

/// An OpenAI-shaped error response, with `Retry-After` when the error says when to come back.
pub fn error_response(error: &ApiError, key: Option<&str>) -> HttpResponse {
    error_response_for(error, key, Surface::OpenAi)
}

/// An error response in `surface`'s shape (OpenAI's or Anthropic's), with `Retry-After` when
/// the error says when to come back.
pub fn error_response_for(error: &ApiError, key: Option<&str>, surface: Surface) -> HttpResponse {
    let mut b = HttpResponse::build(status(error.status()));
    b.content_type("application/json");
    if let Some(secs) = error.retry_after_secs {
        b.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    if let Some(key) = key {
        b.insert_header((UPSTREAM_NAME, key));
    }
    b.body(error.to_json_for(surface))
}
