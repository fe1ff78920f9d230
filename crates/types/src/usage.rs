//! Token usage as OpenAI reports it.

use serde::Deserialize;

/// The `usage` object of a completion, a stream's last chunk or an embedding response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// Total tokens, falling back to the sum when the upstream left `total_tokens` out.
    pub fn total(&self) -> u64 {
        if self.total_tokens == 0 {
            self.prompt_tokens + self.completion_tokens
        } else {
            self.total_tokens
        }
    }
}

/// One client request, as recorded for usage and monitoring. Contains no secret: the caller is a
/// hash of its token (or a JWT subject), the key is its name.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    /// 32 hex characters, unique per request: the store writes each id once, even when an event
    /// is replayed from the spill file or resent by a frontend.
    pub id: String,
    pub at: std::time::SystemTime,
    /// `default` for `/v1/*`.
    pub gateway: String,
    /// Hashed client token (`tok-<12 hex>`), or `None` for anonymous callers.
    pub caller: Option<String>,
    pub model: String,
    /// Name of the key that served the final attempt, if any was leased.
    pub key: Option<String>,
    /// That key's provider (`openai`, `replicate`).
    pub provider: Option<&'static str>,
    pub attempts: u32,
    /// Status sent to the client (for streams: the status of the response head).
    pub status: u16,
    pub stream: bool,
    pub latency: std::time::Duration,
    pub ttfb: Option<std::time::Duration>,
    pub usage: Option<Usage>,
    pub client_ip: Option<std::net::IpAddr>,
    /// Error class when the request did not succeed (`upstream_5xx`, `client_cancelled`, ...).
    pub error: Option<&'static str>,
    pub user_agent: Option<String>,
    /// What the `log:` policy asked to keep of this request, already redacted and capped.
    pub log: Option<Box<RequestLog>>,
}

/// The recorded parts of one request, per the `log:` policy. Never contains a credential:
/// credential headers are redacted before this is built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestLog {
    /// JSON object of (redacted) request headers.
    pub request_headers: Option<String>,
    pub request_body: Option<String>,
    /// The response summarised: message content / concatenated stream deltas, else the body.
    pub response_body: Option<String>,
}

/// Where finished requests' usage events go (the store's batched writer, or a log line).
pub trait UsageSink: Send + Sync + 'static {
    /// Takes one event. Must not block: the request path calls it.
    fn record(&self, event: UsageEvent);
}

/// A new event id: 128 random bits as 32 hex characters.
pub fn new_event_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}
