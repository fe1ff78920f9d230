//! `keypoolctl usage`: totals by gateway, key, model, caller and day, calls per hour, or live
//! events with `--follow`.

use keypool_proto::admin::v1 as pb;
use serde_json::{Value, json};

use crate::Client;
use crate::cli::Cli;
use crate::print::{FOLLOW_HEADER, follow_line, group_name, table, time, usd};

/// Live usage events until interrupted.
pub async fn follow(
    c: &mut Client,
    cli: &Cli,
    filter: pb::StreamUsageRequest,
) -> anyhow::Result<()> {
    let mut stream = c.stream_usage(filter).await?.into_inner();
    if !cli.json {
        println!("{}", follow_line(&FOLLOW_HEADER.map(str::to_owned)));
    }
    while let Some(e) = stream.message().await? {
        if cli.json {
            println!(
                "{}",
                json!({"id": e.id, "at_ms": e.at_ms, "gateway": e.gateway,
                    "caller": e.caller, "model": e.model, "key": e.key,
                    "provider": e.provider, "attempts": e.attempts,
                    "status": e.status, "stream": e.stream,
                    "latency_ms": e.latency_ms, "prompt_tokens": e.prompt_tokens,
                    "completion_tokens": e.completion_tokens,
                    "total_tokens": e.total_tokens,
                    "cache_read_tokens": e.cache_read_tokens,
                    "cache_write_tokens": e.cache_write_tokens,
                    "cache_write_1h_tokens": e.cache_write_1h_tokens,
                    "requested_model": e.requested_model,
                    "cache_hit": e.cache_hit,
                    "guardrails": e.guardrails,
                    "cost_usd": e.cost_pico.map(usd),
                    "error": e.error})
            );
        } else {
            println!(
                "{}",
                follow_line(&[
                    time(e.at_ms),
                    e.gateway,
                    e.model,
                    e.key.unwrap_or_else(|| "(none)".to_owned()),
                    e.status.to_string(),
                    e.attempts.to_string(),
                    e.prompt_tokens.unwrap_or(0).to_string(),
                    e.completion_tokens.unwrap_or(0).to_string(),
                    e.latency_ms.to_string(),
                ])
            );
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    Ok(())
}

fn dollars(pico: i64) -> String {
    usd(u64::try_from(pico).unwrap_or(0))
}

/// A day group (its UTC midnight in unix ms) as `YYYY-MM-DD`.
fn day(group: &str) -> String {
    group
        .parse::<i64>()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| group.to_owned(), |t| t.format("%Y-%m-%d").to_string())
}

fn totals_json(v: &[pb::UsageTotal]) -> Value {
    Value::Array(
        v.iter()
            .map(|t| {
                json!({"group": t.group, "calls": t.calls, "errors": t.errors,
                    "prompt_tokens": t.prompt_tokens,
                    "completion_tokens": t.completion_tokens,
                    "total_tokens": t.total_tokens,
                    "cache_read_tokens": t.cache_read_tokens,
                    "cache_write_tokens": t.cache_write_tokens,
                    "cache_write_1h_tokens": t.cache_write_1h_tokens,
                    "cost_usd": dollars(t.cost_pico)})
            })
            .collect(),
    )
}

/// The totals as JSON, days as `YYYY-MM-DD`.
fn print_json(r: &pb::GetUsageResponse) {
    let days: Vec<pb::UsageTotal> = r
        .by_day
        .iter()
        .map(|t| pb::UsageTotal {
            group: day(&t.group),
            ..t.clone()
        })
        .collect();
    println!(
        "{}",
        json!({
            "by_gateway": totals_json(&r.by_gateway),
            "by_key": totals_json(&r.by_key),
            "by_model": totals_json(&r.by_model),
            "by_caller": totals_json(&r.by_caller),
            "by_day": totals_json(&days),
            "calls_per_hour": r.calls_per_hour.iter().map(|h| json!({"hour_ms": h.hour_ms,
                "calls": h.calls, "total_tokens": h.total_tokens,
                "cost_usd": dollars(h.cost_pico)})).collect::<Vec<_>>(),
        })
    );
}

/// The totals as tables (one per grouping), or JSON.
pub fn print(cli: &Cli, r: &pb::GetUsageResponse) {
    if cli.json {
        print_json(r);
        return;
    }
    for (title, v) in [
        ("GATEWAY", &r.by_gateway),
        ("KEY", &r.by_key),
        ("MODEL", &r.by_model),
        ("CALLER", &r.by_caller),
        ("DAY (UTC)", &r.by_day),
    ] {
        let rows: Vec<Vec<String>> = v
            .iter()
            .map(|t| {
                let group = if title.starts_with("DAY") {
                    day(&t.group)
                } else {
                    group_name(title, &t.group)
                };
                vec![
                    group,
                    t.calls.to_string(),
                    t.errors.to_string(),
                    t.prompt_tokens.to_string(),
                    t.cache_read_tokens.to_string(),
                    t.cache_write_tokens.to_string(),
                    t.completion_tokens.to_string(),
                    t.total_tokens.to_string(),
                    dollars(t.cost_pico),
                ]
            })
            .collect();
        table(
            &[
                title,
                "CALLS",
                "ERRORS",
                "PROMPT",
                "CACHE READ",
                "CACHE WRITE",
                "COMPLETION",
                "TOTAL",
                "SPEND (USD)",
            ],
            &rows,
        );
        println!();
    }
    let busy: Vec<Vec<String>> = r
        .calls_per_hour
        .iter()
        .filter(|h| h.calls > 0)
        .map(|h| {
            vec![
                time(h.hour_ms),
                h.calls.to_string(),
                h.total_tokens.to_string(),
                dollars(h.cost_pico),
            ]
        })
        .collect();
    table(
        &["HOUR (UTC, today)", "CALLS", "TOKENS", "SPEND (USD)"],
        &busy,
    );
}
