//! [`StoredEvent`]: a usage event as the store and the spill file keep it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keypool_types::UsageEvent;
use serde::{Deserialize, Serialize};

/// A usage event with its request log, flattened to plain values (unix ms, strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: String,
    pub at_ms: i64,
    pub gateway: String,
    pub caller: Option<String>,
    pub model: String,
    pub key_name: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    pub attempts: i32,
    pub status: i32,
    pub stream: bool,
    pub latency_ms: i64,
    pub ttfb_ms: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub error: Option<String>,
    /// Parts of `prompt_tokens` (absent from events spilled before they existed).
    #[serde(default)]
    pub cache_read_tokens: Option<i64>,
    #[serde(default)]
    pub cache_write_tokens: Option<i64>,
    #[serde(default)]
    pub cache_write_1h_tokens: Option<i64>,
    /// Pico-dollars; none for a model without a price.
    #[serde(default)]
    pub cost_pico: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<StoredLog>,
    /// The model asked for, when a fallback (`model`) served it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    /// Answered from the response cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_hit: bool,
    /// Guardrail rules that matched, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrails: Option<String>,
}

/// The recorded parts of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLog {
    pub request_headers: Option<String>,
    pub request_body: Option<String>,
    pub response_body: Option<String>,
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl From<UsageEvent> for StoredEvent {
    fn from(e: UsageEvent) -> Self {
        let usage = e.usage;
        Self {
            id: keypool_types::event_id_hex(e.id),
            at_ms: unix_ms(e.at),
            gateway: e.gateway.to_string(),
            caller: e.caller.as_deref().map(str::to_owned),
            model: e.model,
            key_name: e.key.as_deref().map(str::to_owned),
            provider: e.provider.map(str::to_owned),
            attempts: i32::try_from(e.attempts).unwrap_or(i32::MAX),
            status: i32::from(e.status),
            stream: e.stream,
            latency_ms: ms(e.latency),
            ttfb_ms: e.ttfb.map(ms),
            prompt_tokens: usage.map(|u| tokens(u.prompt_tokens)),
            completion_tokens: usage.map(|u| tokens(u.completion_tokens)),
            total_tokens: usage.map(|u| tokens(u.total())),
            client_ip: e.client_ip.map(|ip| ip.to_string()),
            user_agent: e.user_agent,
            error: e.error.map(str::to_owned),
            cache_read_tokens: usage.map(|u| tokens(u.cache_read_tokens)),
            cache_write_tokens: usage.map(|u| tokens(u.cache_write_tokens)),
            cache_write_1h_tokens: usage.map(|u| tokens(u.cache_write_1h_tokens)),
            cost_pico: e.cost_pico.map(tokens),
            requested_model: e.requested_model,
            cache_hit: e.cache_hit,
            guardrails: e.guardrails,
            log: e.log.map(|l| StoredLog {
                request_headers: l.request_headers,
                request_body: l.request_body,
                response_body: l.response_body,
            }),
        }
    }
}

/// A stored event as the admin API's message (`PublishUsage` whole, `StreamUsage` without its
/// log): the one conversion between the two shapes, each way.
impl From<&StoredEvent> for keypool_proto::admin::v1::UsageEvent {
    fn from(e: &StoredEvent) -> Self {
        let n = |v: Option<i64>| v.map(|t| u64::try_from(t).unwrap_or(0));
        Self {
            id: e.id.clone(),
            at_ms: e.at_ms,
            gateway: e.gateway.clone(),
            caller: e.caller.clone(),
            model: e.model.clone(),
            key: e.key_name.clone(),
            provider: e.provider.clone(),
            attempts: u32::try_from(e.attempts).unwrap_or(0),
            status: u32::try_from(e.status).unwrap_or(0),
            stream: e.stream,
            latency_ms: u64::try_from(e.latency_ms).unwrap_or(0),
            prompt_tokens: n(e.prompt_tokens),
            completion_tokens: n(e.completion_tokens),
            total_tokens: n(e.total_tokens),
            error: e.error.clone(),
            ttfb_ms: n(e.ttfb_ms),
            cache_read_tokens: n(e.cache_read_tokens),
            cache_write_tokens: n(e.cache_write_tokens),
            cache_write_1h_tokens: n(e.cache_write_1h_tokens),
            cost_pico: n(e.cost_pico),
            requested_model: e.requested_model.clone(),
            cache_hit: e.cache_hit,
            guardrails: e.guardrails.clone(),
            client_ip: e.client_ip.clone(),
            user_agent: e.user_agent.clone(),
            log: e
                .log
                .as_ref()
                .map(|l| keypool_proto::admin::v1::RequestLog {
                    request_headers: l.request_headers.clone(),
                    request_body: l.request_body.clone(),
                    response_body: l.response_body.clone(),
                }),
        }
    }
}

