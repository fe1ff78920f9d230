//! [`Control`]: the running gateway's mutable configuration — gateways and keys — as the admin
//! service changes it. Every change is validated by the config file's own code, applied to the
//! running pool and gateways at once (in-flight requests keep the spec they started with), and
//! persisted in the store with its owner (`config` for what the file declares, `admin` for what
//! the admin service created).
//!
//! Rules (see docs/DECISIONS.md): config-owned gateways are read-only here (edit the file);
//! config-owned keys may be enabled/disabled and re-limited at run time — `enabled` survives a
//! restart, limits come back from the file; admin-owned entries are fully managed. Upstream
//! secrets are stored only sealed (ChaCha20-Poly1305 under `admin.secret_key`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keypool_config::raw::RawUpstream;
use keypool_config::{
    Config, DEFAULT_GATEWAY, FieldError, Gateway, RawGateway, UpstreamKey, validate_gateway,
    validate_key,
};
use keypool_policy::gateway::Gateways;
use keypool_pool::PoolHandle;
use keypool_proto::admin::v1 as pb;
use keypool_store::{KeyRow, Store, StoredEvent};
use keypool_types::{Secret, UsageEvent, UsageSink};
use tokio::sync::broadcast;

pub const OWNER_CONFIG: &str = "config";
pub const OWNER_ADMIN: &str = "admin";

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("store: {0}")]
    Store(String),
}

impl ControlError {
    /// Its row in the one error table (the admin API's gRPC code).
    pub fn kind(&self) -> keypool_types::ErrorKind {
        use keypool_types::ErrorKind as K;
        match self {
            Self::Invalid(_) => K::InvalidSpec,
            Self::NotFound(_) => K::NotFound,
            Self::Exists(_) => K::AlreadyExists,
            Self::Precondition(_) => K::FailedPrecondition,
            Self::Store(_) => K::StoreUnavailable,
        }
    }
}

impl From<keypool_pool::PoolError> for ControlError {
    fn from(e: keypool_pool::PoolError) -> Self {
        use keypool_pool::PoolError as P;
        match e {
            P::Exists(_) => Self::Exists(e.to_string()),
            P::NoSuchKey(_) => Self::NotFound(e.to_string()),
            P::Stopped => Self::Precondition(e.to_string()),
        }
    }
}

fn invalid(path: &str, reason: impl Into<String>) -> ControlError {
    ControlError::Invalid(vec![FieldError {
        path: path.to_owned(),
        reason: reason.into(),
    }])
}

/// A gateway as the control plane holds it.
#[derive(Debug, Clone)]
pub struct GatewayEntry {
    /// Secrets hashed.
    pub raw: RawGateway,
    pub owner: &'static str,
    pub updated_ms: i64,
}

/// The `default` gateway (`/v1/*`) as the top level of a config declares it.
struct DefaultGateway {
    spec: Arc<Gateway>,
    entry: GatewayEntry,
    client_tokens: Vec<String>,
}

impl DefaultGateway {
    fn of(config: &Config) -> Self {
        Self {
            spec: config.default_gateway.clone(),
            entry: GatewayEntry {
                raw: config.policy.default_gateway.clone(),
                owner: OWNER_CONFIG,
                updated_ms: now_ms(),
            },
            client_tokens: config.client_tokens.clone(),
        }
    }
}

/// A key as the control plane holds it.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub key: Arc<UpstreamKey>,
    pub owner: &'static str,
    pub enabled: bool,
    /// Admin keys: the spec as added (without `sk`), for the store.
    pub raw: Option<RawUpstream>,
}

/// The usage sink in front of the store's: also feeds `StreamUsage` subscribers (only when
/// there are any; a send never waits).
pub struct FeedSink {
    pub inner: Arc<dyn UsageSink>,
    pub feed: broadcast::Sender<Arc<StoredEvent>>,
}

impl UsageSink for FeedSink {
    fn record(&self, mut event: UsageEvent) {
        if self.feed.receiver_count() > 0 {
            // subscribers get the event without its request log
            let log = event.log.take();
            let _ = self.feed.send(Arc::new(StoredEvent::from(event.clone())));
            event.log = log;
        }
        self.inner.record(event);
    }
}

/// A `keypool frontend` as the control plane last heard of it.
#[derive(Debug, Clone, Default)]
pub struct FrontendSeen {
    pub address: String,
    pub last_seen_ms: i64,
    pub config_version: u64,
    /// Whether its `WatchConfig` stream is open.
    pub watching: bool,
}

