//! The actix-web side: turn an HTTP request into a [`RequestCtx`], run the engine, turn its
//! [`Reply`] into a response. The one place where keypool's errors become HTTP responses.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use keypool_config::gateway::Position;
use keypool_policy::gateway::{
    Gateways, RateHeaders, body_credential, query_arg, remove_query_arg,
};
use keypool_policy::{Caller, ClientAuth};
use keypool_types::{ApiError, ErrorKind};
use tokio::time::Instant;
use tracing::Instrument;

use crate::ctx::RequestCtx;
use crate::forward::{Engine, Reply};
use crate::headers::{returns_to_client, upstream_headers};
use crate::inspect::inspect;
use keypool_types::{RequestLog, UsageSink};

use crate::capture;

/// Names the key that served a response. Never the secret.
pub const UPSTREAM_HEADER: &str = "x-keypool-upstream";

/// Per-worker state: the shared engine plus this worker's pooled upstream client.
///
/// The engine (config and pool) and the client-token check are swappable as a whole: a
/// frontend replaces them when the control plane pushes a new policy; a request keeps the one
/// it started with.
pub struct Frontend {
    pub engine: Arc<arc_swap::ArcSwap<Engine>>,
    pub auth: Arc<arc_swap::ArcSwap<ClientAuth>>,
    /// The named gateways (`/llm/api/{name}/v1/*`).
    pub gateways: Arc<Gateways>,
    pub sink: Arc<dyn UsageSink>,
    /// Pooled, keep-alive connections owned by this worker's runtime.
    pub client: crate::client::UpstreamClient,
}

impl Frontend {
    /// The engine requests start with now.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.load_full()
    }
}

/// Handles every `/v1/*` request.
pub async fn proxy(
    req: HttpRequest,
    payload: web::Payload,
    fe: web::Data<Frontend>,
) -> HttpResponse {
    let started = Instant::now();
    let span = server_span(&req);
    let policy = keypool_telemetry::trace::child(&span, "policy");
    // the engine this request keeps from start to end, loaded once
    let engine = fe.engine();
    match prepare(&req, payload, &fe, &engine, started)
        .instrument(policy)
        .await
    {
        Ok(mut ctx) => {
            ctx.span = span.clone();
            respond(engine.forward(&fe.client, ctx).instrument(span).await)
        }
        Err(error) => {
            keypool_telemetry::metrics().refusal("default", error.kind.wire().code);
            error_response(&error, None)
        }
    }
}

/// `authenticate` → read body → `inspect`: everything before the attempt loop.
async fn prepare(
    req: &HttpRequest,
    payload: web::Payload,
    fe: &Frontend,
    engine: &Engine,
    started: Instant,
) -> Result<RequestCtx, ApiError> {
    let caller = fe.auth.load().authenticate(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )?;
    let body = read_body(req, payload, engine.config.max_body_bytes).await?;
    let path = req.path();
    let inspected = inspect(path, content_type(req), body)?;
    let query = Some(req.query_string())
        .filter(|q| !q.is_empty())
        .map(str::to_owned);
    let client_ip = client_ip(req, &engine.config);
    let mut ctx = build_ctx(
        req, fe, engine, path, query, caller, client_ip, inspected, started,
    )?;
    ctx.client_authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| reqwest::header::HeaderValue::from_bytes(v.as_bytes()).ok());
    Ok(ctx)
}

/// The request's server span (none unless traces are exported).
fn server_span(req: &HttpRequest) -> tracing::Span {
    if !keypool_telemetry::trace::enabled() {
        return tracing::Span::none();
    }
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    keypool_telemetry::trace::server_span(
        req.method().as_str(),
        req.path(),
        h("traceparent"),
        h("tracestate"),
    )
}

fn content_type(req: &HttpRequest) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn client_ip(req: &HttpRequest, config: &keypool_config::Config) -> Option<std::net::IpAddr> {
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    capture::client_ip(req.peer_addr().map(|a| a.ip()), forwarded_for, config)
}

