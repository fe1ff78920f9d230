//! What each phase of the request pipeline records, in one place: spans (when traces are
//! exported), metrics and alerts. The phases call these at their boundaries and record nothing
//! themselves. Everything goes to the [`Telemetry`] handle the process was started with: a
//! gateway's runtime carries it (`gw.telemetry`), so does a key's lease.
//!
//! | phase | records |
//! |---|---|
//! | request | the server span ([`server_span`]), its `policy` child over every phase before `forward` |
//! | resolve … build ctx | a refusal: `keypool_refusals_total{gateway, code}` ([`refused`]) |
//! | guard | a rule that matched, on the request or the answer: `keypool_guardrail_hits_total`, a log line, an alert with `alert: true` ([`guardrail_hit`]) |
//! | inspect | a response cache lookup: `keypool_response_cache_total` ([`response_cache`]) |
//! | select key | a `select` span per attempt ([`select_span`]); a wait for budget: `keypool_queue_wait_seconds` ([`queued`]); a session's pick: `keypool_affinity_total` ([`affinity`]) |
//! | forward | an attempt span per key ([`attempt_span`]), its failure on it ([`attempt_failed`]); `keypool_failovers_total{reason}`; every key failed or disabled: an alert ([`all_failed`]); a fallback model: `keypool_model_fallbacks_total` ([`fell_back`]) |
//! | relay | a `stream` span from the first byte (in [`crate::relay`]) |
//! | account | the request's outcome on its server span, `keypool_requests_total` and the latency and token histograms ([`answered`]) |

use std::time::Duration;

use keypool_policy::gateway::GatewayRuntime;
use keypool_telemetry::Telemetry;
use keypool_types::{ApiError, Usage};

use crate::attempt::Failure;
use crate::ctx::RequestCtx;

