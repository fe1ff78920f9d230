//! What a request cost: its usage at its model's price (`keypool_pricing`), or nothing for a
//! model without one (counted, and warned about once per model: never priced at 0).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, PoisonError};

use keypool_pricing::{Catalog, Cost};
use keypool_types::Usage;

/// Models already warned about.
static UNPRICED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Mutex::default);

/// The most models warned about (then only counted): a client naming endless models must not
/// grow this set without bound.
const MAX_WARNED: usize = 1000;

/// The cost of `usage` for `model` at the built-in catalog's prices; `None` for a model
/// without a price.
pub fn cost(model: &str, usage: &Usage) -> Option<Cost> {
    let Some(price) = Catalog::builtin().price(model) else {
        unpriced(model);
        return None;
    };
    Some(keypool_pricing::cost(price, usage))
}

fn unpriced(model: &str) {
    keypool_telemetry::metrics().unpriced.inc();
    let mut warned = UNPRICED.lock().unwrap_or_else(PoisonError::into_inner);
    if warned.len() < MAX_WARNED && warned.insert(model.to_owned()) {
        tracing::warn!(
            model,
            "no price for this model in the catalog: its cost is left empty, not 0"
        );
    }
}