/// The context every gateway builds the same way. `path` is the OpenAI path (`/v1/...`).
#[allow(clippy::too_many_arguments)]
fn build_ctx(
    req: &HttpRequest,
    fe: &Frontend,
    engine: &Engine,
    path: &str,
    query: Option<String>,
    caller: Caller,
    client_ip: Option<std::net::IpAddr>,
    inspected: crate::inspect::Inspected,
    started: Instant,
) -> Result<RequestCtx, ApiError> {
    let upstream_path = path.strip_prefix("/v1").unwrap_or(path).to_owned();
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|_| ApiError::new(ErrorKind::InvalidRequest, "Unsupported method."))?;
    let config = &engine.config;
    let policy = &config.log;
    let log = policy.records_anything().then(|| RequestLog {
        request_headers: policy
            .headers
            .then(|| capture::headers_json(req.headers(), policy)),
        request_body: policy.request_body.then(|| {
            capture::capped(
                &String::from_utf8_lossy(&inspected.body),
                policy.max_field_bytes,
            )
        }),
        response_body: None,
    });
    let mut ctx = RequestCtx::new(
        method,
        Arc::from(path),
        upstream_path,
        query,
        caller,
        client_ip,
        inspected,
        upstream_headers(req.headers(), engine.keeps_headers),
        None,
        fe.sink.clone(),
        started,
    );
    ctx.max_attempts = config.retries.saturating_add(1);
    ctx.user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    ctx.log = log;
    ctx.log_response_cap = policy.response_body.then_some(policy.max_field_bytes);
    Ok(ctx)
}

/// Handles `/llm/api/{name}/v1/*`: the named gateway's checks, in their documented order, then
/// the same engine as `/v1/*`. Every answer after the rate limits carries `x-ratelimit-*`.
pub async fn gateway_proxy(
    req: HttpRequest,
    payload: web::Payload,
    fe: web::Data<Frontend>,
    name: &str,
    path: &str,
) -> HttpResponse {
    let started = Instant::now();
    let mut rate = None;
    let span = server_span(&req);
    let policy = keypool_telemetry::trace::child(&span, "policy");
    let engine = fe.engine();
    let mut resp =
        match prepare_gateway(&req, payload, &fe, &engine, name, path, started, &mut rate)
            .instrument(policy)
            .await
        {
            Ok(mut ctx) => {
                ctx.span = span.clone();
                respond(engine.forward(&fe.client, ctx).instrument(span).await)
            }
            Err(error) => {
                let gateway = if error.kind == ErrorKind::GatewayNotFound {
                    "unknown"
                } else {
                    name
                };
                keypool_telemetry::metrics().refusal(gateway, error.kind.wire().code);
                error_response(&error, None)
            }
        };
    if let Some(r) = rate {
        let h = resp.headers_mut();
        for (n, v) in [
            ("x-ratelimit-limit-requests", r.limit.to_string()),
            ("x-ratelimit-remaining-requests", r.remaining.to_string()),
            ("x-ratelimit-reset-requests", r.reset_text()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(n), v);
            }
        }
    }
    resp
}

