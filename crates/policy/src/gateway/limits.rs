//! A gateway's rate limits at run time: the windows a call counts in, the verdict as headers or
//! a refusal, across replicas through the shared state, and the calls leased from it
//! (`redis.lease`).

use std::net::IpAddr;
use std::sync::Arc;

use keypool_config::Gateway;
use keypool_config::gateway::{LimitScope, RateLimit};
use keypool_shared::{Admit, LeaseReq, Leasing, SharedState, Turn, WindowReq};
use keypool_types::{ApiError, ErrorKind};
use tokio::time::Instant;

use super::{GatewayRuntime, RateHeaders, Refused, refuse, shared_unavailable};
use crate::Caller;

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

impl GatewayRuntime {
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

    fn verdict(&self, outcome: Admit) -> Result<Option<RateHeaders>, Refused> {
        verdict(&self.spec.rate_limits, outcome)
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
            if let Some(h) = self.spend_leased(shared, l, &name, (caller, client_ip), now) {
                return Ok(Some(h));
            }
            // one lease asked for at a time: the admissions meanwhile wait for it once, then
            // spend from it or count a single call
            match l.turn(&name).await {
                Turn::Ask(a) => asking = Some((l, name, a)),
                Turn::Landed => {
                    if let Some(h) = self.spend_leased(shared, l, &name, (caller, client_ip), now) {
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
        let id = lease_id();
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
}

/// An admission's answer as headers (the tightest limit: fewest calls left; its window is
/// empty `per` after this call) or a refusal naming the full limit.
fn verdict(limits: &[RateLimit], outcome: Admit) -> Result<Option<RateHeaders>, Refused> {
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

/// A lease's id in the shared windows.
fn lease_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl GatewayRuntime {
    /// One call of a lease this replica holds for `name`, with the headers of the tightest
    /// limit (the calls left there once the lease was counted, plus what the lease has left).
    /// The call that leaves a quarter of its lease asks for the next one ahead of need.
    fn spend_leased(
        &self,
        shared: &Arc<dyn SharedState>,
        l: &Arc<Leasing<RateHeaders>>,
        name: &Arc<str>,
        (caller, client_ip): (&Caller, Option<IpAddr>),
        now: Instant,
    ) -> Option<RateHeaders> {
        let s = l.spend(&[()], |()| name, now)?;
        if l.time_to_ask_ahead(s.left) {
            self.ask_ahead(shared, l, name.clone(), self.windows(caller, client_ip));
        }
        Some(RateHeaders {
            remaining: s.meta.remaining + u64::from(s.left),
            ..s.meta
        })
    }

    /// Asks for `name`'s next lease in the background, unless an ask for it is under way:
    /// under steady traffic it lands before the current lease is spent, so no admission
    /// waits for the round trip. A refusal or an unavailable shared state leaves nothing kept
    /// (the next admission that finds no lease asks, and decides, itself).
    fn ask_ahead(
        &self,
        shared: &Arc<dyn SharedState>,
        l: &Arc<Leasing<RateHeaders>>,
        name: Arc<str>,
        windows: Vec<WindowReq>,
    ) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (shared, l, spec) = (shared.clone(), l.clone(), self.spec.clone());
        tokio::spawn(async move {
            let Some(_asking) = l.ask_ahead(&name) else {
                return;
            };
            let (id, asked) = (lease_id(), Instant::now());
            match shared.admit_leasing(&windows, &id, l.req, asked).await {
                Ok((outcome, granted)) => {
                    if let Ok(Some(h)) = verdict(&spec.rate_limits, outcome) {
                        let windows = windows.into_boxed_slice();
                        l.keep_ahead(name.clone(), windows, (id, granted, asked), h);
                    }
                }
                Err(e) => shared.background_failed(&e),
            }
        });
    }
}

/// Whom `secret:` limits count: the identity, else (open gateways) the client IP.
fn who(caller: &Caller, client_ip: Option<IpAddr>) -> Arc<str> {
    match (&caller.id, client_ip) {
        (Some(id), _) => id.clone(),
        (None, Some(ip)) => Arc::from(format!("ip:{ip}")),
        (None, None) => Arc::from("anonymous"),
    }
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
