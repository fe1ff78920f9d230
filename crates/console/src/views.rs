//! What the REST API answers and takes: JSON shapes with OpenAPI schemas, each built from the
//! gRPC admin service's message of the same meaning (so the two surfaces cannot drift apart).

use keypool_proto::admin::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An upstream key with its live state (its secret masked).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub name: String,
    /// `openai`, `anthropic`, `azure` or `replicate`.
    pub provider: String,
    pub endpoint: String,
    /// Enough to tell keys apart, never enough to use one (`sk-…abcd`).
    pub secret_masked: String,
    pub enabled: bool,
    /// `healthy`, `cooling` or `disabled`.
    pub health: String,
    /// When a cooldown ends (unix ms; 0 when not cooling).
    pub cooling_until_ms: i64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    /// Requests and tokens in the last minute's window (this process's view).
    pub window_requests: u64,
    pub window_tokens: u64,
    pub in_flight: u32,
    pub used: u64,
    pub success: u64,
    pub failure: u64,
    pub last_error: String,
    pub latency_ms: f64,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// `config` (declared in the file) or `admin` (added at run time).
    pub owner: String,
}

impl From<pb::Key> for KeyView {
    fn from(k: pb::Key) -> Self {
        Self {
            name: k.name,
            provider: k.provider,
            endpoint: k.endpoint,
            secret_masked: k.secret_masked,
            enabled: k.enabled,
            health: k.health,
            cooling_until_ms: k.cooling_until_ms,
            rpm: k.rpm,
            tpm: k.tpm,
            window_requests: k.window_requests,
            window_tokens: k.window_tokens,
            in_flight: k.in_flight,
            used: k.used,
            success: k.success,
            failure: k.failure,
            last_error: k.last_error,
            latency_ms: k.latency_ms,
            allow: k.allow,
            deny: k.deny,
            owner: k.owner,
        }
    }
}

/// A key to add: the config file's `upstreams:` entry.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewKey {
    pub name: Option<String>,
    /// The upstream secret: stored sealed, never shown again.
    #[schema(min_length = 1)]
    pub sk: String,
    /// The provider's base URL (`https://api.openai.com`).
    #[schema(min_length = 1)]
    pub endpoint: String,
    /// `openai` (default), `anthropic`, `azure` or `replicate`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[schema(format = Int64, minimum = 1, maximum = 4_294_967_295_u64)]
    pub rpm: Option<u32>,
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_u64)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `Some(None)` for an explicit `null` (clear it), `None` when the field is absent.
#[allow(clippy::option_option)] // absent, null and a value are three different asks
fn double<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// What to change on a key: each field given is set; `null` clears a limit.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<u32>, nullable, format = Int64, minimum = 1, maximum = 4_294_967_295_u64)]
    pub rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<u64>, nullable, minimum = 1, maximum = 1_000_000_000_000_000_u64)]
    pub tpm: Option<Option<u64>>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

/// A gateway as the control plane holds it: its spec in the config file's shape (exact secrets
/// as their hashes, an HMAC `jwt_key` masked).
#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayView {
    pub name: String,
    /// `config` (declared in the file: read-only here) or `admin`.
    pub owner: String,
    pub updated_at_ms: i64,
    pub tokens_used: u64,
    /// A `gateways:` entry of the config file.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

impl From<pb::Gateway> for GatewayView {
    fn from(g: pb::Gateway) -> Self {
        let raw = keypool_config::RawGateway::from(g.spec.unwrap_or_default());
        Self {
            name: g.name,
            owner: g.owner,
            updated_at_ms: g.updated_at_ms,
            tokens_used: g.tokens_used,
            spec: serde_json::to_value(raw).unwrap_or_default(),
        }
    }
}

/// A gateway to create or replace.
#[derive(Debug, Deserialize, ToSchema)]
pub struct GatewayInput {
    /// A `gateways:` entry of the config file (`name`, `auth`, `models`, `rate_limits`, …).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// Give the gateway one random exact secret, answered once (creation only).
    #[serde(default)]
    pub generate_secret: bool,
}

/// A created gateway, or one whose secret was rotated: the secret is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayCreated {
    pub gateway: GatewayView,
    /// The new secret (only when one was generated).
    pub secret: Option<String>,
}

/// One row of usage totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageTotalView {
    /// The gateway, key, model, caller or day it totals.
    pub group: String,
    pub calls: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    /// What it cost, in USD.
    pub cost_usd: f64,
}

fn usd(pico: i64) -> f64 {
    keypool_pricing::Cost(u128::try_from(pico).unwrap_or(0)).as_f64()
}

impl From<pb::UsageTotal> for UsageTotalView {
    fn from(t: pb::UsageTotal) -> Self {
        Self {
            group: t.group,
            calls: t.calls,
            errors: t.errors,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            total_tokens: t.total_tokens,
            cache_read_tokens: t.cache_read_tokens,
            cache_write_tokens: t.cache_write_tokens,
            cost_usd: usd(t.cost_pico),
        }
    }
}

/// Calls in one hour.
#[derive(Debug, Serialize, ToSchema)]
pub struct HourView {
    pub hour_ms: i64,
    pub calls: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
}

