//! [`Gateways`]: every gateway's runtime by name, with what all of them share (the USD
//! budgets' counters, the prices in force), replaced whole when the configuration changes.

use std::collections::HashMap;
use std::sync::Arc;

use keypool_config::Gateway;
use keypool_shared::{LeaseReq, SharedState};
use keypool_telemetry::Telemetry;

use crate::gateway::{GatewayRuntime, GatewayState};

/// Gateways by name (hashed seeded per process: cheaper than SipHash on every request).
type ByName = HashMap<String, Arc<GatewayRuntime>, foldhash::fast::RandomState>;

/// Every gateway by name, the `default` one included; replaced whole when the configuration
/// changes (state kept by name). Requests read it without a lock.
pub struct Gateways {
    map: arc_swap::ArcSwap<ByName>,
    shared: Option<Arc<dyn SharedState>>,
    /// How many calls of a gateway's rate limits to lease from `shared` at once
    /// (`redis.lease`; [`crate::gateway::lease_for`]).
    lease: Option<LeaseReq>,
    /// Every USD budget's counters (gateways', callers' and keys').
    budgets: Arc<crate::budget::Budgets>,
    /// The prices in force before the built-in catalog's (the admin API's, then the config's):
    /// replaced whole with the configuration.
    prices: arc_swap::ArcSwap<keypool_pricing::Prices>,
    /// What every gateway records into (its runtime carries it to the requests).
    telemetry: Telemetry,
}

impl Default for Gateways {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl Gateways {
    /// In-process gateways with a telemetry handle of their own (tools and tests).
    pub fn new(specs: &[Arc<Gateway>]) -> Self {
        Self::with_shared(specs, None, None, Telemetry::default())
    }

    /// Gateways whose limits and quotas hold across replicas through `shared` (their rate
    /// limits leased from it as `lease` says), recording into `telemetry`.
    pub fn with_shared(
        specs: &[Arc<Gateway>],
        shared: Option<Arc<dyn SharedState>>,
        lease: Option<LeaseReq>,
        telemetry: Telemetry,
    ) -> Self {
        let g = Self {
            map: arc_swap::ArcSwap::default(),
            budgets: Arc::new(crate::budget::Budgets::new(
                shared.clone(),
                lease,
                telemetry.clone(),
            )),
            prices: arc_swap::ArcSwap::default(),
            shared,
            lease,
            telemetry,
        };
        g.replace(specs);
        g
    }

    /// What every gateway records into.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The USD budgets' counters.
    pub fn budgets(&self) -> &Arc<crate::budget::Budgets> {
        &self.budgets
    }

    /// A graceful stop, once the server has drained: every gateway's unspent leased calls go
    /// back to the shared windows and every budget slice is settled, before this answers.
    pub async fn give_back_shared(&self) {
        for g in self.all() {
            g.give_back_leases().await;
        }
        self.budgets.settle_slices().await;
    }

    /// The prices requests are charged at now.
    pub fn prices(&self) -> Arc<keypool_pricing::Prices> {
        self.prices.load_full()
    }

    pub fn set_prices(&self, prices: Arc<keypool_pricing::Prices>) {
        self.prices.store(prices);
    }

    pub fn get(&self, name: &str) -> Option<Arc<GatewayRuntime>> {
        self.map.load().get(name).cloned()
    }

    /// Every gateway, by name.
    pub fn all(&self) -> Vec<Arc<GatewayRuntime>> {
        let mut v: Vec<_> = self.map.load().values().cloned().collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// Installs a new set of specs atomically; a gateway that keeps its name keeps its state.
    pub fn replace(&self, specs: &[Arc<Gateway>]) {
        self.map.rcu(|old| {
            let mut next = ByName::with_capacity_and_hasher(
                specs.len(),
                foldhash::fast::RandomState::default(),
            );
            for spec in specs {
                let previous = old.get(&spec.name);
                let state = previous.map_or_else(
                    || {
                        Arc::new(GatewayState::new(
                            self.shared.clone().map(|s| (s, spec.name.clone())),
                        ))
                    },
                    |r| r.state.clone(),
                );
                next.insert(
                    spec.name.clone(),
                    Arc::new(GatewayRuntime::with_state(
                        spec.clone(),
                        (state, previous.map(|r| &**r)),
                        self.telemetry.clone(),
                        self.lease,
                    )),
                );
            }
            next
        });
    }
}
