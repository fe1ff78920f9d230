//! A gateway's policy at run time: the checks, and the state they keep.
//!
//! Order (each step refuses with its own code, the request pipeline calls them in this order):
//! gateway exists → active → not expired → auth ([`crate::auth`]) → whitelist/blacklist →
//! rate limits → quota → model allowed → transforms ([`crate::transform`]). The steps are pure
//! functions of the request, the gateway's spec, its state and the clock they are given, so
//! tests drive them with a fixed clock.
//!
//! State ([`GatewayState`]: rate windows and tokens used) lives apart from the spec, so a spec
//! replaced by the admin service keeps its counts.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Timelike, Utc};
use keypool_config::Gateway;
use keypool_config::gateway::{LimitScope, ListRule, RateLimit};
use keypool_shared::{Admit, LeaseReq, Leasing, SharedState, Turn, WindowReq};
use keypool_types::{ApiError, ErrorKind};
use tokio::time::Instant;

use crate::{Caller, strip_bearer};

pub use crate::gateways::Gateways;
pub use crate::transform::{body_credential, query_arg, remove_query_arg, transform};

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
    lease: Option<Arc<Leasing<RateHeaders>>>,
}

/// A lease holder for `spec`'s rate limits when replicas share them and `lease` asks for more
/// than one call at a time: only where every limit is `ingress:` (one lease for the gateway)
/// or every one is `secret:` (a lease per caller); with both, an `ingress:` lease would be held
/// once per caller. At most a tenth of the smallest limit at once (small limits stay shared
/// out a call at a time: `ingress:100/minute` leases 10, `ingress:19/minute` none), spent
/// within `lease.within` or the shortest window, whichever is shorter.
pub(crate) fn lease_for(
    spec: &Gateway,
    shared: Option<&Arc<dyn SharedState>>,
    lease: Option<LeaseReq>,
) -> Option<Arc<Leasing<RateHeaders>>> {
    let (shared, lease) = (shared?, lease?);
    let limits = &spec.rate_limits;
    let scope = limits.first()?.scope;
    if limits.iter().any(|l| l.scope != scope) {
        return None;
    }
    let smallest = limits.iter().map(|l| l.limit).min()?;
    let calls = u32::try_from(smallest / 10).map_or(lease.calls, |c| c.min(lease.calls));
    let shortest = limits.iter().map(|l| l.per).min()?;
    (calls > 1).then(|| {
        Arc::new(Leasing::new(
            calls,
            lease.within.min(shortest),
            shared.clone(),
        ))
    })
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
    /// also to the replicas' common counter (in the background: the request never waits).
    pub fn add_tokens(&self, n: u64, quota: bool) {
        self.tokens_used.fetch_add(n, Ordering::Relaxed);
        if let Some((shared, gateway)) = &self.shared
            && n > 0
            && quota
        {
            let (shared, key) = (shared.clone(), quota_counter(gateway));
            tokio::spawn(async move {
                if let Err(e) = shared.add(&key, n).await {
                    shared.background_failed(&e);
                }
            });
        }
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
        let lease = match previous {
            Some(p) if texts(&p.spec) == texts(&spec) => p.lease.clone(),
            _ => lease_for(&spec, state.shared(), lease),
        };
        Self {
            name: Arc::from(spec.name.as_str()),
            lease,
            spec,
            state,
            telemetry,
        }
    }

    /// Settles a request's real usage against the gateway's count and quota.
    pub fn add_tokens(&self, n: u64) {
        self.state.add_tokens(n, self.spec.token_quota.is_some());
    }

    /// Active and not expired.
    pub fn check_open(&self, now: SystemTime) -> Result<(), ApiError> {
        if !self.spec.active {
            return Err(refuse(
                ErrorKind::GatewayInactive,
                format!("The gateway `{}` is not active.", self.spec.name),
            ));
        }
        if self.spec.expires_at.is_some_and(|t| now >= t) {
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
    /// `now` the clock for `time:` rules.
    pub fn check_lists(
        &self,
        ip: Option<IpAddr>,
        credential: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let g = &self.spec;
        if g.whitelist.is_empty() && g.blacklist.is_empty() {
            return Ok(());
        }
        let minute = {
            let local = now.with_timezone(&g.timezone);
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

    /// Counts the call against every rate limit, or refuses it (counting nothing) when one is
    /// exhausted. Returns the headers of the tightest limit.
    pub fn admit(
        &self,
        caller: &Caller,
        client_ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<RateHeaders>, Refused> {
        if self.spec.rate_limits.is_empty() {
            return Ok(None);
        }
        let windows = self.windows(caller, client_ip);
        self.verdict(self.state.local.admit_now(&windows, now))
    }

    /// [`Self::admit`] with every limit divided by `share_of` (this replica's share while the
    /// shared state is unavailable).
    fn admit_share(
        &self,
        caller: &Caller,
        client_ip: Option<IpAddr>,
        now: Instant,
        share_of: u32,
    ) -> Result<Option<RateHeaders>, Refused> {
        let share = u64::from(share_of.max(1));
        let mut windows = self.windows(caller, client_ip);
        for w in &mut windows {
            w.limit = (w.limit / share).max(1);
        }
        self.verdict(self.state.local.admit_now(&windows, now))
    }

    /// The windows a call counts in: one per limit (`secret:` ones per caller).
    fn windows(&self, caller: &Caller, client_ip: Option<IpAddr>) -> Vec<WindowReq> {
        let who = who(caller, client_ip);
        let gateway = &self.spec.name;
        self.spec
            .rate_limits
            .iter()
            .map(|l| WindowReq {
                key: match l.scope {
                    LimitScope::Ingress => format!("gw:{gateway}:{}", l.text),
                    LimitScope::Secret => format!("gw:{gateway}:{}:{who}", l.text),
                },
                limit: l.limit,
                per: l.per,
            })
            .collect()
    }

    /// An admission's answer as headers (the tightest limit: fewest calls left; its window is
    /// empty `per` after this call) or a refusal naming the full limit.
    fn verdict(&self, outcome: Admit) -> Result<Option<RateHeaders>, Refused> {
        let limits = &self.spec.rate_limits;
        match outcome {
            Admit::Admitted { remaining } => Ok(limits
                .iter()
                .zip(&remaining)
                .min_by_key(|(l, r)| (**r, std::cmp::Reverse(l.per)))
                .map(|(l, r)| RateHeaders {
                    limit: l.limit,
                    remaining: *r,
                    reset: l.per,
                })),
            Admit::Refused { index, free_in } => {
                let l = &limits[index.min(limits.len() - 1)];
                let secs = (free_in.as_secs() + u64::from(free_in.subsec_nanos() > 0)).max(1);
                Err(Refused {
                    error: limit_error(l, secs),
                    headers: Some(RateHeaders {
                        limit: l.limit,
                        remaining: 0,
                        reset: free_in,
                    }),
                })
            }
        }
    }

    /// [`Self::admit`] across replicas: through the shared state when there is one (falling back
    /// to this replica's windows while it is unavailable); with a lease holder, a call leased
    /// earlier is spent here without a round trip, and one admission at a time asks for more.
    pub async fn admit_everywhere(
        &self,
        caller: &Caller,
        client_ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<RateHeaders>, Refused> {
        let limits = &self.spec.rate_limits;
        let Some((shared, _)) = &self.state.shared else {
            return self.admit(caller, client_ip, now);
        };
        if limits.is_empty() {
            return Ok(None);
        }
        let mut asking = None;
        if let Some(l) = &self.lease {
            // the gateway's lease, or (`secret:` limits) the caller's
            let name = match limits[0].scope {
                LimitScope::Ingress => self.name.clone(),
                LimitScope::Secret => who(caller, client_ip),
            };
            if let Some(h) = spend_leased(l, &name, now) {
                return Ok(Some(h));
            }
            // one lease asked for at a time: the admissions meanwhile wait for it once, then
            // spend from it or count a single call
            match l.turn(&name).await {
                Turn::Ask(a) => asking = Some((l, name, a)),
                Turn::Landed => {
                    if let Some(h) = spend_leased(l, &name, now) {
                        return Ok(Some(h));
                    }
                }
            }
        }
        let windows = self.windows(caller, client_ip);
        let decided = match &asking {
            Some((l, name, _)) => self.admit_leasing(shared, (l, name), windows, now).await,
            None => shared
                .admit(&windows, now)
                .await
                .map(|outcome| self.verdict(outcome)),
        };
        match decided {
            Ok(verdict) => verdict,
            Err(e) => {
                shared.failed(&e);
                if shared.fail_closed() {
                    return Err(Refused {
                        error: shared_unavailable(),
                        headers: None,
                    });
                }
                self.admit_share(caller, client_ip, now, shared.replicas_hint())
            }
        }
    }

    /// Admits through the shared state reserving a lease of `l.req.calls`, and keeps what it
    /// granted beyond this call for `name`'s next admissions.
    async fn admit_leasing(
        &self,
        shared: &Arc<dyn SharedState>,
        (l, name): (&Arc<Leasing<RateHeaders>>, &Arc<str>),
        windows: Vec<WindowReq>,
        now: Instant,
    ) -> Result<Result<Option<RateHeaders>, Refused>, keypool_shared::SharedError> {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let (outcome, granted) = shared.admit_leasing(&windows, &id, l.req, now).await?;
        let verdict = self.verdict(outcome);
        Ok(match verdict {
            Ok(Some(h)) if granted > 1 => {
                let mine = RateHeaders {
                    remaining: h.remaining + u64::from(granted - 1),
                    ..h.clone()
                };
                l.keep(
                    name.clone(),
                    windows.into_boxed_slice(),
                    (id, granted, now),
                    h,
                );
                Ok(Some(mine))
            }
            other => other,
        })
    }

    /// Refuses once the tokens used (on every replica, with shared state) reached the quota.
    pub async fn check_quota_everywhere(&self) -> Result<(), ApiError> {
        if self.spec.token_quota.is_none() {
            return Ok(());
        }
        if let Some((shared, gateway)) = &self.state.shared {
            return match shared.get(&quota_counter(gateway)).await {
                Ok(used) => self.quota_verdict(used),
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

/// One call of a lease this replica holds for `name`, with the headers of the tightest limit
/// (the calls left there once the lease was counted, plus what the lease has left).
fn spend_leased(l: &Leasing<RateHeaders>, name: &str, now: Instant) -> Option<RateHeaders> {
    l.spend(&[()], |()| name, now).map(|s| RateHeaders {
        remaining: s.meta.remaining + u64::from(s.left),
        ..s.meta
    })
}

/// Whom `secret:` limits count: the identity, else (open gateways) the client IP.
fn who(caller: &Caller, client_ip: Option<IpAddr>) -> Arc<str> {
    match (&caller.id, client_ip) {
        (Some(id), _) => id.clone(),
        (None, Some(ip)) => Arc::from(format!("ip:{ip}")),
        (None, None) => Arc::from("anonymous"),
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

fn limit_error(l: &RateLimit, secs: u64) -> ApiError {
    refuse(
        ErrorKind::RateLimitExceeded,
        format!(
            "Rate limit reached: {} on this gateway{}. Retry after {secs} s.",
            l.text,
            if l.scope == LimitScope::Secret {
                " for your credential"
            } else {
                ""
            }
        ),
    )
    .retry_after(secs)
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
