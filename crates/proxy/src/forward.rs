//! The attempt loop: `select_key` → `forward` → classify → fail over or answer.
//!
//! - Retry another key after: connect error, timeout (time to first byte for streams), 429, 5xx,
//!   401/403 (the key is disabled). 400/404/413/422 and other 4xx are returned as they are.
//! - When every attempt failed, the client gets the last upstream's real status and body; keypool
//!   makes a 502/504 only when the last attempt had no HTTP answer at all.
//! - While no key has budget, wait until the earliest one frees up (plus jitter that doubles with
//!   each wait) if that is within `queue_timeout`; otherwise answer 429 with `Retry-After` at once.
//! - Once a stream's first byte reached the client, there is no retry (see [`crate::relay`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use keypool_config::Config;
use keypool_pool::{BusyCause, KeyAccess, Lease, NoKey, Outcome, Pick, PoolHandle};
use keypool_types::{ApiError, ErrorKind, Usage};
use reqwest::header::HeaderMap;
use tokio::time::{Instant, sleep, timeout_at};
use tracing::Instrument;

use crate::adapter::{Adapters, AttemptRequest, BodyStream, UpstreamResponse};
use crate::client::UpstreamClient;
use crate::cooldown::cooldown;
use crate::ctx::RequestCtx;
use crate::inspect::response_usage;
use crate::relay::{Relay, StreamSetup};

/// The engine shared by all frontend workers.
pub struct Engine {
    pub config: Arc<Config>,
    pub pool: PoolHandle,
    pub adapters: Adapters,
    /// Some key has `keep_header`: only then is the client's full header set prepared.
    pub keeps_headers: bool,
}

/// What the engine answers.
pub enum Reply {
    /// A whole body (non-stream answers, upstream errors passed through).
    Whole {
        status: u16,
        headers: HeaderMap,
        body: Bytes,
        key: Option<Arc<str>>,
        /// Usage read from a successful JSON body (read once, for both tpm and accounting).
        usage: Option<Usage>,
    },
    /// A stream that has produced its first byte.
    Stream {
        status: u16,
        headers: HeaderMap,
        relay: Box<Relay>,
        key: Arc<str>,
    },
    /// An error keypool makes itself.
    Error {
        error: ApiError,
        key: Option<Arc<str>>,
    },
}

/// A failed attempt, kept in case it is the last.
enum Failure {
    /// The upstream answered with this status and body.
    Upstream {
        status: u16,
        headers: HeaderMap,
        body: Bytes,
        key: Arc<str>,
    },
    /// No HTTP answer.
    Transport { error: ApiError, key: Arc<str> },
}

impl Failure {
    /// The failover reason, as metrics label it.
    fn reason(&self) -> &'static str {
        match self {
            Self::Upstream { status: 429, .. } => "rate_limited",
            Self::Upstream {
                status: 401 | 403, ..
            } => "auth_failed",
            Self::Upstream { .. } => "server_error",
            Self::Transport { error, .. } if error.kind == ErrorKind::UpstreamTimeout => "timeout",
            Self::Transport { .. } => "connect",
        }
    }

    /// What the alert says about the last failure.
    fn describe(&self) -> String {
        match self {
            Self::Upstream { status, key, .. } => format!("key {key} answered {status}"),
            Self::Transport { error, key } => format!("key {key}: {}", error.message),
        }
    }

    /// Every attempt failed: the client gets the last failure, operators an alert.
    fn give_up(self, ctx: &RequestCtx) -> Reply {
        keypool_telemetry::alert(
            keypool_telemetry::Cause::AllUpstreamsFailed,
            format!("{}/{}", ctx.gateway.name, ctx.inspected.model),
            format!(
                "all upstreams failed for model {} on gateway {} ({} attempt{}; last: {})",
                ctx.inspected.model,
                ctx.gateway.name,
                ctx.attempts,
                if ctx.attempts == 1 { "" } else { "s" },
                self.describe()
            ),
        );
        self.into_reply()
    }

    fn into_reply(self) -> Reply {
        match self {
            Self::Upstream {
                status,
                headers,
                body,
                key,
            } => Reply::Whole {
                status,
                headers,
                body,
                key: Some(key),
                usage: None,
            },
            Self::Transport { error, key } => Reply::Error {
                error,
                key: Some(key),
            },
        }
    }
}

/// A request's usage event, recorded when this is dropped.
struct AccountLater {
    ctx: RequestCtx,
    status: u16,
    usage: Option<Usage>,
    error: Option<&'static str>,
}

