//! keypool's configuration: parse the YAML file ([`raw`]), then validate it into the runtime
//! types ([`Config`], [`UpstreamKey`]) that the rest of keypool uses.
//!
//! Validation cross-checks everything once, at load time, and reports each mistake with its field
//! path (`upstreams[2].endpoint: ...`), so a bad file stops keypool before it binds a port.
//! The same `validate` will serve keys and gateways arriving through the admin service.

pub mod budget;
pub mod gateway;
mod gateway_validate;
pub mod guard;
mod key_validate;
mod parse;
pub mod raw;
pub mod routing;
mod sections;
mod summary;
mod upstream;
mod validate;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use budget::{Budget, Period};
pub use gateway::{DEFAULT_GATEWAY, Gateway, RawGateway, caller_id, validate_gateway};
pub use key_validate::{MAX_TPM, validate_key};
pub use upstream::{AZURE_API_VERSION, Azure, ChatTemplate, ModelRule, UpstreamKey, UpstreamKind};
pub use validate::{ALWAYS_REDACTED, validate};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Normalised listen address (`:8888` becomes `0.0.0.0:8888`).
    pub address: String,
    /// Client tokens accepted by the default gateway (`/v1/*`). Empty = open gateway.
    pub client_tokens: Vec<String>,
    /// Upstream timeout for non-stream requests (whole response).
    pub timeout: Duration,
    /// Time to first byte for streams.
    pub stream_timeout: Duration,
    /// Longest gap between stream chunks.
    pub idle_timeout: Duration,
    pub store: StoreConfig,
    pub lb_policy: LbPolicy,
    /// How long a request may wait for a key with budget before it gets 429.
    pub queue_timeout: Duration,
    pub max_body_bytes: usize,
    /// Largest upstream answer buffered whole; past it the client gets 502
    /// `response_too_large`.
    pub max_response_bytes: usize,
    /// Largest single event of an upstream stream; past it the stream ends with an error event.
    pub max_stream_event_bytes: usize,
    /// Longest a stream may last (`None`: only `idle_timeout` bounds it).
    pub stream_deadline: Option<Duration>,
    /// Longest a request body may take to arrive (408 past it).
    pub body_timeout: Duration,
    /// Request body bytes being received at once across connections (503 past it).
    pub max_buffered_request_bytes: usize,
    /// Failover attempts after the first one.
    pub retries: u32,
    pub shutdown_grace: Duration,
    /// In config order (the order `lb_policy: order` uses).
    pub upstreams: Vec<Arc<UpstreamKey>>,
    pub log: LogPolicy,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The `default` gateway (`/v1/*`): the policy written at the top level, without its
    /// credentials (the client tokens, joined with the keys' at run time:
    /// [`Gateway::with_client_tokens`]). As written: `policy.default_gateway`.
    pub default_gateway: Arc<Gateway>,
    /// Gateways at `/llm/api/{name}/v1/*`, in config order.
    pub gateways: Vec<Arc<Gateway>>,
    /// The same gateways as written, secrets hashed (what the admin service seeds the store with).
    pub raw_gateways: Vec<RawGateway>,
    pub telemetry: Telemetry,
    pub notify: Notify,
    pub admin: Admin,
    pub redis: Option<Redis>,
    /// What a control plane sends its frontends besides keys and gateways: the top-level
    /// request policy as written (`authorization`, timeouts, `lb_policy`, `queue_timeout`,
    /// `max_body_bytes`, `retries`, `shutdown_grace`, `trusted_proxies`, the recording half of
    /// `log`, the `default` gateway's policy).
    pub policy: Arc<raw::RawPolicy>,
    /// The prices requests are charged at (`pricing:` before the built-in catalog).
    pub prices: Arc<keypool_pricing::Prices>,
    /// Answer tokens a budget's estimate assumes when a request names no `max_tokens`.
    pub completion_estimate: u64,
}

/// Shared state in Redis.
#[derive(Debug, Clone)]
pub struct Redis {
    /// Where it is (URLs may hold passwords: never logged).
    pub servers: RedisServers,
    pub prefix: String,
    pub timeout: Duration,
    /// `on_failure: closed`: refuse with 503 while Redis is unavailable.
    pub fail_closed: bool,
    /// `replicas_hint`: each replica's share of the limits while Redis is unavailable.
    pub replicas_hint: u32,
    /// `lease`: calls (a key's picks, a gateway's admissions) or a USD budget's estimates
    /// reserved at once and spent locally (0: off).
    pub lease: u32,
    /// `lease_ms`: how long a lease may be spent before what is left goes back.
    pub lease_ms: Duration,
}

/// The longest `redis.lease_ms`: the shared windows keep their keys this much longer.
pub const MAX_LEASE_MS: u64 = 60_000;

