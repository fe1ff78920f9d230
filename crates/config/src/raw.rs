//! The YAML file as written: a superset of openai-api-route's `config.yaml`.
//!
//! Field names here are a contract with users' files: add fields, never rename one. Unknown fields
//! are refused (`deny_unknown_fields`) so a typo is reported instead of silently ignored.

use serde::Deserialize;

mod sections;
pub use sections::{
    RawAdmin, RawFeishu, RawLog, RawMatrix, RawNotify, RawRedis, RawSentinel, RawTelemetry,
    RawWebhook,
};

/// Seconds, as an integer or a decimal number.
pub type Seconds = f64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Listen address: `host:port` or Go's `:port` (all interfaces). Default `:8888`.
    pub address: Option<String>,
    /// Client tokens, comma-separated (openai-api-route) or a YAML list.
    pub authorization: Option<StringOrList>,
    /// Upstream timeout for non-stream requests. Default 120.
    pub timeout: Option<Seconds>,
    /// Time to first byte for streams. Default 10.
    pub stream_timeout: Option<Seconds>,
    /// Longest gap between two chunks of a stream. Default 60.
    pub idle_timeout: Option<Seconds>,
    /// `sqlite` | `postgres` | `none`.
    pub dbtype: Option<String>,
    pub dbaddr: Option<String>,
    /// `least-used` (default) | `order` | `random`.
    pub lb_policy: Option<String>,
    /// How long a request may wait for a key with budget. Default 30.
    pub queue_timeout: Option<Seconds>,
    /// Largest request body accepted. Default 32 MiB.
    pub max_body_bytes: Option<u64>,
    /// Failover attempts after the first. Default: one attempt per upstream.
    pub retries: Option<u32>,
    /// How long in-flight requests get to finish on SIGTERM. Default 30.
    pub shutdown_grace: Option<Seconds>,
    /// Largest upstream answer buffered whole (non-stream answers, error bodies). Default 64 MiB.
    pub max_response_bytes: Option<u64>,
    /// Longest a request body may take to arrive, in seconds (408 past it). Default 30.
    pub body_timeout: Option<Seconds>,
    /// Request body bytes being received at once across all connections (503 past it).
    /// Default 512 MiB.
    pub max_buffered_request_bytes: Option<u64>,
    /// Largest single event of an upstream stream. Default 4 MiB.
    pub max_stream_event_bytes: Option<u64>,
    /// Longest a stream may last, in seconds. Default: no limit (only `idle_timeout`).
    pub stream_deadline: Option<Seconds>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// What is recorded of each request, and how usage is written.
    pub log: Option<RawLog>,
    /// Proxies whose `X-Forwarded-For` is believed for the client IP (CIDRs).
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub trusted_proxies: Vec<String>,
    /// Per-tenant gateways at `/llm/api/{name}/v1/*`.
    #[serde(default)]
    pub gateways: Vec<crate::gateway::RawGateway>,
    /// Metrics and traces.
    pub telemetry: Option<RawTelemetry>,
    /// Alerts to Feishu/Lark, Matrix or a webhook.
    pub notify: Option<RawNotify>,
    /// The admin gRPC service.
    pub admin: Option<RawAdmin>,
    /// Shared state across replicas.
    pub redis: Option<RawRedis>,
    /// Prices that replace the built-in catalog's (model names or globs; the first match wins).
    #[serde(default)]
    pub pricing: Vec<keypool_pricing::RawPrice>,
    /// Answer tokens assumed, for a budget's estimate, when a request names no `max_tokens`.
    /// Default 256.
    pub completion_estimate: Option<u64>,

    // The `default` gateway's policy (`/v1/*`): the same fields, with the same meaning, as a
    // `gateways:` entry (see `RawGateway`). Its credentials are `authorization` above plus the
    // keys' own `authorization` tokens, and its `retries` is the top-level `retries`.
    /// RFC 3339; after it every call to `/v1/*` gets 403 `gateway_expired`.
    pub expires_at: Option<String>,
    /// `false` answers 403 `gateway_inactive`. Default `true`.
    pub active: Option<bool>,
    /// Total tokens `/v1/*` may use, or `no-limit` (default).
    pub token_quota: Option<crate::gateway::Quota>,
    /// What `/v1/*` may spend a period, in USD.
    pub budget: Option<crate::budget::RawBudget>,
    /// What each client token may spend a period on `/v1/*`.
    pub caller_budget: Option<crate::budget::RawBudget>,
    /// Models callers may ask for (exact, or a `prefix*`); default all.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::option::deserialize"
    )]
    pub models: Option<Vec<String>>,
    /// `ingress:n/unit` and `secret:n/unit` (per client token), or `no-limit`.
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub rate_limits: Vec<String>,
    /// `ip:CIDR`, `secret:REGEX`, `time:HH:MM-HH:MM`.
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub whitelist: Vec<String>,
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub blacklist: Vec<String>,
    /// IANA name for `time:` rules and the monitoring day. Default UTC.
    pub timezone: Option<String>,
    /// Replaces the last user message's text; must contain `{{query}}`.
    pub prompt_template: Option<String>,
    /// `field: [old, new]`.
    #[serde(default)]
    pub param_map: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
    /// `field: value`, set on every request.
    #[serde(default)]
    pub param_fixed: std::collections::BTreeMap<String, serde_json::Value>,
    /// `model: [next, ...]`: models tried when no key for `model` can serve.
    #[serde(default)]
    pub fallbacks: std::collections::BTreeMap<String, Vec<String>>,
    /// The same, for an answer `400 context_length_exceeded`.
    #[serde(default)]
    pub context_fallbacks: std::collections::BTreeMap<String, Vec<String>>,
    /// `{ttl: 600}`: a session keeps its key.
    pub affinity: Option<crate::routing::RawAffinity>,
    /// `{ttl: 300, backend: memory}`: the exact response cache.
    pub cache: Option<crate::routing::RawCache>,
    /// Personal data masked before it leaves for the provider.
    pub data_masking: Option<crate::guard::RawDataMasking>,
    /// Prohibited content blocked or masked.
    pub content_safety: Option<crate::guard::RawContentSafety>,
}

