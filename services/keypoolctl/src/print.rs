//! How `keypoolctl` shows what the admin API answers: aligned tables, or JSON with `--json`.

use keypool_config::RawGateway;
use keypool_proto::admin::v1 as pb;
use serde_json::{Value, json};

use crate::cli::Cli;

/// A gateway's spec with the config file's field names.
fn spec_json(g: &pb::Gateway) -> Value {
    g.spec
        .clone()
        .map(RawGateway::from)
        .and_then(|raw| serde_json::to_value(raw).ok())
        .unwrap_or(Value::Null)
}

pub(crate) fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// Prints rows as an aligned table.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub(crate) fn gateway_json(g: &pb::Gateway) -> Value {
    json!({
        "name": g.name,
        "owner": g.owner,
        "tokens_used": g.tokens_used,
        "updated_at_ms": g.updated_at_ms,
        "spec": spec_json(g),
    })
}

fn key_json(k: &pb::Key) -> Value {
    json!({
        "name": k.name, "provider": k.provider, "endpoint": k.endpoint,
        "secret": k.secret_masked, "enabled": k.enabled, "health": k.health,
        "cooling_until_ms": k.cooling_until_ms, "window_requests": k.window_requests,
        "window_tokens": k.window_tokens, "rpm": k.rpm, "tpm": k.tpm, "in_flight": k.in_flight,
        "used": k.used, "success": k.success, "failure": k.failure, "last_error": k.last_error,
        "allow": k.allow, "deny": k.deny, "owner": k.owner, "latency_ms": k.latency_ms,
    })
}

pub(crate) fn print_gateways(cli: &Cli, gs: &[pb::Gateway]) {
    if cli.json {
        println!("{}", Value::Array(gs.iter().map(gateway_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = gs
        .iter()
        .map(|g| {
            let spec = spec_json(g);
            vec![
                g.name.clone(),
                g.owner.clone(),
                spec["auth"]["method"].as_str().unwrap_or("none").to_owned(),
                spec["active"].as_bool().unwrap_or(true).to_string(),
                g.tokens_used.to_string(),
                spec["token_quota"]
                    .as_u64()
                    .map_or_else(|| "no-limit".to_owned(), |q| q.to_string()),
                time(g.updated_at_ms),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "OWNER", "AUTH", "ACTIVE", "TOKENS", "QUOTA", "UPDATED",
        ],
        &rows,
    );
}

pub(crate) fn print_keys(cli: &Cli, ks: &[pb::Key]) {
    if cli.json {
        println!("{}", Value::Array(ks.iter().map(key_json).collect()));
        return;
    }
    let limit = |used: u64, l: Option<String>| match l {
        Some(l) => format!("{used}/{l}"),
        None => used.to_string(),
    };
    let rows: Vec<Vec<String>> = ks
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.secret_masked.clone(),
                if k.enabled { "yes" } else { "no" }.to_owned(),
                k.health.clone(),
                limit(k.window_requests, k.rpm.map(|r| r.to_string())),
                limit(k.window_tokens, k.tpm.map(|t| t.to_string())),
                k.in_flight.to_string(),
                format!("{}/{}/{}", k.used, k.success, k.failure),
                k.owner.clone(),
                k.last_error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "SECRET",
            "ENABLED",
            "HEALTH",
            "RPM",
            "TPM",
            "INFLIGHT",
            "USED/OK/FAIL",
            "OWNER",
            "LAST ERROR",
        ],
        &rows,
    );
}

/// `usage --follow`'s columns, fixed widths so lines stay aligned as they come.
pub(crate) const FOLLOW_HEADER: [&str; 9] = [
    "TIME",
    "GATEWAY",
    "MODEL",
    "KEY",
    "STATUS",
    "ATTEMPTS",
    "PROMPT",
    "COMPLETION",
    "LATENCY_MS",
];
const FOLLOW_WIDTHS: [usize; 9] = [19, 12, 22, 16, 6, 8, 8, 10, 10];

pub(crate) fn follow_line(cells: &[String; 9]) -> String {
    let parts: Vec<String> = cells
        .iter()
        .zip(FOLLOW_WIDTHS)
        .enumerate()
        .map(|(i, (c, w))| {
            if i >= 4 {
                format!("{c:>w$}")
            } else {
                format!("{c:<w$}")
            }
        })
        .collect();
    parts.join("  ")
}

/// A usage group as shown: a request no key served (refused by the pool: every key busy,
/// cooling down or not allowed) has no key.
pub(crate) fn group_name(title: &str, group: &str) -> String {
    match (title, group) {
        ("KEY", "") => "(none: refused by the pool)".to_owned(),
        (_, "") => "-".to_owned(),
        _ => group.to_owned(),
    }
}

/// Pico-dollars as decimal dollars, exact (`0.00202`).
pub(crate) fn usd(pico: u64) -> String {
    const PER_USD: u64 = 1_000_000_000_000;
    let (whole, frac) = (pico / PER_USD, pico % PER_USD);
    if frac == 0 {
        return whole.to_string();
    }
    format!("{whole}.{}", format!("{frac:012}").trim_end_matches('0'))
}
