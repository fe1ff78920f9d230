//! Prices set through the admin API (`SetPrices`): a `pricing:` list kept in the store, in
//! force before the config file's (`pricing:`) and the built-in catalog. Frontends get the two
//! lists as one, the admin API's first, in their snapshot's policy.

use std::sync::Arc;

use keypool_config::FieldError;
use keypool_pricing::{Catalog, CatalogError, Prices, RawPrice};
use keypool_store::Store;

use crate::owner::{Command, Owner};
use crate::{Control, ControlError, State, now_ms};

/// What the store's settings row for the admin API's prices is named.
const SETTING: &str = "pricing";

/// The admin API's prices and when they were last set (0: never).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdminPrices {
    pub entries: Vec<RawPrice>,
    pub updated_ms: i64,
}

fn checked(entries: &[RawPrice]) -> Result<Catalog, ControlError> {
    Catalog::from_entries(entries, "pricing").map_err(|e| {
        let (path, reason) = match e {
            CatalogError::Entry { at, why } => (at, why),
            CatalogError::Yaml(why) => ("pricing".to_owned(), why),
        };
        ControlError::Invalid(vec![FieldError { path, reason }])
    })
}

impl State {
    /// The prices in force before the built-in catalog: the admin API's, then the file's (the
    /// first entry naming a model wins).
    pub fn pricing_in_force(&self) -> Vec<RawPrice> {
        let mut all = self.prices.entries.clone();
        all.extend(self.config.policy.pricing.iter().cloned());
        all
    }
}

impl Control {
    /// The admin API's prices.
    pub fn admin_prices(&self) -> AdminPrices {
        self.state.load().prices.clone()
    }

    /// The prices in force before the built-in catalog.
    pub fn pricing_in_force(&self) -> Vec<RawPrice> {
        self.state.load().pricing_in_force()
    }

    /// Replaces the admin API's prices (an empty list clears them): checked, stored, charged
    /// from the next request on, and pushed to frontends and the other replicas.
    pub async fn set_prices(
        &self,
        who: &str,
        entries: Vec<RawPrice>,
    ) -> Result<AdminPrices, ControlError> {
        self.ask(who, |reply| Command::SetPrices { entries, reply })
            .await
    }
}

impl Owner {
    pub(crate) async fn set_prices(
        &mut self,
        entries: Vec<RawPrice>,
    ) -> Result<AdminPrices, ControlError> {
        checked(&entries)?;
        let updated_ms = match &self.store {
            Some(s) => {
                s.save_setting(SETTING, &serde_json::to_string(&entries)?)
                    .await?
            }
            None => now_ms(),
        };
        let set = AdminPrices {
            entries,
            updated_ms,
        };
        self.state.prices = set.clone();
        self.apply_prices();
        self.bump();
        Ok(set)
    }

    /// Reads the admin API's prices from the store (start-up, another replica's change); a row
    /// that does not parse is logged and the running prices kept.
    pub(crate) async fn read_prices(&mut self, store: &Store) -> Result<(), ControlError> {
        let Some((value, updated_ms)) = store.setting(SETTING).await? else {
            return Ok(());
        };
        match serde_json::from_str::<Vec<RawPrice>>(&value)
            .map_err(ControlError::from)
            .and_then(|entries| checked(&entries).map(|_| entries))
        {
            Ok(entries) => {
                self.state.prices = AdminPrices {
                    entries,
                    updated_ms,
                };
            }
            Err(e) => tracing::error!(error = %e, "stored prices not applied"),
        }
        Ok(())
    }

    /// Charges the prices in force from the next request on.
    pub(crate) fn apply_prices(&self) {
        match checked(&self.state.pricing_in_force()) {
            Ok(catalog) => self.gateways.set_prices(Arc::new(Prices::new(catalog))),
            // each list was checked on its own; together they cannot fail
            Err(e) => tracing::error!(error = %e, "prices not applied"),
        }
    }
}
