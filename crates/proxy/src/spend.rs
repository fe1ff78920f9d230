//! What a request costs and what it may spend: its usage at its model's price (a key's own
//! prices, then the config's, then the built-in catalog), or nothing for a model without one
//! (counted, and warned about once per model: never priced at 0); and its holds against the
//! USD budgets it falls under, settled to that cost when it ends.

use std::sync::Arc;

use keypool_policy::budget::{Budgets, Hold};
use keypool_pricing::{Cost, KeyPricing, Prices};
use keypool_types::Usage;

/// A request's prices and budget holds.
pub struct Spending {
    pub prices: Arc<Prices>,
    pub budgets: Arc<Budgets>,
    /// Held against the gateway's and the caller's budgets before forwarding.
    pub hold: Option<Hold>,
    /// Held against the key of the current attempt's budget.
    pub key_hold: Option<Hold>,
    /// The current attempt's key's own prices.
    pub key_pricing: Option<Arc<KeyPricing>>,
}

impl Spending {
    pub fn new(prices: Arc<Prices>, budgets: Arc<Budgets>) -> Self {
        Self {
            prices,
            budgets,
            hold: None,
            key_hold: None,
            key_pricing: None,
        }
    }

    /// The cost of `usage` for `model` on the current key; `None` for a model without a price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<Cost> {
        let cost = self.prices.cost(model, usage, self.key_pricing.as_deref());
        if cost.is_none() {
            unpriced(self.budgets.telemetry(), model);
        }
        cost
    }

    /// Settles every hold to `spent` nano-dollars.
    pub fn settle(&mut self, spent: u64) {
        for hold in [self.hold.take(), self.key_hold.take()]
            .into_iter()
            .flatten()
        {
            hold.settle(spent);
        }
    }
}

/// A request's estimated cost in nano-dollars, for its budget holds: the prompt's estimate
/// plus its `max_tokens` (or `completion_estimate`) at the model's price; 0 without a price.
pub fn estimate(
    prices: &Prices,
    model: &str,
    prompt: u64,
    completion: u64,
    key: Option<&KeyPricing>,
) -> u64 {
    let usage = Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        ..Usage::default()
    };
    prices.cost(model, &usage, key).map_or(0, Cost::nanos)
}

fn unpriced(telemetry: &keypool_telemetry::Telemetry, model: &str) {
    if telemetry.metrics().unpriced(model) {
        tracing::warn!(
            model,
            "no price for this model in the catalog: its cost is left empty, not 0"
        );
    }
}
