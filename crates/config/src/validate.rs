//! Raw → validated, collecting every mistake with its field path.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keypool_types::Secret;
use sha2::{Digest, Sha256};

use crate::raw::{RawConfig, RawUpstream, Seconds};
use crate::{
    Config, ConfigError, FieldError, LbPolicy, ModelRule, StoreConfig, UpstreamKey, UpstreamKind,
};

const DEFAULT_REPLICATE_ENDPOINT: &str = "https://api.replicate.com/v1";

/// Headers never recorded, whatever the configuration says.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "proxy-authorization",
];

/// Collects field errors while walking the raw config.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    fn seconds(&mut self, path: &str, value: Option<Seconds>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Duration::from_secs_f64(s),
            Some(s) => {
                self.push(
                    path,
                    format!("must be a positive number of seconds, got {s}"),
                );
                default
            }
        }
    }
}

/// Validates a parsed file into a [`Config`], reporting every invalid field at once.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut errs = Errors::default();
    let policy = Arc::new(raw.policy());

    let address = normalise_address(raw.address.as_deref().unwrap_or(":8888"));
    if address
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        errs.push(
            "address",
            format!("expected host:port or :port, got {address:?}"),
        );
    }
    let client_tokens = raw
        .authorization
        .as_ref()
        .map(crate::raw::StringOrList::entries)
        .unwrap_or_default();
    let timeout = errs.seconds("timeout", raw.timeout, Duration::from_secs(120));
    let stream_timeout = errs.seconds(
        "stream_timeout",
        raw.stream_timeout,
        Duration::from_secs(10),
    );
    let idle_timeout = errs.seconds("idle_timeout", raw.idle_timeout, Duration::from_secs(60));
    let queue_timeout = errs.seconds("queue_timeout", raw.queue_timeout, Duration::from_secs(30));
    let shutdown_grace = errs.seconds(
        "shutdown_grace",
        raw.shutdown_grace,
        Duration::from_secs(30),
    );

    let store = match (raw.dbtype.as_deref().unwrap_or("sqlite"), raw.dbaddr) {
        ("sqlite", addr) => StoreConfig::Sqlite {
            path: addr.unwrap_or_else(|| "./keypool.sqlite".to_owned()),
        },
        ("postgres", Some(dsn)) => StoreConfig::Postgres { dsn },
        ("postgres", None) => {
            errs.push(
                "dbaddr",
                "dbtype postgres needs dbaddr (a URL or host=... port=...)",
            );
            StoreConfig::None
        }
        ("none", _) => StoreConfig::None,
        (other, _) => {
            errs.push(
                "dbtype",
                format!("expected sqlite, postgres or none, got {other:?}"),
            );
            StoreConfig::None
        }
    };

    let lb_policy = match raw.lb_policy.as_deref() {
        None | Some("least-used") => LbPolicy::LeastUsed,
        Some("order") => LbPolicy::Order,
        Some("random") => LbPolicy::Random,
        Some(other) => {
            errs.push(
                "lb_policy",
                format!("expected least-used, order or random, got {other:?}"),
            );
            LbPolicy::LeastUsed
        }
    };

    let max_body_bytes = match raw.max_body_bytes {
        None => 32 * 1024 * 1024,
        Some(0) => {
            errs.push("max_body_bytes", "must be greater than 0");
            0
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };

    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    for (i, up) in raw.upstreams.into_iter().enumerate() {
        let path = format!("upstreams[{i}]");
        if let Some(key) = validate_upstream(&path, up, timeout, stream_timeout, &mut errs) {
            if !names.insert(key.name.clone()) {
                errs.push(
                    format!("{path}.name"),
                    format!(
                        "duplicate upstream name {:?} (same endpoint and key twice?)",
                        key.name
                    ),
                );
            }
            upstreams.push(Arc::new(key));
        }
    }
    let retries = raw
        .retries
        .unwrap_or_else(|| u32::try_from(upstreams.len().saturating_sub(1)).unwrap_or(u32::MAX));

    let log = validate_log(raw.log.unwrap_or_default(), &store, &mut errs);
    let mut trusted_proxies = Vec::new();
    for (i, cidr) in raw.trusted_proxies.iter().enumerate() {
        match cidr
            .parse::<ipnet::IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => errs.push(
                format!("trusted_proxies[{i}]"),
                format!("expected a CIDR or an IP, got {cidr:?}"),
            ),
        }
    }
    let default_gateway = match crate::gateway::validate_gateway(&policy.default_gateway, "") {
        Ok(g) => Arc::new(g),
        Err(e) => {
            // the top-level fields: no `default.` in front of their paths
            for f in e {
                errs.push(f.path.trim_start_matches('.'), f.reason);
            }
            Arc::new(crate::Gateway::open(crate::DEFAULT_GATEWAY))
        }
    };
    let mut gateways = Vec::with_capacity(raw.gateways.len());
    let mut gateway_names = HashSet::new();
    for (i, g) in raw.gateways.iter().enumerate() {
        let at = format!("gateways[{i}]");
        match crate::gateway::validate_gateway(g, &at) {
            Ok(g) => {
                if g.name == crate::DEFAULT_GATEWAY {
                    errs.push(
                        format!("{at}.name"),
                        "`default` is the gateway at /v1/*: set its policy at the top level",
                    );
                } else if !gateway_names.insert(g.name.clone()) {
                    errs.push(
                        format!("{at}.name"),
                        format!("duplicate gateway name {:?}", g.name),
                    );
                }
                gateways.push(Arc::new(g));
            }
            Err(e) => errs.0.extend(e),
        }
    }
    let telemetry = validate_telemetry(raw.telemetry.unwrap_or_default(), &mut errs);
    let notify = validate_notify(raw.notify.unwrap_or_default(), &mut errs);
    let admin = validate_admin(raw.admin.unwrap_or_default(), &mut errs);
    let redis = raw.redis.map(|r| {
        if url::Url::parse(&r.url).map_or(true, |u| !matches!(u.scheme(), "redis" | "rediss")) {
            errs.push("redis.url", "expected redis://host:port[/db]");
        }
        let fail_closed = match r.on_failure.as_deref() {
            None | Some("local") => false,
            Some("closed") => true,
            Some(other) => {
                errs.push(
                    "redis.on_failure",
                    format!("expected local or closed, got {other:?}"),
                );
                false
            }
        };
        crate::Redis {
            url: Secret::new(r.url),
            prefix: r.prefix.unwrap_or_else(|| "keypool:".to_owned()),
            timeout: Duration::from_millis(r.timeout_ms.unwrap_or(250).max(1)),
            fail_closed,
            replicas_hint: match r.replicas_hint {
                Some(0) => {
                    errs.push("redis.replicas_hint", "must be at least 1");
                    1
                }
                n => n.unwrap_or(1),
            },
        }
    });
    if !errs.0.is_empty() {
        return Err(ConfigError::Invalid(errs.0));
    }
    Ok(Config {
        address,
        client_tokens,
        timeout,
        stream_timeout,
        idle_timeout,
        store,
        lb_policy,
        queue_timeout,
        max_body_bytes,
        retries,
        shutdown_grace,
        upstreams,
        log,
        trusted_proxies,
        default_gateway,
        gateways,
        raw_gateways: raw
            .gateways
            .iter()
            .map(crate::gateway::RawGateway::hashed)
            .collect(),
        telemetry,
        notify,
        admin,
        redis,
        policy,
    })
}