pub struct Control {
    pub config: Arc<Config>,
    pub gateways: Arc<Gateways>,
    pub pool: PoolHandle,
    pub store: Option<Store>,
    pub feed: broadcast::Sender<Arc<StoredEvent>>,
    pub started: std::time::Instant,
    version: AtomicU64,
    /// With Redis: where changes are announced to the other replicas.
    pub redis: Mutex<Option<Arc<keypool_shared::RedisState>>>,
    /// The version after every applied change (what `WatchConfig` streams wait on).
    pub changed: tokio::sync::watch::Sender<u64>,
    /// Frontends seen through `WatchConfig` / `PublishUsage` (control plane role).
    pub frontends: Mutex<BTreeMap<String, FrontendSeen>>,
    /// The `default` gateway's policy (the config's top level, or the control plane's
    /// snapshot): rebuilt with the keys' client tokens whenever keys change.
    default_gateway: Mutex<DefaultGateway>,
    /// The named gateways.
    gateway_entries: Mutex<BTreeMap<String, GatewayEntry>>,
    key_entries: Mutex<BTreeMap<String, KeyEntry>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Control {
    /// Seeds the store with the file's gateways and keys, then applies what the admin service
    /// stored before (admin-owned gateways and keys, keys disabled by hand).
    pub async fn start(
        config: Arc<Config>,
        gateways: Arc<Gateways>,
        pool: PoolHandle,
        store: Option<Store>,
        feed: broadcast::Sender<Arc<StoredEvent>>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut g_entries = BTreeMap::new();
        for raw in &config.raw_gateways {
            let name = raw.name.clone().unwrap_or_default();
            g_entries.insert(
                name,
                GatewayEntry {
                    raw: raw.clone(),
                    owner: OWNER_CONFIG,
                    updated_ms: now_ms(),
                },
            );
        }
        let mut k_entries = BTreeMap::new();
        for key in &config.upstreams {
            k_entries.insert(
                key.name.to_string(),
                KeyEntry {
                    key: key.clone(),
                    owner: OWNER_CONFIG,
                    enabled: true,
                    raw: None,
                },
            );
        }
        let control = Arc::new(Self {
            config: config.clone(),
            gateways,
            pool,
            store: store.clone(),
            feed,
            started: std::time::Instant::now(),
            // versions keep growing across restarts (a frontend compares them in logs only)
            version: AtomicU64::new(u64::try_from(now_ms()).unwrap_or(1)),
            redis: Mutex::new(None),
            changed: tokio::sync::watch::Sender::new(0),
            frontends: Mutex::new(BTreeMap::new()),
            default_gateway: Mutex::new(DefaultGateway::of(&config)),
            gateway_entries: Mutex::new(g_entries),
            key_entries: Mutex::new(k_entries),
        });
        if let Some(store) = &store {
            control.restore(store).await?;
        }
        Ok(control)
    }

    async fn restore(&self, store: &Store) -> anyhow::Result<()> {
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

    fn unseal_key(&self, row: &KeyRow) -> anyhow::Result<(UpstreamKey, RawUpstream)> {
        let mut raw: RawUpstream = serde_json::from_str(&row.spec)?;
        let sealed = row
            .sealed_secret
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("no sealed secret"))?;
        let key = self
            .config
            .admin
            .secret_key
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("admin.secret_key is not set: cannot unseal"))?;
        raw.sk = Some(crate::seal::open(key, sealed)?);
        let validated = validate_key(raw.clone(), &self.config)
            .map_err(|e| anyhow::anyhow!(ControlError::Invalid(e).to_string()))?;
        raw.sk = None;
        Ok((validated, raw))
    }

    /// The configuration version: bumped by every applied change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// A change applied here: a new version, announced to the other replicas (which re-read
    /// the store).
    fn bump(&self) {
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        self.refresh_default();
        self.changed.send_replace(version);
        let redis = lock(&self.redis).clone();
        if let (Some(redis), Some(_)) = (redis, &self.store) {
            tokio::spawn(async move {
                if let Err(e) = redis.announce_config(version).await {
                    keypool_shared::shared_failed(&e);
                }
            });
        }
    }

