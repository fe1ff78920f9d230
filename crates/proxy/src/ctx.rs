//! [`RequestCtx`]: the per-request context every phase shares, and the request's one usage event.
//!
//! The context records exactly one [`UsageEvent`] per client request: when the engine answers,
//! when a stream ends, or, if neither happened, when it is dropped — that is a client that went
//! away (recorded as `client_cancelled` with status 499, never alerted).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keypool_policy::Caller;
use keypool_policy::gateway::GatewayRuntime;
use keypool_types::{RequestLog, Usage, UsageEvent, UsageSink, new_event_id_at};
use reqwest::header::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::inspect::Inspected;

/// Logs each event at `info` (used when no store is configured).
pub struct LogSink;

impl UsageSink for LogSink {
    fn record(&self, e: UsageEvent) {
        let usage = e.usage.unwrap_or_default();
        tracing::info!(
            gateway = %e.gateway,
            caller = e.caller.as_deref().unwrap_or("-"),
            model = %e.model,
            key = e.key.as_deref().unwrap_or("-"),
            provider = e.provider.unwrap_or("-"),
            attempts = e.attempts,
            status = e.status,
            stream = e.stream,
            latency_ms = e.latency.as_millis() as u64,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cache_read_tokens = usage.cache_read_tokens,
            cache_write_tokens = usage.cache_write_tokens,
            error = e.error.unwrap_or("-"),
            "request"
        );
    }
}

/// Status recorded for a client that disconnected before its answer was complete (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// What the phases know about one request.
pub struct RequestCtx {
    pub started: Instant,
    pub method: reqwest::Method,
    /// Client path, e.g. `/v1/chat/completions`.
    pub path: Arc<str>,
    /// Path after `/v1`: what the adapter appends to the endpoint's path.
    pub upstream_path: String,
    /// The client's query string, passed on as it is.
    pub query: Option<String>,
    pub caller: Caller,
    pub client_ip: Option<IpAddr>,
    pub inspected: Inspected,
    /// Headers to forward: (default set, `keep_header` set).
    pub headers: (HeaderMap, HeaderMap),
    /// The client's `Authorization`, for `sk: asis` keys.
    pub client_authorization: Option<HeaderValue>,
    /// Attempts made so far.
    pub attempts: u32,
    /// The key of the last attempt.
    pub key: Option<Arc<str>>,
    /// Its provider.
    pub provider: Option<&'static str>,
    pub ttfb: Option<Duration>,
    pub user_agent: Option<String>,
    /// What the `log:` policy records; `None` when it records nothing.
    pub log: Option<RequestLog>,
    /// Cap for the recorded response when responses are logged.
    pub log_response_cap: Option<usize>,
    /// Attempts allowed in all (the gateway's `retries` + 1).
    pub max_attempts: u32,
    /// The gateway the request came through (`default` for `/v1/*`), as it was when the request
    /// started: its name goes in usage events, its quota is settled with the real usage.
    pub gateway: Arc<GatewayRuntime>,
    /// Time spent in upstream attempts (to the first byte for streams).
    pub upstream_time: Duration,
    /// Time spent waiting for a key with budget.
    pub queued: Duration,
    /// The request's server span (`Span::none()` unless traces are exported).
    pub span: tracing::Span,
    /// The model the upstream answered with, when traced.
    pub response_model: Option<String>,
    sink: Arc<dyn UsageSink>,
    accounted: bool,
    /// The cost (for the answer's header, then the usage event), once `priced`.
    cost: Option<keypool_pricing::Cost>,
    priced: bool,
    /// Prices, and what the request holds against its budgets.
    pub spend: crate::spend::Spending,
    /// The model the client asked for, once a fallback model (`inspected.model`) is tried.
    pub requested_model: Option<String>,
    /// The session the request belongs to, on a gateway with `affinity:`.
    pub session: Option<keypool_pool::SessionReq>,
    /// On a gateway with a response cache: where the answer is kept.
    pub(crate) cache: Option<crate::cache::Pending>,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// What the answer restores (`data_masking` with `restore: true`).
    pub restore: Option<crate::guard::Restore>,
    /// Guardrail rules that matched, as `request:rule` / `response:rule`.
    pub guardrails: Vec<String>,
    /// The hold on an upstream connection ([`crate::inflight`]), until the answer is relayed.
    pub slot: Option<crate::inflight::Slot>,
}

/// What the request pipeline established about a request before `forward`: the fields of a
/// new [`RequestCtx`], by name.
pub struct NewRequest {
    pub started: Instant,
    pub method: reqwest::Method,
    pub path: Arc<str>,
    pub upstream_path: String,
    pub query: Option<String>,
    pub caller: Caller,
    pub gateway: Arc<GatewayRuntime>,
    pub client_ip: Option<IpAddr>,
    pub inspected: Inspected,
    pub headers: (HeaderMap, HeaderMap),
    pub client_authorization: Option<HeaderValue>,
    pub user_agent: Option<String>,
    pub log: Option<RequestLog>,
    pub log_response_cap: Option<usize>,
    pub max_attempts: u32,
    pub sink: Arc<dyn UsageSink>,
    pub spend: crate::spend::Spending,
    pub session: Option<keypool_pool::SessionReq>,
}

