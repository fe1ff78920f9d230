//! `keypoolctl spend`: spend per key, gateway or model over a time range, as CSV or JSON, with
//! exact decimal dollars (from the rollups' pico-dollars) to set beside a provider's bill.

use std::fmt::Write as _;

use keypool_proto::admin::v1 as pb;
use serde_json::json;

use crate::print::usd;

/// `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
}

const DAY_MS: i64 = 86_400_000;

impl Range {
    /// `--from` (default 30 days before `now_ms`) and `--to` (default now).
    pub fn parse(from: Option<&str>, to: Option<&str>, now_ms: i64) -> anyhow::Result<Self> {
        let to_ms = to.map_or(Ok(now_ms + 1), |t| instant(t, "--to"))?;
        let from_ms = from.map_or(Ok(to_ms - 30 * DAY_MS), |f| instant(f, "--from"))?;
        anyhow::ensure!(from_ms < to_ms, "--from must be before --to");
        Ok(Self { from_ms, to_ms })
    }
}

/// A UTC date, an RFC 3339 time, or unix milliseconds.
fn instant(s: &str, flag: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp_millis());
    }
    anyhow::bail!("{flag}: expected a date (2026-11-01), an RFC 3339 time or unix ms, got {s:?}")
}

/// The rows as CSV (a header line, then one line per group) or one JSON document.
pub fn render(by: &str, range: &Range, rows: &[pb::UsageTotal], json: bool) -> String {
    let cost = |t: &pb::UsageTotal| usd(u64::try_from(t.cost_pico).unwrap_or(0));
    let total: i64 = rows.iter().map(|t| t.cost_pico.max(0)).sum();
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|t| {
                json!({by: t.group, "calls": t.calls, "errors": t.errors,
                    "prompt_tokens": t.prompt_tokens,
                    "cache_read_tokens": t.cache_read_tokens,
                    "cache_write_tokens": t.cache_write_tokens,
                    "completion_tokens": t.completion_tokens,
                    "cost_usd": cost(t)})
            })
            .collect();
        return format!(
            "{}\n",
            json!({"by": by, "from_ms": range.from_ms, "to_ms": range.to_ms, "rows": rows,
                "total_usd": usd(u64::try_from(total).unwrap_or(0))})
        );
    }
    let mut out = format!(
        "{by},calls,errors,prompt_tokens,cache_read_tokens,cache_write_tokens,completion_tokens,cost_usd\n"
    );
    for t in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{}",
            csv_field(&t.group),
            t.calls,
            t.errors,
            t.prompt_tokens,
            t.cache_read_tokens,
            t.cache_write_tokens,
            t.completion_tokens,
            cost(t)
        );
    }
    out
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_take_dates_times_and_milliseconds() {
        let r = Range::parse(Some("2026-11-01"), Some("2026-12-01T00:00:00Z"), 0).unwrap();
        assert_eq!(r.from_ms, 1_793_491_200_000);
        assert_eq!(r.to_ms - r.from_ms, 30 * DAY_MS);
        let d = Range::parse(None, None, 100 * DAY_MS).unwrap();
        assert_eq!(d.to_ms - d.from_ms, 30 * DAY_MS);
        assert!(Range::parse(Some("yesterday"), None, 0).is_err());
        assert!(Range::parse(Some("2026-12-02"), Some("2026-12-01"), 0).is_err());
    }

    #[test]
    fn csv_has_exact_dollars_and_quoted_names() {
        let row = pb::UsageTotal {
            group: "a,b".into(),
            calls: 2,
            cost_pico: 1_500_000_001,
            ..pb::UsageTotal::default()
        };
        let r = Range {
            from_ms: 0,
            to_ms: 1,
        };
        let csv = render("key", &r, std::slice::from_ref(&row), false);
        assert_eq!(
            csv.lines().nth(1),
            Some("\"a,b\",2,0,0,0,0,0,0.001500000001")
        );
        let j: serde_json::Value = serde_json::from_str(&render("key", &r, &[row], true)).unwrap();
        assert_eq!(j["rows"][0]["key"], "a,b");
        assert_eq!(j["total_usd"], "0.001500000001");
    }
}