/// What a control plane pushes to its frontends besides keys and gateways: the top-level
/// request policy as written. Unset fields take the file's defaults on the frontend too.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct RawPolicy {
    pub authorization: Vec<String>,
    pub timeout: Option<Seconds>,
    pub stream_timeout: Option<Seconds>,
    pub idle_timeout: Option<Seconds>,
    pub lb_policy: Option<String>,
    pub queue_timeout: Option<Seconds>,
    pub max_body_bytes: Option<u64>,
    pub retries: Option<u32>,
    pub shutdown_grace: Option<Seconds>,
    pub max_response_bytes: Option<u64>,
    pub max_stream_event_bytes: Option<u64>,
    pub stream_deadline: Option<Seconds>,
    pub body_timeout: Option<Seconds>,
    pub max_buffered_request_bytes: Option<u64>,
    pub trusted_proxies: Vec<String>,
    /// The config's prices (`pricing:`).
    #[serde(default)]
    pub pricing: Vec<keypool_pricing::RawPrice>,
    #[serde(default)]
    pub completion_estimate: Option<u64>,
    /// The recording half of `log:` (where the events go is each process's own).
    pub log: RawLogPolicy,
    /// The `default` gateway's fields.
    pub default_gateway: crate::gateway::RawGateway,
}

/// The recording half of `log:`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct RawLogPolicy {
    pub request_body: bool,
    pub response_body: bool,
    pub headers: bool,
    pub max_field_bytes: Option<usize>,
    pub redact_headers: Vec<String>,
}

