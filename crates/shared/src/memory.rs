//! [`InMemory`]: the shared state of one process (a mutex over windows and counters), for a
//! single replica and as each replica's fallback while the shared one is unavailable.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::{
    Admit, BudgetReq, HealthEvent, Held, Picked, SharedError, SharedState, Spent, TokenReq,
    WindowReq,
};

/// A token reservation: when, under which id, how many.
type TokenEntry = (Instant, String, u64);

/// One process's state: windows of admission instants, counters.
#[derive(Default)]
pub struct InMemory {
    windows: Mutex<HashMap<String, Window>>,
    /// Token windows.
    tokens: Mutex<HashMap<String, VecDeque<TokenEntry>>>,
    counters: Mutex<HashMap<String, u64>>,
    /// Pins and when each expires.
    pins: Mutex<HashMap<String, (String, Instant)>>,
    budgets: Mutex<HashMap<String, BudgetEntry>>,
}

/// A USD budget's counters (nano-dollars) and when they lapse.
#[derive(Default, Clone, Copy)]
struct BudgetEntry {
    spent: u64,
    held: u64,
    expires: Option<Instant>,
}

/// Budgets kept before the lapsed ones are swept (each period of each budget is one entry).
const BUDGETS_BEFORE_SWEEP: usize = 10_000;

impl InMemory {
    /// The budget's entry, a fresh one when it lapsed; lapsed entries are swept now and then.
    fn budget_entry<'a>(
        map: &'a mut HashMap<String, BudgetEntry>,
        b: &BudgetReq,
        now: Instant,
    ) -> &'a mut BudgetEntry {
        if map.len() >= BUDGETS_BEFORE_SWEEP && !map.contains_key(&b.key) {
            map.retain(|_, e| e.expires.is_none_or(|t| t > now));
        }
        let e = map.entry(b.key.clone()).or_default();
        if e.expires.is_some_and(|t| t <= now) {
            *e = BudgetEntry::default();
        }
        e.expires = b.ttl.map(|t| now + t);
        e
    }
}

/// The most pins one process keeps: past it, expired ones go, then the ones expiring soonest
/// (a pin is a hint that keeps a follow-up on its key; losing one costs that follow-up a 404
/// from another key, never a wrong answer).
pub const MAX_PINS: usize = 100_000;

/// Above this limit a window counts in buckets rather than one record per call.
pub const EXACT_UP_TO: u64 = 4096;
/// A bucketed window holds at most this many buckets (plus the one filling).
pub const BUCKETS: u32 = 1024;

/// A sliding window of admissions: `(first, last, count)` runs of calls. Up to
/// [`EXACT_UP_TO`] calls each run is one instant (an exact log); above, calls within
/// `per / BUCKETS` of a run's first join it, so a window holds at most `BUCKETS + 1` runs
/// however large its limit. A run counts in full until its *last* call leaves the window:
/// never more than the limit in any trailing `per`, at the price of a full window freeing up
/// to `per / BUCKETS` later than an exact log would.
#[derive(Default)]
struct Window {
    runs: VecDeque<(Instant, Instant, u64)>,
    total: u64,
}

impl Window {
    fn prune(&mut self, now: Instant, per: Duration) {
        while let Some(&(_, last, n)) = self.runs.front() {
            if now.saturating_duration_since(last) < per {
                break;
            }
            self.total -= n;
            self.runs.pop_front();
        }
    }

    fn len(&self) -> u64 {
        self.total
    }

    /// When the oldest run leaves (what a refused call waits for).
    fn frees_in(&self, now: Instant, per: Duration) -> Duration {
        self.runs.front().map_or(Duration::ZERO, |(_, last, _)| {
            (*last + per).saturating_duration_since(now)
        })
    }

    fn last(&self) -> Option<Instant> {
        self.runs.back().map(|(_, last, _)| *last)
    }

