//! Gateways: per-tenant virtual endpoints at `/llm/api/{name}/v1/*`, as written ([`RawGateway`])
//! and validated ([`Gateway`]).
//!
//! The same [`validate_gateway`] serves the config file and (later) the admin service, so a
//! gateway is either valid everywhere or rejected with the path of the field at fault.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use crate::gateway_validate::{RuleError, valid_gateway_name, validate_gateway};
use crate::{ModelRule, UpstreamKey};

/// The gateway at `/v1/*`, whose policy is the config's top level.
pub const DEFAULT_GATEWAY: &str = "default";

/// One `gateways:` entry as written. Names are a contract: add fields, never rename one.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// URL segment, `[a-z0-9-]`.
    pub name: Option<String>,
    /// How callers authenticate; absent = anyone may call (logged loudly at start-up).
    pub auth: Option<RawGatewayAuth>,
    /// RFC 3339; after it every call gets 403 `gateway_expired`.
    pub expires_at: Option<String>,
    /// `false` answers 403 `gateway_inactive`. Default `true`.
    pub active: Option<bool>,
    /// Total tokens this gateway may use, or `no-limit` (default).
    pub token_quota: Option<Quota>,
    /// What the gateway may spend a period, in USD: `{usd: 50, period: day}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::RawBudget>,
    /// What each caller (credential) may spend a period through this gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_budget: Option<crate::budget::RawBudget>,
    /// Models callers may ask for (exact, or a `prefix*`); default all.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::option::deserialize"
    )]
    pub models: Option<Vec<String>>,
    /// Failover attempts after the first (default: the top-level `retries`).
    pub retries: Option<u32>,
    /// `ingress:n/unit` (all calls) and `secret:n/unit` (per caller); unit second, minute, hour
    /// or day; or `no-limit`.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::deserialize",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub rate_limits: Vec<String>,
    /// `ip:CIDR`, `secret:REGEX`, `time:HH:MM-HH:MM`; any match admits, and wins over the
    /// blacklist.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::deserialize",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub whitelist: Vec<String>,
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::deserialize",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub blacklist: Vec<String>,
    /// IANA name for `time:` rules. Default UTC.
    pub timezone: Option<String>,
    /// Replaces the last user message's text; must contain `{{query}}`.
    pub prompt_template: Option<String>,
    /// `field: [old, new]`: a body value equal to `old` becomes `new`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub param_map: BTreeMap<String, Vec<Value>>,
    /// `field: value`, set on every request; dots name nested fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub param_fixed: BTreeMap<String, Value>,
    /// `model: [next, ...]`: models tried when no key for `model` can serve.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// The same, for an answer `400 context_length_exceeded`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context_fallbacks: BTreeMap<String, Vec<String>>,
    /// `{ttl: 600}`: a session keeps its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<crate::routing::RawAffinity>,
    /// `{ttl: 300, backend: memory}`: the exact response cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::routing::RawCache>,
    /// Personal data masked before it leaves for the provider (and restored in the answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_masking: Option<crate::guard::RawDataMasking>,
    /// Prohibited content blocked or masked, in requests and answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_safety: Option<crate::guard::RawContentSafety>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGatewayAuth {
    /// `exact` | `regex` | `jwt`.
    pub method: Option<String>,
    /// `header:NAME` (default `header:Authorization`), `body:FIELD` or `arg:NAME`.
    pub position: Option<String>,
    /// exact: the accepted secrets, plain or as `sha256:<hex>`; kept only hashed.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::deserialize",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub secrets: Vec<String>,
    /// regex: a credential matching it is accepted.
    pub pattern: Option<String>,
    /// jwt: the HMAC secret, or a PEM public key for RS*/PS*/ES*/EdDSA.
    pub jwt_key: Option<String>,
    /// jwt: the algorithms accepted (default `[HS256]`); `none` is always rejected.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::deserialize",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub jwt_algorithms: Vec<String>,
    /// jwt: when set, a token's `aud` must include it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// jwt: when set, a token's `iss` must equal it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
}

/// `token_quota: 1000000` or `token_quota: no-limit`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Quota {
    Tokens(u64),
    Text(String),
}

/// By hand rather than `untagged`, so a mistake says what was expected.
impl<'de> Deserialize<'de> for Quota {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quota;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of tokens or no-limit")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Quota::Tokens(v))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Quota::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A validated gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub name: String,
    pub auth: Option<GatewayAuth>,
    pub expires_at: Option<SystemTime>,
    pub active: bool,
    pub token_quota: Option<u64>,
    pub budget: Option<crate::budget::Budget>,
    pub caller_budget: Option<crate::budget::Budget>,
    /// `None` = every model.
    pub models: Option<Vec<ModelRule>>,
    pub retries: Option<u32>,
    pub rate_limits: Vec<RateLimit>,
    pub whitelist: Vec<ListRule>,
    pub blacklist: Vec<ListRule>,
    pub timezone: chrono_tz::Tz,
    pub prompt_template: Option<String>,
    /// (path, old, new)
    pub param_map: Vec<(Vec<String>, Value, Value)>,
    /// (path, value)
    pub param_fixed: Vec<(Vec<String>, Value)>,
    /// Fallbacks, affinity and the response cache.
    pub routing: crate::routing::Routing,
    pub data_masking: Option<crate::guard::DataMasking>,
    pub content_safety: Option<crate::guard::ContentSafety>,
}

