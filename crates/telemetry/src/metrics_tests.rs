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
