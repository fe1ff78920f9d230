//! A gateway as written ([`RawGateway`]) → validated ([`Gateway`]), every mistake with its
//! field's path; the same code for the config file, the admin API and pushed snapshots.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey};
use regex::Regex;
use serde_json::Value;

use crate::gateway::{
    AuthMethod, Gateway, GatewayAuth, LimitScope, ListRule, Position, Quota, RateLimit, RawGateway,
    RawGatewayAuth, hex32, secret_hash,
};
use crate::{FieldError, ModelRule};

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
    let mut errs = Errors {
        at,
        all: Vec::new(),
    };
    let name = raw.name.clone().unwrap_or_default();
    if !valid_gateway_name(&name) {
        errs.push(
            "name",
            format!("must be 1-64 characters of [a-z0-9-], got {name:?}"),
        );
    }
    let auth = match &raw.auth {
        None => None,
        Some(a) => match validate_auth(a, &format!("{at}.auth")) {
            Ok(a) => Some(a),
            Err(e) => {
                errs.all.extend(e);
                None
            }
        },
    };
    let expires_at = raw.expires_at.as_deref().and_then(|s| errs.expiry(s));
    let token_quota = raw.token_quota.as_ref().and_then(|q| errs.quota(q));
    let budget = errs.budget("budget", raw.budget.as_ref());
    let caller_budget = errs.budget("caller_budget", raw.caller_budget.as_ref());
    let models = raw.models.as_ref().map(|m| {
        m.iter()
            .map(|s| ModelRule::parse(s.trim()))
            .collect::<Vec<_>>()
    });
    let rate_limits = errs.rate_limits(&raw.rate_limits);
    let whitelist = errs.list("whitelist", &raw.whitelist);
    let blacklist = errs.list("blacklist", &raw.blacklist);
    let timezone = raw
        .timezone
        .as_deref()
        .map_or(chrono_tz::UTC, |tz| errs.timezone(tz));
    let (param_map, param_fixed) = errs.transforms(raw);
    if raw.retries.is_some_and(|r| r > 100) {
        errs.push("retries", "must be between 0 and 100");
    }
    let (routing, data_masking, content_safety) = errs.routing_and_guards(raw);
    if !errs.all.is_empty() {
        return Err(errs.all);
    }
    Ok(Gateway {
        name,
        auth,
        expires_at,
        active: raw.active.unwrap_or(true),
        token_quota,
        budget,
        caller_budget,
        models,
        retries: raw.retries,
        rate_limits,
        whitelist,
        blacklist,
        timezone,
        prompt_template: raw.prompt_template.clone(),
        param_map,
        param_fixed,
        routing,
        data_masking,
        content_safety,
    })
}

/// One gateway's mistakes, each with its field's path under `at`.
struct Errors<'a> {
    at: &'a str,
    all: Vec<FieldError>,
}

/// A parsed `param_map` (path, old, new) and `param_fixed` (path, value).
type Transforms = (Vec<(Vec<String>, Value, Value)>, Vec<(Vec<String>, Value)>);

