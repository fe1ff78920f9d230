//! A gateway's policy at run time: the checks, and the state they keep.
//!
//! Order (each step refuses with its own code, the request pipeline calls them in this order):
//! gateway exists → active → not expired → auth ([`crate::auth`]) → whitelist/blacklist →
//! rate limits → quota → model allowed → transforms ([`crate::transform`]). The steps are pure
//! functions of the request, the gateway's spec, its state and the clock they are given, so
//! tests drive them with a fixed clock.
//!
//! State ([`GatewayState`]: rate windows and tokens used) lives apart from the spec, so a spec
//! replaced by the admin service keeps its counts. The rate limits' checks, across replicas, are
//! in `gateway/limits.rs`, and their leases in `gateway/leases.rs`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Timelike, Utc};
use keypool_config::Gateway;
use keypool_config::gateway::ListRule;
use keypool_shared::{LeaseReq, SharedState};
use keypool_types::{ApiError, ErrorKind};
use tokio::time::Instant;

use crate::strip_bearer;

mod leases;
mod limits;

pub use crate::gateways::Gateways;
pub use crate::transform::{body_credential, query_arg, remove_query_arg, transform};
pub(crate) use leases::{Leases, lease_for};

/// A gateway's spec and state, as requests see it.
pub struct GatewayRuntime {
    /// The spec's name, shared with every usage event and metric of the gateway.
    pub name: Arc<str>,
    pub spec: Arc<Gateway>,
    pub state: Arc<GatewayState>,
    /// Where its requests' metrics, spans and alerts go.
    pub telemetry: keypool_telemetry::Telemetry,
    /// Calls of its rate limits leased from the shared state (`redis.lease`) and spent here
    /// ([`lease_for`]); a spec with other limits gets a new one, and the old one gives back
    /// what it holds.
    lease: Option<Arc<Leases>>,
    /// How old a view of the replicas' quota count may be and still decide (`redis.lease_ms`
    /// when leasing; `None`: the count is read for every request).
    quota_view_within: Option<Duration>,
}

/// What a gateway remembers between requests.
#[derive(Default)]
pub struct GatewayState {
    /// Total tokens used, settled from real usage (restored from the store at start-up).
    tokens_used: AtomicU64,
    /// This replica's windows (all of them without Redis; a fallback with it).
    local: keypool_shared::InMemory,
    /// Across replicas (Redis): windows and the quota counter live there too.
    shared: Option<(Arc<dyn SharedState>, String)>,
    /// The replicas' quota count: this replica's view of it and its additions on the way.
    quota: Arc<QuotaSync>,
    /// The response cache's entries kept in this process (`cache: {backend: memory}`).
    pub(crate) cache: crate::cache::MemoryCache,
}

impl GatewayState {
    /// A new gateway's state: counting in `shared` (under the gateway's name) when replicas
    /// share their counts.
    pub(crate) fn new(shared: Option<(Arc<dyn SharedState>, String)>) -> Self {
        Self {
            shared,
            ..Self::default()
        }
    }
}

/// A replica's side of its gateway's shared quota count.
#[derive(Default)]
struct QuotaSync {
    /// The count as this replica last read it or added to it.
    view: arc_swap::ArcSwapOption<QuotaView>,
    /// Tokens this replica counted towards the quota, since it started.
    counted: AtomicU64,
    /// Tokens settled here and not yet added to the shared count.
    pending: AtomicU64,
    /// Tokens handed to additions so far (the one on its way included).
    sent: AtomicU64,
    /// An addition is on its way: the tokens settled meanwhile go with the next one.
    adding: AtomicBool,
}

impl QuotaSync {
    /// The shared count came back as `total`, holding `local` of this replica's own count:
    /// what it counted beyond that is added to the total until the next view.
    fn saw(&self, total: u64, local: u64) {
        self.view.store(Some(Arc::new(QuotaView {
            total,
            local,
            seen: Instant::now(),
        })));
    }
}

/// The replicas' count of a gateway's tokens, as this replica last saw it.
#[derive(Debug)]
struct QuotaView {
    /// The shared counter's total.
    total: u64,
    /// This replica's own count then (`counted`): what it counted since is added to the total.
    local: u64,
    seen: Instant,
}

/// The `x-ratelimit-*-requests` values of the tightest limit, sent with every response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window is empty again (OpenAI's "resets to its initial state").
    pub reset: Duration,
}

impl RateHeaders {
    /// `1s`, `6m0s`, `250ms`: OpenAI's duration format.
    pub fn reset_text(&self) -> String {
        let ms = self.reset.as_millis();
        if ms < 1000 {
            return format!("{ms}ms");
        }
        let secs = self.reset.as_secs() + u64::from(self.reset.subsec_nanos() > 0);
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            format!("{h}h{m}m{s}s")
        } else if m > 0 {
            format!("{m}m{s}s")
        } else {
            format!("{s}s")
        }
    }
}

/// A refusal by a rate limit: the error plus the headers that still go out with it.
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    pub headers: Option<RateHeaders>,
}

fn refuse(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message)
}

