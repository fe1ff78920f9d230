//! The config's sections besides keys and gateways, raw → validated: `admin`, `telemetry`,
//! `notify`, `log`, and the listen address.

use std::time::Duration;

use keypool_types::Secret;

use crate::validate::Errors;
use crate::{ALWAYS_REDACTED, StoreConfig};

pub(crate) fn validate_admin(raw: crate::raw::RawAdmin, errs: &mut Errors) -> crate::Admin {
    // asked for: an address or `enabled: true` written (a taken port then stops start-up);
    // otherwise the default address is used only when it is free
    let requested = raw.address.is_some() || raw.enabled == Some(true);
    let address = normalise_address(raw.address.as_deref().unwrap_or("127.0.0.1:8889"));
    let token = raw
        .token
        .filter(|t| !t.is_empty())
        .or_else(|| env_nonempty("KEYPOOL_ADMIN_TOKEN"))
        .map(Secret::new);
    let enabled = raw.enabled.unwrap_or(true);
    let http_requested = raw.http_address.is_some();
    let http_address = http_address(
        raw.http_address.as_deref(),
        enabled && token.is_none(),
        errs,
    );
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
        requested,
        address,
        http_address,
        http_requested,
        token,
        secret_key: raw
            .secret_key
            .filter(|k| !k.is_empty())
            .or_else(|| env_nonempty("KEYPOOL_SECRET_KEY"))
            .map(Secret::new),
        stream_buffer: errs.ranged("admin.stream_buffer", raw.stream_buffer, 4096, 1..=1 << 20),
    }
}

/// `admin.http_address`: the console's `ip:port` (default `127.0.0.1:8890`), `None` for
/// `none`; beyond loopback only with an admin token (`tokenless`: there is none).
fn http_address(given: Option<&str>, tokenless: bool, errs: &mut Errors) -> Option<String> {
    let http = match given.map(str::trim) {
        Some("none" | "off" | "") => return None,
        given => normalise_address(given.unwrap_or("127.0.0.1:8890")),
    };
    match http.parse::<std::net::SocketAddr>() {
        Err(_) => errs.push(
            "admin.http_address",
            format!("expected ip:port (e.g. 127.0.0.1:8890) or none, got {http:?}"),
        ),
        Ok(a) if tokenless && !a.ip().is_loopback() => errs.push(
            "admin.token",
            format!(
                "the console listens on {a}, beyond this machine: set admin.token (or KEYPOOL_ADMIN_TOKEN)"
            ),
        ),
        Ok(_) => {}
    }
    Some(http)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub(crate) fn validate_telemetry(
    raw: crate::raw::RawTelemetry,
    errs: &mut Errors,
) -> crate::Telemetry {
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

pub(crate) fn validate_notify(raw: crate::raw::RawNotify, errs: &mut Errors) -> crate::Notify {
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

pub(crate) fn validate_log(
    raw: crate::raw::RawLog,
    store: &StoreConfig,
    errs: &mut Errors,
) -> crate::LogPolicy {
    let max_field_bytes = errs.ranged(
        "log.max_field_bytes",
        raw.max_field_bytes,
        64 << 10,
        1..=16 << 20,
    );
    let queue_capacity = errs.ranged(
        "log.queue_capacity",
        raw.queue_capacity,
        100_000,
        1..=10_000_000,
    );
    if let Some(days) = raw.retention_days {
        errs.ranged("log.retention_days", Some(days), 1, 1..=36_500);
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
    let on_overflow = match raw.on_overflow.as_deref() {
        None | Some("spill") => crate::Overflow::Spill,
        Some("backpressure") => crate::Overflow::Backpressure,
        Some("drop") => crate::Overflow::Drop,
        Some(other) => {
            errs.push(
                "log.on_overflow",
                format!("expected spill, backpressure or drop, got {other:?}"),
            );
            crate::Overflow::Spill
        }
    };
    crate::LogPolicy {
        on_overflow,
        request_body: raw.request_body,
        response_body: raw.response_body,
        headers: raw.headers,
        max_field_bytes,
        redact_headers,
        retention_days: raw.retention_days,
        queue_capacity,
        spill_path,
        spill_max_bytes: errs.ranged(
            "log.spill_max_bytes",
            raw.spill_max_bytes,
            1 << 30,
            1..=1 << 40,
        ),
    }
}

/// `:8888` → `0.0.0.0:8888` (Go's notation in openai-api-route).
pub(crate) fn normalise_address(addr: &str) -> String {
    let addr = addr.trim();
    if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    }
}
