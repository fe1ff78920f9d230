//! `build ctx`: the request's [`RequestCtx`], the same for every gateway, from what the phases
//! before it established.

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header;
use keypool_policy::gateway::GatewayRuntime;
use keypool_types::{ApiError, ErrorKind, RequestLog};
use tokio::time::Instant;

use super::authenticate::Authenticated;
use crate::capture;
use crate::ctx::{NewRequest, RequestCtx};
use crate::forward::Engine;
use crate::headers::upstream_headers;
use crate::http::Frontend;
use crate::inspect::Inspected;

#[allow(clippy::too_many_arguments)] // one argument per phase result, named where they are made
pub(super) fn build(
    req: &HttpRequest,
    fe: &Frontend,
    engine: &Engine,
    path: &str,
    auth: Authenticated,
    gateway: Arc<GatewayRuntime>,
    client_ip: Option<IpAddr>,
    inspected: Inspected,
    started: Instant,
    spend: crate::spend::Spending,
) -> Result<RequestCtx, ApiError> {
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
    let mut headers = upstream_headers(req.headers(), engine.keeps_headers);
    if let Some(h) = &auth.header {
        headers.0.remove(h.as_str());
        headers.1.remove(h.as_str());
    }
    // the caller's own `Authorization`, for `sk: asis` keys: never a keypool credential
    let client_authorization = (!auth.caller.authorization_consumed)
        .then(|| req.headers().get(header::AUTHORIZATION))
        .flatten()
        .and_then(|v| reqwest::header::HeaderValue::from_bytes(v.as_bytes()).ok());
    let retries = gateway.spec.retries.unwrap_or(config.retries);
    let session = crate::affinity::session(&gateway, req.headers(), &inspected.body);
    Ok(RequestCtx::new(NewRequest {
        started,
        method,
        path: Arc::from(path),
        upstream_path: path.strip_prefix("/v1").unwrap_or(path).to_owned(),
        query: auth.query,
        caller: auth.caller,
        gateway,
        client_ip,
        inspected,
        headers,
        client_authorization,
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        log,
        log_response_cap: policy.response_body.then_some(policy.max_field_bytes),
        max_attempts: retries.saturating_add(1),
        sink: fe.sink.clone(),
        spend,
        session,
    }))
}
