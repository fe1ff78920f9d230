//! The frontends a control plane has heard from (`WatchConfig`, `PublishUsage`): for
//! `GetStatus`. Not configuration: each contact notes itself here, outside the owner task.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use crate::now_ms;

/// A `keypool frontend` as the control plane last heard of it.
#[derive(Debug, Clone, Default)]
pub struct FrontendSeen {
    pub address: String,
    pub last_seen_ms: i64,
    pub config_version: u64,
    /// Whether its `WatchConfig` stream is open.
    pub watching: bool,
}

/// The frontends seen, by replica id.
#[derive(Debug, Default)]
pub struct Frontends(Mutex<BTreeMap<String, FrontendSeen>>);

impl Frontends {
    /// Notes a frontend as seen now (an empty address or a zero version keeps what was known;
    /// `watching` changes only when given).
    pub fn saw(&self, id: &str, address: &str, version: u64, watching: Option<bool>) {
        if id.is_empty() {
            return;
        }
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let f = seen.entry(id.to_owned()).or_default();
        if !address.is_empty() {
            address.clone_into(&mut f.address);
        }
        f.last_seen_ms = now_ms();
        if version > 0 {
            f.config_version = version;
        }
        if let Some(w) = watching {
            f.watching = w;
        }
    }

    /// The frontends watching now or heard from in the last `within_ms`, by id (a watching
    /// one counts as seen now).
    pub fn recent(&self, within_ms: i64) -> Vec<(String, FrontendSeen)> {
        let now = now_ms();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, f)| f.watching || now - f.last_seen_ms <= within_ms)
            .map(|(id, f)| {
                let mut f = f.clone();
                if f.watching {
                    f.last_seen_ms = now;
                }
                (id.clone(), f)
            })
            .collect()
    }
}
