//! [`KeyPool`]: the supervisor that owns the key set; [`PoolHandle`]: how requests pick keys;
//! [`Lease`]: one reserved use of one key.
//!
//! The supervisor starts one [`KeyActor`] per key and publishes a read-only [`PoolView`] of them
//! (config, address, gauge). A request picks on its own thread, without a message to the
//! supervisor: filter the keys it may use (not yet tried, model and caller allowed), skip those
//! the gauges show disabled or cooling, rank the rest by the policy, then reserve:
//! - a key with an rpm/tpm budget is asked ([`Reserve`], one round trip); its actor is the
//!   authority, so concurrent picks never over-admit, and a refusal moves on to the next key;
//! - a key without a budget has nothing to refuse but its health, which its gauge showed, so its
//!   reservation is only counted in its [`KeyTally`], which the actor folds in on its own time.
//!
//! A lease settles the same way: a success on a key without a tpm budget is counted in the tally
//! (no message) unless a settlement is still waiting in its actor's mailbox (see [`KeyTally`]
//! on order); every other outcome is a [`Settle`] message, since it may change health or the exact
//! token window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, ResponseFuture};
use keypool_config::{LbPolicy, UpstreamKey};
use tokio::time::Instant;

use crate::key::{KeyActor, KeyGauge, KeySeed, KeyState};
use crate::messages::{
    BusyCause, ListKeys, NoKey, Outcome, PoolError, Refusal, Reserve, Settle, Snapshot,
};
use crate::select::{Candidate, rank};
use crate::tally::KeyTally;
use keypool_shared::HealthAnnouncer;

/// One key as the pool publishes it.
#[derive(Clone)]
struct PoolKey {
    id: u64,
    key: Arc<UpstreamKey>,
    addr: Addr<KeyActor>,
    gauge: Arc<KeyGauge>,
    tally: Arc<KeyTally>,
}

impl PoolKey {
    /// Starts the key's actor (on the current arbiter).
    fn start(
        id: u64,
        key: Arc<UpstreamKey>,
        epoch: Instant,
        seed: Option<KeySeed>,
        announcer: HealthAnnouncer,
    ) -> Self {
        let gauge = Arc::new(KeyGauge::default());
        let tally = Arc::new(KeyTally::new(&key.name, key.kind.as_str()));
        let addr = KeyActor::new(key.clone(), epoch, gauge.clone(), tally.clone(), seed)
            .announcing(announcer)
            .start();
        Self {
            id,
            key,
            addr,
            gauge,
            tally,
        }
    }
}

/// What the supervisor publishes for picking: the keys in config order and the policy.
pub struct PoolView {
    policy: LbPolicy,
    epoch: Instant,
    keys: Vec<PoolKey>,
}

/// What a request asks of the pool for one attempt.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The request's model (JSON `model`, multipart `model`, or the path).
    pub model: Arc<str>,
    /// The request path (`/v1/audio/transcriptions`), which allow/deny entries may name.
    pub path: Arc<str>,
    /// Which keys may serve the caller (its gateway's rules).
    pub access: KeyAccess,
    /// The request carries a credential of the caller's own to pass on: only then may
    /// `sk: asis` keys serve it (they forward it instead of a key).
    pub passthrough: bool,
    /// Tokens reserved against tpm until the real usage is known.
    pub est_tokens: u64,
    /// Keys already tried by this request ([`Lease::key_id`]s), skipped.
    pub exclude: Vec<u64>,
}

/// Which keys a caller may use, by its gateway's auth rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAccess {
    /// Every key: the caller authenticated with its gateway's own credential, or the gateway
    /// is open.
    All,
    /// The `default` gateway's client-token rules: keys whose own `authorization` list admits
    /// this token; `None` is a caller with no valid token, whom only `noauth` keys serve.
    Token(Option<Arc<str>>),
}

impl KeyAccess {
    pub fn allows(&self, key: &UpstreamKey) -> bool {
        match self {
            Self::All => true,
            Self::Token(t) => key.allows_caller(t.as_deref()),
        }
    }
}

/// The supervisor actor: owns the key set and publishes the view requests pick from.
pub struct KeyPool {
    view: Arc<RwLock<Arc<PoolView>>>,
    /// The next key id (ids are never reused, so a request's `exclude` stays right).
    next_id: u64,
    /// Handed to every key actor: where it tells other replicas about its key's health.
    announcer: HealthAnnouncer,
}

