//! The sections of the file besides the request policy and the upstreams: `redis`, `admin`,
//! `telemetry`, `notify` and `log`, as written.

use serde::Deserialize;

use super::Seconds;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://host:6379/0`: one server. Exactly one of `url`, `cluster` and `sentinel`.
    pub url: Option<String>,
    /// A Redis Cluster's seed nodes (`redis://host:7000`, ...).
    pub cluster: Option<Vec<String>>,
    /// A master watched by Sentinel.
    pub sentinel: Option<RawSentinel>,
    /// Prefix of every key keypool writes (default `keypool:`).
    pub prefix: Option<String>,
    /// Longest wait for one Redis call, in milliseconds (default 250).
    pub timeout_ms: Option<u64>,
    /// `local` (default): when Redis fails, each replica enforces limits on its own;
    /// `closed`: refuse with 503 until Redis is back.
    pub on_failure: Option<String>,
    /// With `on_failure: local`: how many replicas share the limits; while Redis is down each
    /// enforces `1/N` of every rate budget (default 1: each enforces all of it).
    pub replicas_hint: Option<u32>,
    /// Calls of a key's rpm budget a replica reserves in one round trip and spends locally
    /// (default 0: one round trip per call).
    pub lease: Option<u32>,
    /// How long a replica may spend a lease before what is left goes back, in ms (default 1000).
    pub lease_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master: String,
    /// The Sentinels (`redis://host:26379`).
    pub nodes: Vec<String>,
    /// The master's password (not the Sentinels').
    pub password: Option<String>,
    /// The master's database (default 0).
    pub db: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Default `true`.
    pub enabled: Option<bool>,
    /// Default `127.0.0.1:8889`. A non-loopback address needs a token.
    pub address: Option<String>,
    /// The console and its REST API: default `127.0.0.1:8890`, `none` turns them off. A
    /// non-loopback address needs a token.
    pub http_address: Option<String>,
    /// Bearer token for every `keypool.admin.v1` call (or `KEYPOOL_ADMIN_TOKEN`).
    pub token: Option<String>,
    /// Seals upstream secrets added through the admin service before they are stored (or
    /// `KEYPOOL_SECRET_KEY`). Without it, `AddKey` is refused.
    pub secret_key: Option<String>,
    /// Usage events a `StreamUsage` subscriber may fall behind by before it is dropped
    /// (default 4096).
    pub stream_buffer: Option<usize>,
    /// PEM certificate (chain) and private key: the admin API speaks TLS (`https://`). Strongly
    /// advised off loopback: the token, and the config pushed to frontends (upstream keys
    /// included), cross the network.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// `/metrics` and `/v1/metrics` require `Authorization: Bearer <this>` when set.
    pub metrics_token: Option<String>,
    /// OTLP/gRPC endpoint for traces (else `OTEL_EXPORTER_OTLP_ENDPOINT`; neither: tracing off).
    pub otlp_endpoint: Option<String>,
    /// `service.name` (else `OTEL_SERVICE_NAME`, else `keypool`).
    pub service_name: Option<String>,
    /// Fraction of new traces sampled, 0..=1 (else `OTEL_TRACES_SAMPLER[_ARG]`, else 1).
    pub sample_ratio: Option<f64>,
    /// Logs as JSON lines (with trace ids) instead of text.
    #[serde(default)]
    pub json_logs: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    /// Feishu/Lark incoming webhook (or `FEISHU_WEBHOOK`).
    pub feishu: Option<RawFeishu>,
    pub matrix: Option<RawMatrix>,
    /// Generic JSON webhook.
    pub webhook: Option<RawWebhook>,
    /// One message per cause per this many seconds (default 300); repeats are counted.
    pub dedup_seconds: Option<Seconds>,
    /// Consecutive cooldowns of one key before it is reported (default 3).
    pub cooling_alert_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeishu {
    pub webhook: String,
    /// The bot's signing secret ("签名校验"), when enabled.
    pub secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatrix {
    /// `https://matrix.example.org`
    pub homeserver: String,
    pub access_token: String,
    /// `!room:example.org`
    pub room_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// Record request bodies.
    #[serde(default)]
    pub request_body: bool,
    /// Record responses (summarised: message content or concatenated stream deltas).
    #[serde(default)]
    pub response_body: bool,
    /// Record request headers (credentials always redacted).
    #[serde(default)]
    pub headers: bool,
    /// Cap per recorded field, in bytes (default 64 KiB); longer values are truncated and marked.
    pub max_field_bytes: Option<usize>,
    /// Headers redacted in addition to authorization, api-key, x-api-key, cookie.
    #[serde(default, deserialize_with = "crate::raw::one_or_many::deserialize")]
    pub redact_headers: Vec<String>,
    /// Delete events and logs older than this many days (default: keep).
    pub retention_days: Option<u32>,
    /// Events waiting for the writer, at most (default 100000); past it events are dropped,
    /// counted and logged.
    pub queue_capacity: Option<usize>,
    /// Where batches go while the database is unavailable (default: beside the SQLite file, or
    /// `./keypool-usage.spill.jsonl`).
    pub spill_path: Option<String>,
    /// Largest spill file (default 1 GiB); past it events are dropped, counted and logged.
    pub spill_max_bytes: Option<u64>,
    /// When the queue is full: `spill` (default: events go to the spill file, replayed in
    /// order), `backpressure` (new requests wait for room, then 503), or `drop` (counted).
    pub on_overflow: Option<String>,
}
