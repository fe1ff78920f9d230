//! Gateways: per-tenant virtual endpoints at `/llm/api/{name}/v1/*`, as written ([`RawGateway`])
//! and validated ([`Gateway`]).
//!
//! The same [`validate_gateway`] serves the config file and (later) the admin service, so a
//! gateway is either valid everywhere or rejected with the path of the field at fault.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{FieldError, ModelRule, UpstreamKey};

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
    /// Models callers may ask for (exact, or a `prefix*`); default all.
    pub models: Option<Vec<String>>,
    /// Failover attempts after the first (default: the top-level `retries`).
    pub retries: Option<u32>,
    /// `ingress:n/unit` (all calls) and `secret:n/unit` (per caller); unit second, minute, hour
    /// or day; or `no-limit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<String>,
    /// `ip:CIDR`, `secret:REGEX`, `time:HH:MM-HH:MM`; any match admits, and wins over the
    /// blacklist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub whitelist: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGatewayAuth {
    /// `exact` | `regex` | `jwt`.
    pub method: Option<String>,
    /// `header:NAME` (default `header:Authorization`), `body:FIELD` or `arg:NAME`.
    pub position: Option<String>,
    /// exact: the accepted secrets, plain or as `sha256:<hex>`; kept only hashed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// regex: a credential matching it is accepted.
    pub pattern: Option<String>,
    /// jwt: the HMAC secret, or a PEM public key for RS*/PS*/ES*/EdDSA.
    pub jwt_key: Option<String>,
    /// jwt: the algorithms accepted (default `[HS256]`); `none` is always rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_algorithms: Vec<String>,
}

/// `token_quota: 1000000` or `token_quota: no-limit`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Quota {
    Tokens(u64),
    Text(String),
}

/// A validated gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub name: String,
    pub auth: Option<GatewayAuth>,
    pub expires_at: Option<SystemTime>,
    pub active: bool,
    pub token_quota: Option<u64>,
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
            models: None,
            retries: None,
            rate_limits: Vec::new(),
            whitelist: Vec::new(),
            blacklist: Vec::new(),
            timezone: chrono_tz::UTC,
            prompt_template: None,
            param_map: Vec::new(),
            param_fixed: Vec::new(),
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
    id.push_str(&hex(&digest[..6]));
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
                    *s = format!("sha256:{}", hex(&h));
                }
            }
        }
        g
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of a gateway secret, as [`AuthMethod::Exact`] keeps it.
pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether `name` is a valid gateway URL segment.
pub fn valid_gateway_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Validates one gateway; `at` is its path (`gateways[0]`) for error messages.
pub fn validate_gateway(raw: &RawGateway, at: &str) -> Result<Gateway, Vec<FieldError>> {
    let mut errs: Vec<FieldError> = Vec::new();
    let mut err = |path: String, reason: String| errs.push(FieldError { path, reason });

    let name = raw.name.clone().unwrap_or_default();
    if !valid_gateway_name(&name) {
        err(
            format!("{at}.name"),
            format!("must be 1-64 characters of [a-z0-9-], got {name:?}"),
        );
    }
    let auth = match &raw.auth {
        None => None,
        Some(a) => match validate_auth(a, &format!("{at}.auth")) {
            Ok(a) => Some(a),
            Err(e) => {
                for f in e {
                    err(f.path, f.reason);
                }
                None
            }
        },
    };
    let expires_at =
        raw.expires_at
            .as_deref()
            .and_then(|s| match chrono::DateTime::parse_from_rfc3339(s) {
                Ok(t) => {
                    Some(UNIX_EPOCH + Duration::from_millis(t.timestamp_millis().max(0) as u64))
                }
                Err(e) => {
                    err(
                        format!("{at}.expires_at"),
                        format!("expected RFC 3339 (2026-12-31T23:59:59Z), got {s:?}: {e}"),
                    );
                    None
                }
            });
    let token_quota = match &raw.token_quota {
        None => None,
        Some(Quota::Tokens(n)) => Some(*n),
        Some(Quota::Text(t)) if t == "no-limit" => None,
        Some(Quota::Text(t)) => {
            let n = t.trim().parse::<u64>().ok();
            if n.is_none() {
                err(
                    format!("{at}.token_quota"),
                    format!("expected a number of tokens or no-limit, got {t:?}"),
                );
            }
            n
        }
    };
    let models = raw.models.as_ref().map(|m| {
        m.iter()
            .map(|s| ModelRule::parse(s.trim()))
            .collect::<Vec<_>>()
    });
    let mut rate_limits = Vec::new();
    let no_limit = raw.rate_limits.iter().any(|r| r.trim() == "no-limit");
    for (i, r) in raw.rate_limits.iter().enumerate() {
        if r.trim() == "no-limit" {
            continue;
        }
        match parse_rate_limit(r) {
            Ok(l) if !no_limit => rate_limits.push(l),
            Ok(_) => err(
                format!("{at}.rate_limits[{i}]"),
                "no-limit cannot be combined with limits".to_owned(),
            ),
            Err(reason) => err(format!("{at}.rate_limits[{i}]"), reason.to_string()),
        }
    }
    let mut lists = [Vec::new(), Vec::new()];
    for (li, (field, entries)) in [("whitelist", &raw.whitelist), ("blacklist", &raw.blacklist)]
        .into_iter()
        .enumerate()
    {
        for (i, e) in entries.iter().enumerate() {
            match parse_list_rule(e) {
                Ok(rule) => lists[li].push(rule),
                Err(reason) => err(format!("{at}.{field}[{i}]"), reason.to_string()),
            }
        }
    }
    let [whitelist, blacklist] = lists;
    let timezone = match raw.timezone.as_deref() {
        None => chrono_tz::UTC,
        Some(tz) => tz.parse::<chrono_tz::Tz>().unwrap_or_else(|_| {
            err(
                format!("{at}.timezone"),
                format!("unknown IANA timezone {tz:?} (e.g. Asia/Shanghai, UTC)"),
            );
            chrono_tz::UTC
        }),
    };
    if let Some(t) = &raw.prompt_template
        && !t.contains("{{query}}")
    {
        err(
            format!("{at}.prompt_template"),
            "must contain {{query}}, where the user's message goes".to_owned(),
        );
    }
    let mut param_map = Vec::new();
    for (field, pair) in &raw.param_map {
        match pair.as_slice() {
            [old, new] => param_map.push((field_path(field), old.clone(), new.clone())),
            _ => err(
                format!("{at}.param_map.{field}"),
                "expected [old, new]".to_owned(),
            ),
        }
    }
    let mut param_fixed = Vec::new();
    for (field, value) in &raw.param_fixed {
        let path = field_path(field);
        if path.iter().any(String::is_empty) {
            err(
                format!("{at}.param_fixed.{field}"),
                "empty field name".to_owned(),
            );
        }
        param_fixed.push((path, value.clone()));
    }
    if errs.is_empty() {
        Ok(Gateway {
            name,
            auth,
            expires_at,
            active: raw.active.unwrap_or(true),
            token_quota,
            models,
            retries: raw.retries,
            rate_limits,
            whitelist,
            blacklist,
            timezone,
            prompt_template: raw.prompt_template.clone(),
            param_map,
            param_fixed,
        })
    } else {
        Err(errs)
    }
}

