//! USD budgets at run time. Before a request is forwarded its estimated cost is held against
//! the budgets it falls under (its gateway's, its caller's on that gateway; then, once chosen,
//! its key's); when it ends, the hold is settled to what it really cost. Held amounts count,
//! so requests in flight overshoot a budget by at most their own estimates; with Redis the
//! counters are the replicas' common ones, each decision one script ([`SharedState::hold`]).
//!
//! A budget's counters are named by its period (`budget:gw:team-a:2026-12-05`), so a new day,
//! week or month starts from zero; they lapse a day after their period ends. Reaching 80% and
//! 100% of a period's amount alerts once: the settlement that crosses the line is the only one
//! that sees it crossed, on whichever replica it runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keypool_config::budget::{Budget, dollars};
use keypool_shared::{BudgetReq, Held, InMemory, LeaseReq, SharedState};
use keypool_types::{ApiError, ErrorKind};

use crate::Caller;
use crate::gateway::GatewayRuntime;

mod hold;
pub use hold::Hold;

/// How long a period's counters outlive it (a request admitted just before the end settles
/// into the period it was admitted in).
const LAPSE_AFTER_END: Duration = Duration::from_secs(86_400);

/// One budget a request falls under, in the period it falls in.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub req: BudgetReq,
    /// "the gateway `team-a`", "your credential on the gateway `team-a`", "the key `k1`".
    pub whose: String,
    pub budget: Budget,
    /// When the period ends (`None`: a `total` budget).
    pub end: Option<DateTime<Utc>>,
    /// The period's first instant and its timezone's name, for messages.
    pub since: Option<(DateTime<Utc>, chrono_tz::Tz)>,
}

impl Wanted {
    fn new(
        scope: &str,
        whose: String,
        budget: Budget,
        tz: chrono_tz::Tz,
        now: DateTime<Utc>,
    ) -> Self {
        let w = budget.period.window(tz, now);
        let ttl = w
            .end
            .map(|end| (end - now).to_std().unwrap_or(Duration::ZERO) + LAPSE_AFTER_END);
        Self {
            req: BudgetReq {
                key: format!("budget:{scope}:{}", w.label),
                limit: budget.nanos,
                ttl,
            },
            whose,
            budget,
            end: w.end,
            since: w.start.map(|s| (s, tz)),
        }
    }

    /// A gateway's own budget.
    pub fn gateway(gw: &GatewayRuntime, now: DateTime<Utc>) -> Option<Self> {
        let b = gw.spec.budget?;
        Some(Self::new(
            &format!("gw:{}", gw.name),
            format!("the gateway `{}`", gw.name),
            b,
            gw.spec.timezone,
            now,
        ))
    }

    /// A caller's budget on a gateway (none for an anonymous caller).
    pub fn caller(gw: &GatewayRuntime, caller: &Caller, now: DateTime<Utc>) -> Option<Self> {
        Self::caller_id(gw, caller.id.as_deref()?, now)
    }

    /// The budget of the caller `id` (as usage events record it) on a gateway.
    pub fn caller_id(gw: &GatewayRuntime, id: &str, now: DateTime<Utc>) -> Option<Self> {
        let b = gw.spec.caller_budget?;
        Some(Self::new(
            &format!("caller:{}:{id}", gw.name),
            format!("your credential on the gateway `{}`", gw.name),
            b,
            gw.spec.timezone,
            now,
        ))
    }

    /// An upstream key's own cap (its periods in UTC).
    pub fn key(name: &str, budget: Budget, now: DateTime<Utc>) -> Self {
        Self::new(
            &format!("key:{name}"),
            format!("the key `{name}`"),
            budget,
            chrono_tz::UTC,
            now,
        )
    }