impl KeyPool {
    /// Starts one [`KeyActor`] per key and the pool, on the current actix arbiter.
    pub fn start(keys: &[Arc<UpstreamKey>], policy: LbPolicy) -> PoolHandle {
        Self::start_seeded(
            keys,
            policy,
            &std::collections::HashMap::new(),
            HealthAnnouncer::default(),
        )
    }

    /// Like [`KeyPool::start`], with each key's counters and recent requests restored, and the
    /// keys' health changes announced through `announcer`.
    pub fn start_seeded(
        keys: &[Arc<UpstreamKey>],
        policy: LbPolicy,
        seeds: &std::collections::HashMap<String, KeySeed>,
        announcer: HealthAnnouncer,
    ) -> PoolHandle {
        let epoch = Instant::now();
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                PoolKey::start(
                    i as u64,
                    key.clone(),
                    epoch,
                    seeds.get(&*key.name).cloned(),
                    announcer.clone(),
                )
            })
            .collect();
        let view = Arc::new(RwLock::new(Arc::new(PoolView {
            policy,
            epoch,
            keys,
        })));
        let next_id = keys_len(&view);
        let supervisor = Self {
            view: view.clone(),
            next_id,
            announcer,
        }
        .start();
        PoolHandle {
            view,
            supervisor,
            next_lease: Arc::new(AtomicU64::new(1)),
            shared: None,
        }
    }
}

fn keys_len(view: &RwLock<Arc<PoolView>>) -> u64 {
    view.read()
        .unwrap_or_else(PoisonError::into_inner)
        .keys
        .len() as u64
}

impl Actor for KeyPool {
    type Context = Context<Self>;
}

impl KeyPool {
    fn current(&self) -> Arc<PoolView> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes a new view with `keys`; requests pick from it from now on.
    fn publish(&self, keys: Vec<PoolKey>) {
        let old = self.current();
        let next = Arc::new(PoolView {
            policy: old.policy,
            epoch: old.epoch,
            keys,
        });
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = next;
    }
}

impl Handler<crate::messages::AddKey> for KeyPool {
    type Result = Result<(), PoolError>;

    fn handle(&mut self, msg: crate::messages::AddKey, _: &mut Context<Self>) -> Self::Result {
        let view = self.current();
        if view.keys.iter().any(|k| k.key.name == msg.0.name) {
            return Err(PoolError::Exists(msg.0.name.to_string()));
        }
        let mut keys = view.keys.clone();
        keys.push(PoolKey::start(
            self.next_id,
            msg.0,
            view.epoch,
            None,
            self.announcer.clone(),
        ));
        self.next_id += 1;
        self.publish(keys);
        Ok(())
    }
}

impl Handler<crate::messages::RemoveKey> for KeyPool {
    type Result = Option<Addr<KeyActor>>;

    fn handle(&mut self, msg: crate::messages::RemoveKey, _: &mut Context<Self>) -> Self::Result {
        let view = self.current();
        let gone = view
            .keys
            .iter()
            .find(|k| *k.key.name == msg.0)?
            .addr
            .clone();
        let keys = view
            .keys
            .iter()
            .filter(|k| *k.key.name != msg.0)
            .cloned()
            .collect();
        self.publish(keys);
        Some(gone)
    }
}

impl Handler<crate::messages::UpdateKey> for KeyPool {
    type Result = Result<(), PoolError>;

    fn handle(&mut self, msg: crate::messages::UpdateKey, _: &mut Context<Self>) -> Self::Result {
        let view = self.current();
        let Some(pos) = view.keys.iter().position(|k| k.key.name == msg.0.name) else {
            return Err(PoolError::NoSuchKey(msg.0.name.to_string()));
        };
        let mut keys = view.keys.clone();
        keys[pos].key = msg.0.clone();
        keys[pos].addr.do_send(crate::messages::ReplaceSpec(msg.0));
        self.publish(keys);
        Ok(())
    }
}

impl Handler<crate::messages::SetEnabled> for KeyPool {
    type Result = Result<(), PoolError>;

