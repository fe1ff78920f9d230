//! An `upstreams:` entry, raw → validated ([`UpstreamKey`]), in a file or added at run time.

use std::time::Duration;

use keypool_types::Secret;
use sha2::{Digest, Sha256};

use crate::raw::RawUpstream;
use crate::validate::Errors;
use crate::{Config, FieldError, ModelRule, UpstreamKey, UpstreamKind};

const DEFAULT_REPLICATE_ENDPOINT: &str = "https://api.replicate.com/v1";
const DEFAULT_ANTHROPIC_ENDPOINT: &str = "https://api.anthropic.com/v1";

/// Validates one key outside a whole file (keys added through the admin service), with the
/// running config's defaults; errors name fields as `upstream.<field>`.
pub fn validate_key(raw: RawUpstream, config: &Config) -> Result<UpstreamKey, Vec<FieldError>> {
    let mut errs = Errors::default();
    match validate_upstream(
        "upstream",
        raw,
        config.timeout,
        config.stream_timeout,
        &mut errs,
    ) {
        Some(k) if errs.0.is_empty() => Ok(k),
        _ => Err(errs.0),
    }
}

/// The largest `tpm`: a quadrillion tokens a minute, far below where a Lua number stops being
/// exact.
/// The largest `tpm` a key may have (token sums stay exact in Redis's doubles).
pub const MAX_TPM: u64 = 1_000_000_000_000_000;