impl Gateway {
    /// A gateway named `name` with no policy at all: open, every model, no limits.
    pub fn open(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            auth: None,
            expires_at: None,
            active: true,
            token_quota: None,
            budget: None,
            caller_budget: None,
            models: None,
            retries: None,
            rate_limits: Vec::new(),
            whitelist: Vec::new(),
            blacklist: Vec::new(),
            timezone: chrono_tz::UTC,
            prompt_template: None,
            param_map: Vec::new(),
            param_fixed: Vec::new(),
            routing: crate::routing::Routing::default(),
            data_masking: None,
            content_safety: None,
        }
    }

    /// Whether the gateway rewrites request bodies.
    pub fn transforms(&self) -> bool {
        self.prompt_template.is_some() || !self.param_map.is_empty() || !self.param_fixed.is_empty()
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|rules| rules.iter().any(|r| r.matches(model)))
    }
}

#[derive(Debug, Clone)]
pub struct GatewayAuth {
    pub method: AuthMethod,
    pub position: Position,
}

#[derive(Clone)]
pub enum AuthMethod {
    /// SHA-256 of each accepted secret.
    Exact(Vec<[u8; 32]>),
    /// The `default` gateway's client tokens (see [`ClientTokens`]).
    Tokens(std::sync::Arc<ClientTokens>),
    Regex(Regex),
    Jwt {
        key: DecodingKey,
        algorithms: Vec<Algorithm>,
        /// Required `aud`, when set.
        audience: Option<String>,
        /// Required `iss`, when set.
        issuer: Option<String>,
    },
}

impl std::fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(h) => write!(f, "Exact({} secrets)", h.len()),
            Self::Tokens(t) => write!(f, "Tokens({} tokens)", t.tokens.len()),
            Self::Regex(r) => write!(f, "Regex({})", r.as_str()),
            Self::Jwt { algorithms, .. } => write!(f, "Jwt({algorithms:?})"),
        }
    }
}

/// The `default` gateway's credentials: the top-level `authorization` tokens plus every key's
/// own `authorization` tokens (openai-api-route's rules). Unlike a named gateway's secrets, a
/// token also chooses keys: a key with its own `authorization` list serves only those tokens,
/// and a `noauth` key serves callers with no valid token at all.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTokens {
    /// Each accepted token with its [`caller_id`], computed once.
    pub tokens: Vec<(std::sync::Arc<str>, std::sync::Arc<str>)>,
    /// Some key is `noauth`: a caller without a valid token is admitted, anonymously.
    pub anonymous: bool,
}

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTokens({} tokens)", self.tokens.len())
    }
}

impl ClientTokens {
    /// From the top-level tokens and the keys in use; `None` when no token is configured
    /// anywhere (an open gateway).
    pub fn new(client_tokens: &[String], keys: &[std::sync::Arc<UpstreamKey>]) -> Option<Self> {
        let mut tokens: Vec<(std::sync::Arc<str>, std::sync::Arc<str>)> = Vec::new();
        let all = client_tokens
            .iter()
            .chain(keys.iter().flat_map(|k| k.authorization.iter()));
        for t in all {
            if !tokens.iter().any(|(x, _)| x.as_ref() == t) {
                tokens.push((t.as_str().into(), caller_id(t).into()));
            }
        }
        (!tokens.is_empty()).then(|| Self {
            tokens,
            anonymous: keys.iter().any(|k| k.noauth),
        })
    }
}

/// `tok-<12 hex of sha256>`: identifies a credential in usage and logs without revealing it.
pub fn caller_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut id = String::with_capacity(16);
    id.push_str("tok-");
    id.push_str(&keypool_types::hex(&digest[..6]));
    id
}

impl Gateway {
    /// The `default` gateway as it runs: `spec` (from the top level of the config) with the
    /// client tokens of the config and of `keys` as its credentials.
    #[must_use]
    pub fn with_client_tokens(
        &self,
        client_tokens: &[String],
        keys: &[std::sync::Arc<UpstreamKey>],
    ) -> Self {
        let mut g = self.clone();
        g.auth = ClientTokens::new(client_tokens, keys).map(|t| GatewayAuth {
            method: AuthMethod::Tokens(std::sync::Arc::new(t)),
            position: Position::Header("authorization".to_owned()),
        });
        g
    }
}

/// Where the credential is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Lower-case header name.
    Header(String),
    /// Top-level JSON body field.
    Body(String),
    /// Query parameter.
    Arg(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// All calls to the gateway.
    Ingress,
    /// Per caller identity.
    Secret,
}

/// No more than `limit` calls in any trailing `per`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub scope: LimitScope,
    pub limit: u64,
    pub per: Duration,
    /// As written, for messages: `secret:10/hour`.
    pub text: String,
}

#[derive(Debug, Clone)]
pub enum ListRule {
    Ip(ipnet::IpNet),
    /// On the extracted credential.
    Secret(Regex),
    /// Minutes since midnight in the gateway's timezone, `[from, to)`; `from > to` crosses
    /// midnight.
    Time {
        from: u16,
        to: u16,
    },
}

impl RawGateway {
    /// The same gateway with every plain exact-auth secret replaced by its `sha256:<hex>` form:
    /// what the store and the admin API hold.
    #[must_use]
    pub fn hashed(&self) -> Self {
        let mut g = self.clone();
        if let Some(a) = g.auth.as_mut() {
            for s in &mut a.secrets {
                if !s.starts_with("sha256:") {
                    let h = secret_hash(s.as_bytes());
                    *s = format!("sha256:{}", keypool_types::hex(&h));
                }
            }
        }
        g
    }

    /// Its routing fields.
    pub fn routing(&self) -> crate::routing::RawRouting {
        crate::routing::RawRouting {
            fallbacks: self.fallbacks.clone(),
            context_fallbacks: self.context_fallbacks.clone(),
            affinity: self.affinity.clone(),
            cache: self.cache.clone(),
        }
    }
}

/// SHA-256 of a gateway secret, as [`AuthMethod::Exact`] keeps it.
pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

pub(crate) fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;
