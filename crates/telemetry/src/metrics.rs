//! keypool's Prometheus metrics: one registry, every name in one place.
//!
//! Labels are low-cardinality only: gateway and key names come from the configuration; a model
//! name comes from the client, so it becomes a label only once an upstream answered it with a
//! 2xx, and at most [`MAX_MODELS`] of them (then `other`). Never a caller's token or identity.
//!
//! Request-level series are recorded once per request from its usage event; attempt-level ones
//! when an attempt settles (a success by its lease through [`KeyHandles`] resolved once per key,
//! other outcomes by the key actor); key and usage-writer gauges are read when scraped.

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
    TextEncoder,
};

/// Distinct model label values kept; later ones are counted as `other`.
pub const MAX_MODELS: usize = 200;

/// Latency buckets (seconds): 1 ms … 2 min.
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// keypool's own overhead (seconds): 50 µs … 1 s.
const OVERHEAD: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub overhead: Histogram,
    pub attempts: IntCounterVec,
    pub failovers: IntCounterVec,
    pub upstream_ttfb: HistogramVec,
    pub upstream_latency: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    pub cache_read_tokens: IntCounterVec,
    pub cache_write_tokens: IntCounterVec,
    pub spend: prometheus::CounterVec,
    pub unpriced: prometheus::IntCounter,
    pub queue_wait: Histogram,
    pub rate_limited: IntCounterVec,
    pub refusals: IntCounterVec,
    pub answers_cut: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub affinity: IntCounterVec,
    pub response_cache: IntCounterVec,
    pub guardrail_hits: IntCounterVec,
    pub key_healthy: IntGaugeVec,
    pub key_disabled: IntGaugeVec,
    pub key_cooldown: prometheus::GaugeVec,
    pub key_prompt_cache_hit_ratio: prometheus::GaugeVec,
    pub key_window_requests: IntGaugeVec,
    pub key_window_tokens: IntGaugeVec,
    pub key_rpm_limit: IntGaugeVec,
    pub key_tpm_limit: IntGaugeVec,
    pub key_in_flight: IntGaugeVec,
    pub usage_queue_depth: IntGauge,
    pub usage_written: IntCounter,
    pub usage_spilled: IntCounter,
    pub usage_dropped: IntCounter,
    pub redis_errors: IntCounter,
    pub malformed_requests: IntCounter,
    pub alerts: IntCounterVec,
    models: RwLock<HashSet<String, foldhash::fast::RandomState>>,
    /// Request series resolved so far, by their labels' hash (`labels_hasher`'s: the map takes
    /// it as it is).
    series: RwLock<std::collections::HashMap<u64, Vec<RequestSeries>, TakeHash>>,
    /// Hashes the labels: seeded per process, a few times cheaper than SipHash.
    labels_hasher: foldhash::fast::RandomState,
    /// Models without a price already warned about (at most [`MAX_UNPRICED_WARNED`]).
    unpriced_warned: std::sync::Mutex<HashSet<String>>,
}

/// The most models warned about for having no price (then only counted): a client naming
/// endless models must not grow the set without bound.
const MAX_UNPRICED_WARNED: usize = 1000;

/// `2xx`, `4xx`, `5xx`; 499 (client went away) is its own class.
pub fn status_class(status: u16) -> &'static str {
    match status {
        499 => "499",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A key's attempt series, resolved (see [`Metrics::key_handles`]).
#[derive(Clone)]
pub struct KeyHandles {
    /// `keypool_upstream_attempts_total{outcome="success"}`.
    pub success: IntCounter,
    /// `keypool_upstream_latency_seconds`.
    pub latency: Histogram,
    /// `keypool_upstream_ttfb_seconds`.
    pub ttfb: Histogram,
}

impl std::fmt::Debug for KeyHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHandles").finish_non_exhaustive()
    }
}

/// The most request series kept resolved (beyond them a request resolves its own by label).
const MAX_SERIES: usize = 4096;

/// The labels of a request's series.
struct SeriesLabels<'a> {
    gateway: &'a str,
    model: &'a str,
    key: &'a str,
    class: &'static str,
}

/// A map keyed by a hash already taken uses it as it is.
type TakeHash = std::hash::BuildHasherDefault<U64AsHash>;

