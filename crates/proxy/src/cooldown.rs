//! How long an upstream asked us to stay away, from its 429 headers.
//!
//! Looks at `retry-after-ms` (ms), `Retry-After` (seconds, decimal seconds or an HTTP date) and
//! OpenAI's `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (`1m30s`, `6m0s`, `20ms`,
//! `1.5s`, `2h`). The longest sensible value wins; garbage is ignored, never an error. Values are
//! capped at one hour so a broken upstream cannot park a key forever. Anthropic's
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset` (RFC 3339 instants)
//! are read only when none of those is there: Anthropic sends `retry-after` with its 429s, and a
//! reset of a limit that is not the exhausted one would park the key for nothing.

use std::time::{Duration, SystemTime};

const CAP: Duration = Duration::from_secs(3600);

/// The cooldown an upstream 429 asks for, if any header says so. `get` reads a header by
/// lower-case name.
pub fn cooldown<'a>(get: impl Fn(&str) -> Option<&'a str>, now: SystemTime) -> Option<Duration> {
    let candidates = [
        get("retry-after-ms")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|ms| secs(ms / 1000.0)),
        get("retry-after").and_then(|v| retry_after(v, now)),
        get("x-ratelimit-reset-requests").and_then(go_duration),
        get("x-ratelimit-reset-tokens").and_then(go_duration),
    ];
    let anthropic = || {
        [
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-output-tokens-reset",
        ]
        .into_iter()
        .filter_map(|h| get(h).and_then(|v| instant(v, now)))
        .max()
    };
    candidates
        .into_iter()
        .flatten()
        .max()
        .or_else(anthropic)
        .map(|d| d.min(CAP))
}

/// An RFC 3339 instant (`2026-12-05T03:00:00Z`) as the time left until it.
fn instant(value: &str, now: SystemTime) -> Option<Duration> {
    let at = chrono::DateTime::parse_from_rfc3339(value.trim()).ok()?;
    let at =
        SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(at.timestamp_millis()).ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether an upstream's `Retry-After` or `retry-after-ms` value is one a client can use (a
/// non-negative number of seconds, or an HTTP date); junk never reaches clients.
pub fn relayable(name: &str, value: &str) -> bool {
    match name {
        "retry-after" => retry_after(value, SystemTime::now()).is_some(),
        "retry-after-ms" => value
            .trim()
            .parse::<f64>()
            .is_ok_and(|ms| ms.is_finite() && ms >= 0.0),
        _ => true,
    }
}

fn secs(s: f64) -> Option<Duration> {
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(CAP.as_secs_f64())))
}

/// `Retry-After`: delay-seconds (decimals tolerated) or an HTTP date.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(s) = v.parse::<f64>() {
        return secs(s);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Go-style durations as OpenAI sends them: a sequence of `<number><unit>` with units
/// `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`. A bare number is seconds.
fn go_duration(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if let Ok(s) = v.parse::<f64>() {
        return secs(s);
    }
    let mut total = 0.0f64;
    let mut rest = v;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    secs(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Option<Duration> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        cooldown(
            |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
            now,
        )
    }

    #[test]
    fn anthropic_reset_instants_when_nothing_else_says() {
        // 1_700_000_000 is 2023-11-14T22:13:20Z
        assert_eq!(
            parse(&[
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:50Z"),
                ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:13:25.5Z"),
            ]),
            Some(Duration::from_secs(30))
        );
        // retry-after wins
        assert_eq!(
            parse(&[
                ("retry-after", "3"),
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:50Z"),
            ]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse(&[("anthropic-ratelimit-requests-reset", "soon")]),
            None
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse(&[("retry-after", "5")]), Some(Duration::from_secs(5)));
        assert_eq!(
            parse(&[("retry-after", " 1.5 ")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse(&[("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        // 2023-11-14T22:13:20Z is the epoch above; 30 s later:
        assert_eq!(
            parse(&[("retry-after", "Tue, 14 Nov 2023 22:13:50 GMT")]),
            Some(Duration::from_secs(30))
        );
        // a date in the past means "now"
        assert_eq!(
            parse(&[("retry-after", "Tue, 14 Nov 2023 22:00:00 GMT")]),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn openai_reset_headers() {
        assert_eq!(
            parse(&[("x-ratelimit-reset-requests", "1m30s")]),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse(&[("x-ratelimit-reset-tokens", "20ms")]),
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            parse(&[("x-ratelimit-reset-tokens", "6m0s")]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            parse(&[("x-ratelimit-reset-requests", "1.5s")]),
            Some(Duration::from_millis(1500))
        );
        // the longest wins
        assert_eq!(
            parse(&[("retry-after", "2"), ("x-ratelimit-reset-requests", "7s")]),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn garbage_is_ignored_and_values_capped() {
        assert_eq!(parse(&[("retry-after", "soon")]), None);
        assert_eq!(parse(&[("retry-after", "-3")]), None);
        assert_eq!(parse(&[("x-ratelimit-reset-requests", "1x")]), None);
        assert_eq!(parse(&[("x-ratelimit-reset-requests", "ms")]), None);
        assert_eq!(parse(&[("retry-after", "NaN")]), None);
        assert_eq!(parse(&[("retry-after", "99999999")]), Some(CAP));
        assert_eq!(
            parse(&[("retry-after", "junk"), ("retry-after-ms", "100")]),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse(&[]), None);
    }

    #[test]
    fn only_usable_retry_after_values_are_relayed() {
        use super::relayable;
        assert!(relayable("retry-after", "5"));
        assert!(relayable("retry-after", "Tue, 14 Nov 2023 22:13:50 GMT"));
        assert!(relayable("retry-after-ms", "250"));
        for junk in ["soon", "-3", "NaN", "", "5; drop table"] {
            assert!(!relayable("retry-after", junk), "{junk}");
        }
        assert!(!relayable("retry-after-ms", "-1"));
        assert!(relayable("x-request-id", "anything"));
    }
}
