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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<StoredLog>,
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
            log: e.log.map(|l| StoredLog {
                request_headers: l.request_headers,
                request_body: l.request_body,
                response_body: l.response_body,
            }),
        }
    }
}