    fn push(&mut self, now: Instant, limit: u64, per: Duration) {
        self.total += 1;
        if limit > EXACT_UP_TO
            && let Some(run) = self.runs.back_mut()
            && now.saturating_duration_since(run.0) < per / BUCKETS
        {
            run.1 = now;
            run.2 += 1;
            return;
        }
        self.runs.push_back((now, now, 1));
    }
}

#[async_trait::async_trait]
impl SharedState for InMemory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn admit(&self, windows: &[WindowReq], now: Instant) -> Result<Admit, SharedError> {
        Ok(self.admit_now(windows, now))
    }

    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        now: Instant,
    ) -> Result<Picked, SharedError> {
        let mut all = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut toks = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut best: Option<(usize, u64)> = None;
        let mut earliest: Option<Duration> = None;
        for (i, w) in candidates.iter().enumerate() {
            if let Some(Some(t)) = tokens.get(i) {
                let q = toks.entry(t.key.clone()).or_default();
                while q
                    .front()
                    .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= w.per)
                {
                    q.pop_front();
                }
                let used: u64 = q.iter().map(|(_, _, n)| n).sum();
                let cost = t.cost.min(t.limit);
                if used + cost > t.limit {
                    let mut must_free = used + cost - t.limit;
                    let mut free = w.per;
                    for (at, _, n) in q.iter() {
                        if *n >= must_free {
                            free = (*at + w.per).saturating_duration_since(now);
                            break;
                        }
                        must_free -= n;
                    }
                    earliest = Some(earliest.map_or(free, |e| e.min(free)));
                    continue;
                }
            }
            let q = all.entry(w.key.clone()).or_default();
            q.prune(now, w.per);
            if q.len() < w.limit {
                if best.is_none_or(|(_, n)| q.len() < n) {
                    best = Some((i, q.len()));
                }
                if !least_used {
                    break;
                }
            } else {
                let free = q.frees_in(now, w.per);
                earliest = Some(earliest.map_or(free, |e| e.min(free)));
            }
        }
        Ok(match best {
            Some((i, _)) => {
                let w = &candidates[i];
                all.entry(w.key.clone())
                    .or_default()
                    .push(now, w.limit, w.per);
                if let Some(Some(t)) = tokens.get(i) {
                    toks.entry(t.key.clone()).or_default().push_back((
                        now,
                        id.to_owned(),
                        t.cost.min(t.limit),
                    ));
                }
                Picked::Index(i)
            }
            None => Picked::Busy(earliest.unwrap_or_default()),
        })
    }

    async fn settle_tokens(
        &self,
        req: &TokenReq,
        id: &str,
        actual: u64,
    ) -> Result<(), SharedError> {
        let mut toks = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = toks
            .get_mut(&req.key)
            .and_then(|q| q.iter_mut().rev().find(|(_, i, _)| i == id))
        {
            e.2 = actual;
        }
        Ok(())
    }

    async fn hold(&self, budgets: &[BudgetReq], amount: u64) -> Result<Held, SharedError> {
        let now = Instant::now();
        let mut map = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (index, b) in budgets.iter().enumerate() {
            let e = Self::budget_entry(&mut map, b, now);
            if e.spent.saturating_add(e.held) >= b.limit {
                return Ok(Held::Over {
                    index,
                    spent: e.spent,
                });
            }
        }
        for b in budgets {
            let e = Self::budget_entry(&mut map, b, now);
            e.held = e.held.saturating_add(amount);
        }
        Ok(Held::Held)
    }

    async fn settle_budgets(
        &self,
        budgets: &[BudgetReq],
        held: u64,
        spent: u64,
    ) -> Result<Vec<Spent>, SharedError> {
        let now = Instant::now();
        let mut map = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(budgets
            .iter()
            .map(|b| {
                let e = Self::budget_entry(&mut map, b, now);
                e.held = e.held.saturating_sub(held);
                let before = e.spent;
                e.spent = e.spent.saturating_add(spent);
                Spent {
                    before,
                    after: e.spent,
                }
            })
            .collect())
    }

    async fn init_budget(&self, budget: &BudgetReq, spent: u64) -> Result<(), SharedError> {
        let now = Instant::now();
        let mut map = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(&budget.key) {
            Self::budget_entry(&mut map, budget, now).spent = spent;
        }
        Ok(())
    }

    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError> {
        let mut c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = c.entry(counter.to_owned()).or_default();
        *v += n;
        Ok(*v)
    }

    async fn get(&self, counter: &str) -> Result<u64, SharedError> {
        Ok(self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(counter)
            .copied()
            .unwrap_or(0))
    }

    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(counter.to_owned())
            .or_insert(n);
        Ok(())
    }

    async fn pin(&self, name: &str, value: &str, ttl: Duration) -> Result<(), SharedError> {
        let now = Instant::now();
        let mut pins = self
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pins.len() >= MAX_PINS && !pins.contains_key(name) {
            pins.retain(|_, (_, until)| *until > now);
            if pins.len() >= MAX_PINS {
                // a tenth at once, so the next inserts do not sort again
                let mut by_end: Vec<(Instant, String)> = pins
                    .iter()
                    .map(|(k, (_, until))| (*until, k.clone()))
                    .collect();
                by_end.sort_unstable();
                for (_, k) in by_end.into_iter().take(MAX_PINS / 10) {
                    pins.remove(&k);
                }
            }
        }
        pins.insert(name.to_owned(), (value.to_owned(), now + ttl));
        Ok(())
    }

    async fn pinned(&self, name: &str) -> Result<Option<String>, SharedError> {
        let pins = self
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(pins
            .get(name)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| v.clone()))
    }

    async fn publish_health(&self, _: &str, _: &HealthEvent) -> Result<(), SharedError> {
        Ok(()) // one process: its actors already know
    }
}

