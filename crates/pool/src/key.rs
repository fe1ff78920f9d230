//! [`KeyActor`]: the one owner of an upstream key's live state.
//!
//! It owns the key's trailing-60 s request and token windows, its health (healthy / cooling down
//! until T / disabled), counters and latency. It admits or refuses reservations ([`Reserve`])
//! exactly, and applies each failed attempt's [`Outcome`] ([`Settle`]). What requests count
//! without a message (requests on keys without a budget, successes, attempts in flight) reaches
//! it through its [`KeyTally`], folded on a 1 s tick and before every message. For ranking, it
//! publishes a few numbers in a [`KeyGauge`] that only it writes and the pool reads without a
//! message round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, SpawnHandle};
use keypool_config::UpstreamKey;
use tokio::time::Instant;

use crate::messages::Outcome;
use crate::tally::KeyTally;
use crate::window::{BucketWindow, RateWindow};

pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// How often a key actor folds its tally and republishes its window.
mod handlers;

const TICK: Duration = Duration::from_secs(1);
/// Consecutive transport / 5xx failures before a key is cooled down (a simple circuit breaker).
const FAILURES_BEFORE_COOLDOWN: u32 = 3;
/// Longest cooldown after repeated failures or a 429 without a usable reset header.
const MAX_BACKOFF_COOLDOWN: Duration = Duration::from_secs(30);

/// Health of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Not used until this time (upstream 429, or repeated failures).
    CoolingUntil(Instant),
    /// Never used again until re-enabled (upstream 401/403, or not usable at all).
    Disabled {
        reason: String,
    },
}

/// Numbers the key actor publishes for the pool's ranking. Written only by the key actor.
#[derive(Debug, Default)]
pub struct KeyGauge {
    /// Requests in the trailing window as of the last fold (refreshed when entries expire);
    /// ranking adds the tally's pending requests.
    pub window_requests: AtomicU32,
    /// Milliseconds after the pool's epoch from which the key may be used; `u64::MAX` = disabled.
    pub available_at_ms: AtomicU64,
}

/// Counters kept per key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCounters {
    pub used: u64,
    pub success: u64,
    pub failure: u64,
    pub last_error: Option<String>,
}

/// What a key starts from after a restart: its persisted counters and the requests it served in
/// the last minute (age, tokens), so least-used ranking and budgets carry over.
#[derive(Debug, Clone, Default)]
pub struct KeySeed {
    pub counters: KeyCounters,
    pub recent: Vec<(Duration, u64)>,
}

/// A key's live state, for listings and tests. Contains no secret.
#[derive(Debug, Clone)]
pub struct KeyState {
    pub name: String,
    pub health: Health,
    pub window_requests: u64,
    pub window_tokens: u64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub in_flight: u32,
    pub counters: KeyCounters,
    /// Exponentially weighted mean latency of successful attempts, in milliseconds.
    pub latency_ms: f64,
    /// `false` when an admin disabled the key.
    pub enabled: bool,
}

/// A trailing-minute window: exact where a budget is enforced (its size is bounded by the
/// budget), bucketed where the count only ranks keys (a busy unbudgeted key would otherwise keep
/// every request of the last minute in memory).
#[derive(Debug)]
enum Window {
    Exact(RateWindow),
    Approx(Box<BucketWindow>),
}

impl Window {
    /// A key's token window: reservations settled later, so an exact one merges its settled
    /// entries of one millisecond from time to time.
    fn new(exact: bool, epoch: Instant) -> Self {
        if exact {
            Self::Exact(RateWindow::compacting(WINDOW, epoch))
        } else {
            Self::Approx(Box::new(BucketWindow::new(epoch)))
        }
    }

    /// A key's calls window: never settled, so an exact one keeps an entry a millisecond.
    fn calls(exact: bool, epoch: Instant) -> Self {
        if exact {
            Self::Exact(RateWindow::merging(WINDOW, epoch))
        } else {
            Self::Approx(Box::new(BucketWindow::new(epoch)))
        }
    }

    fn used(&mut self, now: Instant) -> u64 {
        match self {
            Self::Exact(w) => w.used(now),
            Self::Approx(w) => w.used(now),
        }
    }

    /// Records a reservation. Bucketed token windows record only settled, real counts.
    fn record(&mut self, now: Instant, id: u64, cost: u64, is_estimate: bool) {
        match self {
            Self::Exact(w) => w.record(now, id, cost),
            Self::Approx(w) if !is_estimate => w.add(now, cost),
            Self::Approx(_) => {}
        }
    }

    fn settle(&mut self, now: Instant, id: u64, actual: u64) {
        match self {
            Self::Exact(w) => w.settle(id, actual),
            Self::Approx(w) => w.add(now, actual),
        }
    }

