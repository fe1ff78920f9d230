//! One attempt on one leased key ([`Engine::attempt`]) and how its answer is classified:
//! success (relayed: a stream through [`crate::relay`], or a whole body), a client error (returned
//! as it is), or a [`Failure`] to fail over from (5xx, 429, 401/403, 408, no answer in time).

use std::sync::Arc;
use std::time::Duration;

use keypool_config::UpstreamKey;
use keypool_pool::{Lease, Outcome};
use keypool_types::{ApiError, ErrorKind};
use reqwest::header::HeaderMap;
use tokio::time::{Instant, timeout_at};

use crate::adapter::{AttemptRequest, TransportError, UpstreamResponse};
use crate::client::UpstreamClient;
use crate::cooldown::cooldown;
use crate::ctx::RequestCtx;
use crate::forward::{Engine, Reply};
use crate::inspect::response_usage;
use crate::relay::{Relay, StreamSetup};

mod failure;
mod read;

pub(crate) use failure::Failure;
use failure::timed_out;
use read::{BodyError, read_body};

pub(crate) enum Attempt {
    Done(Reply),
    Failed(Failure),
}

/// How an upstream status drives failover.
enum Class {
    Success,
    /// Return as-is; the key is fine.
    Client,
    /// Fail over; report this outcome for the key.
    Retry(Outcome),
    /// No final HTTP status (a 1xx, or a number outside HTTP's).
    NoAnswer,
}

fn classify(status: u16, headers: &HeaderMap, passthrough_auth: bool) -> Class {
    match status {
        200..=399 => Class::Success,
        0..=199 | 600.. => Class::NoAnswer,
        401 | 403 if passthrough_auth => Class::Client,
        401 | 403 => Class::Retry(Outcome::AuthFailed { status }),
        429 => Class::Retry(Outcome::RateLimited {
            cooldown: cooldown(
                |name| headers.get(name).and_then(|v| v.to_str().ok()),
                std::time::SystemTime::now(),
            ),
        }),
        408 | 500..=599 => Class::Retry(Outcome::ServerError { status }),
        _ => Class::Client,
    }
}

/// A 1xx (101 above all) or a number outside HTTP's is no answer to relay: an upstream
/// protocol error, failed over like a 5xx, 502 when it is the last.
fn no_final_status(lease: Lease, status: u16) -> Attempt {
    let key = lease.key.name.clone();
    lease.settle(Outcome::ServerError { status });
    tracing::warn!(key = %key, status, "upstream answered with no final HTTP status; failing over");
    Attempt::Failed(Failure::Transport {
        error: ApiError::new(
            ErrorKind::UpstreamUnreachable,
            format!("The upstream answered with status {status}, which is not a final answer."),
        ),
        key,
    })
}

/// An upstream 4xx that is the caller's: relayed as it is (the key is fine), unless it is
/// larger than keypool buffers.
async fn client_error(
    resp: UpstreamResponse,
    lease: Lease,
    until: Instant,
    limit: usize,
) -> Attempt {
    let UpstreamResponse {
        status,
        headers,
        body,
    } = resp;
    let key = lease.key.name.clone();
    let body = read_body(body, until, limit).await;
    let telemetry = lease.telemetry().clone();
    lease.settle(Outcome::ClientError { status });
    match body {
        Err(BodyError::TooLarge) => too_large(&telemetry, key, limit),
        body => Attempt::Done(Reply::Whole {
            status,
            headers,
            body: body.unwrap_or_default(),
            key: Some(key),
            usage: None,
        }),
    }
}