/// The request's server span (none unless traces are exported), from the caller's trace
/// context headers.
pub(crate) fn server_span(t: &Telemetry, req: &actix_web::HttpRequest) -> tracing::Span {
    if !t.traced() {
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

/// The span over the phases before `forward`.
pub(crate) fn policy_span(server: &tracing::Span) -> tracing::Span {
    keypool_telemetry::trace::child(server, "policy")
}

/// A request refused by keypool itself (before any key was tried): counted by gateway and code.
pub(crate) fn refused(t: &Telemetry, gateway: &str, error: &ApiError) {
    t.metrics().refusal(gateway, error.kind.wire().code);
}

/// The span of one key selection.
pub(crate) fn select_span(ctx: &RequestCtx, policy: &'static str) -> tracing::Span {
    keypool_telemetry::trace::select_span(&ctx.span, ctx.attempts + 1, policy)
}

/// A wait for a key with budget.
pub(crate) fn queued(gw: &GatewayRuntime, wait: Duration) {
    gw.telemetry
        .metrics()
        .queue_wait
        .observe(wait.as_secs_f64());
}

/// The span of one attempt on one key.
pub(crate) fn attempt_span(ctx: &RequestCtx, key: &str, provider: &str) -> tracing::Span {
    keypool_telemetry::trace::attempt_span(
        &ctx.span,
        ctx.attempts,
        key,
        provider,
        ctx.method.as_str(),
    )
}

/// The trace context an attempt passes upstream (W3C `traceparent`/`tracestate` of its span).
pub(crate) fn trace_context(span: &tracing::Span) -> Vec<(String, String)> {
    keypool_telemetry::trace::propagation_headers(span)
}

/// The span of a stream's relay, from its first byte.
pub(crate) fn stream_span(ctx: &RequestCtx, ttfb_ms: u64) -> tracing::Span {
    keypool_telemetry::trace::stream_span(&ctx.span, ttfb_ms)
}

/// A failed attempt, failed over from: on its span, and counted by reason.
pub(crate) fn attempt_failed(gw: &GatewayRuntime, span: &tracing::Span, f: &Failure) {
    if !span.is_none() {
        span.record("error.type", f.reason());
        span.record("otel.status_code", "ERROR");
        if let Failure::Upstream { status, .. } = f {
            span.record("http.response.status_code", *status);
        }
    }
    gw.telemetry
        .metrics()
        .failovers
        .with_label_values(&[f.reason()])
        .inc();
}

/// What a session's pick did with the session's key.
pub(crate) fn affinity(gw: &GatewayRuntime, stick: keypool_pool::Stick) {
    gw.telemetry
        .metrics()
        .affinity
        .with_label_values(&[&gw.name, stick.as_str()])
        .inc();
}

/// A guardrail rule matched (counted once per request and rule; logged by name, never the text).
pub(crate) fn guardrail_hit(gw: &GatewayRuntime, rule: &str, on: &str, alert: bool) {
    let gateway = &*gw.name;
    gw.telemetry
        .metrics()
        .guardrail_hits
        .with_label_values(&[gateway, rule, on])
        .inc();
    tracing::info!(gateway, rule, on, "guardrail rule matched");
    if alert {
        gw.telemetry.alert(
            keypool_telemetry::Cause::Guardrail,
            format!("{gateway}/{rule}"),
            format!("guardrail rule {rule} matched a {on} on gateway {gateway}"),
        );
    }
}

/// A response cache lookup: `hit`, `miss`, `refresh` or `bypass`.
pub(crate) fn response_cache(gw: &GatewayRuntime, outcome: &str) {
    gw.telemetry
        .metrics()
        .response_cache
        .with_label_values(&[&gw.name, outcome])
        .inc();
}

/// A request moved on to a fallback model.
pub(crate) fn fell_back(gw: &GatewayRuntime, from: &str, to: &str, reason: &str) {
    gw.telemetry
        .metrics()
        .fallbacks
        .with_label_values(&[&gw.name, from, to, reason])
        .inc();
}

/// Every key that serves the request failed it (or is disabled): an alert, deduplicated by
/// gateway and model.
pub(crate) fn all_failed(ctx: &RequestCtx, why: &str) {
    ctx.gateway.telemetry.alert(
        keypool_telemetry::Cause::AllUpstreamsFailed,
        format!("{}/{}", ctx.gateway.name, ctx.inspected.model),
        format!(
            "all upstreams failed for model {} on gateway {}{why}",
            ctx.inspected.model, ctx.gateway.name
        ),
    );
}

/// The request answered (or given up): its outcome on the server span, and the request metrics.
pub(crate) fn answered(
    ctx: &RequestCtx,
    status: u16,
    usage: Option<Usage>,
    cost: Option<keypool_pricing::Cost>,
    error: Option<&'static str>,
    latency: Duration,
) {
    if !ctx.span.is_none() {
        trace_outcome(ctx, status, usage, error);
    }
    let tokens = usage.unwrap_or_default();
    ctx.gateway
        .telemetry
        .metrics()
        .request(&keypool_telemetry::RequestRecord {
            gateway: &ctx.gateway.name,
            model: &ctx.inspected.model,
            key: ctx.key.as_deref(),
            status,
            latency,
            overhead: (ctx.attempts > 0 && !ctx.inspected.stream)
                .then(|| latency.saturating_sub(ctx.upstream_time + ctx.queued)),
            prompt_tokens: tokens.prompt_tokens,
            completion_tokens: tokens.completion_tokens,
            cache_read_tokens: tokens.cache_read_tokens,
            cache_write_tokens: tokens.cache_write_tokens,
            cost_usd: cost.map(keypool_pricing::Cost::as_f64),
        });
}

/// Puts the request's outcome on its server span.
fn trace_outcome(ctx: &RequestCtx, status: u16, usage: Option<Usage>, error: Option<&'static str>) {
    let s = &ctx.span;
    s.record("http.response.status_code", status);
    s.record("gen_ai.request.model", ctx.inspected.model.as_str());
    if let Some(m) = &ctx.response_model {
        s.record("gen_ai.response.model", m.as_str());
    }
    if let Some(u) = usage {
        s.record("gen_ai.usage.input_tokens", u.prompt_tokens);
        s.record("gen_ai.usage.output_tokens", u.completion_tokens);
    }
    s.record("keypool.gateway", &*ctx.gateway.name);
    if let Some(k) = &ctx.key {
        s.record("keypool.key", &**k);
    }
    s.record("keypool.attempts", ctx.attempts);
    if let Some(e) = error {
        s.record("error.type", e);
    }
    if status >= 500 {
        s.record("otel.status_code", "ERROR");
    }
    // a span's end time is its last exit: for a stream, that is now, not when the handler
    // returned the response head
    drop(s.enter());
}

/// An upstream answer keypool cut off (`response_too_large`, `stream_event_too_large`,
/// `stream_deadline`).
pub(crate) fn answer_cut(t: &Telemetry, reason: &str) {
    t.metrics().answers_cut.with_label_values(&[reason]).inc();
}