impl RequestCtx {
    pub fn new(r: NewRequest) -> Self {
        Self {
            started: r.started,
            method: r.method,
            path: r.path,
            upstream_path: r.upstream_path,
            query: r.query,
            caller: r.caller,
            client_ip: r.client_ip,
            inspected: r.inspected,
            headers: r.headers,
            client_authorization: r.client_authorization,
            attempts: 0,
            key: None,
            provider: None,
            ttfb: None,
            user_agent: r.user_agent,
            log: r.log,
            log_response_cap: r.log_response_cap,
            max_attempts: r.max_attempts,
            gateway: r.gateway,
            upstream_time: Duration::ZERO,
            queued: Duration::ZERO,
            span: tracing::Span::none(),
            response_model: None,
            sink: r.sink,
            accounted: false,
            cost: None,
            priced: false,
            spend: r.spend,
            requested_model: None,
            session: r.session,
            cache: None,
            cache_hit: false,
            restore: None,
            guardrails: Vec::new(),
            slot: None,
        }
    }

    /// The answer is being relayed and nothing goes upstream again: lets go of what only an
    /// attempt reads (the forwarded headers, the body sent, the upstream path and query), which
    /// a stream would otherwise hold until it ends.
    pub fn forwarded(&mut self) {
        self.headers = Default::default();
        self.client_authorization = None;
        self.inspected.body = bytes::Bytes::new();
        self.upstream_path = String::new();
        self.query = None;
    }

    /// Records the response (summarised) when the `log:` policy asks for it.
    pub fn capture_response(&mut self, body: &[u8]) {
        if let (Some(cap), Some(log)) = (self.log_response_cap, self.log.as_mut()) {
            log.response_body = Some(crate::capture::summarise_response(body, cap));
        }
    }

    /// Records a stream's concatenated deltas when the `log:` policy asks for it.
    pub fn capture_stream_text(&mut self, text: &str) {
        if let (Some(cap), Some(log)) = (self.log_response_cap, self.log.as_mut()) {
            log.response_body = Some(crate::capture::capped(text, cap));
        }
    }

    /// A request keypool makes on this one's behalf (a moderation call): the same caller,
    /// gateway and headers, its own path, model and JSON body, its own usage event; nothing held.
    pub(crate) fn sub_request(&self, path: &str, model: &str, body: bytes::Bytes) -> Self {
        let size = body.len() as u64 / 4;
        Self::new(NewRequest {
            started: Instant::now(),
            method: reqwest::Method::POST,
            path: Arc::from(path),
            upstream_path: path.strip_prefix("/v1").unwrap_or(path).to_owned(),
            query: None,
            caller: self.caller.clone(),
            gateway: self.gateway.clone(),
            client_ip: self.client_ip,
            inspected: Inspected {
                model: model.to_owned(),
                stream: false,
                est_tokens: size,
                est_prompt: size,
                max_output: None,
                body,
                strip_usage_chunk: false,
                previous_response: None,
            },
            headers: self.headers.clone(),
            client_authorization: self.client_authorization.clone(),
            user_agent: None,
            log: None,
            log_response_cap: None,
            max_attempts: self.max_attempts,
            sink: self.sink.clone(),
            spend: crate::spend::Spending::new(
                self.spend.prices.clone(),
                self.spend.budgets.clone(),
            ),
            session: None,
        })
    }

    /// Answers from the response cache: the cached answer, and a usage event marked as a hit
    /// (no key, no usage, no cost) naming the model that served it.
    pub(crate) fn replay(
        &mut self,
        answer: &keypool_policy::cache::CachedAnswer,
    ) -> actix_web::HttpResponse {
        if answer.model != self.inspected.model {
            let requested = std::mem::replace(&mut self.inspected.model, answer.model.clone());
            self.requested_model = Some(requested);
        }
        self.cache_hit = true;
        self.capture_response(&answer.body);
        self.account(200, None, None);
        crate::cache::replay(answer)
    }

    /// Records this request's usage event (once; later calls are ignored).
    /// What `usage` cost (worked out once per request: an unpriced model is counted once).
    pub fn cost_of(&mut self, usage: Option<Usage>) -> Option<keypool_pricing::Cost> {
        if !std::mem::replace(&mut self.priced, true) {
            self.cost = usage.and_then(|u| self.spend.cost(&self.inspected.model, &u));
        }
        self.cost
    }

    pub fn account(&mut self, status: u16, usage: Option<Usage>, error: Option<&'static str>) {
        if std::mem::replace(&mut self.accounted, true) {
            return;
        }
        if let Some(u) = usage {
            self.gateway.add_tokens(u.total());
        }
        let latency = self.started.elapsed();
        let cost = self.cost_of(usage);
        // a failure that produced no output costs its budgets nothing (its usage is still
        // recorded below)
        let empty_failure = error.is_some() && usage.is_none_or(|u| u.completion_tokens == 0);
        let spent = if empty_failure {
            0
        } else {
            cost.map_or(0, keypool_pricing::Cost::nanos)
        };
        self.spend.settle(spent);
        crate::observe::answered(self, status, usage, cost, error, latency);
        let at = SystemTime::now();
        self.sink.record(UsageEvent {
            id: new_event_id_at(at),
            at,
            gateway: self.gateway.name.clone(),
            caller: self.caller.id.clone(),
            model: self.inspected.model.clone(),
            key: self.key.clone(),
            provider: self.provider,
            attempts: self.attempts,
            status,
            stream: self.inspected.stream,
            latency,
            ttfb: self.ttfb,
            usage,
            cost_pico: cost.map(|c| u64::try_from(c.0).unwrap_or(u64::MAX)),
            client_ip: self.client_ip,
            error,
            user_agent: self.user_agent.take(),
            log: self.log.take().map(Box::new),
            requested_model: self.requested_model.take(),
            cache_hit: self.cache_hit,
            guardrails: (!self.guardrails.is_empty()).then(|| self.guardrails.join(",")),
        });
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if !self.accounted {
            self.account(CLIENT_CLOSED, None, Some("client_cancelled"));
        }
    }
}

#[cfg(test)]
#[path = "ctx_tests.rs"]
mod tests;
