//! The actix-web side: turn an HTTP request into a [`RequestCtx`], run the engine, turn its
//! [`Reply`] into a response. The one place where keypool's errors become HTTP responses.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use keypool_policy::ClientAuth;
use keypool_types::{ApiError, ErrorKind};
use tokio::time::Instant;

use crate::ctx::RequestCtx;
use crate::forward::{Engine, Reply};
use crate::headers::{returns_to_client, upstream_headers};
use crate::inspect::inspect;
use keypool_types::{RequestLog, UsageSink};

use crate::capture;

/// Names the key that served a response. Never the secret.
pub const UPSTREAM_HEADER: &str = "x-keypool-upstream";

/// Per-worker state: the shared engine plus this worker's pooled upstream client.
pub struct Frontend {
    pub engine: Arc<Engine>,
    pub auth: Arc<ClientAuth>,
    pub sink: Arc<dyn UsageSink>,
    /// Pooled, keep-alive connections owned by this worker's runtime.
    pub client: reqwest::Client,
}

/// Handles every `/v1/*` request.
pub async fn proxy(
    req: HttpRequest,
    payload: web::Payload,
    fe: web::Data<Frontend>,
) -> HttpResponse {
    let started = Instant::now();
    match prepare(&req, payload, &fe, started).await {
        Ok(ctx) => respond(fe.engine.forward(&fe.client, ctx).await),
        Err(error) => error_response(&error, None),
    }
}

/// `authenticate` → read body → `inspect`: everything before the attempt loop.
async fn prepare(
    req: &HttpRequest,
    payload: web::Payload,
    fe: &Frontend,
    started: Instant,
) -> Result<RequestCtx, ApiError> {
    let caller = fe.auth.authenticate(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )?;
    let body = read_body(req, payload, fe.engine.config.max_body_bytes).await?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = req.path();
    let inspected = inspect(path, content_type, body)?;
    let upstream_path = path.strip_prefix("/v1").unwrap_or(path).to_owned();
    let query = Some(req.query_string())
        .filter(|q| !q.is_empty())
        .map(str::to_owned);
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|_| ApiError::new(ErrorKind::InvalidRequest, "Unsupported method."))?;
    let client_authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| reqwest::header::HeaderValue::from_bytes(v.as_bytes()).ok());
    let config = &fe.engine.config;
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client_ip = capture::client_ip(req.peer_addr().map(|a| a.ip()), forwarded_for, config);
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
        upstream_headers(req.headers(), fe.engine.keeps_headers),
        client_authorization,
        fe.sink.clone(),
        started,
    );
    ctx.user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    ctx.log = log;
    ctx.log_response_cap = policy.response_body.then_some(policy.max_field_bytes);
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
                b.insert_header((UPSTREAM_HEADER, key));
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
            b.insert_header((UPSTREAM_HEADER, key))
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
