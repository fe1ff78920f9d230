//! The metrics' own arithmetic.

use super::*;

#[test]
fn a_keys_prompt_cache_hit_ratio_is_read_over_prompt_tokens() {
    let m = Metrics::new();
    for (gateway, cached) in [("g1", 30), ("g2", 10)] {
        m.request(&RequestRecord {
            gateway,
            model: "m",
            key: Some("ratio-key"),
            status: 200,
            latency: Duration::from_millis(1),
            overhead: None,
            prompt_tokens: 100,
            completion_tokens: 1,
            cache_read_tokens: cached,
            cache_write_tokens: 0,
            cost_usd: None,
        });
    }
    let text = m.render();
    assert!(
        text.contains("keypool_key_prompt_cache_hit_ratio{key=\"ratio-key\"} 0.2\n"),
        "{text}"
    );
}

/// A request's series are resolved once and kept: the same labels count into the same series
/// as the label lookups did, a different status class or key into its own, and past
/// `MAX_SERIES` requests are still counted (resolved each time).
#[test]
fn request_series_are_resolved_once_and_count_like_label_lookups() {
    let m = Metrics::new();
    let rec = |key, status, prompt| RequestRecord {
        overhead: Some(Duration::from_micros(40)),
        completion_tokens: 2,
        cache_read_tokens: 1,
        cost_usd: Some(0.5),
        ..record(key, status, prompt)
    };
    for _ in 0..3 {
        m.request(&rec("k1", 200, 10));
    }
    m.request(&rec("k1", 500, 0));
    m.request(&rec("k2", 200, 4));
    let get = |c: &IntCounterVec, l: &[&str]| c.with_label_values(l).get();
    assert_eq!(get(&m.requests, &["g", "m", "k1", "2xx"]), 3);
    assert_eq!(get(&m.requests, &["g", "m", "k1", "5xx"]), 1);
    assert_eq!(get(&m.requests, &["g", "m", "k2", "2xx"]), 1);
    assert_eq!(get(&m.prompt_tokens, &["g", "m", "k1"]), 30);
    assert_eq!(
        get(&m.completion_tokens, &["g", "m", "k1"]),
        8,
        "the 500 had completion tokens too"
    );
    assert_eq!(get(&m.cache_read_tokens, &["g", "m", "k2"]), 1);
    assert!((m.spend.with_label_values(&["g", "m", "k1"]).get() - 2.0).abs() < 1e-9);
    assert_eq!(
        m.request_duration
            .with_label_values(&["g"])
            .get_sample_count(),
        5
    );
    assert_eq!(m.overhead.get_sample_count(), 5);
    assert_eq!(
        m.series
            .read()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum::<usize>(),
        3
    );

    // full: still counted
    m.series.write().unwrap().clear();
    for i in 0..MAX_SERIES {
        m.series
            .write()
            .unwrap()
            .insert(u64::MAX - i as u64, Vec::new());
    }
    m.request(&rec("k3", 200, 1));
    m.request(&rec("k3", 200, 1));
    assert_eq!(get(&m.requests, &["g", "m", "k3", "2xx"]), 2);
    assert_eq!(m.series.read().unwrap().len(), MAX_SERIES);
}

/// A request without tokens makes no token series, one without a cost no spend series (as
/// when each request looked its series up).
#[test]
fn token_and_spend_series_appear_with_the_first_tokens_and_cost() {
    let m = Metrics::new();
    m.request(&record("k9", 429, 0));
    m.request(&record("k8", 200, 3));
    let text = m.render();
    let lines = |prefix: &str, key: &str| {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(&format!("key=\"{key}\"")))
            .count()
    };
    assert_eq!(lines("keypool_requests_total", "k9"), 1, "{text}");
    assert_eq!(lines("keypool_prompt_tokens_total", "k9"), 0, "{text}");
    assert_eq!(lines("keypool_prompt_tokens_total", "k8"), 1, "{text}");
    assert_eq!(lines("keypool_spend_usd_total", "k8"), 0, "{text}");
}

/// A request of gateway `g` and model `m` through `key`, with `prompt` prompt tokens and no
/// other usage, overhead or cost.
fn record(key: &'static str, status: u16, prompt: u64) -> RequestRecord<'static> {
    RequestRecord {
        gateway: "g",
        model: "m",
        key: Some(key),
        status,
        latency: Duration::from_millis(1),
        overhead: None,
        prompt_tokens: prompt,
        completion_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd: None,
    }
}
