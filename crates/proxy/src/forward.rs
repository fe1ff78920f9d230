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

use bytes::Bytes;
use keypool_config::Config;
use keypool_pool::{BusyCause, KeyAccess, NoKey, Pick, PoolHandle};
use keypool_types::{ApiError, ErrorKind, Usage};
use reqwest::header::HeaderMap;
use tokio::time::{Instant, sleep};
use tracing::Instrument;

use crate::adapter::Adapters;
use crate::attempt::{Attempt, Failure};
use crate::client::UpstreamClient;
use crate::ctx::RequestCtx;
use crate::fallback::Ended;
use crate::observe;
use crate::relay::Relay;

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

/// A non-stream answer's cost in USD, at the price catalog's prices (absent when unknown).
pub const COST_HEADER: &str = "x-keypool-cost";
const COST_NAME: reqwest::header::HeaderName =
    reqwest::header::HeaderName::from_static(COST_HEADER);

/// `x-keypool-model`: the model that served (a fallback's when one did), on a gateway with
/// fallbacks (elsewhere it is always the model asked for, and the header would cost every
/// answer an allocation for nothing).
fn served_model(headers: &mut HeaderMap, ctx: &RequestCtx) {
    let routing = &ctx.gateway.spec.routing;
    if routing.fallbacks.is_empty() && routing.context_fallbacks.is_empty() {
        return;
    }
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&ctx.inspected.model) {
        headers.insert(
            reqwest::header::HeaderName::from_static(crate::fallback::MODEL_HEADER),
            v,
        );
    }
}

/// The answer guardrails on a whole answer: placeholders restored, prohibited content masked,
/// or (blocked) the answer replaced by the error; `true` when blocked.
fn guard_answer(
    ctx: &mut RequestCtx,
    status: &mut u16,
    headers: &mut HeaderMap,
    body: &mut Bytes,
) -> bool {
    if !crate::guard::watches_answers(&ctx.gateway, ctx.restore.as_ref()) {
        return false;
    }
    match crate::guard::answer(
        &ctx.gateway,
        ctx.restore.as_ref(),
        body,
        &mut ctx.guardrails,
    ) {
        Ok(Some(guarded)) => *body = guarded,
        Ok(None) => {}
        Err(e) => {
            *status = e.status();
            *body = Bytes::from(e.to_json_for(keypool_types::Surface::of_path(&ctx.path)));
            headers.insert(
                reqwest::header::CONTENT_TYPE,
                reqwest::header::HeaderValue::from_static("application/json"),
            );
            return true;
        }
    }
    false
}

/// `x-keypool-cache` on a caching gateway's answers: `miss`, `refresh` or `bypass`.
fn cache_outcome(headers: &mut HeaderMap, ctx: &RequestCtx) {
    if let Some(c) = &ctx.cache {
        headers.insert(
            reqwest::header::HeaderName::from_static(crate::cache::CACHE_HEADER),
            reqwest::header::HeaderValue::from_static(c.outcome),
        );
    }
}

/// Cap on the jitter added to waits.
const MAX_JITTER: Duration = Duration::from_secs(1);

/// Up to 10 ms · 2^(n-1), capped at [`MAX_JITTER`], uniformly random.
fn jitter(n: u32) -> Duration {
    let cap = Duration::from_millis(10u64 << n.saturating_sub(1).min(10)).min(MAX_JITTER);
    cap.mul_f64(fastrand::f64())
}

