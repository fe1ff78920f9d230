//! Prices and costs: what one request cost, in exact decimal USD.
//!
//! A [`Catalog`] maps model names (exact, or globs with `*`) to a [`Price`]: USD per million
//! tokens for input, output, cache reads and cache writes (five-minute and one-hour), with an
//! optional context-length tier (prices for prompts above a number of tokens). The built-in
//! catalog ([`Catalog::builtin`], `catalog.yaml`, its source and date at its top) ships with the
//! binary. [`cost`] prices a [`Usage`]: the cache counts are parts of the prompt (see
//! `keypool_types::Usage`), so the uncached input is what is left of the prompt after them, and
//! no token is priced twice.
//!
//! Money is counted in pico-dollars (10⁻¹² USD) as integers: a price of at most six decimal
//! places per million tokens is a whole number of pico-dollars per token, so a cost is exact,
//! with no float drift however many requests are added up.

mod catalog;
mod glob;

pub use catalog::{Catalog, CatalogError, RawAbove, RawPrice, RawTier};

use keypool_types::Usage;

/// Pico-dollars (10⁻¹² USD) per token: USD per million tokens × 10⁶.
pub type PerToken = u64;

/// Prices for one model (or one tier of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub input: PerToken,
    pub output: PerToken,
    /// A token read from the prompt cache.
    pub cached_input: PerToken,
    /// A token written to the cache for five minutes / for an hour.
    pub cache_write_5m: PerToken,
    pub cache_write_1h: PerToken,
    /// Prices for prompts of more than this many tokens.
    pub above: Option<(u64, Box<Price>)>,
}

impl Price {
    /// This price times `factor` (a discounted or marked-up key), each per-token price rounded
    /// to the nearest pico-dollar.
    #[must_use]
    pub fn scaled(&self, factor: f64) -> Self {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let s = |p: PerToken| (p as f64 * factor).round().max(0.0) as PerToken;
        Self {
            input: s(self.input),
            output: s(self.output),
            cached_input: s(self.cached_input),
            cache_write_5m: s(self.cache_write_5m),
            cache_write_1h: s(self.cache_write_1h),
            above: self
                .above
                .as_ref()
                .map(|(t, p)| (*t, Box::new(p.scaled(factor)))),
        }
    }

    /// The prices that apply to a prompt of `prompt_tokens`.
    fn tier(&self, prompt_tokens: u64) -> &Self {
        match &self.above {
            Some((threshold, p)) if prompt_tokens > *threshold => p.tier(prompt_tokens),
            _ => self,
        }
    }
}

/// An amount of money, in pico-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cost(pub u128);

impl Cost {
    /// Pico-dollars in one dollar.
    pub const PICO_PER_USD: u128 = 1_000_000_000_000;

    /// Whole dollars of `usd` (for budgets written in dollars).
    pub fn usd(usd: u64) -> Self {
        Self(u128::from(usd) * Self::PICO_PER_USD)
    }

    /// The amount in nano-dollars (what budgets count), rounded half up.
    pub fn nanos(self) -> u64 {
        u64::try_from(self.0.saturating_add(500) / 1000).unwrap_or(u64::MAX)
    }

    /// The amount in dollars as a float, for metrics (which are floats anyway).
    #[allow(clippy::cast_precision_loss)]
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::PICO_PER_USD as f64
    }
}

impl std::ops::Add for Cost {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

/// Decimal dollars, without trailing zeros: `0.00202`, `12`, `0.000000000001`.
impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.decimal().as_str())
    }
}

