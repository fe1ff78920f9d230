use super::*;
use serde_json::json;

fn gateway(yaml: &str) -> RawGateway {
    serde_norway::from_str(yaml).unwrap()
}

#[test]
fn a_gateway_round_trips_field_for_field() {
    let raw = gateway(
        r#"
name: team
auth: {method: jwt, position: "header:X-Team", jwt_key: k, jwt_algorithms: [HS256, HS384]}
expires_at: "2030-01-01T00:00:00Z"
active: false
token_quota: 1000
models: [gpt-4o-mini, "deepseek*"]
retries: 3
rate_limits: ["ingress:100/minute", "secret:10/hour"]
whitelist: ["ip:10.0.0.0/8"]
blacklist: ["secret:^bad"]
timezone: Asia/Shanghai
prompt_template: "Answer: {{query}}"
param_map: {model: [deepseek, gpt-4o-mini]}
param_fixed: {temperature: 0.2, max_tokens: 100, metadata.tags: [a, 1, true, null], nested: {x: -3}}
budget: {usd: 50.5, period: day}
caller_budget: {usd: 2}
fallbacks: {gpt-4o: [gpt-4o-mini, claude-sonnet-4-5]}
context_fallbacks: {gpt-4o-mini: [gpt-4.1]}
affinity: {ttl: 120.5, hash_prompt: true}
cache: {ttl: 60, max_entries: 10, max_bytes: 4096, backend: redis, per_caller: true, tool_calls: false}
data_masking: {detectors: [phone, email], custom: [{name: emp, pattern: "EMP-[0-9]+"}], action: mask, restore: true, alert: true}
content_safety: {keywords: [bad], keyword_files: [kw.txt], patterns: [{name: p, pattern: "x+"}], on_request: mask, on_response: block, alert: false, moderation: {model: omni-moderation-latest, on: request, timeout_ms: 500, on_failure: block}}
"#,
    );
    let back = RawGateway::from(pb::GatewaySpec::from(&raw));
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&raw).unwrap()
    );
    assert_eq!(back.param_fixed["max_tokens"], json!(100), "not 100.0");
    // unset stays unset; `no-limit` and an empty model list survive as written
    let open = gateway("name: open\ntoken_quota: no-limit\nmodels: []\n");
    let back = RawGateway::from(pb::GatewaySpec::from(&open));
    assert!(back.auth.is_none() && back.active.is_none() && back.retries.is_none());
    assert_eq!(back.token_quota, Some(Quota::Text("no-limit".into())));
    assert_eq!(back.models, Some(vec![]));
    assert_eq!(
        RawGateway::from(pb::GatewaySpec::from(&gateway("name: x\n"))).models,
        None
    );
}

#[test]
fn a_key_round_trips_field_for_field() {
    let raw: RawUpstream = serde_norway::from_str(
        "{name: k, sk: sk-1, endpoint: 'http://x/v1', type: replicate, timeout: 1.5, stream_timeout: 2, allow: [a], deny: [b], authorization: 't1,t2', noauth: true, keep_header: true, rpm: 5, tpm: 6, chat_template: llama3, budget: {usd: 9, period: week}, pricing: [{models: ['gpt-4o*'], input: 1.5, output: 6, cached_input: 0.5, above: {tokens: 200000, input: 3, output: 12}}], price_multiplier: 0.8}",
    )
    .unwrap();
    let back = RawUpstream::from(pb::UpstreamSpec::from(&raw));
    assert_eq!(
        back,
        RawUpstream {
            // a comma-separated list travels as its entries
            authorization: Some(StringOrList::Many(vec!["t1".into(), "t2".into()])),
            ..raw
        }
    );
    let bare = RawUpstream::default();
    assert_eq!(RawUpstream::from(pb::UpstreamSpec::from(&bare)), bare);
}

#[test]
fn the_policy_round_trips_with_the_default_gateway() {
    let config: keypool_config::raw::RawConfig = serde_norway::from_str(
        "authorization: [a, b]\ntimeout: 30\nlb_policy: order\nmax_body_bytes: 10\nretries: 1\ntrusted_proxies: [10.0.0.0/8]\nlog: {request_body: true, max_field_bytes: 99, redact_headers: [x-secret]}\nrate_limits: ['ingress:5/minute']\ntoken_quota: 7\npricing: [{models: [house], input: 1, output: 2, cache_write_1h: 4}]\ncompletion_estimate: 512\nbudget: {usd: 1, period: total}\n",
    )
    .unwrap();
    let policy = config.policy();
    let back = RawPolicy::from(pb::Policy::from(&policy));
    assert_eq!(back, policy);
    assert_eq!(back.default_gateway.rate_limits, ["ingress:5/minute"]);
    assert_eq!(
        RawPolicy::from(pb::Policy::from(&RawPolicy::default())),
        RawPolicy {
            default_gateway: RawGateway::default(),
            ..RawPolicy::default()
        }
    );
}

#[test]
fn json_values_keep_their_kind() {
    for v in [
        json!(null),
        json!(true),
        json!(-7),
        json!(0.25),
        json!("s"),
        json!([1, "a", [false]]),
        json!({"a": {"b": [1.5, null]}}),
        json!(9_007_199_254_740_993_u64 as f64),
    ] {
        assert_eq!(from_value(to_value(&v)), v, "{v}");
    }
}