impl Drop for AccountLater {
    fn drop(&mut self) {
        self.ctx.account(self.status, self.usage, self.error);
    }
}

enum Attempt {
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
}

fn classify(status: u16, headers: &HeaderMap, passthrough_auth: bool) -> Class {
    match status {
        100..=399 => Class::Success,
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

/// Longest time spent reading the body of an upstream error before failing over.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Cap on the jitter added to waits.
const MAX_JITTER: Duration = Duration::from_secs(1);

/// Up to 10 ms · 2^(n-1), capped at [`MAX_JITTER`], uniformly random.
fn jitter(n: u32) -> Duration {
    let cap = Duration::from_millis(10u64 << n.saturating_sub(1).min(10)).min(MAX_JITTER);
    cap.mul_f64(fastrand::f64())
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Engine {
    /// Runs the attempt loop for one request and records its usage event (a stream records it
    /// when it ends, through the context it carries).
    pub async fn forward(&self, client: &UpstreamClient, mut ctx: RequestCtx) -> Reply {
        let mut reply = self.attempts(client, &mut ctx).await;
        match &mut reply {
            Reply::Whole {
                status,
                usage,
                body,
                ..
            } => {
                ctx.capture_response(body);
                let error = (*status >= 400).then_some(if *status >= 500 {
                    "upstream_5xx"
                } else {
                    "upstream_4xx"
                });
                // recorded right after the response is written, off its critical path (a
                // task on this worker; if it never runs, dropping it still records the event)
                let span = ctx.span.clone();
                ctx.answered = Some(Instant::now());
                let later = AccountLater {
                    ctx,
                    status: *status,
                    usage: *usage,
                    error,
                };
                actix_web::rt::spawn(async move { drop(later) }.instrument(span));
                return reply;
            }
            Reply::Error { error, key } => {
                if key.is_none() {
                    keypool_telemetry::metrics().refusal(&ctx.gateway.name, error.kind.wire().code);
                }
                ctx.account(error.status(), None, Some(error.kind.wire().code));
            }
            Reply::Stream { relay, .. } => relay.attach(ctx),
        }
        reply
    }

    async fn attempts(&self, client: &UpstreamClient, ctx: &mut RequestCtx) -> Reply {
        let queue_deadline = ctx.started + self.config.queue_timeout;
        let max_attempts = ctx.max_attempts.max(1);
        let mut last: Option<Failure> = None;
        let mut waits = 0u32;
        // one pick for the whole request: attempts only add to `exclude`
        let mut pick = Pick {
            model: Arc::from(ctx.inspected.model.as_str()),
            path: ctx.path.clone(),
            access: ctx.caller.keys.clone(),
            passthrough: ctx.client_authorization.is_some(),
            est_tokens: ctx.inspected.est_tokens,
            exclude: Vec::new(),
        };
        while ctx.attempts < max_attempts {
            let select = keypool_telemetry::trace::select_span(
                &ctx.span,
                ctx.attempts + 1,
                lb_policy_name(self.config.lb_policy),
            );
            let lease = match self.pool.pick(&pick).instrument(select.clone()).await {
                Ok(lease) => lease,
                Err(NoKey::Busy { until, cause }) => {
                    let now = Instant::now();
                    waits += 1;
                    let wake = until + jitter(waits);
                    if wake > queue_deadline {
                        return match last {
                            Some(f) => f.give_up(ctx),
                            None => busy(until - now, cause, &ctx.inspected.model),
                        };
                    }
                    sleep(wake - now).await;
                    ctx.queued += wake - now;
                    keypool_telemetry::metrics()
                        .queue_wait
                        .observe((wake - now).as_secs_f64());
                    continue;
                }
                Err(no) => {
                    return match last {
                        Some(f) => f.give_up(ctx),
                        None => Reply::Error {
                            error: Self::no_key(&no, ctx),
                            key: None,
                        },
                    };
                }
            };
            if ctx.attempts > 0 {
                sleep(jitter(ctx.attempts)).await;
            }
            ctx.attempts += 1;
            select.record("keypool.key", &*lease.key.name);
            drop(select);
            ctx.key = Some(lease.key.name.clone());
            ctx.provider = Some(lease.key.kind.as_str());
            pick.exclude.push(lease.key_id);
            let t = Instant::now();
            let span = keypool_telemetry::trace::attempt_span(
                &ctx.span,
                ctx.attempts,
                &lease.key.name,
                lease.key.kind.as_str(),
                ctx.method.as_str(),
            );
            let outcome = self
                .attempt(client, ctx, lease, &span)
                .instrument(span.clone())
                .await;
            if let Attempt::Failed(f) = &outcome
                && !span.is_none()
            {
                span.record("error.type", f.reason());
                span.record("otel.status_code", "ERROR");
                if let Failure::Upstream { status, .. } = f {
                    span.record("http.response.status_code", *status);
                }
            }
            ctx.upstream_time += t.elapsed();
            match outcome {
                Attempt::Done(reply) => return reply,
                Attempt::Failed(f) => {
                    tracing::debug!(attempt = ctx.attempts, "attempt failed; failing over");
                    keypool_telemetry::metrics()
                        .failovers
                        .with_label_values(&[f.reason()])
                        .inc();
                    last = Some(f);
                }
            }
        }
        match last {
            Some(f) => f.give_up(ctx),
            None => Reply::Error {
                error: ApiError::new(ErrorKind::NoUsableKey, "No attempt could be made."),
                key: None,
            },
        }
    }

    fn no_key(no: &NoKey, ctx: &RequestCtx) -> ApiError {
        if *no == NoKey::AllDisabled {
            keypool_telemetry::alert(
                keypool_telemetry::Cause::AllUpstreamsFailed,
                format!("{}/{}", ctx.gateway.name, ctx.inspected.model),
                format!(
                    "all upstreams failed for model {} on gateway {}: every key that serves it is disabled",
                    ctx.inspected.model, ctx.gateway.name
                ),
            );
        }
        match no {
            // a caller without a valid token, whom only `noauth` keys serve
            NoKey::NoneServes if ctx.caller.keys == KeyAccess::Token(None) => {
                ApiError::new(ErrorKind::InvalidApiKey, "Missing or incorrect API key.")
            }
            NoKey::NoneServes => ApiError::new(
                ErrorKind::ModelNotFound,
                format!(
                    "The model `{}` does not exist or you do not have access to it.",
                    ctx.inspected.model
                ),
            ),
            NoKey::AllDisabled => ApiError::new(
                ErrorKind::NoUsableKey,
                "Every upstream key that serves this model is disabled.",
            ),
            NoKey::Busy { .. } => ApiError::new(ErrorKind::Internal, "unexpected busy pool"),
            NoKey::SharedUnavailable => shared_unavailable(),
        }
    }

    /// One attempt on one leased key.
    async fn attempt(
        &self,
        client: &UpstreamClient,
        ctx: &mut RequestCtx,
        lease: Lease,
        span: &tracing::Span,
    ) -> Attempt {
        let key = lease.key.clone();
        // when traced, the upstream continues this attempt's span
        let traced_headers = (!span.is_none()).then(|| {
            let mut h = if key.keep_header {
                ctx.headers.1.clone()
            } else {
                ctx.headers.0.clone()
            };
            for (n, v) in keypool_telemetry::trace::propagation_headers(span) {
                if let (Ok(n), Ok(v)) = (
                    reqwest::header::HeaderName::from_bytes(n.as_bytes()),
                    reqwest::header::HeaderValue::from_str(&v),
                ) {
                    h.insert(n, v);
                }
            }
            h
        });
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
                lease.settle(Outcome::Connect);
                tracing::warn!(key = %key.name, error = %e, "upstream unreachable");
                return Attempt::Failed(Failure::Transport {
                    error: ApiError::new(ErrorKind::UpstreamUnreachable, e.to_string()),
                    key: key.name.clone(),
                });
            }
            Err(_) => return Attempt::Failed(timed_out(lease, stream)),
        };
        let UpstreamResponse {
            status,
            headers,
            body,
        } = resp;
        ctx.ttfb = Some(ctx.started.elapsed());
        span.record("http.response.status_code", status);
        lease.observe_ttfb(started.elapsed());
        match classify(status, &headers, key.passthrough_auth) {
            Class::Success => {}
            Class::Client => {
                let body = read_body(body, deadline.min(Instant::now() + ERROR_BODY_TIMEOUT)).await;
                lease.settle(Outcome::ClientError { status });
                return Attempt::Done(Reply::Whole {
                    status,
                    headers,
                    body: body.unwrap_or_default(),
                    key: Some(key.name.clone()),
                    usage: None,
                });
            }
            Class::Retry(outcome) => {
                let body = read_body(body, Instant::now() + ERROR_BODY_TIMEOUT).await;
                tracing::warn!(key = %key.name, status, outcome = outcome.label(), "upstream refused; failing over");
                lease.settle(outcome);
                return Attempt::Failed(Failure::Upstream {
                    status,
                    headers,
                    body: body.unwrap_or_default(),
                    key: key.name.clone(),
                });
            }
        }
        let is_sse = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if stream && is_sse {
            let relay = Relay::start(
                body,
                lease,
                deadline,
                StreamSetup {
                    idle: self.config.idle_timeout,
                    strip_usage_chunk: ctx.inspected.strip_usage_chunk,
                    require_done: ctx.path.ends_with("/completions"),
                    status,
                    collect_text: ctx.log_response_cap,
                },
            );
            return match relay.await {
                Ok(relay) => Attempt::Done(Reply::Stream {
                    status,
                    headers,
                    relay: Box::new(relay),
                    key: key.name.clone(),
                }),
                Err((lease, outcome)) => {
                    let timeout = outcome == Outcome::Timeout;
                    lease.settle(outcome);
                    Attempt::Failed(Failure::Transport {
                        error: if timeout {
                            ApiError::new(
                                ErrorKind::UpstreamTimeout,
                                "The upstream sent no data in time.",
                            )
                        } else {
                            ApiError::new(
                                ErrorKind::UpstreamUnreachable,
                                "The upstream closed the stream before any data.",
                            )
                        },
                        key: key.name.clone(),
                    })
                }
            };
        }
        let body_deadline = started + key.timeout;
        match read_body(body, body_deadline).await {
            Ok(body) => {
                let is_json = headers
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| ct.contains("json"));
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
                    key: Some(key.name.clone()),
                    usage,
                })
            }
            Err(BodyError::Timeout) => Attempt::Failed(timed_out(lease, false)),
            Err(BodyError::Broken(e)) => {
                lease.settle(Outcome::Connect);
                Attempt::Failed(Failure::Transport {
                    error: ApiError::new(ErrorKind::UpstreamUnreachable, e),
                    key: key.name.clone(),
                })
            }
        }
    }
}

