//! Routing a gateway asks for beyond picking a key: model fallbacks (`fallbacks:`,
//! `context_fallbacks:`), session affinity (`affinity:`) and the exact response cache
//! (`cache:`), as written ([`RawRouting`]) and validated ([`Routing`]). Each can be set per
//! gateway or at the top level (the `default` gateway's).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most fallback models one model may list.
pub const MAX_FALLBACKS: usize = 10;

/// The longest affinity or cache entry life: a day.
pub const MAX_TTL_SECS: f64 = 86_400.0;

/// The routing fields of a gateway, as written (the same four fields in a gateway and at the
/// top level).
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
pub struct RawRouting {
    /// `model: [next, ...]`: tried in order when no key for `model` can serve.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// The same for an answer `400 context_length_exceeded`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context_fallbacks: BTreeMap<String, Vec<String>>,
    /// `{ttl: 600}`: a session keeps its key while it is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<RawAffinity>,
    /// `{ttl: 300, ...}`: identical requests answered from a cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<RawCache>,
}

/// `affinity:` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAffinity {
    /// Seconds of inactivity a session keeps its key (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<f64>,
    /// Also name a session by a hash of its system prompt and first user message, when it
    /// names itself no other way (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_prompt: Option<bool>,
}

/// `cache:` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Seconds an answer is served from the cache (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<f64>,
    /// Entries kept in memory at most (default 10,000; `memory` backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
    /// Bytes of answers kept at most (default 64 MiB in memory; per entry, 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// `memory` (default: this replica's) or `redis` (shared by the replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Each caller has its own entries (default false: callers of the gateway share them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<bool>,
    /// Answers that call tools are cached too (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<bool>,
}

/// A gateway's validated routing.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Routing {
    pub fallbacks: BTreeMap<String, Vec<String>>,
    pub context_fallbacks: BTreeMap<String, Vec<String>>,
    pub affinity: Option<Affinity>,
    pub cache: Option<CacheSpec>,
}

/// Session affinity, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affinity {
    pub ttl: Duration,
    pub hash_prompt: bool,
}

/// Where cached answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Memory,
    Redis,
}

/// The response cache, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    pub ttl: Duration,
    pub max_entries: u64,
    pub max_bytes: u64,
    pub backend: CacheBackend,
    pub per_caller: bool,
    pub tool_calls: bool,
}

/// The largest answer one cache entry holds.
pub const MAX_CACHE_ENTRY_BYTES: u64 = 1 << 20;

impl Routing {
    /// The models to try after `model` for this reason, in order.
    pub fn fallbacks_for(&self, model: &str, context: bool) -> &[String] {
        let map = if context {
            &self.context_fallbacks
        } else {
            &self.fallbacks
        };
        map.get(model).map_or(&[], Vec::as_slice)
    }
}

/// Validates `raw`; each mistake as (field path under the gateway, reason).
pub fn validate_routing(raw: &RawRouting) -> Result<Routing, Vec<(String, String)>> {
    let mut errs = Vec::new();
    for (field, map) in [
        ("fallbacks", &raw.fallbacks),
        ("context_fallbacks", &raw.context_fallbacks),
    ] {
        for (model, chain) in map {
            let at = format!("{field}.{model}");
            if model.trim().is_empty() {
                errs.push((field.to_owned(), "a model name is empty".to_owned()));
            }
            if chain.is_empty() || chain.len() > MAX_FALLBACKS {
                errs.push((at.clone(), format!("list 1 to {MAX_FALLBACKS} models")));
            }
            for (i, m) in chain.iter().enumerate() {
                if m.trim().is_empty() || m == model {
                    errs.push((
                        format!("{at}[{i}]"),
                        "must name another model than the one it stands in for".to_owned(),
                    ));
                }
            }
        }
    }
    let affinity = raw.affinity.as_ref().map(|a| Affinity {
        ttl: ttl(&mut errs, "affinity.ttl", a.ttl, 600.0),
        hash_prompt: a.hash_prompt.unwrap_or(false),
    });
    let cache = raw.cache.as_ref().map(|c| validate_cache(c, &mut errs));
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Routing {
        fallbacks: trimmed(&raw.fallbacks),
        context_fallbacks: trimmed(&raw.context_fallbacks),
        affinity,
        cache,
    })
}

/// A positive number of seconds up to [`MAX_TTL_SECS`] (`default` when unset).
fn ttl(errs: &mut Vec<(String, String)>, at: &str, v: Option<f64>, default: f64) -> Duration {
    let v = v.unwrap_or(default);
    if v.is_finite() && v > 0.0 && v <= MAX_TTL_SECS {
        Duration::from_secs_f64(v)
    } else {
        errs.push((
            at.to_owned(),
            format!("must be more than 0 and at most {MAX_TTL_SECS} seconds"),
        ));
        Duration::from_secs_f64(default)
    }
}

fn validate_cache(c: &RawCache, errs: &mut Vec<(String, String)>) -> CacheSpec {
    let backend = match c.backend.as_deref().unwrap_or("memory") {
        "memory" => CacheBackend::Memory,
        "redis" => CacheBackend::Redis,
        other => {
            errs.push((
                "cache.backend".to_owned(),
                format!("expected memory or redis, got {other:?}"),
            ));
            CacheBackend::Memory
        }
    };
    let max_entries = c.max_entries.unwrap_or(10_000);
    if max_entries == 0 || max_entries > 10_000_000 {
        errs.push((
            "cache.max_entries".to_owned(),
            "must be between 1 and 10000000".to_owned(),
        ));
    }
    let max_bytes = c.max_bytes.unwrap_or(64 << 20);
    if !(1024..=(16 << 30)).contains(&max_bytes) {
        errs.push((
            "cache.max_bytes".to_owned(),
            "must be between 1 KiB and 16 GiB".to_owned(),
        ));
    }
    CacheSpec {
        ttl: ttl(errs, "cache.ttl", c.ttl, 300.0),
        max_entries,
        max_bytes,
        backend,
        per_caller: c.per_caller.unwrap_or(false),
        tool_calls: c.tool_calls.unwrap_or(false),
    }
}

fn trimmed(map: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    map.iter()
        .map(|(k, v)| {
            (
                k.trim().to_owned(),
                v.iter().map(|m| m.trim().to_owned()).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawRouting {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn fallbacks_and_defaults() {
        let r = validate_routing(&raw(
            "fallbacks: {gpt-4o: [gpt-4o-mini, claude-sonnet-4-5]}\naffinity: {}\ncache: {backend: redis}\n",
        ))
        .unwrap();
        assert_eq!(
            r.fallbacks_for("gpt-4o", false),
            ["gpt-4o-mini", "claude-sonnet-4-5"]
        );
        assert!(r.fallbacks_for("gpt-4o", true).is_empty());
        assert_eq!(r.affinity.unwrap().ttl, Duration::from_secs(600));
        let c = r.cache.unwrap();
        assert_eq!(
            (c.ttl, c.backend, c.per_caller),
            (Duration::from_secs(300), CacheBackend::Redis, false)
        );
    }

    #[test]
    fn mistakes_name_their_field() {
        let e = validate_routing(&raw(
            "fallbacks: {a: [a], b: []}\naffinity: {ttl: 0}\ncache: {backend: disk, max_entries: 0}\n",
        ))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "fallbacks.a[0]",
                "fallbacks.b",
                "affinity.ttl",
                "cache.backend",
                "cache.max_entries"
            ]
        );
    }
}
