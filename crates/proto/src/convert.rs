//! The config file's shapes as protobuf messages and back, in one place: a gateway
//! ([`RawGateway`] ↔ [`pb::GatewaySpec`]), a key ([`RawUpstream`] ↔ [`pb::UpstreamSpec`]) and the
//! top-level request policy ([`RawPolicy`] ↔ [`pb::Policy`]). A message holds exactly what the
//! file writes (unset fields stay unset), so the same validation runs on both sides.
//!
//! JSON values (`param_map`, `param_fixed`) travel as `google.protobuf.Value`, whose numbers are
//! doubles: a whole number comes back as an integer (`max_tokens: 100` stays `100`, never
//! `100.0`), so `2.0` written in a file comes back as `2`.

use keypool_config::budget::RawBudget;
use keypool_config::gateway::{Quota, RawGateway, RawGatewayAuth};
use keypool_config::guard::{RawContentSafety, RawDataMasking, RawModeration, RawRule};
use keypool_config::raw::{RawLogPolicy, RawPolicy, RawUpstream, StringOrList};
use keypool_config::routing::{RawAffinity, RawCache};
use keypool_pricing::{RawAbove, RawPrice, RawTier};
use prost_types::value::Kind;

use crate::admin::v1 as pb;

impl From<&RawGateway> for pb::GatewaySpec {
    fn from(g: &RawGateway) -> Self {
        Self {
            name: g.name.clone().unwrap_or_default(),
            auth: g.auth.as_ref().map(pb::GatewayAuth::from),
            expires_at: g.expires_at.clone(),
            active: g.active,
            token_quota: g.token_quota.as_ref().map(|q| match q {
                Quota::Tokens(n) => pb::gateway_spec::TokenQuota::QuotaTokens(*n),
                Quota::Text(t) => pb::gateway_spec::TokenQuota::QuotaText(t.clone()),
            }),
            models: g.models.clone().map(|items| pb::StringList { items }),
            retries: g.retries,
            rate_limits: g.rate_limits.clone(),
            whitelist: g.whitelist.clone(),
            blacklist: g.blacklist.clone(),
            timezone: g.timezone.clone(),
            prompt_template: g.prompt_template.clone(),
            param_map: g
                .param_map
                .iter()
                .map(|(k, v)| {
                    let values = v.iter().map(to_value).collect();
                    (k.clone(), prost_types::ListValue { values })
                })
                .collect(),
            param_fixed: g
                .param_fixed
                .iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect(),
            budget: g.budget.as_ref().map(pb::Budget::from),
            caller_budget: g.caller_budget.as_ref().map(pb::Budget::from),
            fallbacks: lists(&g.fallbacks),
            context_fallbacks: lists(&g.context_fallbacks),
            affinity: g.affinity.as_ref().map(|a| pb::Affinity {
                ttl: a.ttl,
                hash_prompt: a.hash_prompt,
            }),
            cache: g.cache.as_ref().map(|c| pb::ResponseCache {
                ttl: c.ttl,
                max_entries: c.max_entries,
                max_bytes: c.max_bytes,
                backend: c.backend.clone(),
                per_caller: c.per_caller,
                tool_calls: c.tool_calls,
            }),
            data_masking: g.data_masking.as_ref().map(|m| pb::DataMasking {
                detectors: m.detectors.clone().map(|items| pb::StringList { items }),
                custom: m.custom.iter().map(rule).collect(),
                action: m.action.clone(),
                restore: m.restore,
                alert: m.alert,
            }),
            content_safety: g.content_safety.as_ref().map(|s| pb::ContentSafety {
                keywords: s.keywords.clone(),
                keyword_files: s.keyword_files.clone(),
                patterns: s.patterns.iter().map(rule).collect(),
                on_request: s.on_request.clone(),
                on_response: s.on_response.clone(),
                alert: s.alert,
                moderation: s.moderation.as_ref().map(|m| pb::Moderation {
                    model: m.model.clone(),
                    on: m.on.clone(),
                    timeout_ms: m.timeout_ms,
                    on_failure: m.on_failure.clone(),
                }),
            }),
        }
    }
}

fn rule(r: &RawRule) -> pb::GuardRule {
    pb::GuardRule {
        name: r.name.clone(),
        pattern: r.pattern.clone(),
    }
}

fn raw_rule(r: pb::GuardRule) -> RawRule {
    RawRule {
        name: r.name,
        pattern: r.pattern,
    }
}

fn lists(
    m: &std::collections::BTreeMap<String, Vec<String>>,
) -> std::collections::HashMap<String, pb::StringList> {
    m.iter()
        .map(|(k, v)| (k.clone(), pb::StringList { items: v.clone() }))
        .collect()
}

