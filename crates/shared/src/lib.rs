//! [`SharedState`]: the counters that must hold across replicas — sliding windows (key rpm,
//! gateway `ingress:`/`secret:` limits), token counters (quotas) and key health events — with an
//! in-process implementation ([`InMemory`]) and a Redis one ([`RedisState`]).
//!
//! Both give the same contract, tested by one suite over both: `admit` checks every window of a
//! call and, only when all have room, counts the call in all of them — atomically (a mutex in
//! process; one Lua script in Redis, on Redis's clock), so concurrent callers on any number of
//! replicas never admit more than a limit. "n per minute" means at most n in any trailing minute.

mod connect;
mod flights;
mod health;
mod leasing;
mod memory;
mod redis;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::Duration;

pub use connect::RedisTarget;
pub use flights::{Asking, Flights, Turn};
pub use health::{
    Announcements, HealthAnnouncer, parse_health, process_id, share_health, subscribe,
};
pub use leasing::{Leasing, Spend, every_half};
pub use memory::InMemory;
pub use redis::RedisState;

use tokio::time::Instant;

/// One sliding window a call must fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowReq {
    /// Identifies the window (the prefix is added by the implementation).
    pub key: String,
    pub limit: u64,
    pub per: Duration,
}

/// A key's token window a pick must also fit in (its `tpm`): `cost` estimated tokens, settled
/// later with [`SharedState::settle_tokens`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReq {
    pub key: String,
    pub limit: u64,
    pub cost: u64,
}

/// What a leasing pick reserved for the candidate it chose: calls in its window, and tokens in
/// its token window (0: it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub calls: u32,
    pub tokens: u64,
}

impl Granted {
    /// What a pick without a lease reserved: the chosen candidate's call and its tokens (if
    /// it has a token window); nothing when none had room.
    fn one(picked: &Picked, tokens: &[Option<TokenReq>]) -> Self {
        match picked {
            Picked::Index(i) => Self {
                calls: 1,
                tokens: tokens.get(*i).cloned().flatten().map_or(0, |t| t.cost),
            },
            Picked::Busy(_) => Self {
                calls: 0,
                tokens: 0,
            },
        }
    }
}

/// A USD budget a request must fit: what was spent in its period and what requests in flight
/// hold, in nano-dollars, under `key` until `ttl` lapses (the period's end plus a margin;
/// `None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetReq {
    pub key: String,
    pub limit: u64,
    pub ttl: Option<Duration>,
}

/// What `hold` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The amount is held against every budget.
    Held,
    /// Budget `index` has no room left (`spent` of it settled); nothing was held.
    Over { index: usize, spent: u64 },
}

/// One budget's settled spend before and after a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub before: u64,
    pub after: u64,
}

/// What `admit` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Counted in every window; calls left in each (in request order) after this one.
    Admitted { remaining: Vec<u64> },
    /// Window `index` is full until one call leaves it, in `free_in`; nothing was counted.
    Refused { index: usize, free_in: Duration },
}

/// What `pick` chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Picked {
    /// Candidate `i` had room and the call is counted in its window.
    Index(usize),
    /// None had room; the first frees up in this long.
    Busy(Duration),
}

/// How many calls a pick may reserve at once, and how long the caller may spend them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseReq {
    pub calls: u32,
    pub within: Duration,
}

/// A session whose calls keep one key (to keep the provider's prompt cache warm): `key` names
/// it in the shared state (the implementation adds its prefix); it lasts `ttl` unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReq {
    pub key: String,
    pub ttl: Duration,
}

/// What a session's pick did with the key the session names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stick {
    /// The session's key served again.
    Hit,
    /// The session named no key yet: the chosen one is remembered.
    Miss,
    /// The session's key could not serve (no room, unhealthy, already tried): the chosen one
    /// is remembered instead.
    Moved,
}

impl Stick {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Moved => "move",
        }
    }
}

/// A key's health as one replica saw it, for the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// Cooling down for this long from now.
    Cooling(Duration),
    /// Rejected by its upstream (401/403).
    Disabled(String),
}

/// The shared state is unreachable or answered nonsense.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shared state unavailable: {0}")]
pub struct SharedError(pub String);

#[async_trait::async_trait]
pub trait SharedState: Send + Sync {
    /// `"memory"` or `"redis"`.
    fn kind(&self) -> &'static str;

    /// Checks every window and counts the call in all of them, or in none. `now` is the
    /// in-process clock (a shared implementation uses its own, the same for all replicas).
    async fn admit(&self, windows: &[WindowReq], now: Instant) -> Result<Admit, SharedError>;

    /// [`Self::admit`] reserving up to `lease.calls` calls at once in every window (at most
    /// the room the fullest has), for the caller to spend over `lease.within` without asking
    /// again; answers the calls reserved, and the remaining counts after all of them. As with
    /// [`Self::pick_leasing`] the reserved calls count from `now + within`, and what is not
    /// spent goes back with [`Self::return_lease`] (each window under the lease's `id`). One
    /// process shares nothing: this default reserves one.
    async fn admit_leasing(
        &self,
        windows: &[WindowReq],
        id: &str,
        lease: LeaseReq,
        now: Instant,
    ) -> Result<(Admit, u32), SharedError> {
        let _ = (id, lease);
        self.admit(windows, now).await.map(|a| (a, 1))
    }