fn shared_unavailable() -> ApiError {
    ApiError::new(
        ErrorKind::SharedStateUnavailable,
        "The shared rate-limit state is unavailable and this gateway refuses rather than guess.",
    )
    .retry_after(1)
}

fn lb_policy_name(p: keypool_config::LbPolicy) -> &'static str {
    match p {
        keypool_config::LbPolicy::LeastUsed => "least-used",
        keypool_config::LbPolicy::Order => "order",
        keypool_config::LbPolicy::Random => "random",
    }
}

fn timed_out(lease: Lease, stream: bool) -> Failure {
    let key = lease.key.name.clone();
    let limit = if stream {
        lease.key.stream_timeout
    } else {
        lease.key.timeout
    };
    lease.settle(Outcome::Timeout);
    tracing::warn!(key = %key, "upstream timed out");
    Failure::Transport {
        error: ApiError::new(
            ErrorKind::UpstreamTimeout,
            format!(
                "The upstream did not answer within {:.1} s.",
                limit.as_secs_f64()
            ),
        ),
        key,
    }
}

fn busy(wait: Duration, cause: BusyCause, model: &str) -> Reply {
    let (kind, why) = match cause {
        BusyCause::Budget => (
            ErrorKind::PoolBudgetExhausted,
            "every key that serves it is at its configured rpm/tpm budget",
        ),
        BusyCause::Cooling => (
            ErrorKind::UpstreamRateLimited,
            "every key that serves it was rate-limited by its upstream",
        ),
    };
    let secs = ceil_secs(wait).max(1);
    Reply::Error {
        error: ApiError::new(
            kind,
            format!("Rate limit reached for `{model}`: {why}. Retry after {secs} s."),
        )
        .retry_after(secs),
        key: None,
    }
}

enum BodyError {
    Timeout,
    Broken(String),
}

/// Reads a whole body before `deadline`. A body that came in one chunk is returned uncopied.
async fn read_body(mut body: BodyStream, deadline: Instant) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    loop {
        match timeout_at(deadline, body.next()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(first.unwrap_or_else(|| buf.freeze())),
            Ok(Some(Ok(chunk))) => {
                if first.is_none() && buf.is_empty() {
                    first = Some(chunk);
                } else {
                    if let Some(f) = first.take() {
                        buf.extend_from_slice(&f);
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
            Ok(Some(Err(e))) => return Err(BodyError::Broken(e.to_string())),
        }
    }
}