impl Cost {
    /// [`Cost`]'s decimal text in a buffer of its own, written digit by digit without the
    /// formatting machinery or an allocation (it is written for every answer's
    /// `x-keypool-cost`; `to_string` cost ~1,000 instructions a request, most of them
    /// dividing a `u128`).
    pub fn decimal(self) -> Decimal {
        let mut buf = [b'0'; Decimal::MAX];
        let mut at = buf.len();
        // right to left
        let mut push = |byte: u8| {
            at -= 1;
            buf[at] = byte;
        };
        // below 10^12: a u64, whose division is a machine instruction (u128's is a call)
        let mut frac = u64::try_from(self.0 % Self::PICO_PER_USD).unwrap_or(0);
        if frac != 0 {
            // twelve digits, those after the last significant one left out
            let mut significant = false;
            for _ in 0..12 {
                significant |= frac % 10 != 0;
                if significant {
                    push(ascii_digit(frac));
                }
                frac /= 10;
            }
            push(b'.');
        }
        let mut whole = self.0 / Self::PICO_PER_USD;
        // past a u64 (never, in practice) the low digits by u128 division, then by u64's
        let mut whole = loop {
            if let Ok(small) = u64::try_from(whole) {
                break small;
            }
            push(ascii_digit(u64::try_from(whole % 10).unwrap_or(0)));
            whole /= 10;
        };
        loop {
            push(ascii_digit(whole));
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        Decimal { buf, start: at }
    }
}

/// `n`'s last decimal digit, in ASCII.
fn ascii_digit(n: u64) -> u8 {
    b'0' + u8::try_from(n % 10).unwrap_or(0)
}

/// A [`Cost`] written as decimal dollars ([`Cost::decimal`]).
pub struct Decimal {
    buf: [u8; Decimal::MAX],
    start: usize,
}

impl Decimal {
    /// The longest: a `u128`'s 39 digits of pico-dollars, a point.
    const MAX: usize = 40;

    pub fn as_str(&self) -> &str {
        // ASCII digits and a point
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or_default()
    }
}

/// A key's own prices: its `pricing:` entries, or a multiplier on the prices that would apply
/// (a discounted key: `price_multiplier: 0.8`).
#[derive(Debug, Clone, Default)]
pub struct KeyPricing {
    pub catalog: Catalog,
    /// The entries `catalog` was made from, as written (what the key's spec shows).
    pub raw: Vec<RawPrice>,
    /// Parts per million (`0.8` is 800 000): applied to the cost, in integers.
    pub multiplier_ppm: Option<u64>,
}

/// The largest `price_multiplier`.
pub const MAX_MULTIPLIER: f64 = 1000.0;

impl KeyPricing {
    /// A multiplier as written (`0.8`), checked: between 0 and [`MAX_MULTIPLIER`].
    pub fn multiplier(factor: f64) -> Option<u64> {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        (factor.is_finite() && (0.0..=MAX_MULTIPLIER).contains(&factor))
            .then(|| (factor * 1e6).round() as u64)
    }

    /// The multiplier as written (`0.8`).
    #[allow(clippy::cast_precision_loss)]
    pub fn factor(&self) -> Option<f64> {
        self.multiplier_ppm.map(|p| p as f64 / 1e6)
    }
}

/// The prices this process charges at: a key's own, then the overrides (the admin API's list,
/// then the config's `pricing:`), then the built-in catalog (each looked up by the model the
/// request named).
#[derive(Debug, Clone, Default)]
pub struct Prices {
    pub overrides: Catalog,
}

impl Prices {
    pub fn new(overrides: Catalog) -> Self {
        Self { overrides }
    }

    /// The price of `model` served by a key with `key`'s pricing.
    pub fn price<'a>(&'a self, model: &str, key: Option<&'a KeyPricing>) -> Option<&'a Price> {
        key.and_then(|k| k.catalog.price(model))
            .or_else(|| self.overrides.price(model))
            .or_else(|| Catalog::builtin().price(model))
    }

    /// What `usage` of `model` cost on a key with `key`'s pricing; `None` without a price.
    pub fn cost(&self, model: &str, usage: &Usage, key: Option<&KeyPricing>) -> Option<Cost> {
        let c = cost(self.price(model, key)?, usage);
        Some(match key.and_then(|k| k.multiplier_ppm) {
            // rounded half up to the pico-dollar
            Some(ppm) => Cost((c.0 * u128::from(ppm) + 500_000) / 1_000_000),
            None => c,
        })
    }
}

/// What `usage` cost at `price`: uncached input, cache reads, five-minute and one-hour cache
/// writes, and output, each at its price (the prompt's tier chosen by its whole size).
pub fn cost(price: &Price, usage: &Usage) -> Cost {
    let p = price.tier(usage.prompt_tokens);
    let read = usage.cache_read_tokens.min(usage.prompt_tokens);
    let written = usage.cache_write_tokens.min(usage.prompt_tokens - read);
    let written_1h = usage.cache_write_1h_tokens.min(written);
    let uncached = usage.prompt_tokens - read - written;
    let at = |tokens: u64, per: PerToken| u128::from(tokens) * u128::from(per);
    Cost(
        at(uncached, p.input)
            + at(read, p.cached_input)
            + at(written - written_1h, p.cache_write_5m)
            + at(written_1h, p.cache_write_1h)
            + at(usage.completion_tokens, p.output),
    )
}

#[cfg(test)]
mod tests;
