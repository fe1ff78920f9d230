//! Token usage, in OpenAI's terms whichever provider reported it.

use std::sync::Arc;

use serde::Deserialize;

/// The `usage` object of a completion, a stream's last chunk, an embedding response, a
/// Responses API response or an Anthropic message.
///
/// `prompt_tokens` counts every input token, cached or not, as OpenAI's does; the cache counts
/// are parts of it, never added to it again. Anthropic's `input_tokens` leaves the cache's out,
/// so they are added back (`input_tokens + cache_creation_input_tokens +
/// cache_read_input_tokens`); OpenAI's `prompt_tokens` (and the Responses API's `input_tokens`)
/// already hold `cached_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "WireUsage")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache: OpenAI's
    /// `prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens`.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the cache: Anthropic's `cache_creation_input_tokens`.
    pub cache_write_tokens: u64,
    /// Of `cache_write_tokens`, those written for an hour (Anthropic's
    /// `cache_creation.ephemeral_1h_input_tokens`); the rest are kept five minutes.
    pub cache_write_1h_tokens: u64,
}

/// Either provider's `usage` object as it comes.
#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    /// The Responses API's name for `prompt_tokens_details`.
    #[serde(default)]
    input_tokens_details: Option<Details>,
    // Anthropic's, and the Responses API's input/output (not flattened: a flattened struct
    // is read through a buffered map, allocations on every answer)
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// Anthropic's usage counts, each when present. A stream reports them over several events
/// (`message_start`, then each `message_delta`): [`Self::update`] keeps the latest of each.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct AnthropicCounts {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: u64,
}

impl AnthropicCounts {
    /// Takes each count `later` reports (they are totals so far, not increments).
    pub fn update(&mut self, later: Self) {
        fn take<T>(kept: &mut Option<T>, new: Option<T>) {
            if new.is_some() {
                *kept = new;
            }
        }
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        take(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        take(&mut self.cache_creation, later.cache_creation);
    }

    /// Whether any count is there (an object without one is not Anthropic's usage).
    fn any(&self) -> bool {
        self.input_tokens.is_some() || self.output_tokens.is_some()
    }

    /// In keypool's terms: the prompt is every input token, cache writes and reads included.
    pub fn usage(&self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        let prompt = self.input_tokens.unwrap_or(0) + written + read;
        let completion = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cache_read_tokens: read,
            cache_write_tokens: written,
            cache_write_1h_tokens: self
                .cache_creation
                .map_or(0, |c| c.ephemeral_1h_input_tokens.min(written)),
        }
    }
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Self {
        let cached = |d: Option<Details>| d.and_then(|d| d.cached_tokens).unwrap_or(0);
        let a = AnthropicCounts {
            input_tokens: w.input_tokens,
            output_tokens: w.output_tokens,
            cache_creation_input_tokens: w.cache_creation_input_tokens,
            cache_read_input_tokens: w.cache_read_input_tokens,
            cache_creation: w.cache_creation,
        };
        // the Responses API: input_tokens (cache included), output_tokens, total_tokens
        if let Some(details) = w.input_tokens_details {
            let prompt = a.input_tokens.unwrap_or(0);
            let completion = a.output_tokens.unwrap_or(0);
            return Self {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: if w.total_tokens == 0 {
                    prompt + completion
                } else {
                    w.total_tokens
                },
                cache_read_tokens: cached(Some(details)),
                ..Self::default()
            };
        }
        if a.any() {
            return a.usage();
        }
        Self {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            total_tokens: w.total_tokens,
            cache_read_tokens: cached(w.prompt_tokens_details),
            ..Self::default()
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
    /// What the usage cost, in pico-dollars (10⁻¹² USD); `None` without usage or for a model
    /// without a price (never 0 for "unknown").
    pub cost_pico: Option<u64>,
    pub client_ip: Option<std::net::IpAddr>,
    /// Error class when the request did not succeed (`upstream_5xx`, `client_cancelled`, ...).
    pub error: Option<&'static str>,
    pub user_agent: Option<String>,
    /// What the `log:` policy asked to keep of this request, already redacted and capped.
    pub log: Option<Box<RequestLog>>,
    /// The model the client asked for, when a fallback model (`model`) served it.
    pub requested_model: Option<String>,
    /// Answered from the response cache: no key, no upstream, no cost.
    pub cache_hit: bool,
    /// Guardrail rules that matched, by name (`request:phone,response:keywords`); never the
    /// matched text.
    pub guardrails: Option<String>,
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
    new_event_id_at(std::time::SystemTime::now())
}

/// [`new_event_id`] for an event that happened `at` (the event's own time, one clock read).
pub fn new_event_id_at(at: std::time::SystemTime) -> u128 {
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = fastrand::u128(..) & ((1u128 << 80) - 1);
    ((ms & 0xffff_ffff_ffff) << 80) | random
}

/// `bytes` as lower-case hex digits (hashes in names: callers, sessions, cache entries).
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
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
    fn bytes_as_hex() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(super::hex(&[]), "");
    }

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
    //! Reference cases: whole `usage` objects shaped as the providers send them.
    use super::{AnthropicCounts, Usage};

