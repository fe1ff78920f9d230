//! Session affinity (`affinity: {ttl}`): the session a request belongs to, so the pool keeps
//! one key for it and the provider's prompt cache (which belongs to one organisation or
//! account) stays warm.
//!
//! A session is named, first found first, by the `x-session-id` header, the
//! `x-claude-code-session-id` header, the body's `prompt_cache_key` (OpenAI), the body's
//! `metadata.user_id` (Anthropic), or, with `hash_prompt: true`, the system prompt and the first
//! user message. Its name in the shared state is a hash of the gateway and that value, so a
//! client's value never becomes a key of its own making, and two gateways never share a
//! session.

use std::borrow::Cow;

use actix_web::http::header::HeaderMap;
use keypool_policy::gateway::GatewayRuntime;
use keypool_pool::SessionReq;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The headers that name a session, in the order they are looked at.
const HEADERS: [&str; 2] = ["x-session-id", "x-claude-code-session-id"];

/// The most of a session name that counts (a longer one is cut, then hashed).
const MAX_NAME: usize = 1024;

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    prompt_cache_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Option<Metadata<'a>>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Prompt {
    #[serde(default)]
    system: Option<serde_json::Value>,
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: serde_json::Value,
}

/// The request's session on a gateway with `affinity:`; `None` without one, or when nothing
/// names a session.
pub(crate) fn session(gw: &GatewayRuntime, headers: &HeaderMap, body: &[u8]) -> Option<SessionReq> {
    let affinity = gw.spec.routing.affinity?;
    let named = |name: &[u8]| Some(hashed(&gw.name, name));
    let id = HEADERS
        .iter()
        .find_map(|h| headers.get(*h).filter(|v| !v.is_empty()))
        .and_then(|v| named(v.as_bytes()))
        .or_else(|| {
            // only a body that can name a session is parsed for it
            if !crate::sse::contains(body, b"\"prompt_cache_key\"")
                && !crate::sse::contains(body, b"\"user_id\"")
            {
                return None;
            }
            let peek: Peek<'_> = serde_json::from_slice(body).ok()?;
            let name = peek
                .prompt_cache_key
                .filter(|k| !k.is_empty())
                .or_else(|| {
                    peek.metadata
                        .and_then(|m| m.user_id)
                        .filter(|u| !u.is_empty())
                })?;
            named(name.as_bytes())
        })
        .or_else(|| {
            affinity
                .hash_prompt
                .then(|| prompt_name(body))
                .flatten()
                .and_then(|p| named(&p))
        })?;
    Some(SessionReq {
        key: id,
        ttl: affinity.ttl,
    })
}

/// The system prompt and the first user message, as one string (`None` without a user message).
fn prompt_name(body: &[u8]) -> Option<Vec<u8>> {
    let p: Prompt = serde_json::from_slice(body).ok()?;
    let system = p.system.or_else(|| {
        p.messages
            .iter()
            .find(|m| m.role == "system" || m.role == "developer")
            .map(|m| m.content.clone())
    });
    let user = p.messages.iter().find(|m| m.role == "user")?;
    let mut out = serde_json::to_vec(&system).ok()?;
    out.push(0);
    out.extend(serde_json::to_vec(&user.content).ok()?);
    Some(out)
}

/// `aff:<32 hex>`: the gateway and the session's name, hashed.
fn hashed(gateway: &str, name: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(gateway.as_bytes());
    h.update([0]);
    h.update(&name[..name.len().min(MAX_NAME)]);
    format!("aff:{}", keypool_types::hex(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn gateway(name: &str, yaml: &str) -> GatewayRuntime {
        let raw: keypool_config::RawGateway =
            serde_norway::from_str(&format!("name: {name}\n{yaml}")).unwrap();
        GatewayRuntime::new(Arc::new(
            keypool_config::validate_gateway(&raw, "g").unwrap(),
        ))
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn each_way_of_naming_a_session() {
        let g = gateway("team", "affinity: {ttl: 30}");
        let none = headers(&[]);
        let by_key = session(&g, &none, br#"{"prompt_cache_key":"s1","messages":[]}"#).unwrap();
        assert_eq!(by_key.ttl, std::time::Duration::from_secs(30));
        assert!(by_key.key.starts_with("aff:") && by_key.key.len() == 36);
        // the same name the same session, whichever way it came
        let by_header = session(&g, &headers(&[("x-session-id", "s1")]), b"{}").unwrap();
        assert_eq!(by_header, by_key);
        let by_claude = session(&g, &headers(&[("x-claude-code-session-id", "s1")]), b"").unwrap();
        assert_eq!(by_claude, by_key);
        let by_user = session(&g, &none, br#"{"metadata":{"user_id":"s1"}}"#).unwrap();
        assert_eq!(by_user, by_key);
        // another gateway: another session
        let other = gateway("other", "affinity: {}");
        assert_ne!(
            session(&other, &none, br#"{"prompt_cache_key":"s1"}"#)
                .unwrap()
                .key,
            by_key.key
        );
        // nothing names one: none (the prompt is hashed only when asked)
        let chat = br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
        assert!(session(&g, &none, chat).is_none());
        let hashing = gateway("team", "affinity: {hash_prompt: true}");
        let a = session(&hashing, &none, chat).unwrap();
        let later = br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"more"}]}"#;
        assert_eq!(session(&hashing, &none, later).unwrap(), a);
        let other_prompt = br#"{"messages":[{"role":"user","content":"bye"}]}"#;
        assert_ne!(session(&hashing, &none, other_prompt).unwrap(), a);
        // a gateway without affinity names no session
        assert!(
            session(
                &gateway("plain", ""),
                &headers(&[("x-session-id", "s1")]),
                b"{}"
            )
            .is_none()
        );
    }
}
