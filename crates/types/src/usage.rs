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
    /// 32 hex characters ([`new_event_id`]: time-ordered, unique per request): the store writes
    /// each id once, even when an event is replayed from the spill file or resent by a frontend.
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

/// A new event id, 32 hex characters: the Unix time in milliseconds (48 bits), then 80 random
/// bits. Time-ordered ids go to the right edge of the store's primary-key index instead of a
/// random page of it: with random ids, a batch of 1,000 events dirtied up to 1,000 index pages
/// (most of the SQLite writer's time went to writing them to the WAL).
pub fn new_event_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = fastrand::u128(..) & ((1u128 << 80) - 1);
    let id = ((ms & 0xffff_ffff_ffff) << 80) | random;
    // 32 hex digits, most significant first (`format!` cost ~1,600 instructions per request)
    let digits: Vec<u8> = (0..32)
        .rev()
        .map(|n| HEX[((id >> (n * 4)) & 0xf) as usize])
        .collect();
    String::from_utf8(digits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_ids_are_32_hex_unique_and_time_ordered() {
        let a = super::new_event_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::new_event_id();
        for id in [&a, &b] {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        }
        assert!(a < b, "{a} then {b}");
        // the first 12 digits are the Unix time in ms
        let ms = u64::from_str_radix(&b[..12], 16).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now - ms < 1000, "{b}: {ms} vs {now}");
        let many: std::collections::HashSet<String> =
            (0..10_000).map(|_| super::new_event_id()).collect();
        assert_eq!(many.len(), 10_000);
    }
}
