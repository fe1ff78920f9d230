//! Token usage, in OpenAI's terms whichever provider reported it.

use std::sync::Arc;

use serde::Deserialize;

/// The `usage` object of a completion, a stream's last chunk or an embedding response, or of an
/// Anthropic message. `prompt_tokens` counts every input token, cached or not, as OpenAI's does:
/// Anthropic's `input_tokens` leaves out the cache's, so they are added back
/// (`input_tokens + cache_creation_input_tokens + cache_read_input_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "WireUsage")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// Either provider's `usage` object as it comes.
#[derive(Deserialize)]
#[expect(clippy::struct_field_names, reason = "the providers' field names")]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    // Anthropic's
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Self {
        if w.input_tokens.is_none() && w.output_tokens.is_none() {
            return Self {
                prompt_tokens: w.prompt_tokens,
                completion_tokens: w.completion_tokens,
                total_tokens: w.total_tokens,
            };
        }
        let prompt = w.input_tokens.unwrap_or(0)
            + w.cache_creation_input_tokens.unwrap_or(0)
            + w.cache_read_input_tokens.unwrap_or(0);
        let completion = w.output_tokens.unwrap_or(0);
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
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
    /// [`new_event_id`]: time-ordered, unique per request; stored as its 32 hex digits
    /// ([`event_id_hex`]). The store writes each id once, even when an event is replayed from
    /// the spill file or resent by a frontend.
    pub id: u128,
    pub at: std::time::SystemTime,
    /// `default` for `/v1/*`.
    pub gateway: Arc<str>,
    /// Hashed client token (`tok-<12 hex>`), or `None` for anonymous callers.
    pub caller: Option<Arc<str>>,
    pub model: String,
    /// Name of the key that served the final attempt, if any was leased.
    pub key: Option<Arc<str>>,
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

// The shared strings are the gateway's, the caller's and the key's own (reference counts, not
// copies), and the id is a number: the event crosses to the store's writer thread, and an
// allocation freed on another thread is the slow path of the request thread's allocator. With
// copied strings and the stored form built on the request path, the request threads spent
// ~2.6 us more CPU per request with a store than with `dbtype: none` (perf, 64 connections);
// with this, ~0.5 us. The writer builds its owned copies on its own thread.

/// Where finished requests' usage events go (the store's batched writer, or a log line).
pub trait UsageSink: Send + Sync + 'static {
    /// Takes one event. Must not block: the request path calls it.
    fn record(&self, event: UsageEvent);

    /// Whether a new request should wait before it starts (`log.on_overflow: backpressure`
    /// and the queue is full). Cheap: the request path asks it.
    fn saturated(&self) -> bool {
        false
    }
}

/// A new event id: the Unix time in milliseconds (48 bits), then 80 random bits. Time-ordered:
/// while ids had a unique index (before migration 5), random ids dirtied up to 1,000 of its
/// pages per batch of 1,000 events, time-ordered ones only its right edge.
pub fn new_event_id() -> u128 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = fastrand::u128(..) & ((1u128 << 80) - 1);
    ((ms & 0xffff_ffff_ffff) << 80) | random
}

/// An event id as the store keeps it: 32 hex digits, most significant first, so ids sort by time.
pub fn event_id_hex(id: u128) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // 32 hex digits, most significant first (`format!` cost ~1,600 instructions per event)
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
        let hex = super::event_id_hex;
        let a = hex(super::new_event_id());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = hex(super::new_event_id());
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
        assert_eq!(hex(0xab), format!("{:032x}", 0xab));
        let many: std::collections::HashSet<u128> =
            (0..10_000).map(|_| super::new_event_id()).collect();
        assert_eq!(many.len(), 10_000);
    }
}

#[cfg(test)]
mod usage_tests {
    use super::Usage;

    #[test]
    fn openai_usage_is_taken_as_it_is() {
        let u: Usage = serde_json::from_str(
            r#"{"prompt_tokens":1200,"completion_tokens":30,"total_tokens":1230,"prompt_tokens_details":{"cached_tokens":1024}}"#,
        )
        .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total()),
            (1200, 30, 1230)
        );
    }

    #[test]
    fn anthropic_usage_adds_the_cache_back_into_the_prompt() {
        // a real-shaped Messages usage: 5-minute and 1-hour cache writes, a cache read
        let u: Usage = serde_json::from_str(
            r#"{"input_tokens":21,"cache_creation_input_tokens":188,"cache_read_input_tokens":1024,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":88},"output_tokens":393,"service_tier":"standard"}"#,
        )
        .unwrap();
        assert_eq!(u.prompt_tokens, 21 + 188 + 1024);
        assert_eq!(u.completion_tokens, 393);
        assert_eq!(u.total(), 21 + 188 + 1024 + 393);
    }
}
