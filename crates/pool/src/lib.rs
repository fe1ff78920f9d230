//! The key pool: one [`KeyActor`] per upstream key and a [`KeyPool`] supervisor that picks keys.
//!
//! Lifecycle: [`KeyPool::start`] (on an actix arbiter) starts the key actors and returns a
//! [`PoolHandle`]. The request path calls [`PoolHandle::pick`] and gets a [`Lease`] on one key
//! with its budget reserved, or a [`NoKey`] saying why none is usable (and until when). After the
//! attempt it settles the lease with an [`Outcome`], which updates the key's counters, health and
//! token window.
//!
//! Eligibility: enabled, not cooling down, model and caller allowed, and rpm/tpm budget left in the
//! trailing 60 s window ([`RateWindow`]). Selection order: see [`select::rank`].

pub mod key;
pub mod messages;
mod pool;
pub mod select;
pub mod tally;
pub mod window;

pub use key::{Health, KeyActor, KeyCounters, KeySeed, KeyState};
pub use keypool_shared::{
    Admit, Granted, HealthEvent, InMemory, LeaseReq, Picked, RedisState, SessionReq, SharedError,
    SharedState, Stick, TokenReq, WindowReq,
};
pub use messages::{
    AddKey, BusyCause, ListKeys, NoKey, Outcome, PoolError, RemoveKey, SetEnabled, UpdateKey,
};
pub use pool::{KeyAccess, KeyPool, Lease, PIN_TTL, Pick, PoolHandle, PoolView};
pub use window::RateWindow;

#[cfg(test)]
mod tests;