    fn handle(&mut self, msg: crate::messages::SetEnabled, _: &mut Context<Self>) -> Self::Result {
        let view = self.current();
        let k = view
            .keys
            .iter()
            .find(|k| *k.key.name == msg.name)
            .ok_or_else(|| PoolError::NoSuchKey(msg.name.clone()))?;
        k.addr.do_send(crate::messages::Enable(msg.enabled));
        Ok(())
    }
}

/// A cheap, cloneable handle to the pool, usable from any thread.
#[derive(Clone)]
pub struct PoolHandle {
    view: Arc<RwLock<Arc<PoolView>>>,
    supervisor: Addr<KeyPool>,
    /// Lease ids, unique across keys, chosen by the requester so a reservation need not answer.
    next_lease: Arc<AtomicU64>,
    /// Shared across replicas (Redis): key rpm windows are admitted there first.
    shared: Option<Arc<dyn crate::SharedState>>,
}

/// A reserved use of one key for one attempt. Settle it with the attempt's [`Outcome`]; dropping
/// it unsettled (the client went away) settles it as [`Outcome::Cancelled`].
#[derive(Debug)]
pub struct Lease {
    /// The pool's id of the key (for [`Pick::exclude`]).
    pub key_id: u64,
    pub key: Arc<UpstreamKey>,
    addr: Addr<KeyActor>,
    tally: Arc<KeyTally>,
    /// This reservation's id in the key's windows.
    id: u64,
    settled: bool,
    /// When the lease was taken: the attempt's start, for its latency.
    started: Instant,
    /// The tokens reserved in the shared token window (a `tpm` key with shared state), settled
    /// there to the real count after a success.
    shared_tokens: Option<SharedTokens>,
}

struct SharedTokens {
    state: Arc<dyn crate::SharedState>,
    req: crate::TokenReq,
    id: String,
}

impl std::fmt::Debug for SharedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTokens")
            .field("req", &self.req)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Records the attempt's time to response headers (its key's TTFB histogram).
    pub fn observe_ttfb(&self, ttfb: Duration) {
        self.tally.metrics.ttfb.observe(ttfb.as_secs_f64());
    }

    pub fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.tally.returned();
        if let (
            Some(shared),
            Outcome::Success {
                tokens: Some(actual),
                ..
            },
        ) = (self.shared_tokens.take(), &outcome)
        {
            let actual = *actual;
            // off the response path: the count matters to the next picks, not to this one
            tokio::spawn(async move {
                if let Err(e) = shared
                    .state
                    .settle_tokens(&shared.req, &shared.id, actual)
                    .await
                {
                    crate::shared_failed(&e);
                }
            });
        }
        let elapsed = self.started.elapsed();
        match outcome {
            // the common case changes only numbers that add up: the tally, no message
            Outcome::Success { tokens, latency }
                if self.key.tpm.is_none() && self.tally.quiet() =>
            {
                self.tally.success(latency, elapsed, tokens);
            }
            Outcome::Cancelled => cancelled(&self.key, elapsed),
            outcome => {
                self.tally.settle_sent();
                self.addr.do_send(Settle {
                    lease_id: self.id,
                    outcome,
                    elapsed,
                });
            }
        }
    }
}