pub(crate) fn validate_upstream(
    path: &str,
    up: RawUpstream,
    default_timeout: Duration,
    default_stream_timeout: Duration,
    errs: &mut Errors,
) -> Option<UpstreamKey> {
    let before = errs.0.len();
    let kind = kind_of(path, up.r#type.as_deref(), errs);
    let endpoint = endpoint_of(path, up.endpoint, kind, errs);
    let endpoint_url = endpoint_url(path, &endpoint, errs);
    let sk = match up.sk {
        Some(sk) if !sk.trim().is_empty() => sk.trim().to_owned(),
        _ => {
            errs.push(
                format!("{path}.sk"),
                "is required (use `asis` to pass the client's own)",
            );
            String::new()
        }
    };
    let timeout = errs.seconds(&format!("{path}.timeout"), up.timeout, default_timeout);
    let stream_timeout = errs.seconds(
        &format!("{path}.stream_timeout"),
        up.stream_timeout,
        default_stream_timeout,
    );
    check_budgets(path, up.rpm, up.tpm, errs);
    let chat_template = chat_template(path, up.chat_template.as_deref(), errs);
    if chat_template.is_some() && kind != UpstreamKind::Replicate {
        errs.push(
            format!("{path}.chat_template"),
            "only applies to type: replicate",
        );
    }
    let azure = azure(path, kind, up.api_version, &up.deployments, errs);
    let (budget, pricing) = spend(
        path,
        up.budget.as_ref(),
        &up.pricing,
        up.price_multiplier,
        errs,
    );
    let name = match up.name {
        Some(n) => checked_name(path, n, errs),
        None => derived_name(&endpoint, &sk),
    };
    if errs.0.len() != before {
        return None;
    }
    let endpoint_url = endpoint_url?;
    let rules = |entries: Vec<String>| entries.iter().map(|e| ModelRule::parse(e)).collect();
    // an Azure key with deployments serves those models, unless its `allow` says otherwise
    let allow = if up.allow.is_empty() {
        up.deployments.keys().cloned().collect()
    } else {
        up.allow
    };
    Some(UpstreamKey {
        name: name.into(),
        passthrough_auth: sk == "asis",
        sk: Secret::new(sk),
        endpoint,
        endpoint_url,
        kind,
        timeout,
        stream_timeout,
        allow: rules(allow),
        deny: rules(up.deny),
        authorization: up
            .authorization
            .as_ref()
            .map(crate::raw::StringOrList::entries)
            .unwrap_or_default(),
        noauth: up.noauth,
        keep_header: up.keep_header,
        rpm: up.rpm,
        tpm: up.tpm,
        unusable: None,
        chat_template,
        azure,
        budget,
        pricing,
    })
}

/// The base URL as keypool uses it: written without a trailing slash, or the kind's default.
fn endpoint_of(
    path: &str,
    endpoint: Option<String>,
    kind: UpstreamKind,
    errs: &mut Errors,
) -> String {
    match (endpoint, kind) {
        // Anthropic's documented base (`https://api.anthropic.com`) means its `/v1`
        (Some(e), UpstreamKind::Anthropic) if bare_host(&e) => {
            format!("{}/v1", e.trim().trim_end_matches('/'))
        }
        (Some(e), _) => e.trim().trim_end_matches('/').to_owned(),
        (None, UpstreamKind::Replicate) => DEFAULT_REPLICATE_ENDPOINT.to_owned(),
        (None, UpstreamKind::Anthropic) => DEFAULT_ANTHROPIC_ENDPOINT.to_owned(),
        (None, UpstreamKind::OpenAi | UpstreamKind::Azure) => {
            errs.push(format!("{path}.endpoint"), "is required");
            String::new()
        }
    }
}

/// A key's `budget`, and its `pricing` or `price_multiplier` (not both: a multiplier on the
/// key's own prices would say the same thing twice).
fn spend(
    path: &str,
    budget: Option<&crate::budget::RawBudget>,
    pricing: &[keypool_pricing::RawPrice],
    multiplier: Option<f64>,
    errs: &mut Errors,
) -> (
    Option<crate::Budget>,
    Option<std::sync::Arc<keypool_pricing::KeyPricing>>,
) {
    let budget = budget.and_then(|b| match b.validate() {
        Ok(b) => Some(b),
        Err((sub, reason)) => {
            errs.push(format!("{path}.budget.{sub}"), reason);
            None
        }
    });
    let multiplier_ppm = multiplier.and_then(|m| {
        let ppm = keypool_pricing::KeyPricing::multiplier(m);
        if ppm.is_none() {
            errs.push(
                format!("{path}.price_multiplier"),
                format!(
                    "must be between 0 and {}, got {m}",
                    keypool_pricing::MAX_MULTIPLIER
                ),
            );
        }
        ppm
    });
    if multiplier.is_some() && !pricing.is_empty() {
        errs.push(
            format!("{path}.price_multiplier"),
            "give the key its own `pricing` or a `price_multiplier`, not both",
        );
    }
    let catalog = errs.prices_at(&format!("{path}.pricing"), pricing);
    let pricing = (multiplier_ppm.is_some() || !catalog.is_empty()).then(|| {
        std::sync::Arc::new(keypool_pricing::KeyPricing {
            catalog,
            raw: pricing.to_vec(),
            multiplier_ppm,
        })
    });
    (budget, pricing)
}

/// `api_version` and `deployments`: for `type: azure` only; names Azure accepts in a URL path.
fn azure(
    path: &str,
    kind: UpstreamKind,
    api_version: Option<String>,
    deployments: &std::collections::BTreeMap<String, String>,
    errs: &mut Errors,
) -> Option<crate::Azure> {
    if kind != UpstreamKind::Azure {
        if api_version.is_some() {
            errs.push(format!("{path}.api_version"), "only applies to type: azure");
        }
        if !deployments.is_empty() {
            errs.push(format!("{path}.deployments"), "only applies to type: azure");
        }
        return None;
    }
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    for (model, deployment) in deployments {
        if !plain(deployment) {
            errs.push(
                format!("{path}.deployments.{model}"),
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            );
        }
    }
    let api_version = api_version.map_or_else(
        || crate::AZURE_API_VERSION.to_owned(),
        |v| v.trim().to_owned(),
    );
    if !plain(&api_version) {
        errs.push(
            format!("{path}.api_version"),
            "must be a version such as 2024-10-21",
        );
    }
    Some(crate::Azure {
        api_version,
        deployments: deployments.clone(),
    })
}

/// Whether an endpoint is a scheme and host with no path (`https://api.anthropic.com/`).
fn bare_host(endpoint: &str) -> bool {
    endpoint
        .trim()
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.trim_end_matches('/').contains('/'))
}