/// Usage over a range: totals by gateway, key, model, caller and day, and calls per hour of
/// one day.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub by_gateway: Vec<UsageTotalView>,
    pub by_key: Vec<UsageTotalView>,
    pub by_model: Vec<UsageTotalView>,
    pub by_caller: Vec<UsageTotalView>,
    pub by_day: Vec<UsageTotalView>,
    pub calls_per_hour: Vec<HourView>,
}

impl From<pb::GetUsageResponse> for UsageView {
    fn from(u: pb::GetUsageResponse) -> Self {
        let rows = |v: Vec<pb::UsageTotal>| v.into_iter().map(UsageTotalView::from).collect();
        Self {
            by_gateway: rows(u.by_gateway),
            by_key: rows(u.by_key),
            by_model: rows(u.by_model),
            by_caller: rows(u.by_caller),
            by_day: rows(u.by_day),
            calls_per_hour: u
                .calls_per_hour
                .into_iter()
                .map(|h| HourView {
                    hour_ms: h.hour_ms,
                    calls: h.calls,
                    total_tokens: h.total_tokens,
                    cost_usd: usd(h.cost_pico),
                })
                .collect(),
        }
    }
}

/// A replica (this process, a frontend, or an all-in-one replica sharing Redis).
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaView {
    pub id: String,
    pub address: String,
    pub last_seen_ms: i64,
    pub config_version: u64,
}

/// The control plane's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusView {
    pub version: String,
    pub uptime_seconds: u64,
    /// `ok`, `unavailable` or `none`.
    pub store: String,
    pub redis: String,
    pub config_version: u64,
    pub keys: u64,
    pub gateways: u64,
    pub replicas: Vec<ReplicaView>,
}

impl From<pb::Status> for StatusView {
    fn from(s: pb::Status) -> Self {
        Self {
            version: s.version,
            uptime_seconds: s.uptime_seconds,
            store: s.store,
            redis: s.redis,
            config_version: s.config_version,
            keys: s.keys,
            gateways: s.gateways,
            replicas: s
                .replicas
                .into_iter()
                .map(|r| ReplicaView {
                    id: r.id,
                    address: r.address,
                    last_seen_ms: r.last_seen_ms,
                    config_version: r.config_version,
                })
                .collect(),
        }
    }
}

/// One change in the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub at_ms: i64,
    /// The surface and where from (`console 127.0.0.1`, `grpc 10.0.0.5:41234`).
    pub who: String,
    /// `gateway.create`, `key.update`, `prices.set`, `config.reload`, …
    pub action: String,
    pub target: String,
    /// What changed (field names and settings, never a secret).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<keypool_store::AuditRow> for AuditView {
    fn from(r: keypool_store::AuditRow) -> Self {
        Self {
            at_ms: r.at_ms,
            who: r.who,
            action: r.action,
            target: r.target,
            detail: serde_json::from_str(&r.detail).unwrap_or_default(),
        }
    }
}

/// One finished request, as the live tail shows it (no body, no prompt).
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveEvent {
    pub at_ms: i64,
    pub gateway: String,
    pub model: String,
    pub key: Option<String>,
    pub status: i32,
    pub stream: bool,
    pub latency_ms: i64,
    pub ttfb_ms: Option<i64>,
    pub total_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    pub error: Option<String>,
}

impl From<&keypool_store::StoredEvent> for LiveEvent {
    fn from(e: &keypool_store::StoredEvent) -> Self {
        Self {
            at_ms: e.at_ms,
            gateway: e.gateway.clone(),
            model: e.model.clone(),
            key: e.key_name.clone(),
            status: e.status,
            stream: e.stream,
            latency_ms: e.latency_ms,
            ttfb_ms: e.ttfb_ms,
            total_tokens: e.total_tokens,
            cost_usd: e.cost_pico.map(usd),
            error: e.error.clone(),
        }
    }
}

/// `POST /api/login`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Login {
    /// The admin token (`admin.token`).
    pub token: String,
}

/// A console session: the CSRF token every write must send as `x-csrf-token`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    pub csrf: String,
    /// No admin token is configured: anyone who reaches the console may use it.
    pub open: bool,
}

/// An error, in OpenAI's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorView {
    #[schema(value_type = Object)]
    pub error: serde_json::Value,
}

/// The prices in force before the built-in catalog: the ones set at run time, then the config
/// file's (`pricing:` entries: `models`, `input`, `output`, … in USD per million tokens).
#[derive(Debug, Serialize, ToSchema)]
pub struct PricesView {
    #[schema(value_type = Vec<Object>)]
    pub admin: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub file: Vec<serde_json::Value>,
    /// When the run-time prices were last set (0: never).
    pub updated_at_ms: i64,
}

impl From<pb::Prices> for PricesView {
    fn from(p: pb::Prices) -> Self {
        let entries = |v: Vec<pb::Price>| {
            v.into_iter()
                .map(|p| {
                    serde_json::to_value(keypool_pricing::RawPrice::from(p)).unwrap_or_default()
                })
                .collect()
        };
        Self {
            admin: entries(p.admin),
            file: entries(p.file),
            updated_at_ms: p.updated_at_ms,
        }
    }
}

/// `PUT /api/prices`: the run-time prices, replaced whole (an empty list clears them).
#[derive(Debug, Deserialize, ToSchema)]
pub struct PricesInput {
    /// `pricing:` entries, as in the config file.
    #[schema(value_type = Vec<Object>)]
    pub pricing: Vec<serde_json::Value>,
}
