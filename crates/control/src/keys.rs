//! Key changes through the admin API: add (sealed), update, enable/disable, remove.

use std::sync::Arc;

use keypool_config::raw::RawUpstream;
use keypool_config::{UpstreamKey, validate_key};
use keypool_store::KeyRow;

use keypool_pool::PoolHandle;

use crate::owner::{Command, Owner};
use crate::{
    Control, ControlError, KeyEntry, OWNER_ADMIN, OWNER_CONFIG, State, config_owned, invalid,
};

/// What `UpdateKey` changes: each field given is set (`Some(None)` clears a limit).
#[derive(Debug, Clone, Default)]
pub struct KeyChange {
    pub rpm: Option<Option<u32>>,
    pub tpm: Option<Option<u64>>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

impl State {
    /// The keys in pool order: config order, then added keys.
    pub fn key_entries(&self, pool: &PoolHandle) -> Vec<KeyEntry> {
        let order = pool.keys();
        let mut out: Vec<KeyEntry> = order
            .iter()
            .filter_map(|k| self.keys.get(&*k.name).cloned())
            .collect();
        for e in self.keys.values() {
            if !out.iter().any(|o| o.key.name == e.key.name) {
                out.push(e.clone());
            }
        }
        out
    }
}

impl Control {
    pub fn key_entries(&self) -> Vec<KeyEntry> {
        self.state.load().key_entries(&self.pool)
    }

    pub fn key_entry(&self, name: &str) -> Option<KeyEntry> {
        self.state.load().keys.get(name).cloned()
    }

    /// Adds a key from a YAML/JSON `upstreams:` entry.
    pub async fn add_key(&self, who: &str, raw: RawUpstream) -> Result<KeyEntry, ControlError> {
        self.ask(who, |reply| Command::AddKey {
            raw: Box::new(raw),
            reply,
        })
        .await
    }

    /// Changes a key's limits, allow/deny lists or enabled flag.
    pub async fn update_key(
        &self,
        who: &str,
        name: &str,
        change: KeyChange,
    ) -> Result<KeyEntry, ControlError> {
        self.ask(who, |reply| Command::UpdateKey {
            name: name.to_owned(),
            change,
            reply,
        })
        .await
    }

    /// Takes a key out of use, waits for its in-flight requests, forgets it.
    pub async fn remove_key(&self, who: &str, name: &str) -> Result<(), ControlError> {
        let drains = self
            .ask(who, |reply| Command::RemoveKey {
                name: name.to_owned(),
                reply,
            })
            .await?;
        // answered once the key's in-flight requests and streams finished
        for drain in drains {
            let _ = drain.await;
        }
        Ok(())
    }
}

impl Owner {
    async fn persist_key(&self, e: &KeyEntry, sealed: Option<String>) -> Result<(), ControlError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let (spec, sealed) = if e.owner == OWNER_CONFIG {
            (key_summary(&e.key).to_string(), None)
        } else {
            let spec =
                serde_json::to_string(&e.raw).map_err(|x| ControlError::Store(x.to_string()))?;
            let sealed = match sealed {
                Some(s) => Some(s),
                None => store
                    .keys()
                    .await
                    .map_err(|x| ControlError::Store(x.to_string()))?
                    .into_iter()
                    .find(|r| r.name == *e.key.name)
                    .and_then(|r| r.sealed_secret),
            };
            (spec, sealed)
        };
        store
            .save_key(&KeyRow {
                name: e.key.name.to_string(),
                spec,
                sealed_secret: sealed,
                owner: e.owner.to_owned(),
                enabled: e.enabled,
                updated_ms: 0,
            })
            .await
            .map_err(|x| ControlError::Store(x.to_string()))
    }

