//! [`KeyPool`]: the supervisor that owns the key set and picks keys; [`Lease`]: one reserved use.
//!
//! A [`Pick`] is answered in one pass: filter keys the request may use (not yet tried, model and
//! caller allowed), skip those the gauges show disabled or cooling, rank the rest by the policy,
//! and offer each, best first, a [`Reserve`] until one key actor admits it. Key actors are the
//! authority on budgets, so concurrent picks never over-admit; ranking only decides the order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, ResponseFuture};
use keypool_config::{LbPolicy, UpstreamKey};
use tokio::time::Instant;

use crate::key::{KeyActor, KeyGauge, KeyState};
use crate::messages::{
    BusyCause, ListKeys, NoKey, Outcome, Pick, Refusal, Reserve, Settle, Snapshot,
};
use crate::select::{Candidate, rank};

/// One key as the pool holds it.
#[derive(Clone)]
struct PoolKey {
    id: u64,
    key: Arc<UpstreamKey>,
    addr: Addr<KeyActor>,
    gauge: Arc<KeyGauge>,
}

/// The supervisor actor: owns the key set and the selection policy.
pub struct KeyPool {
    policy: LbPolicy,
    epoch: Instant,
    keys: Vec<PoolKey>,
}

impl KeyPool {
    /// Starts one [`KeyActor`] per key and the pool, on the current actix arbiter.
    pub fn start(keys: &[Arc<UpstreamKey>], policy: LbPolicy) -> Addr<Self> {
        let epoch = Instant::now();
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let gauge = Arc::new(KeyGauge::default());
                let addr = KeyActor::new(key.clone(), epoch, gauge.clone()).start();
                PoolKey {
                    id: i as u64,
                    key: key.clone(),
                    addr,
                    gauge,
                }
            })
            .collect();
        Self {
            policy,
            epoch,
            keys,
        }
        .start()
    }
}

impl Actor for KeyPool {
    type Context = Context<Self>;
}

/// A reserved use of one key for one attempt. Settle it with the attempt's [`Outcome`]; dropping
/// it unsettled (the client went away) settles it as [`Outcome::Cancelled`].
#[derive(Debug)]
pub struct Lease {
    /// The pool's id of the key (for `Pick::exclude`).
    pub key_id: u64,
    pub key: Arc<UpstreamKey>,
    addr: Addr<KeyActor>,
    /// The key actor's id of this reservation.
    id: u64,
    settled: bool,
}

impl Lease {
    pub fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.addr.do_send(Settle {
            lease_id: self.id,
            outcome,
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            self.addr.do_send(Settle {
                lease_id: self.id,
                outcome: Outcome::Cancelled,
            });
        }
    }
}

/// Earliest time some key frees up, and why it is busy until then.
#[derive(Default)]
struct Earliest(Option<(Instant, BusyCause)>);

impl Earliest {
    fn offer(&mut self, until: Instant, cause: BusyCause) {
        if self.0.is_none_or(|(t, _)| until < t) {
            self.0 = Some((until, cause));
        }
    }
}

impl Handler<Pick> for KeyPool {
    type Result = ResponseFuture<Result<Lease, NoKey>>;

    fn handle(&mut self, msg: Pick, _: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let mut serving = 0usize;
        let mut disabled = 0usize;
        let mut earliest = Earliest::default();
        let mut cands = Vec::with_capacity(self.keys.len());
        for (order, k) in self.keys.iter().enumerate() {
            if msg.exclude.contains(&k.id)
                || !k.key.allows_model(&msg.model, &msg.path)
                || !k.key.allows_caller(msg.caller.as_deref())
            {
                continue;
            }
            serving += 1;
            let available_at = k.gauge.available_at_ms.load(Ordering::Relaxed);
            if available_at == u64::MAX {
                disabled += 1;
            } else if available_at > now_ms {
                let until = self.epoch + Duration::from_millis(available_at);
                earliest.offer(until, BusyCause::Cooling);
            } else {
                cands.push(Candidate {
                    order,
                    window_requests: k.gauge.window_requests.load(Ordering::Relaxed),
                    in_flight: k.gauge.in_flight.load(Ordering::Relaxed),
                });
            }
        }
        if serving == 0 {
            return Box::pin(async { Err(NoKey::NoneServes) });
        }
        rank(self.policy, &mut cands);
        let ranked: Vec<PoolKey> = cands.iter().map(|c| self.keys[c.order].clone()).collect();
        let est_tokens = msg.est_tokens;
        Box::pin(async move {
            for k in ranked {
                match k.addr.send(Reserve { est_tokens }).await {
                    Ok(Ok(lease_id)) => {
                        return Ok(Lease {
                            key_id: k.id,
                            key: k.key,
                            addr: k.addr,
                            id: lease_id,
                            settled: false,
                        });
                    }
                    Ok(Err(Refusal::Budget { until })) => earliest.offer(until, BusyCause::Budget),
                    Ok(Err(Refusal::Cooling { until })) => {
                        earliest.offer(until, BusyCause::Cooling);
                    }
                    Ok(Err(Refusal::Disabled)) | Err(_) => disabled += 1,
                }
            }
            match earliest.0 {
                Some((until, cause)) => Err(NoKey::Busy { until, cause }),
                None if disabled > 0 => Err(NoKey::AllDisabled),
                None => Err(NoKey::NoneServes),
            }
        })
    }
}

impl Handler<ListKeys> for KeyPool {
    type Result = ResponseFuture<Vec<KeyState>>;

    fn handle(&mut self, _: ListKeys, _: &mut Context<Self>) -> Self::Result {
        let addrs: Vec<Addr<KeyActor>> = self.keys.iter().map(|k| k.addr.clone()).collect();
        Box::pin(async move {
            let mut out = Vec::with_capacity(addrs.len());
            for addr in addrs {
                if let Ok(state) = addr.send(Snapshot).await {
                    out.push(state);
                }
            }
            out
        })
    }
}
