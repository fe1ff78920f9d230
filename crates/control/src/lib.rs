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
//! One task owns the state ([`owner`]): every change is a typed [`owner::Command`] it applies
//! one at a time, through one `reconcile(desired)` (start-up, a reloaded file, another
//! replica's change, an admin change, a pushed snapshot); after each it publishes the whole
//! [`State`], which [`Control`] (the handle everyone else holds) reads without locks.
//!
//! Files: this one holds the handle, the state and start-up; the owner task and its commands
//! are in `owner.rs`, gateway changes in `gateways.rs`, key changes in `keys.rs`, the admin
//! API's prices in `prices.rs`, and bringing the running state in line with the store
//! (restore, another replica's change), a reloaded file or a pushed snapshot in `sync.rs`.

mod audit;
mod frontends;
mod gateways;
mod keys;
mod owner;
mod prices;
pub mod seal;
mod sync;

use std::collections::BTreeMap;
use std::sync::Arc;

use keypool_config::raw::RawUpstream;
use keypool_config::{Config, FieldError, Gateway, RawGateway, UpstreamKey};
use keypool_policy::gateway::Gateways;
use keypool_pool::PoolHandle;
use keypool_store::{Store, StoredEvent};
use keypool_types::{Secret, UsageEvent, UsageSink};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use frontends::{FrontendSeen, Frontends};
pub use keys::KeyChange;
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
    #[error("the control plane has stopped")]
    Stopped,
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
            Self::Precondition(_) | Self::Seal(_) | Self::Stopped => K::FailedPrecondition,
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
#[derive(Clone)]
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

/// The control plane's state as its owner last published it: what every reader sees, whole
/// (a change in progress is not visible until it is applied).
#[derive(Clone)]
pub struct State {
    /// The configuration now in force: replaced as a whole by a reloaded file.
    config: Arc<Config>,
    /// Bumped by every applied change.
    version: u64,
    /// The `default` gateway's policy (the config's top level, or the control plane's
    /// snapshot): rebuilt with the keys' client tokens whenever keys change.
    default: DefaultGateway,
    /// The named gateways.
    gateways: BTreeMap<String, GatewayEntry>,
    keys: BTreeMap<String, KeyEntry>,
    /// The prices set through the admin API.
    prices: AdminPrices,
}

impl State {
    /// The version this state was published at.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The control plane as everyone but its owner holds it: reads of the published [`State`],
/// and changes sent to the owner as commands (each answered once applied).
pub struct Control {
    commands: mpsc::Sender<(String, owner::Command)>,
    state: Arc<arc_swap::ArcSwap<State>>,
    pub gateways: Arc<Gateways>,
    pub pool: PoolHandle,
    pub store: Option<Store>,
    pub feed: broadcast::Sender<Arc<StoredEvent>>,
    pub started: std::time::Instant,
    /// With Redis: where changes are announced to the other replicas.
    pub redis: Option<Arc<keypool_shared::RedisState>>,
    /// The version after every applied change (what `WatchConfig` streams wait on).
    changed: watch::Receiver<u64>,
    /// Frontends seen through `WatchConfig` / `PublishUsage` (control plane role).
    pub frontends: Frontends,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the control plane starts from and works with.
pub struct Parts {
    pub config: Arc<Config>,
    pub gateways: Arc<Gateways>,
    pub pool: PoolHandle,
    pub store: Option<Store>,
    pub redis: Option<Arc<keypool_shared::RedisState>>,
    pub feed: broadcast::Sender<Arc<StoredEvent>>,
}

impl Control {
    /// Seeds the store with the file's gateways and keys, applies what the admin service
    /// stored before (admin-owned gateways and keys, keys disabled by hand, prices), then
    /// starts the owner task.
    pub async fn start(parts: Parts) -> Result<Arc<Self>, ControlError> {
        let config = parts.config;
        let gateways = config
            .raw_gateways
            .iter()
            .map(|raw| {
                let entry = GatewayEntry {
                    raw: raw.clone(),
                    owner: OWNER_CONFIG,
                    updated_ms: now_ms(),
                };
                (raw.name.clone().unwrap_or_default(), entry)
            })
            .collect();
        let keys = config
            .upstreams
            .iter()
            .map(|key| {
                let entry = KeyEntry {
                    key: key.clone(),
                    owner: OWNER_CONFIG,
                    enabled: true,
                    raw: None,
                };
                (key.name.to_string(), entry)
            })
            .collect();
        let state = State {
            default: DefaultGateway::of(&config),
            config,
            // versions keep growing across restarts (a frontend compares them in logs only)
            version: u64::try_from(now_ms()).unwrap_or(1),
            gateways,
            keys,
            prices: AdminPrices::default(),
        };
        let published = Arc::new(arc_swap::ArcSwap::from_pointee(state.clone()));
        let (changed_tx, changed) = watch::channel(0);
        let mut owner = owner::Owner {
            state,
            published: published.clone(),
            changed: changed_tx,
            gateways: parts.gateways.clone(),
            pool: parts.pool.clone(),
            store: parts.store.clone(),
            redis: parts.redis.clone(),
        };
        owner.start().await?;
        let (commands, inbox) = mpsc::channel(64);
        tokio::spawn(owner.run(inbox));
        Ok(Arc::new(Self {
            commands,
            state: published,
            gateways: parts.gateways,
            pool: parts.pool,
            store: parts.store,
            feed: parts.feed,
            started: std::time::Instant::now(),
            redis: parts.redis,
            changed,
            frontends: Frontends::default(),
        }))
    }

    /// The state as last published (whole: never one change half applied).
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The configuration now in force.
    pub fn config(&self) -> Arc<Config> {
        self.state.load().config.clone()
    }

    /// The configuration version: bumped by every applied change.
    pub fn version(&self) -> u64 {
        self.state.load().version
    }

    /// Wakes on every applied change (what `WatchConfig` streams wait on).
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// The admin token, if any.
    pub fn token(&self) -> Option<Secret> {
        self.state.load().config.admin.token.clone()
    }

    /// Sends the owner a command on behalf of `who` (the audit log's: the surface and where
    /// from, never a token; empty for what keypool does by itself) and waits for its answer.
    async fn ask<T>(
        &self,
        who: &str,
        command: impl FnOnce(oneshot::Sender<Result<T, ControlError>>) -> owner::Command,
    ) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send((who.to_owned(), command(reply)))
            .await
            .map_err(|_| ControlError::Stopped)?;
        answer.await.map_err(|_| ControlError::Stopped)?
    }
}

fn config_owned(what: &str, name: &str) -> ControlError {
    ControlError::Precondition(format!(
        "{what} {name:?} is declared in the config file: change it there"
    ))
}

/// `n` random bytes from the operating system's generator, as hex.
pub fn random_hex(n: usize) -> String {
    keypool_types::hex(&crate::seal::random_bytes(n))
}