fn validate_admin(raw: crate::raw::RawAdmin, errs: &mut Errors) -> crate::Admin {
    let address = normalise_address(raw.address.as_deref().unwrap_or("127.0.0.1:8889"));
    let token = raw
        .token
        .filter(|t| !t.is_empty())
        .or_else(|| env_nonempty("KEYPOOL_ADMIN_TOKEN"))
        .map(Secret::new);
    let enabled = raw.enabled.unwrap_or(true);
    match address.parse::<std::net::SocketAddr>() {
        Err(_) => errs.push(
            "admin.address",
            format!("expected ip:port (e.g. 127.0.0.1:8889), got {address:?}"),
        ),
        Ok(a) if enabled && !a.ip().is_loopback() && token.is_none() => errs.push(
            "admin.token",
            format!(
                "the admin service listens on {a}, beyond this machine: set admin.token (or KEYPOOL_ADMIN_TOKEN)"
            ),
        ),
        Ok(_) => {}
    }
    let read = |path: &str, field: &str, errs: &mut Errors| match std::fs::read_to_string(path) {
        Ok(pem) if pem.contains("-----BEGIN") => Some(pem),
        Ok(_) => {
            errs.push(field, format!("{path} is not a PEM file"));
            None
        }
        Err(e) => {
            errs.push(field, format!("cannot read {path}: {e}"));
            None
        }
    };
    let tls = match (raw.tls_cert.as_deref(), raw.tls_key.as_deref()) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            match (
                read(cert, "admin.tls_cert", errs),
                read(key, "admin.tls_key", errs),
            ) {
                (Some(cert), Some(key)) => Some(crate::AdminTls {
                    cert_pem: cert.into_bytes(),
                    key_pem: Secret::new(key),
                }),
                _ => None,
            }
        }
        _ => {
            errs.push(
                "admin.tls_cert",
                "set both admin.tls_cert and admin.tls_key (PEM files), or neither",
            );
            None
        }
    };
    crate::Admin {
        tls,
        enabled,
        address,
        token,
        secret_key: raw
            .secret_key
            .filter(|k| !k.is_empty())
            .or_else(|| env_nonempty("KEYPOOL_SECRET_KEY"))
            .map(Secret::new),
        stream_buffer: raw.stream_buffer.unwrap_or(4096).max(1),
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn validate_telemetry(raw: crate::raw::RawTelemetry, errs: &mut Errors) -> crate::Telemetry {
    if let Some(r) = raw.sample_ratio
        && !(0.0..=1.0).contains(&r)
    {
        errs.push(
            "telemetry.sample_ratio",
            format!("must be within 0..=1, got {r}"),
        );
    }
    let otlp_endpoint = raw
        .otlp_endpoint
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if let Some(e) = &otlp_endpoint
        && url::Url::parse(e).is_err()
    {
        errs.push(
            "telemetry.otlp_endpoint",
            format!("expected a URL like http://127.0.0.1:4317, got {e:?}"),
        );
    }
    crate::Telemetry {
        metrics_token: raw.metrics_token.filter(|t| !t.is_empty()).map(Secret::new),
        otlp_endpoint,
        service_name: raw
            .service_name
            .or_else(|| env_nonempty("OTEL_SERVICE_NAME")),
        sample_ratio: raw.sample_ratio,
        json_logs: raw.json_logs,
    }
}

fn validate_notify(raw: crate::raw::RawNotify, errs: &mut Errors) -> crate::Notify {
    let mut url_at = |path: &str, s: &str| match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
        _ => {
            errs.push(path, format!("expected an http(s) URL, got {s:?}"));
            None
        }
    };
    let feishu = match raw.feishu {
        Some(f) => url_at("notify.feishu.webhook", &f.webhook).map(|webhook| crate::Feishu {
            webhook,
            secret: f.secret.filter(|s| !s.is_empty()).map(Secret::new),
        }),
        None => env_nonempty("FEISHU_WEBHOOK").and_then(|w| {
            url_at("FEISHU_WEBHOOK", &w).map(|webhook| crate::Feishu {
                webhook,
                secret: env_nonempty("FEISHU_SECRET").map(Secret::new),
            })
        }),
    };
    let matrix = match raw.matrix {
        Some(m) => {
            url_at("notify.matrix.homeserver", &m.homeserver).map(|homeserver| crate::Matrix {
                homeserver,
                access_token: Some(Secret::new(m.access_token)),
                room_id: Some(m.room_id),
            })
        }
        None => env_nonempty("MATRIX_API").and_then(|w| {
            url_at("MATRIX_API", &w).map(|homeserver| crate::Matrix {
                homeserver,
                access_token: None,
                room_id: None,
            })
        }),
    };
    let webhook = raw
        .webhook
        .and_then(|w| url_at("notify.webhook.url", &w.url));
    let dedup = errs.seconds(
        "notify.dedup_seconds",
        raw.dedup_seconds,
        Duration::from_secs(300),
    );
    crate::Notify {
        feishu,
        matrix,
        webhook,
        dedup,
        cooling_alert_after: raw.cooling_alert_after.unwrap_or(3).max(1),
    }
}

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