/// A lease given up unsettled (the client went away): not the key's fault, nothing for its
/// actor to apply; a tpm reservation keeps its estimate.
fn cancelled(key: &UpstreamKey, elapsed: Duration) {
    keypool_telemetry::metrics().attempt(&key.name, key.kind.as_str(), "cancelled", elapsed);
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            self.tally.returned();
            cancelled(&self.key, self.started.elapsed());
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

impl PoolHandle {
    /// Uses `shared` for key rpm windows from now on (a Redis shared state across replicas).
    #[must_use]
    pub fn with_shared(mut self, shared: Arc<dyn crate::SharedState>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Applies a key health event another replica published.
    pub fn apply_health(&self, key: &str, event: crate::HealthEvent) {
        let view = self.view();
        if let Some(k) = view.keys.iter().find(|k| &*k.key.name == key) {
            k.addr.do_send(crate::messages::RemoteHealth(event));
        }
    }

    fn view(&self) -> Arc<PoolView> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Picks a key for one attempt and reserves its budget.
    pub async fn pick(&self, pick: &Pick) -> Result<Lease, NoKey> {
        let view = self.view();
        let now = Instant::now();
        let Gathered {
            mut cands,
            mut disabled,
            mut earliest,
        } = gather(&view, pick, now)?;
        rank(view.policy, &mut cands);
        let first_lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
        // across replicas: choose and reserve in the shared windows, in one round trip, so the
        // replicas rank on the same counts (least-used) and never exceed a key's rpm together
        let (chosen, share_of, mut shared_tokens) = match &self.shared {
            Some(shared) if !cands.is_empty() => {
                let id = format!("{}-{first_lease}", keypool_shared::process_id());
                match shared_pick(shared, &view, &cands, pick, id, now).await {
                    SharedPick::Chosen(c, tokens) => (Some(vec![c]), 1, tokens),
                    SharedPick::Busy(until) => {
                        earliest.offer(until, BusyCause::Budget);
                        (Some(Vec::new()), 1, None)
                    }
                    SharedPick::Failed if shared.fail_closed() => {
                        return Err(NoKey::SharedUnavailable);
                    }
                    SharedPick::Failed => (None, shared.replicas_hint(), None),
                }
            }
            _ => (None, 1, None),
        };
        for (n, c) in chosen.as_deref().unwrap_or(&cands).iter().enumerate() {
            let k = &view.keys[c.order];
            let lease_id = if n == 0 {
                first_lease
            } else {
                self.next_lease.fetch_add(1, Ordering::Relaxed)
            };
            let mut lease = || {
                k.tally.leased();
                Lease {
                    key_id: k.id,
                    key: k.key.clone(),
                    addr: k.addr.clone(),
                    tally: k.tally.clone(),
                    id: lease_id,
                    settled: false,
                    started: Instant::now(),
                    shared_tokens: shared_tokens.take(),
                }
            };
            if k.key.rpm.is_none() && k.key.tpm.is_none() {
                k.tally.record();
                return Ok(lease());
            }
            let reserve = Reserve {
                lease_id,
                est_tokens: pick.est_tokens,
                share_of,
            };
            match k.addr.send(reserve).await {
                Ok(Ok(())) => return Ok(lease()),
                Ok(Err(Refusal::Budget { until })) => earliest.offer(until, BusyCause::Budget),
                Ok(Err(Refusal::Cooling { until })) => earliest.offer(until, BusyCause::Cooling),
                Ok(Err(Refusal::Disabled)) | Err(_) => disabled += 1,
            }
        }
        match earliest.0 {
            Some((until, cause)) => Err(NoKey::Busy { until, cause }),
            None if disabled > 0 => Err(NoKey::AllDisabled),
            None => Err(NoKey::NoneServes),
        }
    }

    /// The live state of every key, in config order.
    pub async fn list(&self) -> Vec<KeyState> {
        self.supervisor.send(ListKeys).await.unwrap_or_default()
    }

    /// The keys' specs, in order.
    pub fn keys(&self) -> Vec<Arc<UpstreamKey>> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .iter()
            .map(|k| k.key.clone())
            .collect()
    }

    pub async fn add_key(&self, key: Arc<UpstreamKey>) -> Result<(), PoolError> {
        self.supervisor
            .send(crate::messages::AddKey(key))
            .await
            .map_err(|_| PoolError::Stopped)?
    }

    pub async fn update_key(&self, key: Arc<UpstreamKey>) -> Result<(), PoolError> {
        self.supervisor
            .send(crate::messages::UpdateKey(key))
            .await
            .map_err(|_| PoolError::Stopped)?
    }

    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), PoolError> {
        self.supervisor
            .send(crate::messages::SetEnabled {
                name: name.to_owned(),
                enabled,
            })
            .await
            .map_err(|_| PoolError::Stopped)?
    }

    /// Removes a key from picking at once, then waits (up to `drain`) until its in-flight
    /// attempts have settled. `false` when there was no such key.
    pub async fn remove_key(&self, name: &str, drain: Duration) -> bool {
        let Ok(Some(addr)) = self
            .supervisor
            .send(crate::messages::RemoveKey(name.to_owned()))
            .await
        else {
            return false;
        };
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline {
            match addr.send(Snapshot).await {
                Ok(s) if s.in_flight > 0 => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => break,
            }
        }
        true
    }
}

impl Handler<ListKeys> for KeyPool {
    type Result = ResponseFuture<Vec<KeyState>>;

