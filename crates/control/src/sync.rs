//! Bringing the running gateways and keys in line: with the store at start-up and after another
//! replica's change, with a control plane's snapshot on a frontend; and the snapshot itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keypool_config::raw::RawUpstream;
use keypool_config::{Config, RawGateway, UpstreamKey, validate_gateway, validate_key};
use keypool_proto::admin::v1 as pb;
use keypool_store::{KeyRow, Store};

use crate::keys::key_summary;
use crate::owner::{Command, Owner};
use crate::{
    Control, ControlError, DefaultGateway, GatewayEntry, KeyEntry, OWNER_ADMIN, OWNER_CONFIG,
    now_ms,
};

/// What the running gateways and keys should be, for [`Control::reconcile`].
pub(crate) struct Desired {
    /// The `default` gateway's policy; `None` keeps the running one.
    pub default: Option<DefaultGateway>,
    /// Every named gateway, by name.
    pub gateways: BTreeMap<String, GatewayEntry>,
    /// Every key, in order, with its owner and `enabled`.
    pub keys: Vec<KeyEntry>,
}

impl Control {
    /// A reloaded config file (SIGHUP): its gateways and keys replace the config-owned ones,
    /// the admin-owned ones stay (a file entry of the same name wins, as at start-up), its
    /// top-level policy becomes the `default` gateway's; then the store is brought in line
    /// and frontends get the new snapshot. A gateway that does not validate refuses the whole
    /// file before anything changed.
    pub async fn apply_file(&self, config: Arc<Config>) -> Result<(), ControlError> {
        self.ask("config file (SIGHUP)", |reply| Command::ApplyFile {
            config,
            reply,
        })
        .await
    }

    /// Applies what another replica changed: re-reads the admin state from the store and brings
    /// the running gateways and keys in line (without writing anything back).
    pub async fn reload(&self) -> Result<(), ControlError> {
        self.ask("", |reply| Command::Reload { reply }).await
    }

    /// A frontend's side of [`Control::snapshot`]: brings the running gateways and keys in line
    /// with `config` (validated from a snapshot) at once.
    pub async fn apply_snapshot(
        &self,
        config: Arc<Config>,
        disabled: HashSet<String>,
        version: u64,
    ) -> Result<(), ControlError> {
        self.ask("", |reply| Command::ApplySnapshot {
            config,
            disabled,
            version,
            reply,
        })
        .await
    }

    /// The whole configuration a frontend needs, as `WatchConfig` sends it: the top-level
    /// policy (its `pricing:` the prices in force: the admin API's, then the file's), every key
    /// (secrets included) with the disabled ones named, every gateway (secrets hashed).
    pub fn snapshot(&self) -> pb::ConfigSnapshot {
        let state = self.state();
        let keys = state.key_entries(&self.pool);
        let mut policy = pb::Policy::from(&*state.config.policy);
        policy.pricing = state
            .pricing_in_force()
            .iter()
            .map(pb::Price::from)
            .collect();
        pb::ConfigSnapshot {
            version: state.version,
            policy: Some(policy),
            upstreams: keys
                .iter()
                .map(|e| pb::UpstreamSpec::from(&e.key.to_raw()))
                .collect(),
            disabled: keys
                .iter()
                .filter(|e| !e.enabled)
                .map(|e| e.key.name.to_string())
                .collect(),
            gateways: state
                .gateway_entries()
                .iter()
                .map(|e| pb::GatewaySpec::from(&e.raw))
                .collect(),
        }
    }
}

impl Owner {
    /// At start-up: the file's gateways and keys are (re)written to the store as config-owned
    /// (what a previous file declared and this one does not is deleted), then the running state
    /// is brought in line with the store (admin-owned entries, keys disabled by hand).
    pub(crate) async fn restore(&mut self, store: &Store) -> Result<(), ControlError> {
        self.persist_config_owned(store).await?;
        let desired = self.desired_from_store(store).await?;
        self.reconcile(desired).await.map(drop)
    }