    fn parse(json: &str) -> Usage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn openai_chat_usage_keeps_cached_tokens_inside_the_prompt() {
        let u = parse(
            r#"{"prompt_tokens":1200,"completion_tokens":30,"total_tokens":1230,
                "prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
                "completion_tokens_details":{"reasoning_tokens":12,"audio_tokens":0,
                "accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
        );
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total()),
            (1200, 30, 1230)
        );
        assert_eq!((u.cache_read_tokens, u.cache_write_tokens), (1024, 0));
        // an older answer without details
        let u = parse(r#"{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}"#);
        assert_eq!((u.prompt_tokens, u.cache_read_tokens), (9, 0));
    }

    #[test]
    fn responses_api_usage_keeps_cached_tokens_inside_the_input() {
        let u = parse(
            r#"{"input_tokens":2048,"input_tokens_details":{"cached_tokens":1920},
                "output_tokens":100,"output_tokens_details":{"reasoning_tokens":64},
                "total_tokens":2148}"#,
        );
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total()),
            (2048, 100, 2148)
        );
        assert_eq!(u.cache_read_tokens, 1920);
    }

    #[test]
    fn anthropic_usage_adds_the_cache_back_into_the_prompt() {
        // a real-shaped Messages usage: 5-minute and 1-hour cache writes, a cache read
        let u = parse(
            r#"{"input_tokens":21,"cache_creation_input_tokens":188,"cache_read_input_tokens":1024,
                "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":88},
                "output_tokens":393,"service_tier":"standard"}"#,
        );
        assert_eq!(u.prompt_tokens, 21 + 188 + 1024);
        assert_eq!(u.completion_tokens, 393);
        assert_eq!(u.total(), 21 + 188 + 1024 + 393);
        assert_eq!(
            (
                u.cache_read_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (1024, 188, 88)
        );
        // without the split, every write is a five-minute one
        let u = parse(r#"{"input_tokens":3,"cache_creation_input_tokens":50,"output_tokens":1}"#);
        assert_eq!((u.cache_write_tokens, u.cache_write_1h_tokens), (50, 0));
    }

    #[test]
    fn an_anthropic_stream_counts_start_then_deltas() {
        let mut counts = AnthropicCounts::default();
        let start: AnthropicCounts = serde_json::from_str(
            r#"{"input_tokens":25,"cache_creation_input_tokens":10,"cache_read_input_tokens":2000,"output_tokens":1}"#,
        )
        .unwrap();
        counts.update(start);
        // message_delta repeats the running output total (newer API versions repeat the rest)
        counts.update(serde_json::from_str(r#"{"output_tokens":7}"#).unwrap());
        counts.update(serde_json::from_str(r#"{"output_tokens":15}"#).unwrap());
        let u = counts.usage();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total()),
            (2035, 15, 2050)
        );
        assert_eq!((u.cache_read_tokens, u.cache_write_tokens), (2000, 10));
    }
}