    fn free_at(&mut self, now: Instant, limit: u64, cost: u64) -> Instant {
        match self {
            Self::Exact(w) => w.free_at(now, limit, cost),
            Self::Approx(_) => now,
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        match self {
            Self::Exact(w) => w.next_expiry(),
            Self::Approx(_) => None,
        }
    }
}

/// The actor owning one key's live state.
pub struct KeyActor {
    key: Arc<UpstreamKey>,
    epoch: Instant,
    gauge: Arc<KeyGauge>,
    /// What requests counted without a message, folded in by [`KeyActor::fold`].
    tally: Arc<KeyTally>,
    requests: Window,
    tokens: Window,
    health: Health,
    counters: KeyCounters,
    latency_ms: f64,
    consecutive_failures: u32,
    consecutive_429: u32,
    /// Cooldowns since the last success (alerts past a threshold).
    cooldowns_in_row: u32,
    /// When the latest cooldown for failures began: a failure of an attempt admitted before
    /// it was in flight when the key was judged, and does not judge it again.
    cooled_at: Option<Instant>,
    /// Timer that refreshes the gauge when the oldest window entry expires.
    refresh: Option<SpawnHandle>,
    /// Disabled by an admin (health says `Disabled` while this is set).
    admin_disabled: bool,
    /// Where this key's cooldowns and disablings go for the other replicas.
    announcer: keypool_shared::HealthAnnouncer,
}

impl KeyActor {
    pub fn new(
        key: Arc<UpstreamKey>,
        epoch: Instant,
        gauge: Arc<KeyGauge>,
        tally: Arc<KeyTally>,
        seed: Option<KeySeed>,
    ) -> Self {
        let health = match &key.unusable {
            Some(reason) => Health::Disabled {
                reason: reason.clone(),
            },
            None => Health::Healthy,
        };
        let mut requests = Window::calls(key.rpm.is_some(), epoch);
        let mut tokens = Window::new(key.tpm.is_some(), epoch);
        let seed = seed.unwrap_or_default();
        let now = Instant::now();
        let mut recent = seed.recent;
        recent.sort_by_key(|r| std::cmp::Reverse(r.0)); // oldest first: windows are chronological
        for (age, used) in recent {
            if age < WINDOW
                && let Some(at) = now.checked_sub(age)
            {
                // lease id 0 is never settled: ids handed out start at 1
                requests.record(at, 0, 1, false);
                tokens.record(at, 0, used, false);
            }
        }
        let actor = Self {
            key,
            epoch,
            gauge,
            tally,
            requests,
            tokens,
            health,
            counters: seed.counters,
            latency_ms: 0.0,
            consecutive_failures: 0,
            consecutive_429: 0,
            cooldowns_in_row: 0,
            cooled_at: None,
            refresh: None,
            admin_disabled: false,
            announcer: keypool_shared::HealthAnnouncer::default(),
        };
        actor.publish_health();
        actor
    }

    /// The same actor, telling `announcer` about its key's health changes.
    #[must_use]
    pub fn announcing(mut self, announcer: keypool_shared::HealthAnnouncer) -> Self {
        self.announcer = announcer;
        self
    }

    fn publish_health(&self) {
        let at = match &self.health {
            Health::Healthy => 0,
            Health::CoolingUntil(t) => t.saturating_duration_since(self.epoch).as_millis() as u64,
            Health::Disabled { .. } => u64::MAX,
        };
        self.gauge.available_at_ms.store(at, Ordering::Relaxed);
    }

    /// Publishes the window count and arms a timer for the next expiry, so ranking never sees a
    /// key as busier than it is for longer than the timer's resolution.
    fn publish_window(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let used = self.requests.used(now);
        self.tokens.used(now);
        self.gauge
            .window_requests
            .store(u32::try_from(used).unwrap_or(u32::MAX), Ordering::Relaxed);
        if let Some(h) = self.refresh.take() {
            ctx.cancel_future(h);
        }
        if let Some(at) = self.requests.next_expiry() {
            let delay = at.saturating_duration_since(now) + Duration::from_millis(1);
            self.refresh = Some(ctx.run_later(delay, |actor, ctx| {
                actor.refresh = None;
                actor.publish_window(ctx);
            }));
        }
    }

    fn cool_down(&mut self, now: Instant, period: Duration) {
        let until = now + period;
        // never shorten an existing cooldown, never revive a disabled key
        match self.health {
            Health::Disabled { .. } => return,
            Health::CoolingUntil(t) if t >= until => return,
            _ => {}
        }
        tracing::warn!(key = %self.key.name, cooldown_ms = period.as_millis() as u64, "key cooling down");
        self.announcer
            .announce(&self.key.name, crate::HealthEvent::Cooling(period));
        self.cooldowns_in_row += 1;
        let telemetry = &self.tally.telemetry;
        if self.cooldowns_in_row >= telemetry.cooling_alert_after() {
            telemetry.alert(
                keypool_telemetry::Cause::KeyCooling,
                self.key.name.to_string(),
                format!(
                    "key {} is cooling down again ({} times in a row; now for {} s): its upstream keeps refusing or failing",
                    self.key.name,
                    self.cooldowns_in_row,
                    period.as_secs().max(1)
                ),
            );
        }
        self.health = Health::CoolingUntil(until);
        self.publish_health();
    }