impl RawConfig {
    /// The top-level request policy, as written.
    pub fn policy(&self) -> RawPolicy {
        let log = self.log.as_ref();
        RawPolicy {
            authorization: self
                .authorization
                .as_ref()
                .map(StringOrList::entries)
                .unwrap_or_default(),
            timeout: self.timeout,
            stream_timeout: self.stream_timeout,
            idle_timeout: self.idle_timeout,
            lb_policy: self.lb_policy.clone(),
            queue_timeout: self.queue_timeout,
            max_body_bytes: self.max_body_bytes,
            retries: self.retries,
            shutdown_grace: self.shutdown_grace,
            max_response_bytes: self.max_response_bytes,
            max_stream_event_bytes: self.max_stream_event_bytes,
            stream_deadline: self.stream_deadline,
            body_timeout: self.body_timeout,
            max_buffered_request_bytes: self.max_buffered_request_bytes,
            trusted_proxies: self.trusted_proxies.clone(),
            pricing: self.pricing.clone(),
            completion_estimate: self.completion_estimate,
            log: RawLogPolicy {
                request_body: log.is_some_and(|l| l.request_body),
                response_body: log.is_some_and(|l| l.response_body),
                headers: log.is_some_and(|l| l.headers),
                max_field_bytes: log.and_then(|l| l.max_field_bytes),
                redact_headers: log.map(|l| l.redact_headers.clone()).unwrap_or_default(),
            },
            default_gateway: self.default_gateway(),
        }
    }

    /// Takes `policy` as this config's top-level request policy (a frontend's, from its
    /// control plane); the rest of `log:` and everything else stay this config's.
    pub fn set_policy(&mut self, policy: RawPolicy) {
        let g = policy.default_gateway;
        self.authorization =
            (!policy.authorization.is_empty()).then_some(StringOrList::Many(policy.authorization));
        self.timeout = policy.timeout;
        self.stream_timeout = policy.stream_timeout;
        self.idle_timeout = policy.idle_timeout;
        self.lb_policy = policy.lb_policy;
        self.queue_timeout = policy.queue_timeout;
        self.max_body_bytes = policy.max_body_bytes;
        self.retries = policy.retries;
        self.shutdown_grace = policy.shutdown_grace;
        self.max_response_bytes = policy.max_response_bytes;
        self.max_stream_event_bytes = policy.max_stream_event_bytes;
        self.stream_deadline = policy.stream_deadline;
        self.body_timeout = policy.body_timeout;
        self.max_buffered_request_bytes = policy.max_buffered_request_bytes;
        self.trusted_proxies = policy.trusted_proxies;
        self.pricing = policy.pricing;
        self.completion_estimate = policy.completion_estimate;
        let log = self.log.get_or_insert_with(RawLog::default);
        log.request_body = policy.log.request_body;
        log.response_body = policy.log.response_body;
        log.headers = policy.log.headers;
        log.max_field_bytes = policy.log.max_field_bytes;
        log.redact_headers = policy.log.redact_headers;
        self.expires_at = g.expires_at;
        self.active = g.active;
        self.token_quota = g.token_quota;
        self.budget = g.budget;
        self.caller_budget = g.caller_budget;
        self.models = g.models;
        self.rate_limits = g.rate_limits;
        self.whitelist = g.whitelist;
        self.blacklist = g.blacklist;
        self.timezone = g.timezone;
        self.prompt_template = g.prompt_template;
        self.param_map = g.param_map;
        self.param_fixed = g.param_fixed;
        self.fallbacks = g.fallbacks;
        self.context_fallbacks = g.context_fallbacks;
        self.affinity = g.affinity;
        self.cache = g.cache;
        self.data_masking = g.data_masking;
        self.content_safety = g.content_safety;
    }