impl From<pb::GatewaySpec> for RawGateway {
    fn from(g: pb::GatewaySpec) -> Self {
        Self {
            name: Some(g.name).filter(|n| !n.is_empty()),
            auth: g.auth.map(RawGatewayAuth::from),
            expires_at: g.expires_at,
            active: g.active,
            token_quota: g.token_quota.map(|q| match q {
                pb::gateway_spec::TokenQuota::QuotaTokens(n) => Quota::Tokens(n),
                pb::gateway_spec::TokenQuota::QuotaText(t) => Quota::Text(t),
            }),
            models: g.models.map(|m| m.items),
            retries: g.retries,
            rate_limits: g.rate_limits,
            whitelist: g.whitelist,
            blacklist: g.blacklist,
            timezone: g.timezone,
            prompt_template: g.prompt_template,
            param_map: g
                .param_map
                .into_iter()
                .map(|(k, v)| (k, v.values.into_iter().map(from_value).collect()))
                .collect(),
            param_fixed: g
                .param_fixed
                .into_iter()
                .map(|(k, v)| (k, from_value(v)))
                .collect(),
            budget: g.budget.map(RawBudget::from),
            caller_budget: g.caller_budget.map(RawBudget::from),
            fallbacks: g.fallbacks.into_iter().map(|(k, v)| (k, v.items)).collect(),
            context_fallbacks: g
                .context_fallbacks
                .into_iter()
                .map(|(k, v)| (k, v.items))
                .collect(),
            affinity: g.affinity.map(|a| RawAffinity {
                ttl: a.ttl,
                hash_prompt: a.hash_prompt,
            }),
            cache: g.cache.map(|c| RawCache {
                ttl: c.ttl,
                max_entries: c.max_entries,
                max_bytes: c.max_bytes,
                backend: c.backend,
                per_caller: c.per_caller,
                tool_calls: c.tool_calls,
            }),
            data_masking: g.data_masking.map(|m| RawDataMasking {
                detectors: m.detectors.map(|d| d.items),
                custom: m.custom.into_iter().map(raw_rule).collect(),
                action: m.action,
                restore: m.restore,
                alert: m.alert,
            }),
            content_safety: g.content_safety.map(|s| RawContentSafety {
                keywords: s.keywords,
                keyword_files: s.keyword_files,
                patterns: s.patterns.into_iter().map(raw_rule).collect(),
                on_request: s.on_request,
                on_response: s.on_response,
                alert: s.alert,
                moderation: s.moderation.map(|m| RawModeration {
                    model: m.model,
                    on: m.on,
                    timeout_ms: m.timeout_ms,
                    on_failure: m.on_failure,
                }),
            }),
        }
    }
}

impl From<&RawBudget> for pb::Budget {
    fn from(b: &RawBudget) -> Self {
        Self {
            usd: b.usd,
            period: b.period.clone(),
        }
    }
}

impl From<pb::Budget> for RawBudget {
    fn from(b: pb::Budget) -> Self {
        Self {
            usd: b.usd,
            period: b.period,
        }
    }
}

impl From<&RawPrice> for pb::Price {
    fn from(p: &RawPrice) -> Self {
        let t = &p.prices;
        Self {
            models: p.models.clone(),
            input: t.input,
            output: t.output,
            cached_input: t.cached_input,
            cache_write_5m: t.cache_write_5m,
            cache_write_1h: t.cache_write_1h,
            above: p.above.as_ref().map(|a| pb::PriceTier {
                tokens: a.tokens,
                input: a.prices.input,
                output: a.prices.output,
                cached_input: a.prices.cached_input,
                cache_write_5m: a.prices.cache_write_5m,
                cache_write_1h: a.prices.cache_write_1h,
            }),
        }
    }
}

impl From<pb::Price> for RawPrice {
    fn from(p: pb::Price) -> Self {
        Self {
            models: p.models,
            prices: RawTier {
                input: p.input,
                output: p.output,
                cached_input: p.cached_input,
                cache_write_5m: p.cache_write_5m,
                cache_write_1h: p.cache_write_1h,
            },
            above: p.above.map(|a| RawAbove {
                tokens: a.tokens,
                prices: RawTier {
                    input: a.input,
                    output: a.output,
                    cached_input: a.cached_input,
                    cache_write_5m: a.cache_write_5m,
                    cache_write_1h: a.cache_write_1h,
                },
            }),
        }
    }
}

impl From<&RawGatewayAuth> for pb::GatewayAuth {
    fn from(a: &RawGatewayAuth) -> Self {
        Self {
            method: a.method.clone(),
            position: a.position.clone(),
            secrets: a.secrets.clone(),
            pattern: a.pattern.clone(),
            jwt_key: a.jwt_key.clone(),
            jwt_algorithms: a.jwt_algorithms.clone(),
            jwt_audience: a.jwt_audience.clone(),
            jwt_issuer: a.jwt_issuer.clone(),
        }
    }
}

impl From<pb::GatewayAuth> for RawGatewayAuth {
    fn from(a: pb::GatewayAuth) -> Self {
        Self {
            method: a.method,
            position: a.position,
            secrets: a.secrets,
            pattern: a.pattern,
            jwt_key: a.jwt_key,
            jwt_algorithms: a.jwt_algorithms,
            jwt_audience: a.jwt_audience,
            jwt_issuer: a.jwt_issuer,
        }
    }
}