    /// Counts `n` successful attempts taking `mean` each.
    fn succeeded(&mut self, n: u64, mean: Duration) {
        self.counters.success += n;
        self.consecutive_failures = 0;
        self.consecutive_429 = 0;
        self.cooldowns_in_row = 0;
        let ms = mean.as_secs_f64() * 1000.0;
        self.latency_ms = if self.latency_ms == 0.0 {
            ms
        } else {
            0.8 * self.latency_ms + 0.2 * ms
        };
    }

    /// Folds what requests counted in the tally since the last fold. Requests are placed in the
    /// window at the fold's time (at most one tick late: the bucketed window's own resolution);
    /// successes folded together count as one latency sample of their mean, and as having come
    /// before any message handled after the fold.
    fn fold(&mut self, ctx: &mut Context<Self>) {
        let f = self.tally.fold();
        if f.recorded == 0 && f.succeeded == 0 && f.tokens == 0 {
            return;
        }
        let now = Instant::now();
        if f.recorded > 0 {
            self.requests.record(now, 0, f.recorded, false);
            self.counters.used += f.recorded;
        }
        if f.tokens > 0 {
            self.tokens.record(now, 0, f.tokens, false);
        }
        if f.succeeded > 0 {
            self.succeeded(
                f.succeeded,
                Duration::from_micros(f.latency_us / f.succeeded),
            );
        }
        self.publish_window(ctx);
    }

    /// Applies an attempt's outcome; `admitted` is when its lease was taken.
    fn apply(&mut self, outcome: &Outcome, now: Instant, admitted: Instant) {
        match outcome {
            Outcome::Success { latency, .. } => self.succeeded(1, *latency),
            Outcome::ClientError { .. } => {
                self.counters.success += 1;
                self.consecutive_failures = 0;
            }
            // counted (the attempts' metric says it), the key's health untouched: a burst of
            // them when the upstream's idle timeout closes many kept connections at once
            // would otherwise cool every key down
            Outcome::Cancelled | Outcome::StaleConnection => {}
            Outcome::RateLimited { cooldown } => {
                self.counters.failure += 1;
                self.counters.last_error = Some("upstream 429".to_owned());
                self.consecutive_429 += 1;
                let fallback = backoff(self.consecutive_429);
                self.cool_down(now, cooldown.unwrap_or(fallback));
            }
            Outcome::AuthFailed { status } => {
                self.counters.failure += 1;
                let reason = format!("upstream answered {status}: key rejected");
                tracing::error!(key = %self.key.name, status, "upstream rejected the key; disabling it");
                self.counters.last_error = Some(reason.clone());
                if !matches!(self.health, Health::Disabled { .. }) {
                    self.announcer
                        .announce(&self.key.name, crate::HealthEvent::Disabled(reason.clone()));
                    self.tally.telemetry.alert(
                        keypool_telemetry::Cause::KeyDisabled,
                        self.key.name.to_string(),
                        format!(
                            "key {} disabled: its upstream answered {status} (the key was rejected)",
                            self.key.name
                        ),
                    );
                }
                self.health = Health::Disabled { reason };
                self.publish_health();
            }
            Outcome::ServerError { .. }
            | Outcome::Connect
            | Outcome::Timeout
            | Outcome::StreamBroken => {
                self.counters.failure += 1;
                self.counters.last_error = Some(outcome.label().to_owned());
                // the rest of a burst that cooled the key (attempts in flight then, failing
                // as it began): counted, but the cooldown is not lengthened for them; the
                // attempts after it (its probes) go on from where the streak was
                if self.cooled_at.is_some_and(|at| admitted < at) {
                    return;
                }
                self.consecutive_failures += 1;
                if self.consecutive_failures >= FAILURES_BEFORE_COOLDOWN {
                    let n = self.consecutive_failures - FAILURES_BEFORE_COOLDOWN + 1;
                    self.cooled_at = Some(now);
                    self.cool_down(now, backoff(n));
                }
            }
        }
    }
}

/// 1 s, 2 s, 4 s, ... capped at [`MAX_BACKOFF_COOLDOWN`].
fn backoff(n: u32) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(MAX_BACKOFF_COOLDOWN)
}

impl Actor for KeyActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // seeded windows are visible to ranking from the start
        self.publish_window(ctx);
        // fold the tally; bucketed counts decay by the second: republish them as they do
        ctx.run_interval(TICK, |actor, ctx| {
            actor.fold(ctx);
            if matches!(actor.requests, Window::Approx(_)) {
                actor.publish_window(ctx);
            }
        });
    }
}

impl KeyActor {
    /// Takes one request (and its token estimate) into the windows.
    fn admit(&mut self, now: Instant, lease_id: u64, est_tokens: u64, ctx: &mut Context<Self>) {
        self.requests.record(now, lease_id, 1, false);
        let est = self.key.tpm.map_or(est_tokens, |t| est_tokens.min(t));
        self.tokens.record(now, lease_id, est, true);
        self.counters.used += 1;
        self.publish_window(ctx);
    }
}