/// An upstream refusal that fails over: its body kept (up to [`ERROR_BODY_LIMIT`]) for when it
/// is the last.
async fn refused(resp: UpstreamResponse, lease: Lease, outcome: Outcome) -> Attempt {
    let UpstreamResponse {
        status,
        headers,
        body,
    } = resp;
    let key = lease.key.name.clone();
    let body = read_body(body, Instant::now() + ERROR_BODY_TIMEOUT, ERROR_BODY_LIMIT).await;
    tracing::warn!(key = %key, status, outcome = outcome.label(), "upstream refused; failing over");
    let telemetry = lease.telemetry().clone();
    lease.settle(outcome);
    if matches!(body, Err(BodyError::TooLarge)) {
        crate::observe::answer_cut(&telemetry, "response_too_large");
        return Attempt::Failed(Failure::Transport {
            error: ApiError::new(
                ErrorKind::ResponseTooLarge,
                format!("The upstream's {status} answer was larger than {ERROR_BODY_LIMIT} bytes."),
            ),
            key,
        });
    }
    Attempt::Failed(Failure::Upstream {
        status,
        headers,
        body: body.unwrap_or_default(),
        key,
    })
}

/// An answer larger than `limit`: never buffered past it; 502 `response_too_large`.
fn too_large(telemetry: &keypool_telemetry::Telemetry, key: Arc<str>, limit: usize) -> Attempt {
    crate::observe::answer_cut(telemetry, "response_too_large");
    Attempt::Done(Reply::Error {
        error: ApiError::new(
            ErrorKind::ResponseTooLarge,
            format!(
                "The upstream's answer was larger than the {limit} bytes keypool buffers (max_response_bytes)."
            ),
        ),
        key: Some(key),
    })
}

/// The most of an upstream error body kept while failing over.
const ERROR_BODY_LIMIT: usize = 1 << 20;

/// Longest time spent reading the body of an upstream error before failing over.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
impl Engine {
    /// One attempt on one leased key: send, classify the answer, then relay a stream or read a
    /// whole answer. The lease is settled on every path.
    pub(crate) async fn attempt(
        &self,
        client: &UpstreamClient,
        ctx: &mut RequestCtx,
        lease: Lease,
        span: &tracing::Span,
    ) -> Attempt {
        let key = lease.key.clone();
        let traced_headers = traced_headers(ctx, &key, span);
        let stream = ctx.inspected.stream;
        let started = Instant::now();
        let deadline = started
            + if stream {
                key.stream_timeout
            } else {
                key.timeout
            };
        let req = AttemptRequest {
            method: ctx.method.clone(),
            path: &ctx.upstream_path,
            model: &ctx.inspected.model,
            query: ctx.query.as_deref(),
            headers: match &traced_headers {
                Some(h) => h,
                None if key.keep_header => &ctx.headers.1,
                None => &ctx.headers.0,
            },
            client_authorization: ctx.client_authorization.as_ref(),
            body: ctx.inspected.body.clone(),
        };
        let adapter = self.adapters.for_kind(key.kind);
        let resp = match timeout_at(deadline, adapter.send(client, &key, req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let stale = matches!(e, TransportError::Stale(_));
                lease.settle(if stale {
                    Outcome::StaleConnection
                } else {
                    Outcome::Connect
                });
                tracing::warn!(key = %key.name, error = %e, "upstream unreachable");
                return Attempt::Failed(Failure::unanswered(&e, key.name.clone()));
            }
            Err(_) => return Attempt::Failed(timed_out(lease, stream)),
        };
        let answered = Instant::now();
        ctx.ttfb = Some(answered - ctx.started);
        span.record("http.response.status_code", resp.status);
        lease.observe_ttfb(answered - started);
        match classify(resp.status, &resp.headers, key.passthrough_auth) {
            Class::Success if stream && is_sse(&resp.headers) => {
                self.relay(ctx, resp, lease, deadline).await
            }
            Class::Success => {
                let limit = self.config.max_response_bytes;
                whole(ctx, resp, lease, started, span, limit).await
            }
            Class::NoAnswer => no_final_status(lease, resp.status),
            Class::Client => {
                let limit = self.config.max_response_bytes;
                let until = deadline.min(Instant::now() + ERROR_BODY_TIMEOUT);
                client_error(resp, lease, until, limit).await
            }
            Class::Retry(outcome) => refused(resp, lease, outcome).await,
        }
    }