    /// The `default` gateway (`/v1/*`) as a `gateways:` entry would write it (no `auth`: its
    /// credentials are the client tokens, added at run time with the keys').
    pub fn default_gateway(&self) -> crate::gateway::RawGateway {
        crate::gateway::RawGateway {
            name: Some(crate::gateway::DEFAULT_GATEWAY.to_owned()),
            auth: None,
            expires_at: self.expires_at.clone(),
            active: self.active,
            token_quota: self.token_quota.clone(),
            budget: self.budget.clone(),
            caller_budget: self.caller_budget.clone(),
            models: self.models.clone(),
            retries: self.retries,
            rate_limits: self.rate_limits.clone(),
            whitelist: self.whitelist.clone(),
            blacklist: self.blacklist.clone(),
            timezone: self.timezone.clone(),
            prompt_template: self.prompt_template.clone(),
            param_map: self.param_map.clone(),
            param_fixed: self.param_fixed.clone(),
            fallbacks: self.fallbacks.clone(),
            context_fallbacks: self.context_fallbacks.clone(),
            affinity: self.affinity.clone(),
            cache: self.cache.clone(),
            data_masking: self.data_masking.clone(),
            content_safety: self.content_safety.clone(),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Option<String>,
    /// The upstream key; `asis` passes the client's `Authorization` header through.
    pub sk: Option<String>,
    pub endpoint: Option<String>,
    /// `openai` (default) | `anthropic` | `azure` | `replicate`.
    pub r#type: Option<String>,
    pub timeout: Option<Seconds>,
    pub stream_timeout: Option<Seconds>,
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub allow: Vec<String>,
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub deny: Vec<String>,
    /// Client tokens allowed to use this upstream (comma-separated or a list).
    pub authorization: Option<StringOrList>,
    /// Anyone may use this upstream, with or without a client token.
    #[serde(default)]
    pub noauth: bool,
    /// Forward the client's request headers (all but hop-by-hop and credentials).
    #[serde(default)]
    pub keep_header: bool,
    /// Requests per trailing minute this key may take.
    pub rpm: Option<u32>,
    /// Tokens per trailing minute this key may take.
    pub tpm: Option<u64>,
    /// Replicate only: how chat messages become a prompt: `mistral` (`[INST]`), `llama3`, or a
    /// custom template with `{{system}}` and `{{prompt}}`. Default: from the model name.
    pub chat_template: Option<String>,
    /// Azure only: the `api-version` query parameter (default [`crate::AZURE_API_VERSION`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Azure only: model → deployment (`{gpt-4o: my-gpt4o}`); a model not listed is its own
    /// deployment's name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub deployments: std::collections::BTreeMap<String, String>,
    /// What this key may spend a period, in USD (its own cap: past it the key is not picked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::RawBudget>,
    /// This key's own prices (before the config's and the built-in ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pricing: Vec<keypool_pricing::RawPrice>,
    /// A factor on the prices that apply to this key (`0.8`: a 20% discount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_multiplier: Option<f64>,
}

/// `"a,b"` or `[a, b]` (a bare number is a one-token string).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// By hand rather than `untagged`: a mistake names its place (`authorization[1]`) and what was
/// expected, instead of "did not match any variant".
impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringOrList;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a comma-separated string or a list of strings")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StringOrList::One(v.to_owned()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StringOrList::One(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StringOrList::One(v.to_string()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StringOrList::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl StringOrList {
    /// The non-empty, trimmed entries.
    pub fn entries(&self) -> Vec<String> {
        let parts: Vec<&str> = match self {
            Self::One(s) => s.split(',').collect(),
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        };
        parts
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// `allow: gpt-4o` is `allow: [gpt-4o]`: a scalar is accepted wherever a list of strings is.
pub(crate) mod one_or_many {
    use serde::de::{Deserializer, SeqAccess, Visitor};

    struct Strings;

    impl<'de> Visitor<'de> for Strings {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or a list of strings")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(Strings)
    }

    /// The same, for an optional field (`null` is `None`).
    pub(crate) mod option {
        use serde::de::{Deserializer, Visitor};

        struct MaybeStrings;

        impl<'de> Visitor<'de> for MaybeStrings {
            type Value = Option<Vec<String>>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::deserialize(d).map(Some)
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<String>>, D::Error> {
            d.deserialize_option(MaybeStrings)
        }
    }
}