    pub(crate) async fn add_key(&mut self, mut raw: RawUpstream) -> Result<KeyEntry, ControlError> {
        let sealing = self.state.config.admin.secret_key.clone();
        let sk = raw.sk.clone().unwrap_or_default();
        if sk == "asis" {
            return Err(invalid(
                "upstream.sk",
                "asis keys come from the config file only",
            ));
        }
        let key = validate_key(raw.clone(), &self.state.config).map_err(ControlError::Invalid)?;
        if self.state.keys.contains_key(&*key.name) {
            return Err(ControlError::Exists(format!(
                "a key named {:?} exists",
                key.name
            )));
        }
        let sealed = match (&self.store, &sealing) {
            (Some(_), Some(k)) => {
                Some(crate::seal::seal(k, &sk).map_err(|e| ControlError::Store(e.to_string()))?)
            }
            (Some(_), None) => {
                return Err(ControlError::Precondition(
                    "set admin.secret_key (or KEYPOOL_SECRET_KEY) so that keypool can store upstream keys sealed".to_owned(),
                ));
            }
            (None, _) => None,
        };
        raw.sk = None;
        raw.name = Some(key.name.to_string());
        let key = Arc::new(key);
        let entry = KeyEntry {
            key: key.clone(),
            owner: OWNER_ADMIN,
            enabled: true,
            raw: Some(raw),
        };
        self.persist_key(&entry, sealed).await?;
        let added = entry.clone();
        self.change(|d| d.keys.push(added)).await?;
        self.bump();
        Ok(entry)
    }

    pub(crate) async fn update_key(
        &mut self,
        name: &str,
        change: KeyChange,
    ) -> Result<KeyEntry, ControlError> {
        let KeyChange {
            rpm,
            tpm,
            allow,
            deny,
            enabled,
        } = change;
        let mut entry = self
            .state
            .keys
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no key named {name:?}")))?;
        let mut key = (*entry.key).clone();
        if let Some(r) = rpm {
            if r == Some(0) {
                return Err(invalid("upstream.rpm", "must be at least 1 (or cleared)"));
            }
            key.rpm = r;
        }
        if let Some(t) = tpm {
            if t.is_some_and(|t| t == 0 || t > keypool_config::MAX_TPM) {
                return Err(invalid(
                    "upstream.tpm",
                    format!(
                        "must be between 1 and {} (or cleared)",
                        keypool_config::MAX_TPM
                    ),
                ));
            }
            key.tpm = t;
        }
        if let Some(a) = &allow {
            key.allow = a
                .iter()
                .map(|s| keypool_config::ModelRule::parse(s))
                .collect();
        }
        if let Some(d) = &deny {
            key.deny = d
                .iter()
                .map(|s| keypool_config::ModelRule::parse(s))
                .collect();
        }
        if let Some(raw) = entry.raw.as_mut() {
            if rpm.is_some() {
                raw.rpm = key.rpm;
            }
            if tpm.is_some() {
                raw.tpm = key.tpm;
            }
            if let Some(a) = allow {
                raw.allow = a;
            }
            if let Some(d) = deny {
                raw.deny = d;
            }
        }
        if let Some(en) = enabled {
            entry.enabled = en;
        }
        entry.key = Arc::new(key);
        self.persist_key(&entry, None).await?;
        self.change(|d| {
            for k in &mut d.keys {
                if *k.key.name == *name {
                    k.clone_from(&entry);
                }
            }
        })
        .await?;
        self.bump();
        Ok(entry)
    }

    /// Answers the key's drain: the caller waits for its in-flight requests, not the owner.
    pub(crate) async fn remove_key(
        &mut self,
        name: &str,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, ControlError> {
        match self.state.keys.get(name) {
            None => return Err(ControlError::NotFound(format!("no key named {name:?}"))),
            Some(e) if e.owner == OWNER_CONFIG => return Err(config_owned("key", name)),
            Some(_) => {}
        }
        let drains = self
            .change(|d| d.keys.retain(|k| *k.key.name != *name))
            .await?;
        if let Some(s) = &self.store {
            s.delete_key(name)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?;
        }
        self.bump();
        Ok(drains)
    }
}

/// What the store keeps of a config-owned key: its settings, never its secret.
pub(crate) fn key_summary(k: &UpstreamKey) -> serde_json::Value {
    serde_json::json!({
        "name": k.name,
        "endpoint": k.endpoint,
        "type": k.kind.as_str(),
        "rpm": k.rpm,
        "tpm": k.tpm,
    })
}
