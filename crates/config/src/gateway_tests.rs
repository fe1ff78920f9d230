//! Gateways as written → validated: every field, every mistake with its path.

use super::*;
use crate::FieldError;

fn gw(yaml: &str) -> Result<Gateway, Vec<FieldError>> {
    let raw: RawGateway = serde_norway::from_str(yaml).unwrap();
    validate_gateway(&raw, "gateways[0]")
}

#[test]
fn the_issue_example_validates() {
    let g = gw(r#"
name: team
auth: {method: exact, position: "header:Authorization", secrets: [s1, "sha256:0000000000000000000000000000000000000000000000000000000000000000"]}
expires_at: "2026-12-31T23:59:59Z"
active: true
token_quota: 1000000
models: [gpt-4o-mini, "deepseek*"]
retries: 2
rate_limits: ["ingress:100/minute", "secret:10/hour", "secret:1000/day"]
whitelist: ["ip:10.0.0.0/8", "secret:^vip-", "time:22:00-06:00"]
blacklist: ["ip:203.0.113.7"]
timezone: "Asia/Shanghai"
prompt_template: "Answer briefly: {{query}}"
param_map: {model: ["deepseek", "deepseek-qwen2-7b"]}
param_fixed: {temperature: 0.2, stream_options.include_usage: true}
"#)
        .unwrap();
    assert_eq!(g.token_quota, Some(1_000_000));
    assert_eq!(g.rate_limits.len(), 3);
    assert_eq!(g.rate_limits[2].per, Duration::from_secs(86_400));
    assert!(matches!(
        g.whitelist[2],
        ListRule::Time {
            from: 1320,
            to: 360
        }
    ));
    assert!(g.allows_model("deepseek-r1") && !g.allows_model("gpt-4o"));
    assert_eq!(g.param_fixed[0].0, vec!["stream_options", "include_usage"]);
    assert!(g.transforms());
}

#[test]
fn mistakes_name_their_field() {
    let errs = gw(r#"
name: Team_1
auth: {method: jwt, jwt_algorithms: [none, RS256], jwt_key: "not a pem"}
expires_at: tomorrow
token_quota: lots
rate_limits: ["ingress:ten/minute", "burst:1/second"]
whitelist: ["time:25:00-01:00", "mac:aa"]
timezone: Mars/Olympus
prompt_template: "no placeholder"
param_map: {model: [a]}
"#)
    .unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "gateways[0].name",
        "gateways[0].auth.jwt_algorithms[0]",
        "gateways[0].auth.jwt_key",
        "gateways[0].expires_at",
        "gateways[0].token_quota",
        "gateways[0].rate_limits[0]",
        "gateways[0].rate_limits[1]",
        "gateways[0].whitelist[0]",
        "gateways[0].whitelist[1]",
        "gateways[0].timezone",
        "gateways[0].prompt_template",
        "gateways[0].param_map.model",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
}

#[test]
fn no_limit_and_defaults() {
    let g = gw("name: open\nrate_limits: [no-limit]\ntoken_quota: no-limit\n").unwrap();
    assert!(g.auth.is_none() && g.rate_limits.is_empty() && g.token_quota.is_none());
    assert!(g.active && g.allows_model("anything"));
    let a = gw("name: a\nauth: {method: regex, pattern: '^t-'}\n").unwrap();
    assert_eq!(
        a.auth.unwrap().position,
        Position::Header("authorization".into())
    );
}

#[test]
fn a_gateway_round_trips_through_json_with_its_unset_lists() {
    let raw: RawGateway = serde_norway::from_str("name: team\nmodels: gpt-4o\n").unwrap();
    let back: RawGateway = serde_json::from_str(&serde_json::to_string(&raw).unwrap()).unwrap();
    assert_eq!(back, raw);
    let none: RawGateway = serde_json::from_str(r#"{"name": "t", "models": null}"#).unwrap();
    assert_eq!(none.models, None);
}