impl InMemory {
    /// The synchronous core of [`SharedState::admit`].
    pub fn admit_now(&self, windows: &[WindowReq], now: Instant) -> Admit {
        let mut all = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut refused: Option<(usize, Duration)> = None;
        for (i, w) in windows.iter().enumerate() {
            let q = all.entry(w.key.clone()).or_default();
            q.prune(now, w.per);
            if q.len() >= w.limit {
                let free_in = q.frees_in(now, w.per);
                if refused.is_none_or(|(_, d)| free_in > d) {
                    refused = Some((i, free_in));
                }
            }
        }
        if let Some((index, free_in)) = refused {
            return Admit::Refused { index, free_in };
        }
        let remaining = windows
            .iter()
            .map(|w| {
                let q = all.entry(w.key.clone()).or_default();
                q.push(now, w.limit, w.per);
                w.limit.saturating_sub(q.len())
            })
            .collect();
        if all.len() > 4096 {
            let longest = windows.iter().map(|w| w.per).max().unwrap_or_default();
            all.retain(|_, q| {
                q.last()
                    .is_some_and(|t| now.saturating_duration_since(t) < longest)
            });
        }
        Admit::Admitted { remaining }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million calls spread over a day in a `1000000000/day` window: at most 1,025 runs held,
    /// the count exact, and a run leaves only when its last call does.
    #[test]
    fn a_huge_limit_holds_buckets_not_calls() {
        let day = Duration::from_secs(86_400);
        let start = Instant::now();
        let mut w = Window::default();
        for i in 0..1_000_000u64 {
            let now = start + day.mul_f64(i as f64 / 1_000_000.0);
            w.prune(now, day);
            w.push(now, 1_000_000_000, day);
        }
        assert!(w.runs.len() <= 1025, "{} runs", w.runs.len());
        assert_eq!(w.len(), 1_000_000);
        // half a day later: the first half's runs are gone, nothing of the second half is
        let later = start + day + day / 2;
        w.prune(later, day);
        assert!((499_000..=501_000).contains(&w.len()), "{}", w.len());
    }

    /// Small limits keep the exact log: one run per call.
    #[test]
    fn small_limits_stay_exact() {
        let now = Instant::now();
        let mut w = Window::default();
        for i in 0..10u64 {
            w.push(now + Duration::from_micros(i), 100, Duration::from_secs(60));
        }
        assert_eq!(w.runs.len(), 10);
    }
}
