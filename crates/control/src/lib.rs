//! [`Control`]: the running gateway's mutable configuration — gateways and keys — as the admin
//! service changes it. Every change is validated by the config file's own code, applied to the
//! running pool and gateways at once (in-flight requests keep the spec they started with), and
//! persisted in the store with its owner (`config` for what the file declares, `admin` for what
//! the admin service created).
//!
//! Rules (see docs/DECISIONS.md): config-owned gateways are read-only here (edit the file);
//! config-owned keys may be enabled/disabled and re-limited at run time — `enabled` survives a
//! restart, limits come back from the file; admin-owned entries are fully managed. Upstream
//! secrets are stored only sealed (ChaCha20-Poly1305 under `admin.secret_key`, [`seal`]).
//!
//! Files: this one holds the state and start-up; [`Control`]'s gateway changes are in
//! `gateways.rs`, its key changes in `keys.rs`, the admin API's prices in `prices.rs`, and
//! bringing the running state in line with the store (restore, another replica's change) or a pushed snapshot in `sync.rs`.

mod gateways;
mod keys;
mod prices;
pub mod seal;
mod sync;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use keypool_config::raw::RawUpstream;
use keypool_config::{Config, FieldError, Gateway, RawGateway, UpstreamKey};
use keypool_policy::gateway::Gateways;
use keypool_pool::PoolHandle;
use keypool_store::{Store, StoredEvent};
use keypool_types::{Secret, UsageEvent, UsageSink};
use tokio::sync::broadcast;

pub use prices::AdminPrices;

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
    #[error(transparent)]
    Seal(#[from] seal::SealError),
}

/// A stored entry that does not parse (or one that does not encode).
impl From<serde_json::Error> for ControlError {
    fn from(e: serde_json::Error) -> Self {
        Self::Store(format!("a stored entry is unreadable: {e}"))
    }
}

impl From<keypool_store::StoreError> for ControlError {
    fn from(e: keypool_store::StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

impl ControlError {
    /// Its row in the one error table (the admin API's gRPC code).
    pub fn kind(&self) -> keypool_types::ErrorKind {
        use keypool_types::ErrorKind as K;
        match self {
            Self::Invalid(_) => K::InvalidSpec,
            Self::NotFound(_) => K::NotFound,
            Self::Exists(_) => K::AlreadyExists,
            Self::Precondition(_) | Self::Seal(_) => K::FailedPrecondition,
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
    fn saturated(&self) -> bool {
        self.inner.saturated()
    }

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
    /// The configuration now in force: replaced as a whole by a reloaded file
    /// ([`Control::apply_file`]).
    config: arc_swap::ArcSwap<Config>,
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
    /// Held from reading the running state to reconciling it, so changes apply one at a time
    /// and none is lost to another's stale copy.
    changes: tokio::sync::Mutex<()>,
    /// The named gateways.
    gateway_entries: Mutex<BTreeMap<String, GatewayEntry>>,
    key_entries: Mutex<BTreeMap<String, KeyEntry>>,
    /// The prices set through the admin API.
    admin_prices: Mutex<AdminPrices>,
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
    ) -> Result<Arc<Self>, ControlError> {
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
            config: arc_swap::ArcSwap::new(config.clone()),
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
            changes: tokio::sync::Mutex::new(()),
            gateway_entries: Mutex::new(g_entries),
            key_entries: Mutex::new(k_entries),
            admin_prices: Mutex::new(AdminPrices::default()),
        });
        if let Some(store) = &store {
            control.restore(store).await?;
            control.read_prices(store).await?;
        }
        control.apply_prices();
        Ok(control)
    }

    /// The configuration now in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The configuration version: bumped by every applied change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// A change applied here: a new version, announced to the other replicas (which re-read
    /// the store).
    pub(crate) fn bump(&self) {
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

    /// The admin token, if any.
    pub fn token(&self) -> Option<Secret> {
        self.config.load().admin.token.clone()
    }
}

fn config_owned(what: &str, name: &str) -> ControlError {
    ControlError::Precondition(format!(
        "{what} {name:?} is declared in the config file: change it there"
    ))
}

/// `n` random bytes as hex (from the OS's randomness via a fresh hasher seed and the clock).
pub fn random_hex(n: usize) -> String {
    keypool_types::hex(&crate::seal::random_bytes(n))
}
