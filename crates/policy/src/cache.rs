//! A gateway's exact response cache (`cache:`): answers by their request's hash, kept in this
//! process (`backend: memory`, bounded by `max_entries` and `max_bytes`, the oldest dropped
//! first) or in the replicas' Redis (`backend: redis`, bounded there by Redis's own memory
//! policy), for `ttl`. What makes the hash, and what may be kept, is the request pipeline's
//! (`keypool_proxy::cache`); this only keeps entries.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use keypool_config::routing::{CacheBackend, CacheSpec};
use tokio::time::Instant;

use crate::gateway::GatewayRuntime;

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// An SSE stream as the client received it, or a whole body.
    pub stream: bool,
    pub content_type: String,
    /// The model that served it.
    pub model: String,
    pub body: Bytes,
}

/// The entries one process keeps for one gateway.
#[derive(Default)]
pub struct MemoryCache {
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, (CachedAnswer, Instant)>,
    /// Keys oldest first (an entry replaced is found here twice; the stale one is skipped).
    order: VecDeque<(String, Instant)>,
    bytes: u64,
}

impl Entries {
    fn remove(&mut self, key: &str) {
        if let Some((old, _)) = self.map.remove(key) {
            self.bytes -= old.body.len() as u64;
        }
    }

    /// Drops the oldest entries until one more of `size` bytes fits.
    fn make_room(&mut self, spec: &CacheSpec, size: u64) {
        while self.map.len() as u64 >= spec.max_entries || self.bytes + size > spec.max_bytes {
            let Some((key, stored)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&key).is_some_and(|(_, at)| *at == stored) {
                self.remove(&key);
            }
        }
    }
}

impl MemoryCache {
    fn get(&self, key: &str, now: Instant, spec: &CacheSpec) -> Option<CachedAnswer> {
        let mut e = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match e.map.get(key) {
            Some((answer, at)) if now.saturating_duration_since(*at) < spec.ttl => {
                Some(answer.clone())
            }
            Some(_) => {
                e.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: &str, answer: CachedAnswer, now: Instant, spec: &CacheSpec) {
        let size = answer.body.len() as u64;
        if size > spec.max_bytes {
            return;
        }
        let mut e = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        e.remove(key);
        e.make_room(spec, size);
        e.bytes += size;
        e.map.insert(key.to_owned(), (answer, now));
        e.order.push_back((key.to_owned(), now));
        // replaced entries leave stale keys behind: compact when they outnumber the live ones
        if e.order.len() > 2 * e.map.len() + 64 {
            let Entries { map, order, .. } = &mut *e;
            order.retain(|(k, at)| map.get(k).is_some_and(|(_, t)| t == at));
        }
    }

    /// Entries and bytes kept now.
    pub fn size(&self) -> (usize, u64) {
        let e = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (e.map.len(), e.bytes)
    }
}

/// `<stream>\n<content type>\n<model>\n<body>`: a cached answer as one Redis string.
fn encode(a: &CachedAnswer) -> Option<String> {
    let body = std::str::from_utf8(&a.body).ok()?;
    Some(format!(
        "{}\n{}\n{}\n{body}",
        u8::from(a.stream),
        a.content_type.replace('\n', " "),
        a.model.replace('\n', " ")
    ))
}

fn decode(s: &str) -> Option<CachedAnswer> {
    let mut parts = s.splitn(4, '\n');
    let stream = parts.next()? == "1";
    let content_type = parts.next()?.to_owned();
    let model = parts.next()?.to_owned();
    let body = Bytes::from(parts.next()?.to_owned());
    Some(CachedAnswer {
        stream,
        content_type,
        model,
        body,
    })
}

impl GatewayRuntime {
    /// The answer cached under `key`, while its `ttl` lasts.
    pub async fn cached(&self, key: &str) -> Option<CachedAnswer> {
        let spec = self.spec.routing.cache.as_ref()?;
        match (spec.backend, self.state.shared()) {
            (CacheBackend::Redis, Some(shared)) => {
                match shared.pinned(&format!("cache:{key}")).await {
                    Ok(v) => v.as_deref().and_then(decode),
                    Err(e) => {
                        shared.background_failed(&e);
                        None
                    }
                }
            }
            _ => self.state.cache.get(key, Instant::now(), spec),
        }
    }

    /// Keeps `answer` under `key` for the cache's `ttl` (an answer over the entry or memory
    /// bound, or not UTF-8 for Redis, is not kept).
    pub async fn cache(&self, key: &str, answer: CachedAnswer) {
        let Some(spec) = self.spec.routing.cache.as_ref() else {
            return;
        };
        if answer.body.len() as u64 > keypool_config::routing::MAX_CACHE_ENTRY_BYTES {
            return;
        }
        match (spec.backend, self.state.shared()) {
            (CacheBackend::Redis, Some(shared)) => {
                let Some(value) = encode(&answer) else {
                    return;
                };
                if let Err(e) = shared.pin(&format!("cache:{key}"), &value, spec.ttl).await {
                    shared.background_failed(&e);
                }
            }
            _ => self.state.cache.put(key, answer, Instant::now(), spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(max_entries: u64, max_bytes: u64) -> CacheSpec {
        CacheSpec {
            ttl: Duration::from_secs(60),
            max_entries,
            max_bytes,
            backend: CacheBackend::Memory,
            per_caller: false,
            tool_calls: false,
        }
    }

    fn answer(body: &'static str) -> CachedAnswer {
        CachedAnswer {
            stream: false,
            content_type: "application/json".into(),
            model: "m".into(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn bounded_by_entries_and_bytes_oldest_first_and_by_ttl() {
        let c = MemoryCache::default();
        let t = Instant::now();
        let s = spec(2, 10);
        c.put("a", answer("1234"), t, &s);
        c.put("b", answer("1234"), t, &s);
        c.put("c", answer("1234"), t, &s);
        assert_eq!(c.get("a", t, &s), None, "the oldest made room");
        assert_eq!(c.size(), (2, 8));
        // bytes: 8 + 4 > 10, so b goes too
        c.put("d", answer("1234"), t, &s);
        assert_eq!(c.size(), (2, 8));
        assert!(c.get("b", t, &s).is_none() && c.get("d", t, &s).is_some());
        // a replaced entry counts once
        c.put("d", answer("12"), t, &s);
        assert_eq!(c.size(), (2, 6));
        // too large for the cache at all: not kept
        c.put("e", answer("12345678901"), t, &s);
        assert!(c.get("e", t, &s).is_none());
        assert!(
            c.get("d", t + Duration::from_secs(61), &s).is_none(),
            "expired"
        );
    }

    #[test]
    fn an_answer_round_trips_through_its_redis_form() {
        let mut a = answer("data: {\"x\":1}\n\ndata: [DONE]\n\n");
        a.stream = true;
        assert_eq!(decode(&encode(&a).unwrap()), Some(a));
    }
}
