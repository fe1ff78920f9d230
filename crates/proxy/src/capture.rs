//! What the `log:` policy records of a request, and who the client is.
//!
//! Credentials never reach a record: headers named in `log.redact_headers` (always including
//! `authorization`, `api-key`, `x-api-key`, `cookie`) are replaced by `[redacted]` before
//! anything is kept. Each field is capped at `log.max_field_bytes` and marked when truncated.

use std::net::IpAddr;

use actix_web::http::header::HeaderMap;
use keypool_config::{Config, LogPolicy};
use serde_json::Value;

/// `text` capped at `cap` bytes (on a char boundary), marked when cut.
pub fn capped(text: &str, cap: usize) -> String {
    if text.len() <= cap {
        return text.to_owned();
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated: {} bytes in all]", &text[..end], text.len())
}

/// The request headers as a JSON object, credentials redacted.
pub fn headers_json(headers: &HeaderMap, policy: &LogPolicy) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let n = name.as_str();
        let v = if policy.redact_headers.iter().any(|r| r == n) {
            "[redacted]".to_owned()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        map.insert(n.to_owned(), Value::String(v));
    }
    capped(&Value::Object(map).to_string(), policy.max_field_bytes)
}

/// A response as openai-api-route records it: the message content of each choice (or the
/// completion text, or a transcription's text); any other body as it is.
pub fn summarise_response(body: &[u8], cap: usize) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => summary_of(&v).unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    capped(&text, cap)
}

fn summary_of(v: &Value) -> Option<String> {
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        let parts: Vec<&str> = choices
            .iter()
            .filter_map(|c| {
                c.pointer("/message/content")
                    .and_then(Value::as_str)
                    .or_else(|| c.get("text").and_then(Value::as_str))
            })
            .collect();
        return Some(parts.join("\n"));
    }
    v.get("text").and_then(Value::as_str).map(str::to_owned)
}

/// The client's address: the socket peer, or — only when the peer is a trusted proxy — the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    config: &Config,
) -> Option<IpAddr> {
    let trusted = |ip: &IpAddr| config.trusted_proxies.iter().any(|net| net.contains(ip));
    let peer = peer?;
    if !trusted(&peer) {
        return Some(peer);
    }
    let Some(xff) = forwarded_for else {
        return Some(peer);
    };
    let hops: Vec<IpAddr> = xff
        .split(',')
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    Some(
        hops.iter()
            .rev()
            .find(|ip| !trusted(ip))
            .or_else(|| hops.first())
            .copied()
            .unwrap_or(peer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    #[test]
    fn caps_on_char_boundaries() {
        assert_eq!(capped("hello", 10), "hello");
        let cut = capped("héllo wörld", 3);
        assert!(cut.starts_with("h\u{e9}…[truncated: 13 bytes"), "{cut}");
    }

    #[test]
    fn redacts_credentials() {
        let cfg = keypool_config::from_yaml("log: {headers: true, redact_headers: [X-Secret]}\n")
            .unwrap();
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer t0k"),
            ("x-secret", "s"),
            ("cookie", "c"),
            ("user-agent", "ua"),
        ] {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let json = headers_json(&h, &cfg.log);
        assert!(
            !json.contains("t0k") && !json.contains("\"s\"") && !json.contains("\"c\""),
            "{json}"
        );
        assert!(json.contains("\"user-agent\":\"ua\""));
    }

    #[test]
    fn summaries() {
        let chat =
            br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"}}],"usage":{}}"#;
        assert_eq!(summarise_response(chat, 100), "Hi there");
        assert_eq!(summarise_response(br#"{"text":"heard"}"#, 100), "heard");
        assert_eq!(summarise_response(b"plain", 100), "plain");
    }

    #[test]
    fn forwarded_for_only_behind_trusted_proxies() {
        let cfg = keypool_config::from_yaml("trusted_proxies: [10.0.0.0/8]\n").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        let xff = Some("203.0.113.9, 198.51.100.2, 10.1.1.1");
        assert_eq!(client_ip(ip("10.0.0.5"), xff, &cfg), ip("198.51.100.2"));
        assert_eq!(
            client_ip(ip("192.0.2.1"), xff, &cfg),
            ip("192.0.2.1"),
            "untrusted peer: XFF ignored"
        );
        assert_eq!(client_ip(ip("10.0.0.5"), None, &cfg), ip("10.0.0.5"));
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some("junk"), &cfg),
            ip("10.0.0.5")
        );
    }
}