    /// Chooses among candidate windows (in preference order) the one with room — the least
    /// used (`least_used`, ties to the earlier) or the first — and counts the call in it: the
    /// pick and the reservation in one step (one round trip in Redis). A window with limit
    /// `u64::MAX` is unbudgeted: it only ranks, and may be counted approximately.
    async fn pick(
        &self,
        candidates: &[WindowReq],
        least_used: bool,
        now: Instant,
    ) -> Result<Picked, SharedError> {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.pick_reserving(candidates, &[], least_used, &id, now)
            .await
    }

    /// [`Self::pick`] where candidate `i` must also fit `tokens[i]` (when given: its key's
    /// token window, a trailing sum); the chosen one's tokens are reserved under `id`.
    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        now: Instant,
    ) -> Result<Picked, SharedError>;

    /// [`Self::pick_reserving`] reserving up to `lease.calls` calls at once in the chosen
    /// window (at most the room of one with an rpm budget; an unbudgeted one counts them for
    /// its ranking), for the caller to spend over `lease.within` without asking again. Where
    /// the chosen one has a token window, the lease holds one estimate (its `cost`) per call
    /// there too: at most a tenth of its limit and the room it has left, and only where that is
    /// two estimates or more (else one call, one estimate). Answers what it reserved. Reserved
    /// calls and tokens count from `now + within`, the latest they may be spent, so a window
    /// never holds more than its limit in any trailing period; unspent calls go back with
    /// [`Self::return_lease`], the tokens are settled with [`Self::settle_tokens`] under `id`.
    /// One process shares nothing: this default reserves one call.
    async fn pick_leasing(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        lease: LeaseReq,
        now: Instant,
    ) -> Result<(Picked, Granted), SharedError> {
        let _ = lease;
        let picked = self
            .pick_reserving(candidates, tokens, least_used, id, now)
            .await?;
        let granted = Granted::one(&picked, tokens);
        Ok((picked, granted))
    }

    /// Gives back `unused` of the `granted` calls lease `id` reserved in `window` (once per
    /// lease: the caller's to keep); answers the calls given back (none once they have left
    /// the window).
    async fn return_lease(
        &self,
        window: &WindowReq,
        id: &str,
        granted: u32,
        unused: u32,
    ) -> Result<u32, SharedError> {
        let _ = (window, id, granted, unused);
        Ok(0)
    }

    /// [`Self::pick_reserving`] for a call of a session: the candidate the session names is
    /// chosen while it has room, whatever the ranking ([`Stick::Hit`]); otherwise the choice is
    /// the usual one and the session names it from now on. Every pick renews the session's
    /// `ttl`; a busy answer leaves the session as it was. Redis does it all in one round trip;
    /// this default takes up to four.
    async fn pick_in_session(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        session: &SessionReq,
        now: Instant,
    ) -> Result<(Picked, Stick), SharedError> {
        let named = self.pinned(&session.key).await?;
        let stuck = named
            .as_deref()
            .and_then(|n| candidates.iter().position(|c| c.key == n));
        let token = |i: usize| tokens.get(i).cloned().flatten();
        let mut busy = None;
        if let Some(i) = stuck {
            match self
                .pick_reserving(&candidates[i..=i], &[token(i)], least_used, id, now)
                .await?
            {
                Picked::Index(_) => {
                    self.pin(&session.key, &candidates[i].key, session.ttl)
                        .await?;
                    return Ok((Picked::Index(i), Stick::Hit));
                }
                Picked::Busy(d) => busy = Some(d),
            }
        }
        let rest: Vec<usize> = (0..candidates.len())
            .filter(|&j| Some(j) != stuck)
            .collect();
        let windows: Vec<WindowReq> = rest.iter().map(|&j| candidates[j].clone()).collect();
        let toks: Vec<Option<TokenReq>> = rest.iter().map(|&j| token(j)).collect();
        let picked = if windows.is_empty() {
            Picked::Busy(busy.unwrap_or_default())
        } else {
            self.pick_reserving(&windows, &toks, least_used, id, now)
                .await?
        };
        Ok(match picked {
            Picked::Index(j) => {
                let i = rest[j.min(rest.len() - 1)];
                self.pin(&session.key, &candidates[i].key, session.ttl)
                    .await?;
                let stick = if named.is_some() {
                    Stick::Moved
                } else {
                    Stick::Miss
                };
                (Picked::Index(i), stick)
            }
            Picked::Busy(d) => (Picked::Busy(busy.map_or(d, |b| b.min(d))), Stick::Moved),
        })
    }

    /// [`Self::pick_in_session`] reserving a lease of the key the session keeps (or moves to),
    /// as [`Self::pick_leasing`] does; answers what it reserved. One process shares nothing:
    /// this default reserves one call.
    async fn pick_in_session_leasing(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        (session, lease): (&SessionReq, LeaseReq),
        now: Instant,
    ) -> Result<(Picked, Stick, Granted), SharedError> {
        let _ = lease;
        let (picked, stick) = self
            .pick_in_session(candidates, tokens, least_used, id, session, now)
            .await?;
        let granted = Granted::one(&picked, tokens);
        Ok((picked, stick, granted))
    }

    /// Replaces the estimate reserved under `id` in a token window by the real count (nothing
    /// when the reservation already left the window).
    async fn settle_tokens(&self, req: &TokenReq, id: &str, actual: u64)
    -> Result<(), SharedError>;

    /// Holds `amount` against every budget, or against none when one has no room left (its
    /// spend plus what is held reached its limit): a request's estimate, before it is
    /// forwarded. Requests in flight overshoot a budget by at most their own estimates.
    async fn hold(&self, budgets: &[BudgetReq], amount: u64) -> Result<Held, SharedError>;

    /// [`Self::hold`] for a slice that a replica spends requests' estimates from without
    /// asking again: holds up to `slice`, at most the smallest room any budget has left, but
    /// never less than `amount` (what a lone hold would); answers what it held. So a slice
    /// overshoots a budget by no more than the one request asking for it would. One process
    /// shares nothing: this default holds `amount`.
    async fn hold_slice(
        &self,
        budgets: &[BudgetReq],
        amount: u64,
        slice: u64,
    ) -> Result<(Held, u64), SharedError> {
        let _ = slice;
        self.hold(budgets, amount).await.map(|h| (h, amount))
    }

    /// Releases a hold of `held` and adds the real `spent`, to every budget (one round trip).
    async fn settle_budgets(
        &self,
        budgets: &[BudgetReq],
        held: u64,
        spent: u64,
    ) -> Result<Vec<Spent>, SharedError>;

    /// Sets a budget's spend unless it has one (start-up restore: the first replica's wins).
    async fn init_budget(&self, budget: &BudgetReq, spent: u64) -> Result<(), SharedError>;

    /// Adds `n` to a counter; answers the new total.
    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError>;

    /// A counter's total (0 when absent).
    async fn get(&self, counter: &str) -> Result<u64, SharedError>;

    /// Sets a counter unless it exists (start-up restore: the first replica's value wins).
    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError>;

    /// Remembers `value` under `name` for `ttl` (which key created a Responses API response,
    /// which key a session keeps, a cached answer), replacing what was there.
    async fn pin(&self, name: &str, value: &str, ttl: Duration) -> Result<(), SharedError>;

    /// What [`Self::pin`] remembered under `name`, while its ttl lasts.
    async fn pinned(&self, name: &str) -> Result<Option<String>, SharedError>;

    /// Tells the other replicas about a key's health.
    async fn publish_health(&self, key: &str, event: &HealthEvent) -> Result<(), SharedError>;

    /// While unavailable, refuse (`true`, `on_failure: closed`) rather than fall back to local
    /// limits.
    fn fail_closed(&self) -> bool {
        false
    }

    /// How many replicas share the limits (`redis.replicas_hint`): while the shared state is
    /// unavailable, each replica enforces `1/N` of every rate budget on its own.
    fn replicas_hint(&self) -> u32 {
        1
    }

    /// Counts, logs and alerts a failure of a background task's call (retried later).
    fn background_failed(&self, _e: &SharedError) {}

    /// Counts, logs and alerts a failure of a request's call, saying what the caller does about
    /// it ([`SharedState::fail_closed`]: refuse, or fall back to local state).
    fn failed(&self, _e: &SharedError) {}
}