/// How the shared state's Redis is reached.
#[derive(Debug, Clone)]
pub enum RedisServers {
    /// `redis.url`: one server.
    Url(keypool_types::Secret),
    /// `redis.cluster`: a Redis Cluster's seed nodes.
    Cluster(Vec<keypool_types::Secret>),
    /// `redis.sentinel`: the master Sentinel names `master`.
    Sentinel {
        master: String,
        nodes: Vec<keypool_types::Secret>,
        password: Option<keypool_types::Secret>,
        db: i64,
    },
}

/// The admin gRPC service's settings.
#[derive(Debug, Clone)]
pub struct Admin {
    pub enabled: bool,
    /// The operator asked for it (`admin.address` or `enabled: true` in the file, or
    /// `--admin-address`): a taken port stops start-up. Otherwise the default address is bound
    /// only when free, and the log says which.
    pub requested: bool,
    /// `host:port`.
    pub address: String,
    /// The console and its REST API (`host:port`); `None`: off (`http_address: none`).
    pub http_address: Option<String>,
    /// `http_address` was written (or given on the command line): a taken port stops
    /// start-up; otherwise the default is bound only when free.
    pub http_requested: bool,
    pub token: Option<keypool_types::Secret>,
    pub secret_key: Option<keypool_types::Secret>,
    pub stream_buffer: usize,
    /// PEM certificate chain and key, read at start-up: the admin API serves TLS.
    pub tls: Option<AdminTls>,
}

/// The admin API's TLS identity (PEM).
#[derive(Clone)]
pub struct AdminTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: keypool_types::Secret,
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminTls { .. }")
    }
}

/// Metrics and tracing settings (the `OTEL_*` variables fill what the file leaves out).
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub metrics_token: Option<keypool_types::Secret>,
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
    pub json_logs: bool,
}

/// Where alerts go, and how often.
#[derive(Debug, Clone)]
pub struct Notify {
    pub feishu: Option<Feishu>,
    pub matrix: Option<Matrix>,
    pub webhook: Option<url::Url>,
    pub dedup: Duration,
    pub cooling_alert_after: u32,
}

impl Notify {
    pub fn any(&self) -> bool {
        self.feishu.is_some() || self.matrix.is_some() || self.webhook.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct Feishu {
    pub webhook: url::Url,
    pub secret: Option<keypool_types::Secret>,
}

/// A Matrix room to post `m.text` messages to.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Either a homeserver base URL (with `room_id` and the token), or, from openai-api-route's
    /// `MATRIX_API`, a full `.../send/m.room.message` URL carrying its own `access_token`.
    pub homeserver: url::Url,
    pub access_token: Option<keypool_types::Secret>,
    pub room_id: Option<String>,
}

/// What is recorded of each request and how usage reaches the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPolicy {
    pub request_body: bool,
    pub response_body: bool,
    pub headers: bool,
    pub max_field_bytes: usize,
    /// Lower-case header names never recorded (credentials plus configured ones).
    pub redact_headers: Vec<String>,
    pub retention_days: Option<u32>,
    pub queue_capacity: usize,
    pub spill_path: std::path::PathBuf,
    pub spill_max_bytes: u64,
    /// What happens to an event when the queue is full.
    pub on_overflow: Overflow,
}

/// `log.on_overflow`: what happens to a usage event when the writer's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Appended to the spill file (one fsync per batch, off the request path) and replayed in
    /// order; dropped, counted, only past `spill_max_bytes`.
    #[default]
    Spill,
    /// New requests wait for room in the queue (up to 1 s), then get 503 with `Retry-After`;
    /// an event that still finds the queue full is spilled.
    Backpressure,
    /// Dropped, counted and logged.
    Drop,
}

impl LogPolicy {
    /// Whether any part of requests is recorded beyond the usage event.
    pub fn records_anything(&self) -> bool {
        self.request_body || self.response_body || self.headers
    }
}

/// Where usage is persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    None,
    Sqlite { path: String },
    Postgres { dsn: String },
}

/// How the key pool picks among eligible keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Fewest requests in the trailing window, then fewest in flight, then config order.
    #[default]
    LeastUsed,
    /// Config order: the first eligible key (openai-api-route's behaviour).
    Order,
    /// Uniformly random among eligible keys.
    Random,
    /// The lowest recent time to first byte (the faster of this process's last two attempts
    /// on the key, in steps of 5 ms or a quarter of the fastest time), then least-used.
    Latency,
}

impl LbPolicy {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastUsed => "least-used",
            Self::Order => "order",
            Self::Random => "random",
            Self::Latency => "latency",
        }
    }
}

/// A mistake in the configuration, with the path of the field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Parses YAML text into a validated [`Config`].
pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
    validate(parse::parse(text)?)
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    from_yaml(&text)
}