    /// A stream that answered: relayed once its first event arrived (the lease goes with it);
    /// no data before the time-to-first-byte deadline fails the attempt over.
    async fn relay(
        &self,
        ctx: &RequestCtx,
        resp: UpstreamResponse,
        lease: Lease,
        deadline: Instant,
    ) -> Attempt {
        let key = lease.key.name.clone();
        let UpstreamResponse {
            status,
            headers,
            body,
        } = resp;
        let relay = Relay::start(
            body,
            lease,
            deadline,
            StreamSetup {
                idle: self.config.idle_timeout,
                strip_usage_chunk: ctx.inspected.strip_usage_chunk,
                require_done: ctx.path.ends_with("/completions")
                    || matches!(&*ctx.path, "/v1/messages" | "/v1/responses"),
                surface: keypool_types::Surface::of_path(&ctx.path),
                status,
                collect_text: ctx.log_response_cap,
                max_event: self.config.max_stream_event_bytes,
                deadline: self.config.stream_deadline.map(|d| ctx.started + d),
                guard: crate::guard::stream::StreamGuard::new(
                    ctx.gateway.clone(),
                    ctx.restore.clone(),
                    keypool_types::Surface::of_path(&ctx.path),
                ),
            },
        );
        match relay.await {
            Ok(relay) => Attempt::Done(Reply::Stream {
                status,
                headers,
                relay: Box::new(relay),
                key,
            }),
            Err((lease, outcome)) => {
                let timeout = outcome == Outcome::Timeout;
                lease.settle(outcome);
                let error = if timeout {
                    ApiError::new(
                        ErrorKind::UpstreamTimeout,
                        "The upstream sent no data in time.",
                    )
                } else {
                    ApiError::new(
                        ErrorKind::UpstreamUnreachable,
                        "The upstream closed the stream before any data.",
                    )
                };
                Attempt::Failed(Failure::Transport { error, key })
            }
        }
    }
}

/// The attempt's headers when traced: the upstream continues this attempt's span.
fn traced_headers(ctx: &RequestCtx, key: &UpstreamKey, span: &tracing::Span) -> Option<HeaderMap> {
    if span.is_none() {
        return None;
    }
    let mut h = if key.keep_header {
        ctx.headers.1.clone()
    } else {
        ctx.headers.0.clone()
    };
    for (n, v) in crate::observe::trace_context(span) {
        if let (Ok(n), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(n.as_bytes()),
            reqwest::header::HeaderValue::from_str(&v),
        ) {
            h.insert(n, v);
        }
    }
    Some(h)
}

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"))
}

/// A whole successful answer, read before the key's timeout; its usage read once, for the
/// key's tpm and the request's accounting.
async fn whole(
    ctx: &mut RequestCtx,
    resp: UpstreamResponse,
    lease: Lease,
    started: Instant,
    span: &tracing::Span,
    max_response_bytes: usize,
) -> Attempt {
    let UpstreamResponse {
        status,
        headers,
        body,
    } = resp;
    let key = lease.key.name.clone();
    let limit = max_response_bytes;
    match read_body(body, started + lease.key.timeout, limit).await {
        Ok(body) => {
            let is_json = headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(crate::inspect::says_json);
            let usage = if is_json { response_usage(&body) } else { None };
            if is_json && !span.is_none() {
                ctx.response_model = crate::inspect::response_model(&body);
            }
            lease.settle(Outcome::Success {
                tokens: usage.map(|u| u.total()),
                latency: started.elapsed(),
            });
            Attempt::Done(Reply::Whole {
                status,
                headers,
                body,
                key: Some(key),
                usage,
            })
        }
        Err(BodyError::Timeout) => Attempt::Failed(timed_out(lease, false)),
        Err(BodyError::TooLarge) => {
            let telemetry = lease.telemetry().clone();
            lease.settle(Outcome::ClientError { status });
            too_large(&telemetry, key, limit)
        }
        Err(BodyError::Broken(e)) => {
            lease.settle(Outcome::Connect);
            Attempt::Failed(Failure::Transport {
                error: ApiError::new(ErrorKind::UpstreamUnreachable, e),
                key,
            })
        }
    }
}
