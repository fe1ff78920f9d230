//! [`Catalog`]: model names and globs to prices, from YAML (the built-in `catalog.yaml`, or a
//! config's `pricing:` list of the same entries).

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::{PerToken, Price};

/// A mistake in a catalog, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog is not valid YAML: {0}")]
    Yaml(String),
    #[error("{at}: {why}")]
    Entry { at: String, why: String },
}

/// One catalog entry as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// Exact names or globs.
    pub models: Vec<String>,
    #[serde(flatten)]
    pub prices: RawTier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<RawAbove>,
}

/// Prices, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RawTier {
    pub input: f64,
    pub output: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_5m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<f64>,
}

/// A context-length tier.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RawAbove {
    pub tokens: u64,
    #[serde(flatten)]
    pub prices: RawTier,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    models: Vec<RawPrice>,
}

/// The most a price may be: a million dollars per million tokens.
const MAX_USD_PER_MILLION: f64 = 1_000_000.0;

/// USD per million tokens as pico-dollars per token (six decimal places kept).
fn per_token(usd_per_million: f64, at: &str, field: &str) -> Result<PerToken, CatalogError> {
    if !usd_per_million.is_finite() || !(0.0..=MAX_USD_PER_MILLION).contains(&usd_per_million) {
        return Err(CatalogError::Entry {
            at: at.to_owned(),
            why: format!(
                "{field} must be between 0 and {MAX_USD_PER_MILLION} (USD per million tokens)"
            ),
        });
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((usd_per_million * 1e6).round() as PerToken)
}

fn tier(raw: &RawTier, at: &str) -> Result<Price, CatalogError> {
    let input = per_token(raw.input, at, "input")?;
    let or_input = |v: Option<f64>, field: &str| v.map_or(Ok(input), |v| per_token(v, at, field));
    Ok(Price {
        input,
        output: per_token(raw.output, at, "output")?,
        cached_input: or_input(raw.cached_input, "cached_input")?,
        cache_write_5m: or_input(raw.cache_write_5m, "cache_write_5m")?,
        cache_write_1h: or_input(raw.cache_write_1h, "cache_write_1h")?,
        above: None,
    })
}

impl RawPrice {
    /// The price this entry gives (`at` names it in errors).
    pub fn price(&self, at: &str) -> Result<Price, CatalogError> {
        let mut p = tier(&self.prices, at)?;
        if let Some(above) = &self.above {
            p.above = Some((
                above.tokens,
                Box::new(tier(&above.prices, &format!("{at}.above"))?),
            ));
        }
        if self.models.is_empty() {
            return Err(CatalogError::Entry {
                at: at.to_owned(),
                why: "names no model".into(),
            });
        }
        Ok(p)
    }
}

/// Prices by model.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    prices: Vec<Price>,
    /// Exact names (hashed seeded per process: cheaper than SipHash on every request).
    exact: HashMap<String, usize, foldhash::fast::RandomState>,
    /// In file order: the first that matches wins.
    globs: Vec<(String, usize)>,
}

static BUILTIN: LazyLock<Catalog> = LazyLock::new(|| {
    // a test parses the same text: a broken catalog fails the build's tests, not a start
    Catalog::parse(include_str!("../catalog.yaml")).unwrap_or_default()
});

impl Catalog {
    /// The catalog that ships with keypool (`crates/pricing/catalog.yaml`).
    pub fn builtin() -> &'static Self {
        &BUILTIN
    }

    /// A catalog file (`models:` and its entries).
    pub fn parse(yaml: &str) -> Result<Self, CatalogError> {
        let raw: RawCatalog =
            serde_norway::from_str(yaml).map_err(|e| CatalogError::Yaml(e.to_string()))?;
        Self::from_entries(&raw.models, "models")
    }

    /// Entries as a config's `pricing:` list holds them (`path` names the list in errors).
    pub fn from_entries(entries: &[RawPrice], path: &str) -> Result<Self, CatalogError> {
        let mut c = Self::default();
        for (i, e) in entries.iter().enumerate() {
            let at = format!("{path}[{i}]");
            c.prices.push(e.price(&at)?);
            let n = c.prices.len() - 1;
            for m in &e.models {
                if m.contains('*') {
                    c.globs.push((m.clone(), n));
                } else {
                    // the first entry naming a model wins, as among globs
                    c.exact.entry(m.clone()).or_insert(n);
                }
            }
        }
        Ok(c)
    }

    /// The price of `model`: the first entry naming it exactly, else the first glob that
    /// matches.
    pub fn price(&self, model: &str) -> Option<&Price> {
        let i = self.exact.get(model).copied().or_else(|| {
            self.globs
                .iter()
                .find(|(g, _)| crate::glob::matches(g, model))
                .map(|(_, i)| *i)
        })?;
        self.prices.get(i)
    }

    /// How many entries it has.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}
