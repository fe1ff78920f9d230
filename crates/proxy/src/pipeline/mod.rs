//! The request pipeline: every API request, on `/v1/*` (the gateway named `default`) and on
//! every named gateway (`/llm/api/{name}/v1/*`), goes through the same phases over one context.
//!
//! ```text
//!  resolve ─▶ authenticate ─▶ admit ─────────────▶ read body ─▶ inspect ─▶ transform ─▶ guard ─▶ cache ─▶ budgets
//!  gateway    credential(&req)  lists, rate limits,   bounded     model,      param_map,    estimate
//!  exists,    by the gateway's  quota                 (413)       stream,     param_fixed,  held (USD,
//!  active,    policy → Caller   (x-ratelimit-*)                   est tokens  prompt_template gateway,
//!  not expired                      (GET /v1/models is           (model ACL)               caller)
//!                                    answered here: crate::models)
//!        ─▶ build ctx ─▶ forward ──────────────────▶ relay ───────────▶ account
//!                        select key, attempts,        whole answer or     one usage event
//!                        failover, backoff            SSE stream          per request
//!                        (crate::forward)             (crate::relay)      (crate::ctx)
//! ```
//!
//! Before any phase the path is normalised once (`path.rs`): the form every rule sees is the
//! form forwarded. The order is written once, in `prepare`; each phase is a function in its own module.
//! A credential in the body (`body:` positions) is the one reason the body is read before the
//! caller is known. What each phase records (spans, metrics, alerts) is said in one place,
//! `crate::observe`; the phases call it at their boundaries.
//! A new API surface adds its own inspect and relay adapters, not a new pipeline.

mod admit;
mod authenticate;
mod body;
mod context;
mod path;

pub use authenticate::Incoming;
pub use body::Receiving;
pub use path::normalise as normalise_path;

use std::sync::Arc;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use keypool_config::DEFAULT_GATEWAY;
use keypool_policy::gateway::{GatewayRuntime, RateHeaders};
use keypool_types::{ApiError, ErrorKind, Surface};
use tokio::time::Instant;
use tracing::Instrument;

use crate::ctx::RequestCtx;
use crate::forward::Engine;
use crate::http::{Frontend, client_ip, error_response, error_response_for, respond};
use crate::{models, observe};

/// The gateway and the OpenAI path (`/v1/...`) of an API request path: `/v1/*` is the
/// `default` gateway, `/llm/api/{name}/v1/*` the gateway `name`; `None` for any other path.
pub fn route(path: &str) -> Option<(&str, &str)> {
    if path.starts_with("/v1/") {
        return Some((DEFAULT_GATEWAY, path));
    }
    let rest = path.strip_prefix("/llm/api/")?;
    let (name, tail) = rest.split_once('/')?;
    tail.starts_with("v1/").then(|| (name, &rest[name.len()..]))
}

/// Serves one API request (a path [`route`] accepts; any other gets 404).
pub async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    fe: web::Data<Frontend>,
) -> HttpResponse {
    // an upgrade would turn the rest of the connection into the body: never read, never held
    if req.headers().contains_key(actix_web::http::header::UPGRADE) {
        let error = ApiError::new(
            ErrorKind::InvalidRequest,
            "keypool does not upgrade connections (Upgrade: is refused).",
        );
        return error_response(&error, None);
    }
    // one spelling of the path for every rule and for the upstream
    let normal = match path::normalise(req.path()) {
        Ok(p) => p,
        Err(error) => return error_response(&error, None),
    };
    let Some((gateway, path)) = route(&normal) else {
        return error_response(
            &ApiError::new(ErrorKind::NotFound, "Unknown request URL."),
            None,
        );
    };
    // whose API this is: keypool's own errors answer in its shape
    let surface = Surface::of_path(path);
    let started = Instant::now();
    let span = observe::server_span(fe.gateways.telemetry(), &req);
    let policy = observe::policy_span(&span);
    // the engine and the gateway this request keeps from start to end, loaded once
    let engine = fe.engine();
    let mut rate = None;
    let mut resp = match prepare(
        &req, payload, &fe, &engine, gateway, path, started, &mut rate,
    )
    .instrument(policy)
    .await
    {
        Ok(Prepared::Forward(mut ctx)) => {
            ctx.span = span.clone();
            respond(
                engine.forward(&fe.client, ctx).instrument(span).await,
                surface,
            )
        }
        Ok(Prepared::Answered(resp)) => resp,
        Err(error) => {
            let name = if error.kind == ErrorKind::GatewayNotFound {
                "unknown"
            } else {
                gateway
            };
            observe::refused(fe.gateways.telemetry(), name, &error);
            error_response_for(&error, None, surface)
        }
    };
    if let Some(r) = rate {
        rate_headers(&mut resp, &r);
    }
    resp
}

/// Where the phases before `forward` leave a request.
enum Prepared {
    /// On to the key pool. Boxed: the context is ~1 KB, and each future that holds it across
    /// an await (this handler's, `forward`'s, twice for an `async fn`'s argument) would hold
    /// that much more and copy it on each move; one allocation costs less (callgrind).
    Forward(Box<RequestCtx>),
    /// Answered by keypool itself (`GET /v1/models`).
    Answered(HttpResponse),
}

