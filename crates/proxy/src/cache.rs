//! The exact response cache, as the request pipeline uses it (`cache:` on a gateway): the
//! request's hash, the lookup before any budget is held (a hit answers at once, costs nothing,
//! and records a usage event marked `cache_hit`), and what a miss keeps afterwards.
//!
//! - The hash covers the gateway, the caller (with `per_caller: true`), the path and the body as
//!   forwarded (after transforms), its JSON keys sorted at every level: the model is in it, and
//!   two requests that differ only in key order or spacing are one entry. An entry is never
//!   served to another gateway.
//! - Only `POST` chat completions, completions, embeddings and Messages with a JSON body are
//!   cached; only a `200` whole answer, or a stream that ended complete (replayed as the client
//!   first received it); never an error; an answer that calls tools only with `tool_calls: true`.
//! - The request header `x-keypool-cache: no-store` skips the cache both ways; `refresh` skips the
//!   lookup and keeps the new answer. Answers say `x-keypool-cache: hit | miss | refresh |
//!   bypass`.

use std::sync::Arc;

use actix_web::HttpResponse;
use bytes::Bytes;
use keypool_policy::cache::CachedAnswer;
use keypool_policy::gateway::GatewayRuntime;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::inspect::Inspected;

/// The header a client steers the cache with, and an answer reports it in.
pub const CACHE_HEADER: &str = "x-keypool-cache";

/// The paths whose answers are cached.
const CACHED_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
];

/// What the cache made of a request.
pub(crate) enum Lookup {
    /// Answered from the cache.
    Hit(CachedAnswer),
    /// Forwarded; what the answer is kept under (none: `no-store`), and what the answer says.
    Forward(Pending),
}

/// A forwarded request of a caching gateway: where its answer goes.
pub(crate) struct Pending {
    key: Option<String>,
    gateway: Arc<GatewayRuntime>,
    tool_calls: bool,
    /// `miss`, `refresh` or `bypass`.
    pub(crate) outcome: &'static str,
}

/// The cache's verdict on a request; `None` when the gateway has no cache or the request is
/// not one it caches.
pub(crate) async fn lookup(
    req: &actix_web::HttpRequest,
    gw: &Arc<GatewayRuntime>,
    caller: Option<&str>,
    path: &str,
    inspected: &Inspected,
) -> Option<Lookup> {
    let spec = gw.spec.routing.cache.as_ref()?;
    if req.method() != actix_web::http::Method::POST || !CACHED_PATHS.contains(&path) {
        return None;
    }
    let body: Value = serde_json::from_slice(&inspected.body).ok()?;
    let asked = req
        .headers()
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let pending = |key, outcome| {
        crate::observe::response_cache(gw, outcome);
        Some(Lookup::Forward(Pending {
            key,
            gateway: gw.clone(),
            tool_calls: spec.tool_calls,
            outcome,
        }))
    };
    if asked.eq_ignore_ascii_case("no-store") {
        return pending(None, "bypass");
    }
    let key = hash(
        &gw.name,
        spec.per_caller.then_some(caller).flatten(),
        path,
        &body,
    );
    if asked.eq_ignore_ascii_case("refresh") {
        return pending(Some(key), "refresh");
    }
    match gw.cached(&key).await {
        Some(answer) if answer.stream == inspected.stream => {
            crate::observe::response_cache(gw, "hit");
            Some(Lookup::Hit(answer))
        }
        _ => pending(Some(key), "miss"),
    }
}

impl Pending {
    /// Keeps a whole answer (a success that calls no tools, unless they are cached too).
    pub(crate) fn keep_whole(
        &self,
        status: u16,
        content_type: Option<&str>,
        model: &str,
        body: &Bytes,
    ) {
        if status != 200 || (!self.tool_calls && calls_tools(body)) {
            return;
        }
        self.keep(CachedAnswer {
            stream: false,
            content_type: content_type.unwrap_or("application/json").to_owned(),
            model: model.to_owned(),
            body: body.clone(),
        });
    }

    /// What keeps a stream once it ended complete: its bytes as the client received them.
    pub(crate) fn stream_keeper(self, model: String) -> Option<crate::relay::Keep> {
        self.key.as_ref()?;
        Some(Box::new(move |body: Bytes| {
            if !self.tool_calls && calls_tools(&body) {
                return;
            }
            self.keep(CachedAnswer {
                stream: true,
                content_type: "text/event-stream".to_owned(),
                model,
                body,
            });
        }))
    }

    fn keep(&self, answer: CachedAnswer) {
        let Some(key) = self.key.clone() else {
            return;
        };
        let gw = self.gateway.clone();
        tokio::spawn(async move { gw.cache(&key, answer).await });
    }
}

/// The answer to a hit: the cached body, as it was first sent.
pub(crate) fn replay(answer: &CachedAnswer) -> HttpResponse {
    let mut b = HttpResponse::Ok();
    b.insert_header((CACHE_HEADER, "hit"))
        .insert_header((crate::fallback::MODEL_HEADER, answer.model.as_str()))
        .content_type(answer.content_type.as_str());
    if answer.stream {
        b.insert_header(("x-accel-buffering", "no"))
            .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"));
    }
    b.body(answer.body.clone())
}

/// OpenAI's `tool_calls` / `function_call`, Anthropic's `tool_use` blocks.
fn calls_tools(body: &[u8]) -> bool {
    [
        &b"\"tool_calls\""[..],
        b"\"function_call\"",
        b"\"tool_use\"",
    ]
    .iter()
    .any(|needle| crate::sse::contains(body, needle))
}

/// The entry's name: a hash of the gateway, the caller (when entries are per caller), the
/// path and the body with its keys sorted.
fn hash(gateway: &str, caller: Option<&str>, path: &str, body: &Value) -> String {
    let mut h = Sha256::new();
    for part in [gateway, caller.unwrap_or(""), path] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let mut canonical = Vec::with_capacity(256);
    write_sorted(&mut canonical, body);
    h.update(&canonical);
    keypool_types::hex(&h.finalize())
}

/// `v` as JSON with every object's keys in order, whatever order the map keeps them in.
fn write_sorted(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_sorted(out, &m[k]);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(out, item);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_and_spacing_do_not_matter_but_everything_else_does() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let a = hash(
            "g",
            None,
            "/v1/chat/completions",
            &v(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
        );
        let b = hash(
            "g",
            None,
            "/v1/chat/completions",
            &v(r#"{ "messages": [ {"content":"hi", "role":"user"} ], "model": "m" }"#),
        );
        assert_eq!(a, b);
        let body = v(r#"{"model":"m"}"#);
        let base = hash("g", None, "/v1/chat/completions", &body);
        assert_ne!(base, hash("h", None, "/v1/chat/completions", &body));
        assert_ne!(
            base,
            hash("g", Some("tok-1"), "/v1/chat/completions", &body)
        );
        assert_ne!(base, hash("g", None, "/v1/completions", &body));
        assert_ne!(
            base,
            hash("g", None, "/v1/chat/completions", &v(r#"{"model":"n"}"#))
        );
    }

    #[test]
    fn tool_calls_are_seen_in_both_shapes() {
        assert!(calls_tools(
            br#"{"choices":[{"message":{"tool_calls":[]}}]}"#
        ));
        assert!(calls_tools(br#"{"content":[{"type":"tool_use"}]}"#));
        assert!(!calls_tools(
            br#"{"choices":[{"message":{"content":"hi"}}]}"#
        ));
    }
}