#[allow(clippy::too_many_arguments)]
async fn prepare_gateway(
    req: &HttpRequest,
    payload: web::Payload,
    fe: &Frontend,
    engine: &Engine,
    name: &str,
    path: &str,
    started: Instant,
    rate: &mut Option<RateHeaders>,
) -> Result<RequestCtx, ApiError> {
    let gw = fe.gateways.get(name).ok_or_else(|| {
        ApiError::new(
            ErrorKind::GatewayNotFound,
            format!("There is no gateway named `{name}`."),
        )
    })?;
    gw.check_open(std::time::SystemTime::now())?;
    let body = read_body(req, payload, engine.config.max_body_bytes).await?;
    let ct = content_type(req);
    let spec = &gw.spec;
    let body_position = matches!(gw.position(), Some(Position::Body(_)));
    // the body as a JSON object, parsed once, when the credential is in it or it is rewritten
    let mut json: Option<serde_json::Map<String, serde_json::Value>> =
        if (body_position || spec.transforms()) && !ct.starts_with("multipart/") {
            serde_json::from_slice(&body).ok()
        } else {
            None
        };
    let mut query = req.query_string().to_owned();
    let credential = match gw.position() {
        None => None,
        Some(Position::Header(h)) => req
            .headers()
            .get(h.as_str())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        Some(Position::Arg(a)) => {
            let c = query_arg(&query, a);
            query = remove_query_arg(&query, a);
            c
        }
        Some(Position::Body(f)) => json.as_ref().and_then(|m| body_credential(m, f)),
    };
    let identity = gw.authenticate(credential.as_deref())?;
    let client_ip = client_ip(req, &engine.config);
    gw.check_lists(client_ip, credential.as_deref(), chrono::Utc::now())?;
    match gw
        .admit_everywhere(&identity, client_ip, Instant::now())
        .await
    {
        Ok(h) => *rate = h,
        Err(refused) => {
            *rate = refused.headers;
            return Err(refused.error);
        }
    }
    gw.check_quota_everywhere().await?;
    let checked_model = json.is_some();
    let body = match json.as_mut() {
        Some(map) => {
            if let Some(m) = map.get("model").and_then(serde_json::Value::as_str) {
                gw.check_model(m)?;
            }
            if let Some(Position::Body(f)) = gw.position() {
                map.remove(f.as_str());
            }
            keypool_policy::gateway::transform(spec, map);
            Bytes::from(serde_json::to_vec(map).map_err(|e| {
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("Could not encode the body: {e}"),
                )
            })?)
        }
        None => body,
    };
    let inspected = inspect(path, ct, body)?;
    if !checked_model && inspected.model != path {
        gw.check_model(&inspected.model)?;
    }
    let caller = Caller {
        token: None,
        id: identity.id,
    };
    let query = Some(query).filter(|q| !q.is_empty());
    let mut ctx = build_ctx(
        req, fe, engine, path, query, caller, client_ip, inspected, started,
    )?;
    if let Some(Position::Header(h)) = gw.position() {
        ctx.headers.0.remove(h.as_str());
        ctx.headers.1.remove(h.as_str());
    }
    if let Some(r) = spec.retries {
        ctx.max_attempts = r.saturating_add(1);
    }
    ctx.gateway = Arc::from(spec.name.as_str());
    ctx.gateway_state = Some(gw.state.clone());
    Ok(ctx)
}

/// Reads the body once, refusing more than `limit` bytes (by `Content-Length` up front, or as it
/// arrives) with 413.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::BodyTooLarge,
            format!("The request body is larger than the {limit} bytes this gateway accepts."),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                ErrorKind::InvalidRequest,
                format!("Could not read the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn copy_headers(builder: &mut HttpResponseBuilder, headers: &reqwest::header::HeaderMap) {
    for (name, value) in headers {
        if !returns_to_client(name.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            builder.append_header((n, v));
        }
    }
}

fn respond(reply: Reply) -> HttpResponse {
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
                b.insert_header((UPSTREAM_HEADER, &*key));
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
            b.insert_header((UPSTREAM_HEADER, &*key))
                .insert_header(("x-accel-buffering", "no"))
                .insert_header((header::CACHE_CONTROL, "no-cache"));
            b.streaming(Box::pin(relay.into_stream()))
        }
        Reply::Error { error, key } => error_response(&error, key.as_deref()),
    }
}

/// An OpenAI-shaped error response, with `Retry-After` when the error says when to come back.
pub fn error_response(error: &ApiError, key: Option<&str>) -> HttpResponse {
    let mut b = HttpResponse::build(status(error.status()));
    b.content_type("application/json");
    if let Some(secs) = error.retry_after_secs {
        b.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    if let Some(key) = key {
        b.insert_header((UPSTREAM_HEADER, key.to_owned()));
    }
    b.body(error.to_json())
}
