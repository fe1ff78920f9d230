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
//!   reservation is only counted in its [`KeyTally`], which the actor folds in on its own time;
//!   unless a settlement still waits in the actor's mailbox (the gauge may not show it yet):
//!   then it is asked too, and answers after that settlement.
//!
//! A lease settles the same way: a success on a key without a tpm budget is counted in the tally
//! (no message) unless a settlement is still waiting in its actor's mailbox (see [`KeyTally`]
//! on order); every other outcome is a [`Settle`] message, since it may change health or the exact
//! token window.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, ResponseFuture};
use keypool_config::{LbPolicy, UpstreamKey};
use tokio::time::Instant;

use crate::SharedState as _;
use crate::key::{KeyActor, KeyGauge, KeySeed, KeyState};
use crate::messages::{ListKeys, PoolError, Snapshot};
use crate::tally::KeyTally;

mod lease;
mod pick;
mod shared_pick;
mod slice;

pub use keypool_shared::Leasing;

/// The pool's leases: a key's calls, with the token slice leased beside them where the key
/// has `tpm`.
type PickLeasing = Leasing<Option<Arc<slice::TokenSlice>>>;

use keypool_shared::HealthAnnouncer;
use keypool_telemetry::Telemetry;
pub use lease::Lease;
use lease::SharedTokens;
pub use pick::{KeyAccess, Pick};

/// One key as the pool publishes it.
#[derive(Clone)]
struct PoolKey {
    id: u64,
    key: Arc<UpstreamKey>,
    addr: Arc<Addr<KeyActor>>,
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
        telemetry: &Telemetry,
    ) -> Self {
        let gauge = Arc::new(KeyGauge::default());
        let tally = Arc::new(KeyTally::new(
            &key.name,
            key.kind.as_str(),
            telemetry.clone(),
        ));
        let addr = KeyActor::new(key.clone(), epoch, gauge.clone(), tally.clone(), seed)
            .announcing(announcer)
            .start()
            .into();
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

/// The supervisor actor: owns the key set and publishes the view requests pick from.
pub struct KeyPool {
    view: Arc<RwLock<Arc<PoolView>>>,
    /// The next key id (ids are never reused, so a request's `exclude` stays right).
    next_id: u64,
    /// Handed to every key actor: where it tells other replicas about its key's health.
    announcer: HealthAnnouncer,
    /// Where every key's attempts are counted and its alerts go.
    telemetry: Telemetry,
}

impl KeyPool {
    /// Starts one [`KeyActor`] per key and the pool, on the current actix arbiter.
    pub fn start(keys: &[Arc<UpstreamKey>], policy: LbPolicy) -> PoolHandle {
        Self::start_seeded(
            keys,
            policy,
            &std::collections::HashMap::new(),
            HealthAnnouncer::default(),
            Telemetry::default(),
        )
    }

    /// Like [`KeyPool::start`], with each key's counters and recent requests restored, the
    /// keys' health changes announced through `announcer`, their attempts counted and their
    /// alerts sent through `telemetry`.
    pub fn start_seeded(
        keys: &[Arc<UpstreamKey>],
        policy: LbPolicy,
        seeds: &std::collections::HashMap<String, KeySeed>,
        announcer: HealthAnnouncer,
        telemetry: Telemetry,
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
                    &telemetry,
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
            telemetry,
        }
        .start();
        PoolHandle {
            view,
            supervisor,
            next_lease: Arc::new(AtomicU64::new(1)),
            shared: None,
            pins: Arc::new(crate::InMemory::default()),
            sessions: Arc::new(crate::InMemory::default()),
            leasing: None,
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
            &self.telemetry,
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
            .as_ref()
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
    /// This process's pins (every pin is kept here too: a follow-up on this replica needs no
    /// round trip, and survives a Redis outage).
    pins: Arc<crate::InMemory>,
    /// Which key each session keeps, without shared state (bounded as pins are); with
    /// leases, this replica's view of it, learned from the pick script, for `lease_ms`.
    sessions: Arc<crate::InMemory>,
    /// Calls (and, of keys with `tpm`, token slices) leased from the shared state
    /// (`redis.lease`), spent here.
    leasing: Option<Arc<PickLeasing>>,
}

/// How long a Responses API response stays pinned to the key that created it.
pub const PIN_TTL: Duration = Duration::from_secs(24 * 3600);

impl PoolHandle {
    /// Uses `shared` for key rpm windows from now on (a Redis shared state across replicas).
    #[must_use]
    pub fn with_shared(mut self, shared: Arc<dyn crate::SharedState>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// With shared state: picks reserve up to `calls` calls of a key's rpm budget at once
    /// (of a key with `tpm`, an estimate of tokens per call beside them: a token slice) and
    /// spend them here within `within` ([`Leasing`]); `calls` of 0 or 1 leases nothing.
    /// Call after [`Self::with_shared`] (what lapses is given back by a task of its own,
    /// started with the first lease).
    #[must_use]
    pub fn with_leasing(mut self, calls: u32, within: std::time::Duration) -> Self {
        if let (Some(shared), true) = (&self.shared, calls > 1) {
            self.leasing = Some(Arc::new(PickLeasing::new(calls, within, shared.clone())));
        }
        self
    }

    /// Gives back the keys' calls leased and not spent, and settles their token slices (a
    /// graceful stop, once the server has drained).
    pub async fn give_back_leases(&self) {
        if let Some(l) = &self.leasing {
            // and settles their token slices: what was held and not used is room again
            for slice in l.give_back_all().await.into_iter().flatten() {
                slice.settle_now().await;
            }
        }
    }

    /// Pins a Responses API response id to the key that created it, here and (with Redis) for
    /// every replica, for [`PIN_TTL`].
    pub async fn pin(&self, response_id: &str, key: &str) {
        let _ = self.pins.pin(response_id, key, PIN_TTL).await;
        if let Some(shared) = &self.shared
            && let Err(e) = shared.pin(response_id, key, PIN_TTL).await
        {
            shared.background_failed(&e);
        }
    }

    /// The key a response id is pinned to, if any: this process's pin, else the shared one.
    pub async fn pinned(&self, response_id: &str) -> Option<Arc<str>> {
        if let Ok(Some(key)) = self.pins.pinned(response_id).await {
            return Some(key.into());
        }
        match &self.shared {
            Some(shared) => match shared.pinned(response_id).await {
                Ok(key) => key.map(Into::into),
                Err(e) => {
                    shared.background_failed(&e);
                    None
                }
            },
            None => None,
        }
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