/// One attempt a request beyond `retries` after a connection closed as it was reused (the
/// upstream's idle timeout, not the key): the key, just excluded, may take the request again on
/// its next connection, so a single key is not a 502 for it. Answers the attempts added.
fn again_after_stale(failure: &Failure, spare: &mut bool, pick: &mut Pick) -> u32 {
    if matches!(failure, Failure::Stale { .. }) && std::mem::take(spare) {
        pick.exclude.pop();
        return 1;
    }
    0
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Engine {
    /// Runs the attempt loop for one request and records its usage event (a stream records it
    /// when it ends, through the context it carries).
    pub async fn forward(&self, client: &UpstreamClient, mut ctx: Box<RequestCtx>) -> Reply {
        let mut reply = self.attempts(client, &mut ctx).await;
        match &mut reply {
            Reply::Whole {
                status,
                usage,
                body,
                headers,
                key,
            } => {
                let blocked = *status == 200
                    && key.is_some()
                    && guard_answer(&mut ctx, status, headers, body);
                if key.is_some() {
                    served_model(headers, &ctx);
                    if let Some(cache) = &ctx.cache {
                        let content_type = headers
                            .get(reqwest::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok());
                        cache.keep_whole(*status, content_type, &ctx.inspected.model, body);
                    }
                }
                cache_outcome(headers, &ctx);
                ctx.capture_response(body);
                // the cost is keypool's to say, never the upstream's
                headers.remove(&COST_NAME);
                if let Some(cost) = ctx.cost_of(*usage)
                    && let Ok(v) = reqwest::header::HeaderValue::from_str(cost.decimal().as_str())
                {
                    headers.insert(COST_NAME, v);
                }
                let error = (*status >= 400).then_some(if blocked {
                    "content_blocked"
                } else if *status >= 500 {
                    "upstream_5xx"
                } else {
                    "upstream_4xx"
                });
                // recorded before the answer is written: whoever sees the answer (the
                // caller's next request, a scrape, on any worker) sees it counted
                ctx.account(*status, *usage, error);
                return reply;
            }
            Reply::Error { error, key } => {
                if key.is_none() {
                    observe::refused(&ctx.gateway.telemetry, &ctx.gateway.name, error);
                }
                ctx.account(error.status(), None, Some(error.kind.wire().code));
            }
            Reply::Stream { relay, headers, .. } => {
                served_model(headers, &ctx);
                cache_outcome(headers, &ctx);
                if let Some(keep) = ctx
                    .cache
                    .take()
                    .and_then(|c| c.stream_keeper(ctx.inspected.model.clone()))
                {
                    relay.record_into(keep);
                }
                relay.attach(ctx);
            }
        }
        reply
    }

    /// The attempt loop for the request's current model. `Ended::Exhausted` when no key for it
    /// could serve; with `fallback_ready` (a fallback model is next) it does not wait for a
    /// key's budget.
    pub(crate) async fn model_attempts(
        &self,
        client: &UpstreamClient,
        ctx: &mut RequestCtx,
        fallback_ready: bool,
    ) -> Ended {
        let queue_deadline = ctx.started + self.config.queue_timeout;
        let mut max_attempts = ctx.max_attempts.max(1);
        let mut spare = true;
        let first_attempt = ctx.attempts;
        let mut last: Option<Failure> = None;
        let (mut waits, mut keys_spent) = (0u32, 0u32);
        // one pick for the whole request: attempts only add to `exclude`
        let mut pick = Pick {
            model: Arc::from(ctx.inspected.model.as_str()),
            path: ctx.path.clone(),
            access: ctx.caller.keys.clone(),
            passthrough: ctx.client_authorization.is_some(),
            est_tokens: ctx.inspected.est_tokens,
            exclude: Vec::new(),
            only: self.pinned_key(ctx).await,
            session: ctx.session.clone(),
        };
        while ctx.attempts - first_attempt < max_attempts {
            let select =
                observe::select_span(ctx, keypool_config::LbPolicy::as_str(self.config.lb_policy));
            let lease = match self.pool.pick(&pick).instrument(select.clone()).await {
                Ok(lease) => lease,
                Err(NoKey::Busy { until, cause }) => {
                    waits += 1;
                    if !fallback_ready && wait_for_budget(ctx, until, waits, queue_deadline).await {
                        continue;
                    }
                    return Ended::Exhausted(match last {
                        Some(f) => f.give_up(ctx),
                        None => busy(until - Instant::now(), cause, &ctx.inspected.model),
                    });
                }
                Err(no) => {
                    return Ended::Exhausted(match last {
                        Some(f) => f.give_up(ctx),
                        None if keys_spent > 0 => Reply::Error {
                            error: keys_spent_error(&ctx.inspected.model),
                            key: None,
                        },
                        None => Reply::Error {
                            error: Self::no_key(&no, ctx),
                            key: None,
                        },
                    });
                }
            };
            if !self.hold_key_budget(ctx, &lease).await {
                // this key spent its budget: not an attempt, another key is picked
                keys_spent += 1;
                pick.exclude.push(lease.key_id);
                continue;
            }
            if ctx.attempts > 0 {
                sleep(jitter(ctx.attempts)).await;
            }
            select.record("keypool.key", &*lease.key.name);
            drop(select);
            if let Some(stick) = lease.affinity {
                observe::affinity(&ctx.gateway, stick);
            }
            pick.exclude.push(lease.key_id);
            match self.traced_attempt(client, ctx, lease).await {
                Attempt::Done(mut reply) => {
                    self.pin_created(ctx, &mut reply).await;
                    return Ended::Served(reply);
                }
                Attempt::Failed(f) => {
                    tracing::debug!(attempt = ctx.attempts, "attempt failed; failing over");
                    max_attempts += again_after_stale(&f, &mut spare, &mut pick);
                    last = Some(f);
                }
            }
        }
        Ended::Exhausted(match last {
            Some(f) => f.give_up(ctx),
            None => Reply::Error {
                error: ApiError::new(ErrorKind::NoUsableKey, "No attempt could be made."),
                key: None,
            },
        })
    }

    /// Holds the request's estimate against the leased key's own budget (releasing the hold on
    /// the key of a failed attempt before); `false` when the key has spent it. Takes the key's
    /// prices for the request's cost.
    async fn hold_key_budget(&self, ctx: &mut RequestCtx, lease: &keypool_pool::Lease) -> bool {
        let key = &lease.key;
        ctx.spend.key_hold = None;
        ctx.spend.key_pricing.clone_from(&key.pricing);
        let Some(budget) = key.budget else {
            return true;
        };
        let amount = crate::spend::estimate(
            &ctx.spend.prices,
            &ctx.inspected.model,
            ctx.inspected.est_prompt,
            ctx.inspected
                .max_output
                .unwrap_or(self.config.completion_estimate),
            key.pricing.as_deref(),
        );
        ctx.spend.key_hold = ctx.spend.budgets.hold_key(&key.name, budget, amount).await;
        ctx.spend.key_hold.is_some()
    }

    /// One attempt on a leased key, inside its own span (its failure recorded there).
    async fn traced_attempt(
        &self,
        client: &UpstreamClient,
        ctx: &mut RequestCtx,
        lease: keypool_pool::Lease,
    ) -> Attempt {
        ctx.attempts += 1;
        ctx.key = Some(lease.key.name.clone());
        ctx.provider = Some(lease.key.kind.as_str());
        let t = Instant::now();
        let span = observe::attempt_span(ctx, &lease.key.name, lease.key.kind.as_str());
        let outcome = self
            .attempt(client, ctx, lease, &span)
            .instrument(span.clone())
            .await;
        if let Attempt::Failed(f) = &outcome {
            observe::attempt_failed(&ctx.gateway, &span, f);
        }
        ctx.upstream_time += t.elapsed();
        outcome
    }

    /// The key a Responses API request must go to: the one that created the response it names
    /// (by path or `previous_response_id`), when that is pinned.
    async fn pinned_key(&self, ctx: &RequestCtx) -> Option<Arc<str>> {
        if keypool_types::Surface::of_path(&ctx.path) != keypool_types::Surface::Responses {
            return None;
        }
        let id = crate::inspect::referenced_response(&ctx.path, &ctx.inspected)?;
        self.pool.pinned(id).await
    }

    /// Pins a response the Responses API just created to the key that created it: a whole
    /// answer before it is sent, a stream when its `response.created` passes.
    async fn pin_created(&self, ctx: &RequestCtx, reply: &mut Reply) {
        if keypool_types::Surface::of_path(&ctx.path) != keypool_types::Surface::Responses
            || &*ctx.path != "/v1/responses"
            || ctx.method != reqwest::Method::POST
        {
            return;
        }
        match reply {
            Reply::Whole {
                status: 200..=299,
                body,
                key: Some(key),
                ..
            } => {
                if let Some(id) = crate::inspect::response_id(body) {
                    self.pool.pin(&id, key).await;
                }
            }
            Reply::Stream { relay, key, .. } => {
                let (pool, key) = (self.pool.clone(), key.clone());
                relay.on_response_id(Box::new(move |id| {
                    tokio::spawn(async move { pool.pin(&id, &key).await });
                }));
            }
            _ => {}
        }
    }

    fn no_key(no: &NoKey, ctx: &RequestCtx) -> ApiError {
        if *no == NoKey::AllDisabled {
            observe::all_failed(ctx, ": every key that serves it is disabled");
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
}

/// Every key that serves the model has spent its own budget for the period.
fn keys_spent_error(model: &str) -> ApiError {
    ApiError::new(
        ErrorKind::InsufficientQuota,
        format!(
            "Every upstream key that serves `{model}` has reached its own budget for this period."
        ),
    )
}

fn shared_unavailable() -> ApiError {
    ApiError::new(
        ErrorKind::SharedStateUnavailable,
        "The shared rate-limit state is unavailable and this gateway refuses rather than guess.",
    )
    .retry_after(1)
}

/// Every key is out of budget until `until`: waits for it (plus jitter growing with `waits`)
/// when that is before `deadline`; `false` when it is not (nothing waited).
async fn wait_for_budget(
    ctx: &mut RequestCtx,
    until: Instant,
    waits: u32,
    deadline: Instant,
) -> bool {
    let now = Instant::now();
    let wake = until + jitter(waits);
    if wake > deadline {
        return false;
    }
    sleep(wake - now).await;
    ctx.queued += wake - now;
    observe::queued(&ctx.gateway, wake - now);
    true
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
