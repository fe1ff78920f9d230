//! Key changes through the admin API: add (sealed), update, enable/disable, remove.

use std::sync::Arc;

use keypool_config::raw::RawUpstream;
use keypool_config::{UpstreamKey, validate_key};
use keypool_store::KeyRow;

use crate::{
    Control, ControlError, KeyEntry, OWNER_ADMIN, OWNER_CONFIG, config_owned, invalid, lock,
};

impl Control {
    pub fn key_entries(&self) -> Vec<KeyEntry> {
        let entries = lock(&self.key_entries);
        // pool order: config order, then added keys
        let order = self.pool.keys();
        let mut out: Vec<KeyEntry> = order
            .iter()
            .filter_map(|k| entries.get(&*k.name).cloned())
            .collect();
        for e in entries.values() {
            if !out.iter().any(|o| o.key.name == e.key.name) {
                out.push(e.clone());
            }
        }
        out
    }

    pub fn key_entry(&self, name: &str) -> Option<KeyEntry> {
        lock(&self.key_entries).get(name).cloned()
    }

    pub(crate) async fn persist_key(
        &self,
        e: &KeyEntry,
        sealed: Option<String>,
    ) -> Result<(), ControlError> {
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

    /// Adds a key from a YAML/JSON `upstreams:` entry.
    pub async fn add_key(&self, mut raw: RawUpstream) -> Result<KeyEntry, ControlError> {
        let sealing = self.config.load().admin.secret_key.clone();
        let sk = raw.sk.clone().unwrap_or_default();
        if sk == "asis" {
            return Err(invalid(
                "upstream.sk",
                "asis keys come from the config file only",
            ));
        }
        let key = validate_key(raw.clone(), &self.config.load()).map_err(ControlError::Invalid)?;
        if self.key_entry(&key.name).is_some() {
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

    /// Changes a key's limits, allow/deny lists or enabled flag.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_key(
        &self,
        name: &str,
        rpm: Option<Option<u32>>,
        tpm: Option<Option<u64>>,
        allow: Option<Vec<String>>,
        deny: Option<Vec<String>>,
        enabled: Option<bool>,
    ) -> Result<KeyEntry, ControlError> {
        let mut entry = self
            .key_entry(name)
            .ok_or_else(|| ControlError::NotFound(format!("no key named {name:?}")))?;
        let mut key = (*entry.key).clone();
        if let Some(r) = rpm {
            if r == Some(0) {
                return Err(invalid("upstream.rpm", "must be at least 1 (or cleared)"));
            }
            key.rpm = r;
        }
        if let Some(t) = tpm {
            if t == Some(0) {
                return Err(invalid("upstream.tpm", "must be at least 1 (or cleared)"));
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

    /// Takes a key out of use, waits for its in-flight requests, forgets it.
    pub async fn remove_key(&self, name: &str) -> Result<(), ControlError> {
        match self.key_entry(name) {
            None => return Err(ControlError::NotFound(format!("no key named {name:?}"))),
            Some(e) if e.owner == OWNER_CONFIG => return Err(config_owned("key", name)),
            Some(_) => {}
        }
        // answered once the key's in-flight requests and streams finished
        for drain in self
            .change(|d| d.keys.retain(|k| *k.key.name != *name))
            .await?
        {
            let _ = drain.await;
        }
        if let Some(s) = &self.store {
            s.delete_key(name)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?;
        }
        self.bump();
        Ok(())
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