/// `rpm` and `tpm`: left out for no limit, otherwise at least 1; token sums are Lua numbers in
/// Redis (doubles), exact below 2^53, so `tpm` stops at [`MAX_TPM`].
fn check_budgets(path: &str, rpm: Option<u32>, tpm: Option<u64>, errs: &mut Errors) {
    if rpm == Some(0) {
        errs.push(
            format!("{path}.rpm"),
            "must be greater than 0 (leave it out for no limit)",
        );
    }
    if tpm == Some(0) {
        errs.push(
            format!("{path}.tpm"),
            "must be greater than 0 (leave it out for no limit)",
        );
    }
    if tpm.is_some_and(|t| t > MAX_TPM) {
        errs.push(
            format!("{path}.tpm"),
            format!("must be between 1 and {MAX_TPM}"),
        );
    }
}

/// `<host>-<6 hex of sha256(sk)>`: stable across restarts and reorderings, reveals nothing of the
/// key (24 bits of a hash of a high-entropy secret).
fn derived_name(endpoint: &str, sk: &str) -> String {
    let host = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(endpoint)
        .split(['/', '?'])
        .next()
        .unwrap_or("upstream")
        .replace(':', "_");
    let digest = Sha256::digest(sk.as_bytes());
    let [a, b, c, ..] = digest.as_slice() else {
        return host;
    };
    format!("{host}-{a:02x}{b:02x}{c:02x}")
}

/// `endpoint` as a URL: http(s), with a host and no query string.
fn endpoint_url(path: &str, endpoint: &str, errs: &mut Errors) -> Option<url::Url> {
    if endpoint.is_empty() {
        None
    } else if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
        errs.push(
            format!("{path}.endpoint"),
            if endpoint.contains('@') {
                // never echo what may be a credential
                "must start with http:// or https://".to_owned()
            } else {
                format!("must start with http:// or https://, got {endpoint:?}")
            },
        );
        None
    } else {
        match url::Url::parse(endpoint) {
            // credentials in the URL would be neither sent nor kept secret (the key's name, its
            // logs and metrics derive from the endpoint): refused
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                errs.push(
                    format!("{path}.endpoint"),
                    "must not carry credentials (user:password@host): put the key in sk",
                );
                None
            }
            Ok(u) if u.host().is_some() && u.query().is_none() => Some(u),
            Ok(_) => {
                errs.push(
                    format!("{path}.endpoint"),
                    "needs a host and no query string",
                );
                None
            }
            Err(e) => {
                errs.push(
                    format!("{path}.endpoint"),
                    format!("is not a valid URL: {e}"),
                );
                None
            }
        }
    }
}

/// Replicate's chat template: `mistral`, `llama3`, or a template with `{{prompt}}`.
fn chat_template(
    path: &str,
    template: Option<&str>,
    errs: &mut Errors,
) -> Option<crate::ChatTemplate> {
    match template {
        None => None,
        Some("mistral") => Some(crate::ChatTemplate::Mistral),
        Some("llama3") => Some(crate::ChatTemplate::Llama3),
        Some(t) if t.contains("{{prompt}}") => Some(crate::ChatTemplate::Custom(t.to_owned())),
        Some(t) => {
            errs.push(
                format!("{path}.chat_template"),
                format!(
                    "expected mistral, llama3 or a template containing {{{{prompt}}}}, got {t:?}"
                ),
            );
            None
        }
    }
}

/// A written key name: `[A-Za-z0-9._-]`, non-empty.
fn checked_name(path: &str, n: String, errs: &mut Errors) -> String {
    if n.is_empty()
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errs.push(
            format!("{path}.name"),
            format!("must be non-empty and use only [A-Za-z0-9._-], got {n:?}"),
        );
    }
    n
}

/// `type`: `openai` (default), `anthropic`, `azure` or `replicate`.
fn kind_of(path: &str, written: Option<&str>, errs: &mut Errors) -> UpstreamKind {
    match written {
        None | Some("openai") => UpstreamKind::OpenAi,
        Some("anthropic") => UpstreamKind::Anthropic,
        Some("azure") => UpstreamKind::Azure,
        Some("replicate") => UpstreamKind::Replicate,
        Some(other) => {
            errs.push(
                format!("{path}.type"),
                format!("expected openai, anthropic, azure or replicate, got {other:?}"),
            );
            UpstreamKind::OpenAi
        }
    }
}