fn field_path(field: &str) -> Vec<String> {
    field.split('.').map(str::to_owned).collect()
}

fn validate_auth(a: &RawGatewayAuth, at: &str) -> Result<GatewayAuth, Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut err = |path: &str, reason: String| {
        errs.push(FieldError {
            path: format!("{at}.{path}"),
            reason,
        });
    };
    let p = a.position.as_deref().unwrap_or("header:Authorization");
    let position = match p.split_once(':') {
        Some(("header", h)) if !h.is_empty() => Position::Header(h.to_ascii_lowercase()),
        Some(("body", f)) if !f.is_empty() => Position::Body(f.to_owned()),
        Some(("arg", q)) if !q.is_empty() => Position::Arg(q.to_owned()),
        _ => {
            err(
                "position",
                format!("expected header:NAME, body:FIELD or arg:NAME, got {p:?}"),
            );
            Position::Header("authorization".into())
        }
    };
    let method = match a.method.as_deref().unwrap_or("exact") {
        "exact" => {
            if a.secrets.is_empty() {
                err("secrets", "exact auth needs at least one secret".to_owned());
            }
            let mut hashes = Vec::with_capacity(a.secrets.len());
            for (i, s) in a.secrets.iter().enumerate() {
                match s.strip_prefix("sha256:") {
                    Some(hex) => match hex32(hex) {
                        Some(h) => hashes.push(h),
                        None => err(
                            &format!("secrets[{i}]"),
                            "sha256: must be followed by 64 hex digits".to_owned(),
                        ),
                    },
                    None if s.is_empty() => {
                        err(&format!("secrets[{i}]"), "empty secret".to_owned());
                    }
                    None => hashes.push(secret_hash(s.as_bytes())),
                }
            }
            Some(AuthMethod::Exact(hashes))
        }
        "regex" => match a.pattern.as_deref() {
            None => {
                err("pattern", "regex auth needs a pattern".to_owned());
                None
            }
            Some(p) => match Regex::new(p) {
                Ok(r) => Some(AuthMethod::Regex(r)),
                Err(e) => {
                    err("pattern", format!("invalid regex: {e}"));
                    None
                }
            },
        },
        "jwt" => jwt_method(a, &mut err),
        other => {
            err(
                "method",
                format!("expected exact, regex or jwt, got {other:?}"),
            );
            None
        }
    };
    match method {
        Some(method) if errs.is_empty() => Ok(GatewayAuth { method, position }),
        _ => Err(errs),
    }
}