impl GatewayState {
    /// The replicas' shared state, when they share one.
    pub(crate) fn shared(&self) -> Option<&Arc<dyn SharedState>> {
        self.shared.as_ref().map(|(s, _)| s)
    }

    pub fn tokens_used(&self) -> u64 {
        self.tokens_used.load(Ordering::Relaxed)
    }

    /// Adds real usage (a request's total tokens); with shared state and a quota to enforce,
    /// also to the replicas' common counter (in the background: the request never waits). One
    /// addition is on its way at a time: the tokens settled meanwhile go with the next, so a
    /// busy gateway adds in one round trip what many requests used. The new total is this
    /// replica's next view of the count.
    pub fn add_tokens(&self, n: u64, quota: bool) {
        self.tokens_used.fetch_add(n, Ordering::Relaxed);
        if let Some((shared, gateway)) = &self.shared
            && n > 0
            && quota
        {
            self.quota.counted.fetch_add(n, Ordering::AcqRel);
            self.quota.pending.fetch_add(n, Ordering::AcqRel);
            if self.quota.adding.swap(true, Ordering::AcqRel) {
                return;
            }
            let (shared, key) = (shared.clone(), quota_counter(gateway));
            let sync = self.quota.clone();
            tokio::spawn(async move {
                loop {
                    // one addition at a time: its total holds exactly what was sent so far
                    let n = sync.pending.swap(0, Ordering::AcqRel);
                    let through = sync.sent.fetch_add(n, Ordering::AcqRel) + n;
                    match shared.add(&key, n).await {
                        Ok(total) => sync.saw(total, through),
                        Err(e) => {
                            // not sent again: a call that timed out may have been applied,
                            // and counting it twice would refuse the gateway for good (the
                            // count never resets); the tokens settled since go with the next
                            shared.background_failed(&e);
                            sync.adding.store(false, Ordering::Release);
                            return;
                        }
                    }
                    sync.adding.store(false, Ordering::Release);
                    if sync.pending.load(Ordering::Acquire) == 0
                        || sync.adding.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
            });
        }
    }

    /// The replicas' count as last seen, with what this replica counted since, if it was
    /// seen less than `within` ago.
    fn quota_seen(&self, within: Duration) -> Option<u64> {
        let view = self.quota.view.load();
        let view = view.as_ref().filter(|v| v.seen.elapsed() < within)?;
        let since = self
            .quota
            .counted
            .load(Ordering::Acquire)
            .saturating_sub(view.local);
        Some(view.total.saturating_add(since))
    }

    /// Sets the total at start-up, from the store (the shared counter only if it has none yet).
    pub async fn restore_tokens(&self, n: u64) {
        self.tokens_used.store(n, Ordering::Relaxed);
        if let Some((shared, gateway)) = &self.shared
            && let Err(e) = shared.init(&quota_counter(gateway), n).await
        {
            shared.background_failed(&e);
        }
    }

    /// Tokens used by the gateway on every replica (this replica's count when not shared or
    /// when the shared state is down).
    pub async fn tokens_used_everywhere(&self) -> u64 {
        match &self.shared {
            None => self.tokens_used(),
            Some((shared, gateway)) => match shared.get(&quota_counter(gateway)).await {
                Ok(n) => n,
                Err(e) => {
                    shared.background_failed(&e);
                    self.tokens_used()
                }
            },
        }
    }
}

impl GatewayRuntime {
    pub fn new(spec: Arc<Gateway>) -> Self {
        Self {
            name: Arc::from(spec.name.as_str()),
            spec,
            state: Arc::default(),
            telemetry: keypool_telemetry::Telemetry::default(),
            lease: None,
            quota_view_within: None,
        }
    }

    /// This runtime with `state` and `telemetry`, leasing calls of its rate limits from the
    /// state's shared windows as `lease` says ([`lease_for`]); the `previous` runtime's leases
    /// carry on where its limits are the same.
    pub(crate) fn with_state(
        spec: Arc<Gateway>,
        (state, previous): (Arc<GatewayState>, Option<&Self>),
        telemetry: keypool_telemetry::Telemetry,
        lease: Option<LeaseReq>,
    ) -> Self {
        let texts =
            |g: &Gateway| -> Vec<String> { g.rate_limits.iter().map(|l| l.text.clone()).collect() };
        let quota_view_within = lease.map(|l| l.within);
        let lease = match previous {
            Some(p) if texts(&p.spec) == texts(&spec) => p.lease.clone(),
            _ => lease_for(&spec, state.shared(), lease),
        };
        Self {
            name: Arc::from(spec.name.as_str()),
            lease,
            quota_view_within,
            spec,
            state,
            telemetry,
        }
    }

    /// Gives back the calls of its rate limits leased and not spent (a graceful stop).
    pub async fn give_back_leases(&self) {
        if let Some(l) = &self.lease {
            l.give_back_all().await;
        }
    }

    /// Settles a request's real usage against the gateway's count and quota.
    pub fn add_tokens(&self, n: u64) {
        self.state.add_tokens(n, self.spec.token_quota.is_some());
    }