    /// 429 `insufficient_quota`, naming the budget, `Retry-After` the period's end.
    fn refusal(&self, spent: u64, now: DateTime<Utc>) -> ApiError {
        let since = self.since.map_or_else(String::new, |(t, tz)| {
            format!(
                " since {} ({tz})",
                t.with_timezone(&tz).format("%Y-%m-%d %H:%M")
            )
        });
        let (next, secs) = match self.end {
            Some(end) => {
                let secs = u64::try_from((end - now).num_seconds().max(1)).unwrap_or(1);
                (
                    format!(" It starts again in {}.", in_words(secs)),
                    Some(secs),
                )
            }
            None => (" Ask its admin for more.".to_owned(), None),
        };
        let mut e = ApiError::new(
            ErrorKind::InsufficientQuota,
            format!(
                "{} has reached its {} budget of {}: {} spent{since}.{next}",
                capitalised(&self.whose),
                self.budget.period.adjective(),
                dollars(self.budget.nanos),
                dollars(spent),
            ),
        );
        e.retry_after_secs = secs;
        e
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// `3h12m`, `45m`, `20s`.
fn in_words(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// The budgets' counters: in the shared state when there is one (this process's own while it
/// is unavailable and `on_failure: local`), else this process's.
pub struct Budgets {
    local: InMemory,
    shared: Option<Arc<dyn SharedState>>,
    /// Slices of the shared budgets held here (`redis.lease`).
    slices: Option<Arc<crate::slices::Slices>>,
    /// Where a budget's 80% and 100% crossings are alerted.
    telemetry: keypool_telemetry::Telemetry,
    /// Keys' budgets known spent, until their period ends (asked again if the limit changes):
    /// a spent key costs the requests that pick it no round trip.
    spent_keys: Mutex<HashMap<String, SpentUntil>>,
}

/// A spent key budget: its amount then, and its period's end (`None`: never).
type SpentUntil = (u64, Option<DateTime<Utc>>);

/// Why a hold was refused.
#[derive(Debug)]
pub enum Refusal {
    /// Budget `index` (of those asked) has no room: the answer for the client.
    Over { index: usize, error: ApiError },
    /// The shared state is unavailable and the deployment refuses rather than guess.
    Unavailable(ApiError),
}

impl Refusal {
    pub fn into_error(self) -> ApiError {
        match self {
            Self::Over { error, .. } | Self::Unavailable(error) => error,
        }
    }
}

impl Budgets {
    /// The budgets' counters, in `shared` when there is one; with `lease` asking for more than
    /// one estimate at a time, held there in slices ([`crate::slices`]).
    pub fn new(
        shared: Option<Arc<dyn SharedState>>,
        lease: Option<LeaseReq>,
        telemetry: keypool_telemetry::Telemetry,
    ) -> Self {
        let slices = match (&shared, lease) {
            (Some(s), Some(l)) if l.calls > 1 => Some(Arc::new(crate::slices::Slices::new(
                l,
                s.clone(),
                telemetry.clone(),
            ))),
            _ => None,
        };
        Self {
            local: InMemory::default(),
            slices,
            shared,
            telemetry,
            spent_keys: Mutex::default(),
        }
    }

    /// Where budget alerts (and the spend of requests under them) are recorded.
    pub fn telemetry(&self) -> &keypool_telemetry::Telemetry {
        &self.telemetry
    }

    /// Holds `amount` nano-dollars against every budget in `wanted`, or refuses naming the one
    /// without room. `None` when there is no budget to hold against.
    pub async fn hold(
        self: &Arc<Self>,
        wanted: Vec<Wanted>,
        amount: u64,
    ) -> Result<Option<Hold>, Refusal> {
        if wanted.is_empty() {
            return Ok(None);
        }
        let reqs: Vec<BudgetReq> = wanted.iter().map(|w| w.req.clone()).collect();
        let (held, local, slice) = match &self.shared {
            None => (self.local.hold(&reqs, amount).await, true, None),
            Some(shared) => match self.hold_shared(shared, &wanted, &reqs, amount).await {
                Ok((h, slice)) => (Ok(h), false, slice),
                Err(e) => {
                    shared.failed(&e);
                    if shared.fail_closed() {
                        return Err(Refusal::Unavailable(
                            ApiError::new(
                                ErrorKind::SharedStateUnavailable,
                                "The shared budget state is unavailable and this gateway refuses rather than guess.",
                            )
                            .retry_after(1),
                        ));
                    }
                    (self.local.hold(&reqs, amount).await, true, None)
                }
            },
        };
        match held {
            Ok(Held::Held) | Err(_) => Ok(Some(Hold {
                wanted,
                amount,
                local,
                slice,
                owner: self.clone(),
                settled: false,
            })),
            Ok(Held::Over { index, spent }) => {
                let error = wanted[index].refusal(spent, Utc::now());
                Err(Refusal::Over { index, error })
            }
        }
    }

    /// Settles every slice of the shared budgets this replica holds (a graceful stop, once the
    /// server has drained).
    pub async fn settle_slices(&self) {
        if let Some(slices) = &self.slices {
            slices.settle_all().await;
        }
    }

    /// A hold in the shared state: from a slice of it where slices are on.
    async fn hold_shared(
        &self,
        shared: &Arc<dyn SharedState>,
        wanted: &[Wanted],
        reqs: &[BudgetReq],
        amount: u64,
    ) -> Result<(Held, Option<Arc<crate::slices::Slice>>), keypool_shared::SharedError> {
        match &self.slices {
            Some(slices) => slices.hold(wanted, reqs, amount).await,
            None => crate::slices::hold_alone(shared, reqs, amount).await,
        }
    }

    /// Holds `amount` against a key's budget; `None` when the key has spent it (remembered
    /// until the period ends) or its budget cannot be asked (`on_failure: closed`).
    pub async fn hold_key(
        self: &Arc<Self>,
        name: &str,
        budget: Budget,
        amount: u64,
    ) -> Option<Hold> {
        let now = Utc::now();
        let w = Wanted::key(name, budget, now);
        if let Some((limit, until)) = self.spent_key(&w.req.key)
            && limit == budget.nanos
            && until.is_none_or(|t| t > now)
        {
            return None;
        }
        let (key, end) = (w.req.key.clone(), w.end);
        match self.hold(vec![w], amount).await {
            Ok(hold) => hold,
            Err(Refusal::Over { .. }) => {
                self.spent_keys
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key, (budget.nanos, end));
                None
            }
            Err(Refusal::Unavailable(_)) => None,
        }
    }

    fn spent_key(&self, key: &str) -> Option<SpentUntil> {
        self.spent_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    async fn settle(&self, wanted: Vec<Wanted>, held: u64, local: bool, spent: u64) {
        if wanted.is_empty() {
            return;
        }
        let reqs: Vec<BudgetReq> = wanted.iter().map(|w| w.req.clone()).collect();
        let settled = match (&self.shared, local) {
            (Some(shared), false) => match shared.settle_budgets(&reqs, held, spent).await {
                Ok(s) => s,
                Err(e) => {
                    shared.background_failed(&e);
                    return;
                }
            },
            _ => match self.local.settle_budgets(&reqs, held, spent).await {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        for (w, s) in wanted.iter().zip(settled) {
            alert_crossings(&self.telemetry, w, s.before, s.after);
        }
    }

    /// Sets a budget's spend in its current period at start-up (from the store), unless the
    /// shared state already has one.
    pub async fn restore(&self, wanted: &Wanted, spent: u64) {
        if let Some(shared) = &self.shared
            && let Err(e) = shared.init_budget(&wanted.req, spent).await
        {
            shared.background_failed(&e);
        }
        // this process's counters too: the fallback while the shared state is unavailable
        let _ = self.local.init_budget(&wanted.req, spent).await;
    }
}

/// Alerts once for each of 80% and 100% that this settlement crossed.
pub(crate) fn alert_crossings(
    telemetry: &keypool_telemetry::Telemetry,
    w: &Wanted,
    before: u64,
    after: u64,
) {
    let limit = u128::from(w.budget.nanos);
    for pct in [80u128, 100] {
        let line = limit * pct / 100;
        if u128::from(before) < line && u128::from(after) >= line {
            telemetry.alert(
                keypool_telemetry::Cause::Budget,
                format!("{}:{pct}", w.req.key),
                format!(
                    "{} has spent {} of its {} budget of {} ({pct}%)",
                    capitalised(&w.whose),
                    dollars(after),
                    w.budget.period.adjective(),
                    dollars(w.budget.nanos),
                ),
            );
        }
    }
}

/// The budgets a request through `gw` by `caller` falls under.
pub fn request_budgets(gw: &GatewayRuntime, caller: &Caller) -> Vec<Wanted> {
    if gw.spec.budget.is_none() && gw.spec.caller_budget.is_none() {
        return Vec::new();
    }
    let now = Utc::now();
    Wanted::gateway(gw, now)
        .into_iter()
        .chain(Wanted::caller(gw, caller, now))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keypool_config::budget::{NANOS_PER_USD, Period};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_refusal_names_the_budget_and_when_it_starts_again() {
        let b = Budget {
            nanos: 50 * NANOS_PER_USD,
            period: Period::Day,
        };
        let tz: chrono_tz::Tz = "Asia/Shanghai".parse().unwrap();
        let now = at("2026-12-05T12:30:00Z");
        let w = Wanted::new("gw:team", "the gateway `team`".into(), b, tz, now);
        assert_eq!(w.req.key, "budget:gw:team:2026-12-05");
        // the Shanghai day ends at 16:00 UTC: 3.5 hours, and the counters outlive it a day
        assert_eq!(
            w.req.ttl,
            Some(Duration::from_secs(3 * 3600 + 1800) + LAPSE_AFTER_END)
        );
        let e = w.refusal(50_000_000_123, now);
        assert_eq!(e.kind, ErrorKind::InsufficientQuota);
        assert_eq!(e.retry_after_secs, Some(3 * 3600 + 1800));
        assert_eq!(
            e.message,
            "The gateway `team` has reached its daily budget of $50: $50.000000123 spent since 2026-12-05 00:00 (Asia/Shanghai). It starts again in 3h30m."
        );
        let total = Wanted::key(
            "k1",
            Budget {
                nanos: NANOS_PER_USD,
                period: Period::Total,
            },
            now,
        );
        assert_eq!(
            (total.req.key.as_str(), total.req.ttl),
            ("budget:key:k1:total", None)
        );
        let e = total.refusal(NANOS_PER_USD, now);
        assert_eq!(e.retry_after_secs, None);
        assert!(
            e.message
                .starts_with("The key `k1` has reached its total budget of $1")
        );
    }

    #[tokio::test]
    async fn a_spent_key_is_remembered_until_its_period_ends() {
        let budgets = Arc::new(Budgets::new(
            None,
            None,
            keypool_telemetry::Telemetry::default(),
        ));
        let b = Budget {
            nanos: 10,
            period: Period::Day,
        };
        let hold = budgets.hold_key("k", b, 10).await.unwrap();
        assert_eq!(hold.amount(), 10);
        assert!(budgets.hold_key("k", b, 1).await.is_none(), "10 held of 10");
        // a larger budget is asked again
        let more = Budget { nanos: 20, ..b };
        let second = budgets.hold_key("k", more, 1).await.unwrap();
        // settled or dropped, a hold leaves nothing held
        hold.settle(3);
        drop(second);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let w = Wanted::key("k", more, Utc::now());
        assert!(
            matches!(budgets.hold(vec![w], 17).await, Ok(Some(_)),),
            "3 spent, nothing held: 17 more fit under 20"
        );
    }
}