/// Where a shared state's failures go: counted (`keypool_redis_errors_total`), logged at most
/// once every 10 s (with how many were not), alerted as the alert policy says.
pub struct Failures {
    telemetry: keypool_telemetry::Telemetry,
    last_logged_s: std::sync::atomic::AtomicU64,
    unlogged: std::sync::atomic::AtomicU64,
}

impl Failures {
    pub fn new(telemetry: keypool_telemetry::Telemetry) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            telemetry,
            last_logged_s: 0.into(),
            unlogged: 0.into(),
        })
    }

    /// A failure of a background task (heartbeats, announcements, subscriptions): retried later.
    pub fn background(&self, e: &SharedError) {
        self.report(e, "a background task will retry");
    }

    /// A failure of a request's call, with what the caller does about it: refuse with 503
    /// (`closed`, `on_failure: closed`) or fall back to local limits.
    pub fn serving(&self, e: &SharedError, closed: bool) {
        self.report(
            e,
            if closed {
                "refusing requests that need it with 503 shared_state_unavailable (redis.on_failure: closed)"
            } else {
                "using local state (redis.on_failure: local)"
            },
        );
    }

    fn report(&self, e: &SharedError, what: &str) {
        use std::sync::atomic::Ordering;
        self.telemetry.metrics().redis_errors.inc();
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_logged_s.load(Ordering::Relaxed);
        if now_s >= last + 10
            && self
                .last_logged_s
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(error = %e, failures_not_logged = unlogged, "shared state unavailable: {what}");
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
        self.telemetry.alert(
            keypool_telemetry::Cause::RedisUnavailable,
            "redis",
            format!("Redis (shared state) is unavailable: {e}; {what}"),
        );
    }
}