    fn handle(&mut self, _: ListKeys, _: &mut Context<Self>) -> Self::Result {
        let view = self
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(async move {
            let mut out = Vec::with_capacity(view.keys.len());
            for k in &view.keys {
                if let Ok(state) = k.addr.send(Snapshot).await {
                    out.push(state);
                }
            }
            out
        })
    }
}

/// The keys that may serve a pick and are usable now, with what the others say.
struct Gathered {
    cands: Vec<Candidate>,
    /// Keys that serve the pick but are disabled.
    disabled: usize,
    /// When the first cooling key comes back.
    earliest: Earliest,
}

/// One pass over the view: the keys allowed for the pick, split into candidates (usable now),
/// disabled and cooling ones. `NoneServes` when no key serves it at all.
fn gather(view: &PoolView, pick: &Pick, now: Instant) -> Result<Gathered, NoKey> {
    let now_ms = now.saturating_duration_since(view.epoch).as_millis() as u64;
    let mut serving = 0usize;
    let mut out = Gathered {
        cands: Vec::with_capacity(view.keys.len()),
        disabled: 0,
        earliest: Earliest::default(),
    };
    for (order, k) in view.keys.iter().enumerate() {
        if pick.exclude.contains(&k.id)
            || !k.key.allows_model(&pick.model, &pick.path)
            || (k.key.passthrough_auth && !pick.passthrough)
            || !pick.access.allows(&k.key)
        {
            continue;
        }
        serving += 1;
        let available_at = k.gauge.available_at_ms.load(Ordering::Relaxed);
        if available_at == u64::MAX {
            out.disabled += 1;
        } else if available_at > now_ms {
            let until = view.epoch + Duration::from_millis(available_at);
            out.earliest.offer(until, BusyCause::Cooling);
        } else {
            let pending = u32::try_from(k.tally.pending()).unwrap_or(u32::MAX);
            out.cands.push(Candidate {
                order,
                window_requests: k
                    .gauge
                    .window_requests
                    .load(Ordering::Relaxed)
                    .saturating_add(pending),
                in_flight: k.tally.in_flight(),
            });
        }
    }
    if serving == 0 {
        return Err(NoKey::NoneServes);
    }
    Ok(out)
}

/// What the shared state chose among the candidates.
enum SharedPick {
    /// This candidate, its call counted (and its tokens reserved, when it has a tpm).
    Chosen(Candidate, Option<SharedTokens>),
    /// None has room before this.
    Busy(Instant),
    /// The shared state is unavailable (already counted and logged).
    Failed,
}

/// Chooses and reserves among `cands` in the shared windows, in one round trip.
async fn shared_pick(
    shared: &Arc<dyn crate::SharedState>,
    view: &PoolView,
    cands: &[Candidate],
    pick: &Pick,
    id: String,
    now: Instant,
) -> SharedPick {
    let mut ordered = cands.to_vec();
    if view.policy != LbPolicy::Random {
        ordered.sort_by_key(|c| c.order); // ties go to config order
    }
    let windows: Vec<crate::WindowReq> = ordered
        .iter()
        .map(|c| {
            let key = &view.keys[c.order].key;
            crate::WindowReq {
                key: format!("key:{}:req", key.name),
                limit: key.rpm.map_or(u64::MAX, u64::from),
                per: crate::key::WINDOW,
            }
        })
        .collect();
    let tokens: Vec<Option<crate::TokenReq>> = ordered
        .iter()
        .map(|c| {
            let key = &view.keys[c.order].key;
            key.tpm.map(|limit| crate::TokenReq {
                key: format!("key:{}:tok", key.name),
                limit,
                cost: pick.est_tokens,
            })
        })
        .collect();
    let least_used = view.policy == LbPolicy::LeastUsed;
    match shared
        .pick_reserving(&windows, &tokens, least_used, &id, now)
        .await
    {
        Ok(crate::Picked::Index(i)) => {
            let i = i.min(ordered.len() - 1);
            let reserved = tokens[i].clone().map(|req| SharedTokens {
                state: shared.clone(),
                req,
                id,
            });
            SharedPick::Chosen(ordered[i], reserved)
        }
        Ok(crate::Picked::Busy(free_in)) => SharedPick::Busy(Instant::now() + free_in),
        Err(e) => {
            crate::shared_failed(&e);
            SharedPick::Failed
        }
    }
}
