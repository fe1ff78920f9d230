//! USD budgets: `budget: {usd: 50, period: day}` per gateway, per caller of a gateway
//! (`caller_budget`) and per upstream key, as written ([`RawBudget`]) and validated
//! ([`Budget`]), with the calendar arithmetic of their periods ([`Period::window`]).
//!
//! Budgets count in nano-dollars (10⁻⁹ USD): a counter of up to nine million dollars stays an
//! exact integer everywhere it is kept, a Lua number in Redis included (2⁵³ nano-dollars).

use chrono::{DateTime, Datelike, Duration as Days, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Nano-dollars (10⁻⁹ USD).
pub type Nanos = u64;

/// Nano-dollars in a dollar.
pub const NANOS_PER_USD: u64 = 1_000_000_000;

/// The largest budget: a million dollars a period.
pub const MAX_BUDGET_USD: f64 = 1_000_000.0;

/// `budget:` as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// Dollars a period (up to nine decimal places count).
    pub usd: f64,
    /// `day` | `week` (from Monday) | `month` (default) | `total` (never resets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
}

/// How often a budget starts again, in its timezone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    /// From Monday 00:00.
    Week,
    Month,
    /// Never resets.
    Total,
}

/// A validated budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub nanos: Nanos,
    pub period: Period,
}

/// The period a moment falls in: its name (part of the counter's key), its first instant and
/// the first instant of the next (none for `total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub label: String,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

impl Period {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" | "daily" => Self::Day,
            "week" | "weekly" => Self::Week,
            "month" | "monthly" => Self::Month,
            "total" => Self::Total,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Total => "total",
        }
    }

    /// "daily", "weekly", "monthly", "total": how a message names a budget of this period.
    pub fn adjective(self) -> &'static str {
        match self {
            Self::Day => "daily",
            Self::Week => "weekly",
            Self::Month => "monthly",
            Self::Total => "total",
        }
    }

    /// The period `now` falls in, its calendar read in `tz`.
    pub fn window(self, tz: chrono_tz::Tz, now: DateTime<Utc>) -> Window {
        let today = now.with_timezone(&tz).date_naive();
        let (first, next) = match self {
            Self::Total => {
                return Window {
                    label: "total".into(),
                    start: None,
                    end: None,
                };
            }
            Self::Day => (today, today + Days::days(1)),
            Self::Week => {
                let monday = today - Days::days(i64::from(today.weekday().num_days_from_monday()));
                (monday, monday + Days::days(7))
            }
            Self::Month => {
                let first = today.with_day(1).unwrap_or(today);
                let next = if first.month() == 12 {
                    NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
                };
                (first, next.unwrap_or(first + Days::days(31)))
            }
        };
        Window {
            label: first.format("%Y-%m-%d").to_string(),
            start: Some(midnight(tz, first)),
            end: Some(midnight(tz, next)),
        }
    }
}

/// The first instant of `day` in `tz` (a day whose midnight a DST change skips starts at the
/// first instant it has).
fn midnight(tz: chrono_tz::Tz, day: NaiveDate) -> DateTime<Utc> {
    let naive = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.with_timezone(&Utc)
        }
        chrono::LocalResult::None => {
            let later = naive + Days::hours(1);
            tz.from_local_datetime(&later)
                .earliest()
                .map_or_else(|| Utc.from_utc_datetime(&naive), |t| t.with_timezone(&Utc))
        }
    }
}

impl RawBudget {
    /// Checks the amount and the period (the reason names the field under the budget).
    pub fn validate(&self) -> Result<Budget, (&'static str, String)> {
        if !self.usd.is_finite() || self.usd <= 0.0 || self.usd > MAX_BUDGET_USD {
            return Err((
                "usd",
                format!(
                    "must be more than 0 and at most {MAX_BUDGET_USD} dollars, got {}",
                    self.usd
                ),
            ));
        }
        let period = match self.period.as_deref() {
            None => Period::Month,
            Some(p) => Period::parse(p.trim()).ok_or((
                "period",
                format!("expected day, week, month or total, got {p:?}"),
            ))?,
        };
        // at most 1e15 nano-dollars: exact in an f64 and in a Lua number
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let nanos = (self.usd * 1e9).round() as Nanos;
        Ok(Budget {
            nanos: nanos.max(1),
            period,
        })
    }
}

impl Budget {
    /// As written (`usd` back in dollars).
    #[allow(clippy::cast_precision_loss)] // at most 1e15: exact in an f64
    pub fn to_raw(self) -> RawBudget {
        RawBudget {
            usd: self.nanos as f64 / 1e9,
            period: Some(self.period.as_str().to_owned()),
        }
    }
}

/// Nano-dollars as decimal dollars without trailing zeros (`$12.5`, `$0.000002`).
pub fn dollars(nanos: Nanos) -> String {
    let (whole, frac) = (nanos / NANOS_PER_USD, nanos % NANOS_PER_USD);
    if frac == 0 {
        return format!("${whole}");
    }
    let digits = format!("{frac:09}");
    format!("${whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods_follow_the_calendar_of_their_timezone() {
        let shanghai: chrono_tz::Tz = "Asia/Shanghai".parse().unwrap();
        // 2026-12-06 01:00 in Shanghai is still the 5th in UTC
        let now = at("2026-12-05T17:00:00Z");
        let d = Period::Day.window(shanghai, now);
        assert_eq!(d.label, "2026-12-06");
        assert_eq!(d.start, Some(at("2026-12-05T16:00:00Z")));
        assert_eq!(d.end, Some(at("2026-12-06T16:00:00Z")));
        let utc = Period::Day.window(chrono_tz::UTC, now);
        assert_eq!(utc.label, "2026-12-05");
        // 2026-12-05 is a Saturday: the week started on Monday the 30th of November
        let w = Period::Week.window(chrono_tz::UTC, now);
        assert_eq!(w.label, "2026-11-30");
        assert_eq!(w.end, Some(at("2026-12-07T00:00:00Z")));
        let m = Period::Month.window(chrono_tz::UTC, now);
        assert_eq!(
            (m.label.as_str(), m.end),
            ("2026-12-01", Some(at("2027-01-01T00:00:00Z")))
        );
        let t = Period::Total.window(chrono_tz::UTC, now);
        assert_eq!((t.label.as_str(), t.end), ("total", None));
    }

    #[test]
    fn a_budget_needs_a_positive_amount_and_a_known_period() {
        let b = |usd: f64, period: Option<&str>| {
            RawBudget {
                usd,
                period: period.map(str::to_owned),
            }
            .validate()
        };
        assert_eq!(
            b(50.0, Some("day")),
            Ok(Budget {
                nanos: 50 * NANOS_PER_USD,
                period: Period::Day
            })
        );
        assert_eq!(b(0.25, None).unwrap().period, Period::Month);
        assert_eq!(b(0.0, None).unwrap_err().0, "usd");
        assert_eq!(b(f64::NAN, None).unwrap_err().0, "usd");
        assert_eq!(b(2e6, None).unwrap_err().0, "usd");
        assert_eq!(b(1.0, Some("year")).unwrap_err().0, "period");
    }

    #[test]
    fn dollars_are_written_without_trailing_zeros() {
        assert_eq!(dollars(50 * NANOS_PER_USD), "$50");
        assert_eq!(dollars(12_500_000_000), "$12.5");
        assert_eq!(dollars(2_000), "$0.000002");
    }
}