impl Errors<'_> {
    fn push(&mut self, field: impl std::fmt::Display, reason: impl Into<String>) {
        self.all.push(FieldError {
            path: format!("{}.{field}", self.at),
            reason: reason.into(),
        });
    }

    fn expiry(&mut self, s: &str) -> Option<SystemTime> {
        match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => Some(UNIX_EPOCH + Duration::from_millis(t.timestamp_millis().max(0) as u64)),
            Err(e) => {
                self.push(
                    "expires_at",
                    format!("expected RFC 3339 (2026-12-31T23:59:59Z), got {s:?}: {e}"),
                );
                None
            }
        }
    }

    fn quota(&mut self, q: &Quota) -> Option<u64> {
        match q {
            Quota::Tokens(n) => Some(*n),
            Quota::Text(t) if t == "no-limit" => None,
            Quota::Text(t) => {
                let n = t.trim().parse::<u64>().ok();
                if n.is_none() {
                    self.push(
                        "token_quota",
                        format!("expected a number of tokens or no-limit, got {t:?}"),
                    );
                }
                n
            }
        }
    }

    fn budget(
        &mut self,
        field: &str,
        raw: Option<&crate::budget::RawBudget>,
    ) -> Option<crate::budget::Budget> {
        match raw?.validate() {
            Ok(b) => Some(b),
            Err((sub, reason)) => {
                self.push(format!("{field}.{sub}"), reason);
                None
            }
        }
    }

    fn rate_limits(&mut self, written: &[String]) -> Vec<RateLimit> {
        let mut limits = Vec::new();
        let no_limit = written.iter().any(|r| r.trim() == "no-limit");
        for (i, r) in written.iter().enumerate() {
            if r.trim() == "no-limit" {
                continue;
            }
            match parse_rate_limit(r) {
                Ok(l) if !no_limit => limits.push(l),
                Ok(_) => self.push(
                    format!("rate_limits[{i}]"),
                    "no-limit cannot be combined with limits",
                ),
                Err(reason) => self.push(format!("rate_limits[{i}]"), reason.to_string()),
            }
        }
        limits
    }

    fn list(&mut self, field: &str, entries: &[String]) -> Vec<ListRule> {
        let mut rules = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match parse_list_rule(e) {
                Ok(rule) => rules.push(rule),
                Err(reason) => self.push(format!("{field}[{i}]"), reason.to_string()),
            }
        }
        rules
    }

    fn timezone(&mut self, tz: &str) -> chrono_tz::Tz {
        tz.parse::<chrono_tz::Tz>().unwrap_or_else(|_| {
            self.push(
                "timezone",
                format!("unknown IANA timezone {tz:?} (e.g. Asia/Shanghai, UTC)"),
            );
            chrono_tz::UTC
        })
    }

    /// Routing (fallbacks, affinity, the response cache) and guardrails, validated.
    fn routing_and_guards(
        &mut self,
        raw: &RawGateway,
    ) -> (
        crate::routing::Routing,
        Option<crate::guard::DataMasking>,
        Option<crate::guard::ContentSafety>,
    ) {
        let mut found = Vec::new();
        let routing = crate::routing::validate_routing(&raw.routing()).unwrap_or_else(|e| {
            found.extend(e);
            crate::routing::Routing::default()
        });
        let masking = raw
            .data_masking
            .as_ref()
            .map(|m| crate::guard::validate_masking(m, &mut found));
        let safety = raw
            .content_safety
            .as_ref()
            .map(|s| crate::guard::validate_safety(s, &mut found));
        for (field, reason) in found {
            self.push(field, reason);
        }
        (routing, masking, safety)
    }

    /// `prompt_template` checked; `param_map` and `param_fixed` parsed.
    fn transforms(&mut self, raw: &RawGateway) -> Transforms {
        if let Some(t) = &raw.prompt_template
            && !t.contains("{{query}}")
        {
            self.push(
                "prompt_template",
                "must contain {{query}}, where the user's message goes",
            );
        }
        let mut param_map = Vec::new();
        for (field, pair) in &raw.param_map {
            match pair.as_slice() {
                [old, new] => param_map.push((field_path(field), old.clone(), new.clone())),
                _ => self.push(format!("param_map.{field}"), "expected [old, new]"),
            }
        }
        let mut param_fixed = Vec::new();
        for (field, value) in &raw.param_fixed {
            let path = field_path(field);
            if path.iter().any(String::is_empty) {
                self.push(format!("param_fixed.{field}"), "empty field name");
            }
            param_fixed.push((path, value.clone()));
        }
        (param_map, param_fixed)
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
            // the whole credential must match, not a part of it
            Some(p) => match Regex::new(&format!("^(?:{p})$")) {
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
        Ok(key) => Some(AuthMethod::Jwt {
            key,
            algorithms,
            audience: a.jwt_audience.clone().filter(|s| !s.is_empty()),
            issuer: a.jwt_issuer.clone().filter(|s| !s.is_empty()),
        }),
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
