//! Every metric's registration, in the order `/metrics` lists them: [`Metrics::new`].

use std::sync::RwLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::{LATENCY, Metrics, OVERHEAD};

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn float_counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::CounterVec {
    let c = prometheus::CounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

fn plain_histogram(r: &Registry, name: &str, help: &str, b: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

fn plain_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[allow(clippy::too_many_lines)] // one registration per metric, in the order /metrics lists them
    /// A registry of its own with every metric registered.
    #[must_use]
    pub fn new() -> Self {
        let r = Registry::new();
        let key = &["key"];
        Self {
            requests: counter(
                &r,
                "keypool_requests_total",
                "Client requests answered, by gateway, model, key and status class.",
                &["gateway", "model", "key", "status_class"],
            ),
            request_duration: histogram(
                &r,
                "keypool_request_duration_seconds",
                "Client request latency (to the end of the response or stream).",
                &["gateway"],
                LATENCY,
            ),
            overhead: plain_histogram(
                &r,
                "keypool_overhead_seconds",
                "Time keypool itself added to non-stream requests: latency minus upstream and queue time.",
                OVERHEAD,
            ),
            attempts: counter(
                &r,
                "keypool_upstream_attempts_total",
                "Upstream attempts by key, provider and outcome.",
                &["key", "provider", "outcome"],
            ),
            failovers: counter(
                &r,
                "keypool_failovers_total",
                "Attempts that failed over to another key, by reason.",
                &["reason"],
            ),
            upstream_ttfb: histogram(
                &r,
                "keypool_upstream_ttfb_seconds",
                "Upstream time to response headers, per attempt.",
                key,
                LATENCY,
            ),
            upstream_latency: histogram(
                &r,
                "keypool_upstream_latency_seconds",
                "Upstream attempt duration (whole response or stream), per key.",
                key,
                LATENCY,
            ),
            prompt_tokens: counter(
                &r,
                "keypool_prompt_tokens_total",
                "Prompt tokens used, by gateway, model and key.",
                &["gateway", "model", "key"],
            ),
            completion_tokens: counter(
                &r,
                "keypool_completion_tokens_total",
                "Completion tokens used, by gateway, model and key.",
                &["gateway", "model", "key"],
            ),
            cache_read_tokens: counter(
                &r,
                "keypool_cache_read_tokens_total",
                "Prompt tokens read from the provider's prompt cache (part of the prompt tokens), by gateway, model and key.",
                &["gateway", "model", "key"],
            ),
            spend: float_counter(
                &r,
                "keypool_spend_usd_total",
                "What requests cost in USD at the price catalog's prices, by gateway, model and key.",
                &["gateway", "model", "key"],
            ),
            unpriced: plain_counter(
                &r,
                "keypool_unpriced_requests_total",
                "Requests with usage whose model has no price (their cost is left empty, never 0).",
            ),
            cache_write_tokens: counter(
                &r,
                "keypool_cache_write_tokens_total",
                "Prompt tokens written to the provider's prompt cache (part of the prompt tokens), by gateway, model and key.",
                &["gateway", "model", "key"],
            ),
            queue_wait: plain_histogram(
                &r,
                "keypool_queue_wait_seconds",
                "Time requests waited for a key with budget.",
                LATENCY,
            ),
            rate_limited: counter(
                &r,
                "keypool_rate_limited_total",
                "Rate-limit refusals: source policy (gateway limits, quota), pool (key budgets, cooling keys) or upstream (an upstream 429).",
                &["source", "reason"],
            ),
            refusals: counter(
                &r,
                "keypool_refusals_total",
                "Requests refused by keypool before any upstream, by gateway and error code.",
                &["gateway", "code"],
            ),
            answers_cut: counter(
                &r,
                "keypool_upstream_answers_cut_total",
                "Upstream answers keypool cut off: response_too_large (a buffered answer past max_response_bytes), stream_event_too_large (an event past max_stream_event_bytes), stream_deadline (a stream past stream_deadline).",
                &["reason"],
            ),
            fallbacks: counter(
                &r,
                "keypool_model_fallbacks_total",
                "Requests moved to a fallback model, by gateway, model asked for, model tried next and reason: exhausted (no key could serve) or context_length (the answer was 400 context_length_exceeded).",
                &["gateway", "from", "to", "reason"],
            ),
            affinity: counter(
                &r,
                "keypool_affinity_total",
                "Requests naming a session, by gateway and outcome: hit (its key served it), miss (a new session took a key) or move (its key could not serve; another was remembered).",
                &["gateway", "outcome"],
            ),
            response_cache: counter(
                &r,
                "keypool_response_cache_total",
                "Response cache lookups by gateway and outcome: hit, miss, refresh (x-keypool-cache: refresh) or bypass (no-store, or not cacheable).",
                &["gateway", "outcome"],
            ),
            guardrail_hits: counter(
                &r,
                "keypool_guardrail_hits_total",
                "Guardrail rules that matched, by gateway, rule (a detector, a custom rule, `keywords` or a pattern's name) and where: request or response. Counted once per request and rule.",
                &["gateway", "rule", "on"],
            ),
            key_healthy: gauge(
                &r,
                "keypool_key_healthy",
                "1 when the key is usable now.",
                key,
            ),
            key_disabled: gauge(
                &r,
                "keypool_key_disabled",
                "1 when the key is disabled (rejected by its upstream, or unusable).",
                key,
            ),
            key_cooldown: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "keypool_key_cooldown_seconds",
                        "Seconds until a cooling key is used again (0 when not cooling).",
                    ),
                    key,
                )
                .unwrap_or_else(|e| panic!("metric: {e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("metric: {e}"));
                g
            },
            key_prompt_cache_hit_ratio: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "keypool_key_prompt_cache_hit_ratio",
                        "Prompt tokens the key's provider read from its prompt cache, over all its prompt tokens, since start (from exact usage).",
                    ),
                    key,
                )
                .unwrap_or_else(|e| panic!("metric: {e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("metric: {e}"));
                g
            },
            key_window_requests: gauge(
                &r,
                "keypool_key_window_requests",
                "Requests in the key's trailing 60 s window.",
                key,
            ),
            key_window_tokens: gauge(
                &r,
                "keypool_key_window_tokens",
                "Tokens in the key's trailing 60 s window (reserved estimates until settled).",
                key,
            ),
            key_rpm_limit: gauge(
                &r,
                "keypool_key_rpm_limit",
                "The key's configured rpm (absent when unlimited).",
                key,
            ),
            key_tpm_limit: gauge(
                &r,
                "keypool_key_tpm_limit",
                "The key's configured tpm (absent when unlimited).",
                key,
            ),
            key_in_flight: gauge(
                &r,
                "keypool_key_in_flight",
                "Attempts in flight on the key.",
                key,
            ),
            usage_queue_depth: {
                let g = IntGauge::new(
                    "keypool_usage_queue_depth",
                    "Usage events waiting for the store writer.",
                )
                .unwrap_or_else(|e| panic!("metric: {e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("metric: {e}"));
                g
            },
            usage_written: plain_counter(
                &r,
                "keypool_usage_written_total",
                "Usage events written to the store.",
            ),
            usage_spilled: plain_counter(
                &r,
                "keypool_usage_spilled_total",
                "Usage events spilled to the local file while the store was unavailable.",
            ),
            malformed_requests: plain_counter(
                &r,
                "keypool_malformed_requests_total",
                "Client requests the HTTP server could not read (malformed, past its bounds, too slow), counted instead of logged one by one.",
            ),
            usage_dropped: plain_counter(
                &r,
                "keypool_usage_dropped_total",
                "Usage events dropped past the configured queue or spill caps.",
            ),
            redis_errors: plain_counter(
                &r,
                "keypool_redis_errors_total",
                "Errors talking to Redis (shared state).",
            ),
            alerts: counter(
                &r,
                "keypool_alerts_total",
                "Alert messages by channel and result (sent, failed, suppressed).",
                &["channel", "result"],
            ),
            models: RwLock::default(),
            series: RwLock::default(),
            labels_hasher: foldhash::fast::RandomState::default(),
            unpriced_warned: std::sync::Mutex::default(),
            registry: r,
        }
    }
}