fn jwt_method(a: &RawGatewayAuth, err: &mut impl FnMut(&str, String)) -> Option<AuthMethod> {
    let names: Vec<&str> = if a.jwt_algorithms.is_empty() {
        vec!["HS256"]
    } else {
        a.jwt_algorithms.iter().map(String::as_str).collect()
    };
    let mut algorithms = Vec::new();
    for (i, n) in names.iter().enumerate() {
        if n.eq_ignore_ascii_case("none") {
            err(
                &format!("jwt_algorithms[{i}]"),
                "\"none\" is never accepted: tokens must be signed".to_owned(),
            );
            continue;
        }
        match n.parse::<Algorithm>() {
            Ok(alg) => algorithms.push(alg),
            Err(_) => err(
                &format!("jwt_algorithms[{i}]"),
                format!("unknown algorithm {n:?} (HS256, RS256, ES256, ...)"),
            ),
        }
    }
    let families: std::collections::HashSet<_> = algorithms
        .iter()
        .map(|a| format!("{:?}", a.family()))
        .collect();
    if families.len() > 1 {
        err(
            "jwt_algorithms",
            "algorithms must share one key type (HMAC, RSA, EC or Ed25519)".to_owned(),
        );
        return None;
    }
    let Some(key) = a.jwt_key.as_deref().filter(|k| !k.is_empty()) else {
        err("jwt_key", "jwt auth needs jwt_key".to_owned());
        return None;
    };
    let first = *algorithms.first()?;
    let decoded = match first.family() {
        jsonwebtoken::AlgorithmFamily::Hmac => Ok(DecodingKey::from_secret(key.as_bytes())),
        jsonwebtoken::AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(key.as_bytes()),
        jsonwebtoken::AlgorithmFamily::Ec => DecodingKey::from_ec_pem(key.as_bytes()),
        jsonwebtoken::AlgorithmFamily::Ed => DecodingKey::from_ed_pem(key.as_bytes()),
    };
    match decoded {
        Ok(key) => Some(AuthMethod::Jwt { key, algorithms }),
        Err(e) => {
            err(
                "jwt_key",
                format!("not a PEM public key for {first:?}: {e}"),
            );
            None
        }
    }
}

/// Why a `rate_limits` or list entry is not valid (the field's reason in a [`FieldError`]).
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("expected ingress:N/UNIT or secret:N/UNIT (second, minute, hour, day), got {0:?}")]
    RateLimit(String),
    #[error("a limit of 0 would refuse every call; set active: false instead")]
    ZeroLimit,
    #[error("expected ip:CIDR, got {0:?}")]
    Cidr(String),
    #[error("invalid regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("expected time:HH:MM-HH:MM, got {0:?}")]
    Time(String),
    #[error("expected ip:CIDR, secret:REGEX or time:HH:MM-HH:MM, got {0:?}")]
    ListRule(String),
}

/// `ingress:100/minute`, `secret:10/hour`.
fn parse_rate_limit(text: &str) -> Result<RateLimit, RuleError> {
    let t = text.trim();
    let bad = || RuleError::RateLimit(t.to_owned());
    let (scope, rest) = t.split_once(':').ok_or_else(bad)?;
    let scope = match scope {
        "ingress" => LimitScope::Ingress,
        "secret" => LimitScope::Secret,
        _ => return Err(bad()),
    };
    let (n, unit) = rest.split_once('/').ok_or_else(bad)?;
    let limit: u64 = n.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    if limit == 0 {
        return Err(RuleError::ZeroLimit);
    }
    Ok(RateLimit {
        scope,
        limit,
        per,
        text: t.to_owned(),
    })
}

fn parse_list_rule(text: &str) -> Result<ListRule, RuleError> {
    let t = text.trim();
    match t.split_once(':') {
        Some(("ip", net)) => {
            let net = net.trim();
            net.parse::<ipnet::IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(ListRule::Ip)
                .map_err(|_| RuleError::Cidr(t.to_owned()))
        }
        Some(("secret", re)) => Ok(ListRule::Secret(Regex::new(re)?)),
        Some(("time", range)) => {
            let (from, to) = range
                .split_once('-')
                .and_then(|(a, b)| Some((hhmm(a)?, hhmm(b)?)))
                .ok_or_else(|| RuleError::Time(t.to_owned()))?;
            Ok(ListRule::Time { from, to })
        }
        _ => Err(RuleError::ListRule(t.to_owned())),
    }
}

fn hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is allowed as an end of day
    ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