    /// Applies what another replica changed: re-reads the admin state from the store and brings
    /// the running gateways and keys in line (without writing anything back).
    pub async fn reload(&self) -> anyhow::Result<()> {
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
    ) -> anyhow::Result<()> {
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
    fn apply_gateways(&self) -> Result<(), ControlError> {
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

    /// The named gateways (what the store holds and frontends are sent besides the policy).
    pub fn gateway_entries(&self) -> Vec<GatewayEntry> {
        lock(&self.gateway_entries).values().cloned().collect()
    }

    /// Every gateway, `default` first: what `ListGateways` shows.
    pub fn listed_gateways(&self) -> Vec<GatewayEntry> {
        let mut all = vec![lock(&self.default_gateway).entry.clone()];
        all.extend(self.gateway_entries());
        all
    }

    pub fn gateway_entry(&self, name: &str) -> Option<GatewayEntry> {
        if name == DEFAULT_GATEWAY {
            return Some(lock(&self.default_gateway).entry.clone());
        }
        lock(&self.gateway_entries).get(name).cloned()
    }

    /// Creates (`replace: false`) or replaces an admin-owned gateway.
    pub async fn put_gateway(
        &self,
        name: Option<&str>,
        raw: RawGateway,
        replace: bool,
    ) -> Result<GatewayEntry, ControlError> {
        let mut raw = raw.hashed();
        if let Some(n) = name {
            match raw.name.as_deref() {
                Some(given) if given != n => {
                    return Err(invalid(
                        "gateway.name",
                        format!("a gateway cannot be renamed ({n:?} → {given:?})"),
                    ));
                }
                _ => raw.name = Some(n.to_owned()),
            }
        }
        validate_gateway(&raw, "gateway").map_err(ControlError::Invalid)?;
        let name = raw.name.clone().unwrap_or_default();
        if name == DEFAULT_GATEWAY {
            return Err(config_owned("gateway", &name));
        }
        {
            let entries = lock(&self.gateway_entries);
            match (entries.get(&name), replace) {
                (Some(_), false) => {
                    return Err(ControlError::Exists(format!(
                        "a gateway named {name:?} exists"
                    )));
                }
                (None, true) => {
                    return Err(ControlError::NotFound(format!("no gateway named {name:?}")));
                }
                (Some(e), true) if e.owner == OWNER_CONFIG => {
                    return Err(config_owned("gateway", &name));
                }
                _ => {}
            }
        }
        let spec = serde_json::to_string(&raw).map_err(|e| ControlError::Store(e.to_string()))?;
        let updated_ms = match &self.store {
            Some(s) => s
                .save_gateway(&name, &spec, OWNER_ADMIN)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?,
            None => now_ms(),
        };
        let entry = GatewayEntry {
            raw,
            owner: OWNER_ADMIN,
            updated_ms,
        };
        lock(&self.gateway_entries).insert(name, entry.clone());
        self.apply_gateways()?;
        self.bump();
        Ok(entry)
    }

    pub async fn delete_gateway(&self, name: &str) -> Result<(), ControlError> {
        match self.gateway_entry(name) {
            None => return Err(ControlError::NotFound(format!("no gateway named {name:?}"))),
            Some(e) if e.owner == OWNER_CONFIG => return Err(config_owned("gateway", name)),
            Some(_) => {}
        }
        if let Some(s) = &self.store {
            s.delete_gateway(name)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?;
        }
        lock(&self.gateway_entries).remove(name);
        self.apply_gateways()?;
        self.bump();
        Ok(())
    }

    /// Replaces an admin gateway's exact secrets with one new random secret (returned once).
    pub async fn rotate_secret(&self, name: &str) -> Result<(GatewayEntry, String), ControlError> {
        let entry = self
            .gateway_entry(name)
            .ok_or_else(|| ControlError::NotFound(format!("no gateway named {name:?}")))?;
        if entry.owner == OWNER_CONFIG {
            return Err(config_owned("gateway", name));
        }
        let mut raw = entry.raw;
        let auth = raw.auth.get_or_insert_with(Default::default);
        if auth.method.as_deref().is_some_and(|m| m != "exact") {
            return Err(ControlError::Precondition(format!(
                "gateway {name:?} authenticates by {}: only exact secrets can be rotated",
                auth.method.as_deref().unwrap_or_default()
            )));
        }
        auth.method = Some("exact".to_owned());
        let secret = format!("kp-{}", random_hex(24));
        auth.secrets = vec![secret.clone()];
        let entry = self.put_gateway(Some(name), raw, true).await?;
        Ok((entry, secret))
    }

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

    /// Adds a key from a YAML/JSON `upstreams:` entry.
    pub async fn add_key(&self, mut raw: RawUpstream) -> Result<KeyEntry, ControlError> {
        let sealing = self.config.admin.secret_key.clone();
        let sk = raw.sk.clone().unwrap_or_default();
        if sk == "asis" {
            return Err(invalid(
                "upstream.sk",
                "asis keys come from the config file only",
            ));
        }
        let key = validate_key(raw.clone(), &self.config).map_err(ControlError::Invalid)?;
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
        self.pool.add_key(key).await?;
        lock(&self.key_entries).insert(entry.key.name.to_string(), entry.clone());
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
        let key = Arc::new(key);
        self.pool.update_key(key.clone()).await?;
        if let Some(en) = enabled {
            self.pool.set_enabled(name, en).await?;
            entry.enabled = en;
        }
        entry.key = key;
        self.persist_key(&entry, None).await?;
        lock(&self.key_entries).insert(name.to_owned(), entry.clone());
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
        lock(&self.key_entries).remove(name);
        self.pool
            .remove_key(name, self.config.shutdown_grace.max(Duration::from_secs(1)))
            .await;
        if let Some(s) = &self.store {
            s.delete_key(name)
                .await
                .map_err(|e| ControlError::Store(e.to_string()))?;
        }
        self.bump();
        Ok(())
    }

    /// The admin token, if any.
    pub fn token(&self) -> Option<&Secret> {
        self.config.admin.token.as_ref()
    }
}

fn config_owned(what: &str, name: &str) -> ControlError {
    ControlError::Precondition(format!(
        "{what} {name:?} is declared in the config file: change it there"
    ))
}

/// What the store keeps of a config-owned key: its settings, never its secret.
fn key_summary(k: &UpstreamKey) -> serde_json::Value {
    serde_json::json!({
        "name": k.name,
        "endpoint": k.endpoint,
        "type": k.kind.as_str(),
        "rpm": k.rpm,
        "tpm": k.tpm,
    })
}

/// `n` random bytes as hex (from the OS's randomness via a fresh hasher seed and the clock).
pub fn random_hex(n: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(n * 2);
    let bytes = crate::seal::random_bytes(n);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