    /// Writes the running config-owned gateways and keys to the store, deleting the
    /// config-owned rows the file no longer declares (an admin's `enabled: false` on a config
    /// key is kept).
    async fn persist_config_owned(&self, store: &Store) -> Result<(), ControlError> {
        let config_gateways: Vec<GatewayEntry> = self
            .state
            .gateways
            .values()
            .filter(|e| e.owner == OWNER_CONFIG)
            .cloned()
            .collect();
        for row in store.gateways().await? {
            let declared = config_gateways
                .iter()
                .any(|e| e.raw.name.as_deref() == Some(&row.name));
            if row.owner == OWNER_CONFIG && !declared {
                store.delete_gateway(&row.name).await?;
            }
        }
        for e in &config_gateways {
            store
                .save_gateway(
                    e.raw.name.as_deref().unwrap_or_default(),
                    &self.stored_gateway(&e.raw, OWNER_CONFIG)?,
                    OWNER_CONFIG,
                )
                .await?;
        }
        let stored: BTreeMap<String, KeyRow> = store
            .keys()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let mut config_keys = self.key_entries();
        config_keys.retain(|e| e.owner == OWNER_CONFIG);
        for row in stored.values() {
            if row.owner == OWNER_CONFIG && !config_keys.iter().any(|e| *e.key.name == row.name) {
                store.delete_key(&row.name).await?;
            }
        }
        for e in &config_keys {
            // an admin's `enabled: false` on a config key survives the restart
            let enabled = stored
                .get(&*e.key.name)
                .is_none_or(|r| r.owner != OWNER_CONFIG || r.enabled);
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
        Ok(())
    }

    pub(crate) async fn apply_file(&mut self, new: Arc<Config>) -> Result<(), ControlError> {
        let running = self.key_entries();
        let mut gateways: BTreeMap<String, GatewayEntry> = self
            .state
            .gateways
            .iter()
            .filter(|(_, e)| e.owner == OWNER_ADMIN)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for raw in &new.raw_gateways {
            let entry = GatewayEntry {
                raw: raw.clone(),
                owner: OWNER_CONFIG,
                updated_ms: now_ms(),
            };
            gateways.insert(raw.name.clone().unwrap_or_default(), entry);
        }
        let mut keys: Vec<KeyEntry> = new
            .upstreams
            .iter()
            .map(|key| KeyEntry {
                key: key.clone(),
                owner: OWNER_CONFIG,
                // a config key disabled by hand stays disabled
                enabled: running
                    .iter()
                    .find(|e| e.key.name == key.name && e.owner == OWNER_CONFIG)
                    .is_none_or(|e| e.enabled),
                raw: None,
            })
            .collect();
        keys.extend(
            running
                .iter()
                .filter(|e| {
                    e.owner == OWNER_ADMIN && !new.upstreams.iter().any(|k| k.name == e.key.name)
                })
                .cloned(),
        );
        self.reconcile(Desired {
            default: Some(DefaultGateway::of(&new)),
            gateways,
            keys,
        })
        .await?;
        self.state.config = new;
        self.apply_prices();
        if let Some(store) = self.store.clone() {
            self.persist_config_owned(&store).await?;
        }
        self.state.version += 1;
        self.publish();
        Ok(())
    }

    /// The running state as the store says it should be: the config-owned gateways and keys
    /// as running (keys with their stored `enabled`), plus every admin-owned one stored.
    async fn desired_from_store(&self, store: &Store) -> Result<Desired, ControlError> {
        let mut gateways: BTreeMap<String, GatewayEntry> = self
            .state
            .gateways
            .iter()
            .filter(|(_, e)| e.owner == OWNER_CONFIG)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for row in store.gateways().await? {
            if row.owner != OWNER_ADMIN || gateways.contains_key(&row.name) {
                continue;
            }
            let read = serde_json::from_str::<RawGateway>(&row.spec)
                .map_err(ControlError::from)
                .and_then(|raw| self.unseal_gateway(raw));
            match read {
                Ok(raw) => {
                    let entry = GatewayEntry {
                        raw,
                        owner: OWNER_ADMIN,
                        updated_ms: row.updated_ms,
                    };
                    gateways.insert(row.name.clone(), entry);
                }
                Err(e) => {
                    tracing::error!(gateway = %row.name, error = %e, "stored gateway unreadable; skipped");
                }
            }
        }
        let rows = store.keys().await?;
        let running = self.key_entries();
        let mut keys: Vec<KeyEntry> = Vec::with_capacity(rows.len());
        for e in running.iter().filter(|e| e.owner == OWNER_CONFIG) {
            let enabled = rows
                .iter()
                .find(|r| r.name == *e.key.name)
                .map_or(e.enabled, |r| r.enabled);
            keys.push(KeyEntry {
                enabled,
                ..e.clone()
            });
        }
        for row in rows.iter().filter(|r| r.owner == OWNER_ADMIN) {
            // a running key whose stored spec did not change is not unsealed again
            let same = running.iter().find(|e| {
                *e.key.name == row.name
                    && serde_json::to_string(&e.raw).ok().as_deref() == Some(row.spec.as_str())
            });
            let entry = match same {
                Some(e) => e.clone(),
                None => match self.unseal_key(row) {
                    Ok((key, raw)) => KeyEntry {
                        key: Arc::new(key),
                        owner: OWNER_ADMIN,
                        enabled: row.enabled,
                        raw: Some(raw),
                    },
                    Err(e) => {
                        tracing::error!(key = %row.name, error = %e, "stored key not applied");
                        continue;
                    }
                },
            };
            keys.push(KeyEntry {
                enabled: row.enabled,
                ..entry
            });
        }
        Ok(Desired {
            default: None,
            gateways,
            keys,
        })
    }

    /// The one way the running gateways and keys change as a whole (start-up, another replica's
    /// change, a pushed snapshot): gateways validated first (an invalid one refuses the change
    /// before anything moved), then keys not running start, changed specs are replaced,
    /// `enabled` follows, keys no longer wanted drain and go; in-flight requests keep what they
    /// started with.
    /// Answers the drains of the keys it removed (a caller may wait for them).
    pub(crate) async fn reconcile(
        &mut self,
        desired: Desired,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, ControlError> {
        for (i, e) in desired.gateways.values().enumerate() {
            validate_gateway(&e.raw, &format!("gateways[{i}]")).map_err(ControlError::Invalid)?;
        }
        if let Some(d) = desired.default {
            self.state.default = d;
        }
        self.state.gateways = desired.gateways;
        let running = self.key_entries();
        let mut drains = Vec::new();
        for want in &desired.keys {
            let was = running.iter().find(|e| e.key.name == want.key.name);
            match was {
                None => {
                    if let Err(e) = self.pool.add_key(want.key.clone()).await {
                        tracing::error!(key = %want.key.name, error = %e, "key not applied");
                        continue;
                    }
                }
                Some(e) if e.key.to_raw() != want.key.to_raw() => {
                    let _ = self.pool.update_key(want.key.clone()).await;
                }
                Some(_) => {}
            }
            // a new key starts enabled
            if was.map_or(!want.enabled, |e| e.enabled != want.enabled) {
                let _ = self.pool.set_enabled(&want.key.name, want.enabled).await;
            }
            self.state
                .keys
                .insert(want.key.name.to_string(), want.clone());
        }
        for gone in running
            .iter()
            .filter(|e| !desired.keys.iter().any(|k| k.key.name == e.key.name))
        {
            self.state.keys.remove(&*gone.key.name);
            let (pool, name, grace) = (
                self.pool.clone(),
                gone.key.name.clone(),
                self.state.config.shutdown_grace.max(Duration::from_secs(1)),
            );
            drains.push(tokio::spawn(async move {
                pool.remove_key(&name, grace).await;
            }));
        }
        // the `default` gateway's credentials include the keys' own tokens
        self.apply_gateways()?;
        Ok(drains)
    }

    /// An admin change: `edit` changes the running state as it is, which is then reconciled.
    pub(crate) async fn change(
        &mut self,
        edit: impl FnOnce(&mut Desired),
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, ControlError> {
        let mut desired = Desired {
            default: None,
            gateways: self.state.gateways.clone(),
            keys: self.key_entries(),
        };
        edit(&mut desired);
        self.reconcile(desired).await
    }

    fn unseal_key(&self, row: &KeyRow) -> Result<(UpstreamKey, RawUpstream), ControlError> {
        let mut raw: RawUpstream = serde_json::from_str(&row.spec)?;
        let sealed = row
            .sealed_secret
            .as_deref()
            .ok_or_else(|| ControlError::Precondition("no sealed secret".to_owned()))?;
        let config = &self.state.config;
        let key = config.admin.secret_key.as_ref().ok_or_else(|| {
            ControlError::Precondition("admin.secret_key is not set: cannot unseal".to_owned())
        })?;
        raw.sk = Some(crate::seal::open(key, sealed)?);
        let validated = validate_key(raw.clone(), config).map_err(ControlError::Invalid)?;
        raw.sk = None;
        Ok((validated, raw))
    }

    pub(crate) async fn reload(&mut self) -> Result<(), ControlError> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let desired = self.desired_from_store(&store).await?;
        self.reconcile(desired).await?;
        self.read_prices(&store).await?;
        self.apply_prices();
        self.state.version += 1;
        self.publish();
        Ok(())
    }

    pub(crate) async fn apply_snapshot(
        &mut self,
        config: &Config,
        disabled: &HashSet<String>,
        version: u64,
    ) -> Result<(), ControlError> {
        let gateways = config
            .raw_gateways
            .iter()
            .map(|raw| {
                let entry = GatewayEntry {
                    raw: raw.clone(),
                    owner: OWNER_ADMIN,
                    updated_ms: now_ms(),
                };
                (raw.name.clone().unwrap_or_default(), entry)
            })
            .collect();
        let keys = config
            .upstreams
            .iter()
            .map(|key| KeyEntry {
                key: key.clone(),
                owner: OWNER_ADMIN,
                enabled: !disabled.contains(&*key.name),
                raw: None,
            })
            .collect();
        self.reconcile(Desired {
            default: Some(DefaultGateway::of(config)),
            gateways,
            keys,
        })
        .await?;
        self.gateways.set_prices(config.prices.clone());
        self.state.version = version;
        self.publish();
        Ok(())
    }

    /// Validates every gateway entry and installs them, with the `default` gateway, in the
    /// running gateway at once.
    pub(crate) fn apply_gateways(&self) -> Result<(), ControlError> {
        let keys: Vec<Arc<UpstreamKey>> = self.key_entries().into_iter().map(|e| e.key).collect();
        let d = &self.state.default;
        let default = Arc::new(d.spec.with_client_tokens(&d.client_tokens, &keys));
        let entries = &self.state.gateways;
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