impl From<&RawUpstream> for pb::UpstreamSpec {
    fn from(u: &RawUpstream) -> Self {
        Self {
            name: u.name.clone(),
            sk: u.sk.clone(),
            endpoint: u.endpoint.clone(),
            r#type: u.r#type.clone(),
            timeout: u.timeout,
            stream_timeout: u.stream_timeout,
            allow: u.allow.clone(),
            deny: u.deny.clone(),
            authorization: u
                .authorization
                .as_ref()
                .map(StringOrList::entries)
                .unwrap_or_default(),
            noauth: u.noauth,
            keep_header: u.keep_header,
            rpm: u.rpm,
            tpm: u.tpm,
            chat_template: u.chat_template.clone(),
            api_version: u.api_version.clone(),
            deployments: u.deployments.clone().into_iter().collect(),
            budget: u.budget.as_ref().map(pb::Budget::from),
            pricing: u.pricing.iter().map(pb::Price::from).collect(),
            price_multiplier: u.price_multiplier,
        }
    }
}

impl From<pb::UpstreamSpec> for RawUpstream {
    fn from(u: pb::UpstreamSpec) -> Self {
        Self {
            name: u.name,
            sk: u.sk,
            endpoint: u.endpoint,
            r#type: u.r#type,
            timeout: u.timeout,
            stream_timeout: u.stream_timeout,
            allow: u.allow,
            deny: u.deny,
            authorization: (!u.authorization.is_empty())
                .then_some(StringOrList::Many(u.authorization)),
            noauth: u.noauth,
            keep_header: u.keep_header,
            rpm: u.rpm,
            tpm: u.tpm,
            chat_template: u.chat_template,
            api_version: u.api_version,
            deployments: u.deployments.into_iter().collect(),
            budget: u.budget.map(RawBudget::from),
            pricing: u.pricing.into_iter().map(RawPrice::from).collect(),
            price_multiplier: u.price_multiplier,
        }
    }
}

impl From<&RawPolicy> for pb::Policy {
    fn from(p: &RawPolicy) -> Self {
        Self {
            authorization: p.authorization.clone(),
            timeout: p.timeout,
            stream_timeout: p.stream_timeout,
            idle_timeout: p.idle_timeout,
            lb_policy: p.lb_policy.clone(),
            queue_timeout: p.queue_timeout,
            max_body_bytes: p.max_body_bytes,
            retries: p.retries,
            shutdown_grace: p.shutdown_grace,
            max_response_bytes: p.max_response_bytes,
            max_stream_event_bytes: p.max_stream_event_bytes,
            stream_deadline: p.stream_deadline,
            body_timeout: p.body_timeout,
            max_buffered_request_bytes: p.max_buffered_request_bytes,
            trusted_proxies: p.trusted_proxies.clone(),
            pricing: p.pricing.iter().map(pb::Price::from).collect(),
            completion_estimate: p.completion_estimate,
            log: Some(pb::LogPolicy {
                request_body: p.log.request_body,
                response_body: p.log.response_body,
                headers: p.log.headers,
                max_field_bytes: p.log.max_field_bytes.map(|n| n as u64),
                redact_headers: p.log.redact_headers.clone(),
            }),
            default_gateway: Some(pb::GatewaySpec::from(&p.default_gateway)),
        }
    }
}

impl From<pb::Policy> for RawPolicy {
    fn from(p: pb::Policy) -> Self {
        let log = p.log.unwrap_or_default();
        Self {
            authorization: p.authorization,
            timeout: p.timeout,
            stream_timeout: p.stream_timeout,
            idle_timeout: p.idle_timeout,
            lb_policy: p.lb_policy,
            queue_timeout: p.queue_timeout,
            max_body_bytes: p.max_body_bytes,
            retries: p.retries,
            shutdown_grace: p.shutdown_grace,
            max_response_bytes: p.max_response_bytes,
            max_stream_event_bytes: p.max_stream_event_bytes,
            stream_deadline: p.stream_deadline,
            body_timeout: p.body_timeout,
            max_buffered_request_bytes: p.max_buffered_request_bytes,
            trusted_proxies: p.trusted_proxies,
            pricing: p.pricing.into_iter().map(RawPrice::from).collect(),
            completion_estimate: p.completion_estimate,
            log: RawLogPolicy {
                request_body: log.request_body,
                response_body: log.response_body,
                headers: log.headers,
                max_field_bytes: log
                    .max_field_bytes
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                redact_headers: log.redact_headers,
            },
            default_gateway: p.default_gateway.map(RawGateway::from).unwrap_or_default(),
        }
    }
}

/// A JSON value as `google.protobuf.Value`.
pub fn to_value(v: &serde_json::Value) -> prost_types::Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A `google.protobuf.Value` as JSON; a whole number becomes an integer.
pub fn from_value(v: prost_types::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(b),
        Some(Kind::NumberValue(n)) => number(n),
        Some(Kind::StringValue(s)) => J::String(s),
        Some(Kind::ListValue(l)) => J::Array(l.values.into_iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => J::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, from_value(v)))
                .collect(),
        ),
    }
}

/// 2^53: above it a double no longer holds every integer.
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

fn number(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() < EXACT_INTEGERS {
        return serde_json::Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

#[cfg(test)]
mod tests {
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
}