fn validate_upstream(
    path: &str,
    up: RawUpstream,
    default_timeout: Duration,
    default_stream_timeout: Duration,
    errs: &mut Errors,
) -> Option<UpstreamKey> {
    let before = errs.0.len();
    let kind = match up.r#type.as_deref() {
        None | Some("openai") => UpstreamKind::OpenAi,
        Some("replicate") => UpstreamKind::Replicate,
        Some(other) => {
            errs.push(
                format!("{path}.type"),
                format!("expected openai or replicate, got {other:?}"),
            );
            UpstreamKind::OpenAi
        }
    };
    let endpoint = match (up.endpoint, kind) {
        (Some(e), _) => e.trim().trim_end_matches('/').to_owned(),
        (None, UpstreamKind::Replicate) => DEFAULT_REPLICATE_ENDPOINT.to_owned(),
        (None, UpstreamKind::OpenAi) => {
            errs.push(format!("{path}.endpoint"), "is required");
            String::new()
        }
    };
    let endpoint_url = if endpoint.is_empty() {
        None
    } else if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
        errs.push(
            format!("{path}.endpoint"),
            format!("must start with http:// or https://, got {endpoint:?}"),
        );
        None
    } else {
        match url::Url::parse(&endpoint) {
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
    };
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
    if up.rpm == Some(0) {
        errs.push(
            format!("{path}.rpm"),
            "must be greater than 0 (leave it out for no limit)",
        );
    }
    let chat_template = match up.chat_template.as_deref() {
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
    };
    if chat_template.is_some() && kind != UpstreamKind::Replicate {
        errs.push(
            format!("{path}.chat_template"),
            "only applies to type: replicate",
        );
    }
    if up.tpm == Some(0) {
        errs.push(
            format!("{path}.tpm"),
            "must be greater than 0 (leave it out for no limit)",
        );
    }
    let name = match up.name {
        Some(n) => {
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
        None => derived_name(&endpoint, &sk),
    };
    if errs.0.len() != before {
        return None;
    }
    let endpoint_url = endpoint_url?;
    let rules = |entries: Vec<String>| entries.iter().map(|e| ModelRule::parse(e)).collect();
    Some(UpstreamKey {
        name: name.into(),
        passthrough_auth: sk == "asis",
        sk: Secret::new(sk),
        endpoint,
        endpoint_url,
        kind,
        timeout,
        stream_timeout,
        allow: rules(up.allow),
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
    })
}

fn validate_log(
    raw: crate::raw::RawLog,
    store: &StoreConfig,
    errs: &mut Errors,
) -> crate::LogPolicy {
    let max_field_bytes = raw.max_field_bytes.unwrap_or(64 * 1024);
    if max_field_bytes == 0 {
        errs.push("log.max_field_bytes", "must be greater than 0");
    }
    let queue_capacity = raw.queue_capacity.unwrap_or(100_000);
    if queue_capacity == 0 {
        errs.push("log.queue_capacity", "must be greater than 0");
    }
    if raw.retention_days == Some(0) {
        errs.push(
            "log.retention_days",
            "must be at least 1 (leave it out to keep everything)",
        );
    }
    let mut redact_headers: Vec<String> = ALWAYS_REDACTED.iter().map(|h| (*h).to_owned()).collect();
    for h in raw.redact_headers {
        let h = h.trim().to_ascii_lowercase();
        if !h.is_empty() && !redact_headers.contains(&h) {
            redact_headers.push(h);
        }
    }
    let spill_path = raw.spill_path.map_or_else(
        || match store {
            StoreConfig::Sqlite { path } => std::path::PathBuf::from(format!("{path}.spill.jsonl")),
            _ => std::path::PathBuf::from("./keypool-usage.spill.jsonl"),
        },
        std::path::PathBuf::from,
    );
    crate::LogPolicy {
        request_body: raw.request_body,
        response_body: raw.response_body,
        headers: raw.headers,
        max_field_bytes,
        redact_headers,
        retention_days: raw.retention_days,
        queue_capacity,
        spill_path,
        spill_max_bytes: raw.spill_max_bytes.unwrap_or(1 << 30),
    }
}

/// `:8888` → `0.0.0.0:8888` (Go's notation in openai-api-route).
fn normalise_address(addr: &str) -> String {
    let addr = addr.trim();
    if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
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

#[cfg(test)]
mod tests {
    #[test]
    fn an_admin_api_beyond_loopback_needs_a_token() {
        let err = crate::from_yaml("admin: {address: '0.0.0.0:8889'}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.token"), "{err}");
        assert!(crate::from_yaml("admin: {address: '0.0.0.0:8889', token: t}\n").is_ok());
        assert!(crate::from_yaml("admin: {address: '127.0.0.1:8889'}\n").is_ok());
        assert!(crate::from_yaml("admin: {address: '0.0.0.0:8889', enabled: false}\n").is_ok());
    }

    use crate::{ConfigError, LbPolicy, StoreConfig, from_yaml};

    /// openai-api-route's `config.sample.yaml`, unchanged.
    pub const OPENAI_API_ROUTE_SAMPLE: &str = include_str!("../tests/openai-api-route.sample.yaml");

    #[test]
    fn openai_api_route_sample_loads() {
        let cfg = from_yaml(OPENAI_API_ROUTE_SAMPLE).unwrap();
        assert_eq!(cfg.client_tokens, vec!["woshimima"]);
        assert_eq!(cfg.address, "0.0.0.0:8888");
        assert_eq!(cfg.upstreams.len(), 4);
        assert_eq!(
            cfg.store,
            StoreConfig::Sqlite {
                path: "./db.sqlite".into()
            }
        );
        assert_eq!(cfg.upstreams[2].timeout.as_secs(), 30);
        assert_eq!(cfg.upstreams[3].endpoint, "https://api.replicate.com/v1");
        assert_eq!(cfg.upstreams[3].kind, crate::UpstreamKind::Replicate);
        // names are derived, distinct and free of the secret
        assert!(cfg.upstreams[1].name.starts_with("api.openai.com-"));
        assert!(!cfg.upstreams[1].name.contains("secret_key"));
        assert_eq!(cfg.retries, 3);
        assert_eq!(cfg.lb_policy, LbPolicy::LeastUsed);
    }

    #[test]
    fn comma_separated_tokens() {
        let cfg = from_yaml("authorization: woshimima, iampassword\n").unwrap();
        assert_eq!(cfg.client_tokens, vec!["woshimima", "iampassword"]);
    }

    #[test]
    fn reports_every_field_path() {
        let text = "lb_policy: fastest\ntimeout: -1\nupstreams:\n  - sk: a\n  - endpoint: ftp://x\n    sk: b\n    rpm: 0\n";
        let Err(ConfigError::Invalid(errs)) = from_yaml(text) else {
            panic!("expected invalid")
        };
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "timeout",
                "lb_policy",
                "upstreams[0].endpoint",
                "upstreams[1].endpoint",
                "upstreams[1].rpm"
            ]
        );
    }

    #[test]
    fn unknown_field_is_refused_with_its_path() {
        let err =
            from_yaml("upstreams:\n  - sk: a\n    endpoint: http://x\n    rmp: 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("upstreams[0]"), "{text}");
        assert!(text.contains("rmp"), "{text}");
    }

    #[test]
    fn duplicate_names_refused() {
        let text = "upstreams:\n  - {sk: a, endpoint: 'http://x/v1'}\n  - {sk: a, endpoint: 'http://x/v1'}\n";
        assert!(
            from_yaml(text)
                .unwrap_err()
                .to_string()
                .contains("upstreams[1].name")
        );
    }

    #[test]
    fn empty_file_is_a_valid_open_gateway_with_no_keys() {
        let cfg = from_yaml("").unwrap();
        assert!(cfg.client_tokens.is_empty());
        assert!(cfg.upstreams.is_empty());
    }
}