    /// Active and not expired.
    /// `now` is read only when the gateway has an expiry.
    pub fn check_open(&self, now: impl FnOnce() -> SystemTime) -> Result<(), ApiError> {
        if !self.spec.active {
            return Err(refuse(
                ErrorKind::GatewayInactive,
                format!("The gateway `{}` is not active.", self.spec.name),
            ));
        }
        if self.spec.expires_at.is_some_and(|t| now() >= t) {
            return Err(refuse(
                ErrorKind::GatewayExpired,
                format!(
                    "该网关已过有效期 (the gateway `{}` has expired).",
                    self.spec.name
                ),
            ));
        }
        Ok(())
    }

    /// Whitelist / blacklist. `credential` is the extracted credential (`secret:` rules),
    /// `now` the clock for `time:` rules (read only when there are lists).
    pub fn check_lists(
        &self,
        ip: Option<IpAddr>,
        credential: Option<&str>,
        now: impl FnOnce() -> DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let g = &self.spec;
        if g.whitelist.is_empty() && g.blacklist.is_empty() {
            return Ok(());
        }
        let minute = {
            let local = now().with_timezone(&g.timezone);
            (local.hour() * 60 + local.minute()) as u16
        };
        let cred =
            credential.map(|c| std::str::from_utf8(strip_bearer(c.as_bytes())).unwrap_or(""));
        let hit = |r: &ListRule| match r {
            ListRule::Ip(net) => ip.is_some_and(|ip| net.contains(&canonical(ip))),
            ListRule::Secret(re) => cred.is_some_and(|c| re.is_match(c)),
            ListRule::Time { from, to } => in_range(minute, *from, *to),
        };
        let denied = if g.whitelist.is_empty() {
            g.blacklist.iter().any(hit)
        } else {
            !g.whitelist.iter().any(hit)
        };
        if denied {
            return Err(refuse(
                ErrorKind::AccessDenied,
                if g.whitelist.is_empty() {
                    "Access denied by this gateway's blacklist."
                } else {
                    "Access denied: the request matches none of this gateway's whitelist."
                },
            ));
        }
        Ok(())
    }

    /// Refuses once the tokens used (on every replica, with shared state) reached the quota.
    /// With `redis.lease`, the replicas' count as this replica saw it within `lease_ms` (read,
    /// or answered by its own last addition), plus what it counted since, decides without a
    /// round trip.
    pub async fn check_quota_everywhere(&self) -> Result<(), ApiError> {
        if self.spec.token_quota.is_none() {
            return Ok(());
        }
        if let Some((shared, gateway)) = &self.state.shared {
            if let Some(used) = self
                .quota_view_within
                .and_then(|within| self.state.quota_seen(within))
            {
                return self.quota_verdict(used);
            }
            // an addition on its way may or may not be in what the read finds: counted as in
            // it (under-counted until its own total comes back, never twice)
            let local = self.state.quota.sent.load(Ordering::Acquire);
            return match shared.get(&quota_counter(gateway)).await {
                Ok(total) => {
                    if self.quota_view_within.is_some() {
                        self.state.quota.saw(total, local);
                    }
                    // with what this replica counted and has not added yet, as a view does
                    let counted = self.state.quota.counted.load(Ordering::Acquire);
                    self.quota_verdict(total.saturating_add(counted.saturating_sub(local)))
                }
                Err(e) => {
                    shared.failed(&e);
                    if shared.fail_closed() {
                        Err(shared_unavailable())
                    } else {
                        self.quota_verdict(self.state.tokens_used())
                    }
                }
            };
        }
        self.quota_verdict(self.state.tokens_used())
    }

    /// Refuses once the tokens used reached the quota.
    pub fn check_quota(&self) -> Result<(), ApiError> {
        self.quota_verdict(self.state.tokens_used())
    }

    fn quota_verdict(&self, used: u64) -> Result<(), ApiError> {
        match self.spec.token_quota {
            Some(q) if used >= q => Err(refuse(
                ErrorKind::InsufficientQuota,
                format!(
                    "This gateway has used its token quota ({q} tokens). Ask its admin for more."
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a model the gateway does not serve.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.spec.allows_model(model) {
            Ok(())
        } else {
            Err(refuse(
                ErrorKind::ModelNotFound,
                format!("The model `{model}` does not exist or you do not have access to it."),
            ))
        }
    }
}

fn shared_unavailable() -> ApiError {
    refuse(
        ErrorKind::SharedStateUnavailable,
        "The shared rate-limit state is unavailable and this gateway refuses rather than guess.",
    )
    .retry_after(1)
}

fn quota_counter(gateway: &str) -> String {
    format!("quota:{gateway}")
}

/// An IPv4-mapped IPv6 address is matched as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// `[from, to)` in minutes of the day; `from > to` crosses midnight; `from == to` is all day.
fn in_range(minute: u16, from: u16, to: u16) -> bool {
    match from.cmp(&to) {
        std::cmp::Ordering::Less => (from..to).contains(&minute),
        std::cmp::Ordering::Greater => minute >= from || minute < to,
        std::cmp::Ordering::Equal => true,
    }
}