#[derive(Default)]
struct U64AsHash(u64);

impl std::hash::Hasher for U64AsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // only `write_u64` is used (the key is a u64); anything else folds in
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The labels a resolved series was made for.
struct OwnedLabels {
    gateway: Box<str>,
    model: Box<str>,
    key: Box<str>,
    class: &'static str,
}

impl OwnedLabels {
    fn is(&self, l: &SeriesLabels<'_>) -> bool {
        *self.gateway == *l.gateway
            && *self.model == *l.model
            && *self.key == *l.key
            && self.class == l.class
    }
}

/// One (gateway, model, key, status class)'s request series, resolved. The token series come
/// into being with the first request that has tokens, the spend series with the first that
/// has a cost, as they did when each request looked them up.
struct RequestSeries {
    labels: OwnedLabels,
    requests: IntCounter,
    duration: Histogram,
    tokens: std::sync::OnceLock<TokenSeries>,
    spend: std::sync::OnceLock<prometheus::Counter>,
}

/// The token counters of a request's (gateway, model, key).
struct TokenSeries {
    prompt: IntCounter,
    completion: IntCounter,
    cache_read: IntCounter,
    cache_write: IntCounter,
}

impl RequestSeries {
    fn resolve(m: &Metrics, l: &SeriesLabels<'_>) -> Self {
        Self {
            labels: OwnedLabels {
                gateway: l.gateway.into(),
                model: l.model.into(),
                key: l.key.into(),
                class: l.class,
            },
            requests: m
                .requests
                .with_label_values(&[l.gateway, l.model, l.key, l.class]),
            duration: m.request_duration.with_label_values(&[l.gateway]),
            tokens: std::sync::OnceLock::new(),
            spend: std::sync::OnceLock::new(),
        }
    }

    fn record(&self, m: &Metrics, r: &RequestRecord<'_>) {
        self.requests.inc();
        self.duration.observe(r.latency.as_secs_f64());
        if r.prompt_tokens == 0 && r.completion_tokens == 0 {
            return;
        }
        let l = &self.labels;
        let labels = [&*l.gateway, &*l.model, &*l.key];
        let t = self.tokens.get_or_init(|| TokenSeries {
            prompt: m.prompt_tokens.with_label_values(&labels),
            completion: m.completion_tokens.with_label_values(&labels),
            cache_read: m.cache_read_tokens.with_label_values(&labels),
            cache_write: m.cache_write_tokens.with_label_values(&labels),
        });
        t.prompt.inc_by(r.prompt_tokens);
        t.completion.inc_by(r.completion_tokens);
        // with the prompt's series, so a hit rate (read / prompt) always has both
        t.cache_read.inc_by(r.cache_read_tokens);
        t.cache_write.inc_by(r.cache_write_tokens);
        if let Some(usd) = r.cost_usd {
            self.spend
                .get_or_init(|| m.spend.with_label_values(&labels))
                .inc_by(usd);
        }
    }
}

/// What one finished request contributes.
pub struct RequestRecord<'a> {
    pub gateway: &'a str,
    pub model: &'a str,
    pub key: Option<&'a str>,
    pub status: u16,
    pub latency: Duration,
    /// Time keypool itself spent (latency minus upstream and queue time), when known.
    pub overhead: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Parts of `prompt_tokens`: read from the provider's prompt cache, written to it.
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// What it cost, in USD (`None`: no usage, or a model without a price).
    pub cost_usd: Option<f64>,
}

impl Metrics {
    /// A request for `model`, which has no price: counted; `true` the first time (then it is
    /// worth a warning).
    pub fn unpriced(&self, model: &str) -> bool {
        self.unpriced.inc();
        let mut warned = self
            .unpriced_warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        warned.len() < MAX_UNPRICED_WARNED && warned.insert(model.to_owned())
    }