/// Every phase before `forward`, in their order. `rate` receives the tightest rate limit's
/// headers once `admit` ran, refused or not.
#[allow(clippy::too_many_arguments)] // the request, its surroundings, and one out-parameter
async fn prepare(
    req: &HttpRequest,
    payload: web::Payload,
    fe: &Frontend,
    engine: &Engine,
    gateway: &str,
    path: &str,
    started: Instant,
    rate: &mut Option<RateHeaders>,
) -> Result<Prepared, ApiError> {
    let gw = resolve(fe, gateway)?;
    let config = &engine.config;
    let limits = body::Limits {
        max_bytes: config.max_body_bytes,
        timeout: config.body_timeout,
        receiving: fe.receiving.clone(),
        max_receiving: config.max_buffered_request_bytes,
    };
    let mut body = body::Body::new(payload, limits);
    if gw.credential_in_body() {
        body.read_json(req).await?;
    }
    let auth = authenticate::caller(&gw, req, &body)?;
    let client_ip = client_ip(req, &engine.config);
    admit::admit(&gw, &auth, client_ip, rate).await?;
    admit::usage_room(fe.sink.as_ref()).await?;
    if let Some(what) = models::listing(req.method(), path) {
        let keys = engine.pool.keys();
        let resp = models::answer(
            &fe.models,
            fe.client.reqwest(),
            &keys,
            &auth.caller.keys,
            &gw,
            &what,
        )
        .await?;
        return Ok(Prepared::Answered(resp));
    }
    let mut inspected = body.inspect(req, &gw, path).await?;
    let mut guardrails = Vec::new();
    let (guarded, restore) = crate::guard::request(&gw, &inspected.body, &mut guardrails)?;
    if let Some(b) = guarded {
        inspected.body = b;
    }
    // an answer that restores masked values is this caller's alone: never cached
    let cache = match restore {
        None => crate::cache::lookup(req, &gw, auth.caller.id.as_deref(), path, &inspected).await,
        Some(_) => None,
    };
    let (budgets, prices) = (fe.gateways.budgets(), fe.gateways.prices());
    let mut spend = crate::spend::Spending::new(prices.clone(), budgets.clone());
    // a hit holds nothing, neither budget nor upstream connection: it costs nothing
    let hit = matches!(cache, Some(crate::cache::Lookup::Hit(_)));
    let slot = if hit { None } else { Some(fe.inflight.take()?) };
    if !hit {
        spend.hold = admit::hold_budgets(&gw, &auth, &inspected, engine, budgets, &prices).await?;
    }
    let mut ctx = Box::new(context::build(
        req, fe, engine, path, auth, gw, client_ip, inspected, started, spend,
    )?);
    ctx.slot = slot;
    ctx.restore = restore;
    ctx.guardrails = guardrails;
    if !hit && crate::guard::moderation::wanted(&ctx) {
        // boxed: it forwards a request of its own, and inline its future would make every
        // request's future ~6 KB larger (and moved so much more)
        Box::pin(crate::guard::moderation::check(
            engine, &fe.client, &mut ctx,
        ))
        .await?;
    }
    match cache {
        Some(crate::cache::Lookup::Hit(answer)) => Ok(Prepared::Answered(ctx.replay(&answer))),
        Some(crate::cache::Lookup::Forward(pending)) => {
            ctx.cache = Some(pending);
            Ok(Prepared::Forward(ctx))
        }
        None => Ok(Prepared::Forward(ctx)),
    }
}

/// The gateway exists, is active and has not expired.
fn resolve(fe: &Frontend, name: &str) -> Result<Arc<GatewayRuntime>, ApiError> {
    let gw = fe.gateways.get(name).ok_or_else(|| {
        ApiError::new(
            ErrorKind::GatewayNotFound,
            format!("There is no gateway named `{name}`."),
        )
    })?;
    gw.check_open(std::time::SystemTime::now)?;
    Ok(gw)
}

/// `x-ratelimit-*-requests` of the tightest limit, on every answer after `admit`.
fn rate_headers(resp: &mut HttpResponse, r: &RateHeaders) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::UpstreamClient;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, C, R>(_: impl Fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request's future is allocated once and moved into place: its size is memory per
    /// request in flight and bytes copied per request. `handle` was 9.7 KB while the
    /// moderation call (a request of its own) and the context sat in it inline; a phase that
    /// makes it grow again shows here (print-type-sizes on nightly says which).
    #[test]
    fn a_request_future_stays_small() {
        let handle_size =
            returned_size(|r: HttpRequest, p: web::Payload, f: web::Data<Frontend>| {
                handle(r, p, f)
            });
        let forward_size = returned_size(
            |e: &'static Engine, c: &'static UpstreamClient, x: Box<RequestCtx>| e.forward(c, x),
        );
        assert!(
            handle_size <= 5 * 1024,
            "handle's future is {handle_size} bytes"
        );
        assert!(
            forward_size <= 4 * 1024,
            "forward's future is {forward_size} bytes"
        );
    }
}
