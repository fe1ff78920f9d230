//! Bringing the running gateways and keys in line: with the store at start-up and after another
//! replica's change, with a control plane's snapshot on a frontend; and the snapshot itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keypool_config::raw::RawUpstream;
use keypool_config::{Config, RawGateway, UpstreamKey, validate_gateway, validate_key};
use keypool_proto::admin::v1 as pb;
use keypool_store::{KeyRow, Store};

use crate::keys::key_summary;
use crate::{
    Control, ControlError, DefaultGateway, GatewayEntry, KeyEntry, OWNER_ADMIN, OWNER_CONFIG, lock,
    now_ms,
};

impl Control {
    pub(crate) async fn restore(&self, store: &Store) -> Result<(), ControlError> {
        // admin-owned gateways come back; the file's are (re)written as config-owned
        for row in store.gateways().await? {
            let config_owned = lock(&self.gateway_entries)
                .get(&row.name)
                .is_some_and(|e| e.owner == OWNER_CONFIG);
            if config_owned {
                continue;
            }
            if row.owner == OWNER_CONFIG {
                // declared by a previous file, not by this one
                store.delete_gateway(&row.name).await?;
                continue;
            }
            let raw: RawGateway = match serde_json::from_str(&row.spec) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(gateway = %row.name, error = %e, "stored gateway unreadable; skipped");
                    continue;
                }
            };
            lock(&self.gateway_entries).insert(
                row.name.clone(),
                GatewayEntry {
                    raw,
                    owner: OWNER_ADMIN,
                    updated_ms: row.updated_ms,
                },
            );
        }
        let entries: Vec<GatewayEntry> = lock(&self.gateway_entries).values().cloned().collect();
        for e in entries.iter().filter(|e| e.owner == OWNER_CONFIG) {
            store
                .save_gateway(
                    e.raw.name.as_deref().unwrap_or_default(),
                    &serde_json::to_string(&e.raw)?,
                    OWNER_CONFIG,
                )
                .await?;
        }
        self.apply_gateways()?;

        let stored: BTreeMap<String, KeyRow> = store
            .keys()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        // config keys: stored as config-owned; an admin's `enabled: false` survives the restart
        let config_keys: Vec<KeyEntry> = lock(&self.key_entries).values().cloned().collect();
        for e in config_keys {
            let enabled = stored
                .get(&*e.key.name)
                .is_none_or(|r| r.owner != OWNER_CONFIG || r.enabled);
            if !enabled {
                let _ = self.pool.set_enabled(&e.key.name, false).await;
                if let Some(entry) = lock(&self.key_entries).get_mut(&*e.key.name) {
                    entry.enabled = false;
                }
            }
            store
                .save_key(&KeyRow {
                    name: e.key.name.to_string(),
                    spec: key_summary(&e.key).to_string(),
                    sealed_secret: None,
                    owner: OWNER_CONFIG.to_owned(),
                    enabled,
                    updated_ms: stored.get(&*e.key.name).map_or(0, |r| r.updated_ms),
                })
                .await?;
        }
        for row in stored.values() {
            if lock(&self.key_entries).contains_key(&row.name) {
                continue;
            }
            if row.owner == OWNER_CONFIG {
                store.delete_key(&row.name).await?;
                continue;
            }
            self.apply_stored_key(row).await;
        }
        Ok(())
    }

    /// Starts using an admin key from the store (unsealing its secret), with its enabled flag.
    async fn apply_stored_key(&self, row: &KeyRow) {
        let (key, raw) = match self.unseal_key(row) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(key = %row.name, error = %e, "stored key not applied");
                return;
            }
        };
        let key = Arc::new(key);
        if let Err(e) = self.pool.add_key(key.clone()).await {
            tracing::error!(key = %row.name, error = %e, "stored key not applied");
            return;
        }
        if !row.enabled {
            let _ = self.pool.set_enabled(&row.name, false).await;
        }
        lock(&self.key_entries).insert(
            row.name.clone(),
            KeyEntry {
                key,
                owner: OWNER_ADMIN,
                enabled: row.enabled,
                raw: Some(raw),
            },
        );
    }

    fn unseal_key(&self, row: &KeyRow) -> Result<(UpstreamKey, RawUpstream), ControlError> {
        let mut raw: RawUpstream = serde_json::from_str(&row.spec)?;
        let sealed = row
            .sealed_secret
            .as_deref()
            .ok_or_else(|| ControlError::Precondition("no sealed secret".to_owned()))?;
        let key = self.config.admin.secret_key.as_ref().ok_or_else(|| {
            ControlError::Precondition("admin.secret_key is not set: cannot unseal".to_owned())
        })?;
        raw.sk = Some(crate::seal::open(key, sealed)?);
        let validated = validate_key(raw.clone(), &self.config).map_err(ControlError::Invalid)?;
        raw.sk = None;
        Ok((validated, raw))
    }

    /// Applies what another replica changed: re-reads the admin state from the store and brings
    /// the running gateways and keys in line (without writing anything back).
    pub async fn reload(&self) -> Result<(), ControlError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let rows = store.gateways().await?;
        {
            let mut entries = lock(&self.gateway_entries);
            entries.retain(|_, e| e.owner == OWNER_CONFIG);
            for row in rows.iter().filter(|r| r.owner == OWNER_ADMIN) {
                if entries.contains_key(&row.name) {
                    continue;
                }
                match serde_json::from_str::<RawGateway>(&row.spec) {
                    Ok(raw) => {
                        entries.insert(
                            row.name.clone(),
                            GatewayEntry {
                                raw,
                                owner: OWNER_ADMIN,
                                updated_ms: row.updated_ms,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(gateway = %row.name, error = %e, "stored gateway unreadable");
                    }
                }
            }
        }
        self.apply_gateways()?;
        let rows = store.keys().await?;
        let local = self.key_entries();
        for row in &rows {
            match local.iter().find(|e| *e.key.name == row.name) {
                Some(e) => {
                    if e.owner == OWNER_ADMIN
                        && serde_json::to_string(&e.raw).ok().as_deref() != Some(row.spec.as_str())
                        && let Ok((key, raw)) = self.unseal_key(row)
                    {
                        let key = Arc::new(key);
                        let _ = self.pool.update_key(key.clone()).await;
                        if let Some(entry) = lock(&self.key_entries).get_mut(&row.name) {
                            entry.key = key;
                            entry.raw = Some(raw);
                        }
                    }
                    if e.enabled != row.enabled {
                        let _ = self.pool.set_enabled(&row.name, row.enabled).await;
                        if let Some(entry) = lock(&self.key_entries).get_mut(&row.name) {
                            entry.enabled = row.enabled;
                        }
                    }
                }
                None if row.owner == OWNER_ADMIN => self.apply_stored_key(row).await,
                None => {}
            }
        }
        for e in local.iter().filter(|e| e.owner == OWNER_ADMIN) {
            if !rows.iter().any(|r| r.name == *e.key.name) {
                lock(&self.key_entries).remove(&*e.key.name);
                let (pool, name, grace) = (
                    self.pool.clone(),
                    e.key.name.clone(),
                    self.config.shutdown_grace,
                );
                tokio::spawn(async move { pool.remove_key(&name, grace).await });
            }
        }
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        self.refresh_default();
        self.changed.send_replace(version);
        Ok(())
    }

    /// Rebuilds the `default` gateway from its policy and the keys now in use (their own
    /// `authorization` tokens and `noauth` flags count).
    pub fn refresh_default(&self) {
        if let Err(e) = self.apply_gateways() {
            tracing::error!(error = %e, "gateways not refreshed");
        }
    }

    /// The whole configuration a frontend needs, as `WatchConfig` sends it: the top-level
    /// policy, every key (secrets included) with the disabled ones named, every gateway
    /// (secrets hashed).
    pub fn snapshot(&self) -> pb::ConfigSnapshot {
        let keys = self.key_entries();
        pb::ConfigSnapshot {
            version: self.version(),
            policy: Some(pb::Policy::from(&*self.config.policy)),
            upstreams: keys
                .iter()
                .map(|e| pb::UpstreamSpec::from(&e.key.to_raw()))
                .collect(),
            disabled: keys
                .iter()
                .filter(|e| !e.enabled)
                .map(|e| e.key.name.to_string())
                .collect(),
            gateways: self
                .gateway_entries()
                .iter()
                .map(|e| pb::GatewaySpec::from(&e.raw))
                .collect(),
        }
    }

    /// A frontend's side of [`Control::snapshot`]: brings the running gateways and keys in line
    /// with `config` (validated from a snapshot) at once. In-flight requests keep what they
    /// started with; removed keys drain first.
    pub async fn apply_snapshot(
        &self,
        config: &Config,
        disabled: &std::collections::HashSet<String>,
        version: u64,
    ) -> Result<(), ControlError> {
        *lock(&self.default_gateway) = DefaultGateway::of(config);
        {
            let mut entries = lock(&self.gateway_entries);
            entries.clear();
            for raw in &config.raw_gateways {
                entries.insert(
                    raw.name.clone().unwrap_or_default(),
                    GatewayEntry {
                        raw: raw.clone(),
                        owner: OWNER_ADMIN,
                        updated_ms: now_ms(),
                    },
                );
            }
        }
        self.apply_gateways()?;
        let local = self.key_entries();
        for key in &config.upstreams {
            let enabled = !disabled.contains(&*key.name);
            let was = local.iter().find(|e| e.key.name == key.name);
            match was {
                None => {
                    if let Err(e) = self.pool.add_key(key.clone()).await {
                        tracing::error!(key = %key.name, error = %e, "pushed key not applied");
                        continue;
                    }
                }
                Some(e) if e.key.to_raw() != key.to_raw() => {
                    let _ = self.pool.update_key(key.clone()).await;
                }
                Some(_) => {}
            }
            // a new key starts enabled
            if was.map_or(!enabled, |e| e.enabled != enabled) {
                let _ = self.pool.set_enabled(&key.name, enabled).await;
            }
            lock(&self.key_entries).insert(
                key.name.to_string(),
                KeyEntry {
                    key: key.clone(),
                    owner: OWNER_ADMIN,
                    enabled,
                    raw: None,
                },
            );
        }
        for e in &local {
            if !config.upstreams.iter().any(|k| k.name == e.key.name) {
                lock(&self.key_entries).remove(&*e.key.name);
                let (pool, name, grace) = (
                    self.pool.clone(),
                    e.key.name.clone(),
                    self.config.shutdown_grace.max(Duration::from_secs(1)),
                );
                tokio::spawn(async move { pool.remove_key(&name, grace).await });
            }
        }
        self.version.store(version, Ordering::Relaxed);
        self.refresh_default();
        self.changed.send_replace(version);
        Ok(())
    }

    /// Validates every gateway entry and installs them, with the `default` gateway, in the
    /// running gateway at once.
    pub(crate) fn apply_gateways(&self) -> Result<(), ControlError> {
        let keys: Vec<Arc<UpstreamKey>> = self.key_entries().into_iter().map(|e| e.key).collect();
        let default = {
            let d = lock(&self.default_gateway);
            Arc::new(d.spec.with_client_tokens(&d.client_tokens, &keys))
        };
        let entries = lock(&self.gateway_entries);
        let mut specs = Vec::with_capacity(entries.len() + 1);
        specs.push(default);
        for (i, e) in entries.values().enumerate() {
            let g = validate_gateway(&e.raw, &format!("gateways[{i}]"))
                .map_err(ControlError::Invalid)?;
            specs.push(Arc::new(g));
        }
        self.gateways.replace(&specs);
        Ok(())
    }
}