    /// The model's label value: itself once an upstream served it with a 2xx, else `other`.
    fn model_label<'a>(&self, model: &'a str, ok: bool) -> &'a str {
        {
            let known = self
                .models
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if known.contains(model) {
                return model;
            }
            if !ok || known.len() >= MAX_MODELS {
                return "other";
            }
        }
        self.models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(model.to_owned());
        model
    }

    /// Records one finished client request: a few atomic adds on its series, resolved by
    /// label once per (gateway, model, key, status class) and kept ([`RequestSeries`]).
    pub fn request(&self, r: &RequestRecord<'_>) {
        let model = self.model_label(r.model, (200..300).contains(&r.status));
        let labels = SeriesLabels {
            gateway: r.gateway,
            model,
            key: r.key.unwrap_or(""),
            class: status_class(r.status),
        };
        if let Some(o) = r.overhead {
            self.overhead.observe(o.as_secs_f64());
        }
        let hash = std::hash::BuildHasher::hash_one(
            &self.labels_hasher,
            (labels.gateway, labels.model, labels.key, labels.class),
        );
        {
            let known = self
                .series
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(s) = known
                .get(&hash)
                .and_then(|v| v.iter().find(|s| s.labels.is(&labels)))
            {
                s.record(self, r);
                return;
            }
        }
        let series = RequestSeries::resolve(self, &labels);
        series.record(self, r);
        let mut known = self
            .series
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() < MAX_SERIES {
            let same = known.entry(hash).or_default();
            if !same.iter().any(|s| s.labels.is(&labels)) {
                same.push(series);
            }
        }
    }

    /// Records a refusal keypool made before any upstream (auth, lists, limits, quota, ...).
    pub fn refusal(&self, gateway: &str, code: &str) {
        self.refusals.with_label_values(&[gateway, code]).inc();
        let reason = match code {
            "rate_limit_exceeded" => Some(("policy", "rate_limit")),
            "insufficient_quota" => Some(("policy", "quota")),
            "pool_budget_exhausted" => Some(("pool", "budget")),
            "upstream_rate_limited" => Some(("pool", "cooling")),
            _ => None,
        };
        if let Some((source, reason)) = reason {
            self.rate_limited.with_label_values(&[source, reason]).inc();
        }
    }

    /// The per-key series an attempt touches on its common path, resolved once per key so a
    /// request records them with a few atomic adds instead of label lookups.
    pub fn key_handles(&self, key: &str, provider: &str) -> KeyHandles {
        KeyHandles {
            success: self.attempts.with_label_values(&[key, provider, "success"]),
            latency: self.upstream_latency.with_label_values(&[key]),
            ttfb: self.upstream_ttfb.with_label_values(&[key]),
        }
    }

    /// Records one settled upstream attempt (called by the key actors).
    pub fn attempt(&self, key: &str, provider: &str, outcome: &str, elapsed: Duration) {
        self.attempts
            .with_label_values(&[key, provider, outcome])
            .inc();
        if outcome != "cancelled" {
            self.upstream_latency
                .with_label_values(&[key])
                .observe(elapsed.as_secs_f64());
        }
        if outcome == "rate_limited" {
            self.rate_limited
                .with_label_values(&["upstream", "upstream_429"])
                .inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.update_hit_ratios();
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Each key's prompt-cache hit ratio, from the token counters (summed over gateways and
    /// models), worked out when the metrics are read rather than on every request.
    fn update_hit_ratios(&self) {
        use prometheus::core::Collector;
        let by_key = |c: &IntCounterVec| {
            let mut sums = std::collections::HashMap::<String, f64>::new();
            for family in c.collect() {
                for m in family.get_metric() {
                    let key = m
                        .get_label()
                        .iter()
                        .find(|l| l.name() == "key")
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default();
                    *sums.entry(key).or_default() += m.get_counter().get_value();
                }
            }
            sums
        };
        let (prompt, cached) = (by_key(&self.prompt_tokens), by_key(&self.cache_read_tokens));
        for (key, p) in prompt {
            if key.is_empty() || p <= 0.0 {
                continue;
            }
            let c = cached.get(&key).copied().unwrap_or(0.0);
            self.key_prompt_cache_hit_ratio
                .with_label_values(&[key.as_str()])
                .set(c / p);
        }
    }

    /// Raises a counter to `total` (for totals read from elsewhere, e.g. the writer's stats).
    pub fn catch_up(counter: &IntCounter, total: u64) {
        let now = counter.get();
        if total > now {
            counter.inc_by(total - now);
        }
    }
}

#[path = "metrics_register.rs"]
mod register;

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