impl From<keypool_proto::admin::v1::UsageEvent> for StoredEvent {
    fn from(e: keypool_proto::admin::v1::UsageEvent) -> Self {
        let n = |v: Option<u64>| v.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        Self {
            id: e.id,
            at_ms: e.at_ms,
            gateway: e.gateway,
            caller: e.caller,
            model: e.model,
            key_name: e.key,
            provider: e.provider,
            attempts: i32::try_from(e.attempts).unwrap_or(i32::MAX),
            status: i32::try_from(e.status).unwrap_or(i32::MAX),
            stream: e.stream,
            latency_ms: i64::try_from(e.latency_ms).unwrap_or(i64::MAX),
            ttfb_ms: n(e.ttfb_ms),
            prompt_tokens: n(e.prompt_tokens),
            completion_tokens: n(e.completion_tokens),
            total_tokens: n(e.total_tokens),
            client_ip: e.client_ip,
            user_agent: e.user_agent,
            error: e.error,
            cache_read_tokens: n(e.cache_read_tokens),
            cache_write_tokens: n(e.cache_write_tokens),
            cache_write_1h_tokens: n(e.cache_write_1h_tokens),
            cost_pico: n(e.cost_pico),
            requested_model: e.requested_model,
            cache_hit: e.cache_hit,
            guardrails: e.guardrails,
            log: e.log.map(|l| StoredLog {
                request_headers: l.request_headers,
                request_body: l.request_body,
                response_body: l.response_body,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(log: Option<StoredLog>, usage: bool) -> StoredEvent {
        let t = |n: i64| usage.then_some(n);
        StoredEvent {
            id: "0190abcdef".into(),
            at_ms: 1_764_000_000_123,
            gateway: "team".into(),
            caller: usage.then(|| "tok-abc".into()),
            model: "gpt-4o-mini".into(),
            key_name: usage.then(|| "k1".into()),
            provider: usage.then(|| "openai".into()),
            attempts: 2,
            status: 200,
            stream: true,
            latency_ms: 1234,
            ttfb_ms: t(56),
            prompt_tokens: t(11),
            completion_tokens: t(7),
            total_tokens: t(18),
            client_ip: usage.then(|| "127.0.0.1".into()),
            user_agent: usage.then(|| "OpenAI/Python".into()),
            error: (!usage).then(|| "client_cancelled".into()),
            cache_read_tokens: t(4),
            cache_write_tokens: t(2),
            cache_write_1h_tokens: t(1),
            cost_pico: t(2_020_000_000),
            requested_model: usage.then(|| "gpt-4o".into()),
            cache_hit: !usage,
            guardrails: usage.then(|| "request:phone".into()),
            log,
        }
    }

    #[test]
    fn a_usage_event_round_trips_through_its_message() {
        let log = StoredLog {
            request_headers: Some("{}".into()),
            request_body: None,
            response_body: Some("hi".into()),
        };
        for e in [
            event(Some(log), true),
            event(None, true),
            // no usage and no key: unset, not zeros
            event(None, false),
        ] {
            let message = keypool_proto::admin::v1::UsageEvent::from(&e);
            assert_eq!(StoredEvent::from(message), e);
        }
    }
}
