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
#[path = "convert_tests.rs"]
mod tests;
