//! A gateway's rate limits at run time: the windows a call counts in, the verdict as headers or
//! a refusal, and across replicas through the shared state (the calls leased from it are in
//! `gateway/leases.rs`).

use std::net::IpAddr;
use std::sync::Arc;

use keypool_config::gateway::{LimitScope, RateLimit};
use keypool_shared::{Admit, SharedState, WindowReq};
use keypool_types::{ApiError, ErrorKind};
use tokio::time::Instant;

use super::{GatewayRuntime, RateHeaders, Refused, refuse, shared_unavailable};
use crate::Caller;

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
        self.spec
            .rate_limits
            .iter()
            .map(|l| window(&self.spec.name, l, &who))
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
        if let Some(leases) = &self.lease {
            return self
                .admit_leased(shared, leases, (caller, client_ip), now)
                .await;
        }
        match shared.admit(&self.windows(caller, client_ip), now).await {
            Ok(outcome) => self.verdict(outcome),
            Err(e) => self.shared_failed(shared, &e, (caller, client_ip), now),
        }
    }

    /// The shared state failed an admission: refused where it must decide (`fail_closed`),
    /// else decided in this replica's windows with its share of every limit.
    pub(super) fn shared_failed(
        &self,
        shared: &Arc<dyn SharedState>,
        e: &keypool_shared::SharedError,
        (caller, client_ip): (&Caller, Option<IpAddr>),
        now: Instant,
    ) -> Result<Option<RateHeaders>, Refused> {
        shared.failed(e);
        if shared.fail_closed() {
            return Err(Refused {
                error: shared_unavailable(),
                headers: None,
            });
        }
        self.admit_share(caller, client_ip, now, shared.replicas_hint())
    }
}

/// The window of `gateway`'s limit `l` a call of `who` counts in.
pub(super) fn window(gateway: &str, l: &RateLimit, who: &str) -> WindowReq {
    WindowReq {
        key: match l.scope {
            LimitScope::Ingress => format!("gw:{gateway}:{}", l.text),
            LimitScope::Secret => format!("gw:{gateway}:{}:{who}", l.text),
        },
        limit: l.limit,
        per: l.per,
    }
}

/// An admission's answer as headers (the tightest limit: fewest calls left; its window is
/// empty `per` after this call) or a refusal naming the full limit.
fn verdict(limits: &[RateLimit], outcome: Admit) -> Result<Option<RateHeaders>, Refused> {
    match outcome {
        Admit::Admitted { remaining } => Ok(tightest_of(limits, &remaining)),
        Admit::Refused { index, free_in } => {
            Err(refusal(&limits[index.min(limits.len() - 1)], free_in))
        }
    }
}

/// The headers of the tightest of `limits` (fewest calls left, of those the longest window),
/// with `remaining` calls left in each.
pub(super) fn tightest_of(limits: &[RateLimit], remaining: &[u64]) -> Option<RateHeaders> {
    limits
        .iter()
        .zip(remaining)
        .min_by_key(|(l, r)| (**r, std::cmp::Reverse(l.per)))
        .map(|(l, r)| RateHeaders {
            limit: l.limit,
            remaining: *r,
            reset: l.per,
        })
}

/// The refusal of a call by limit `l`, full until one call leaves it in `free_in`.
pub(super) fn refusal(l: &RateLimit, free_in: std::time::Duration) -> Refused {
    let secs = (free_in.as_secs() + u64::from(free_in.subsec_nanos() > 0)).max(1);
    Refused {
        error: limit_error(l, secs),
        headers: Some(RateHeaders {
            limit: l.limit,
            remaining: 0,
            reset: free_in,
        }),
    }
}

/// Whom `secret:` limits count: the identity, else (open gateways) the client IP.
pub(super) fn who(caller: &Caller, client_ip: Option<IpAddr>) -> Arc<str> {
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
