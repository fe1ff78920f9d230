//! `GET /v1/models` and `GET /v1/models/{id}`, answered by keypool from what the caller may
//! reach: the keys its credential may use, each key's exact `allow` names (or, for a key with
//! no exact names, the upstream's own list, cached and filtered by `allow`/`deny`), and the
//! gateway's `models:`. In OpenAI's list shape, in first-seen order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use keypool_config::{ModelRule, UpstreamKey, UpstreamKind};
use keypool_policy::gateway::GatewayRuntime;
use keypool_pool::KeyAccess;
use keypool_types::{ApiError, ErrorKind};
use serde_json::{Value, json};

/// How long an upstream's list is kept; a failed fetch is retried sooner.
const LIST_TTL: Duration = Duration::from_secs(600);
const FAILED_TTL: Duration = Duration::from_secs(30);
/// Longest wait for one upstream's list.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a models request asks for: the list, or one model.
pub(crate) enum Listing<'a> {
    All,
    One(&'a str),
}

/// `GET /v1/models[/{id}]` is answered by keypool; every other request goes upstream.
pub(crate) fn listing<'a>(method: &actix_web::http::Method, path: &'a str) -> Option<Listing<'a>> {
    if method != actix_web::http::Method::GET {
        return None;
    }
    match path.strip_prefix("/v1/models")? {
        "" | "/" => Some(Listing::All),
        rest => rest
            .strip_prefix('/')
            .filter(|id| !id.is_empty())
            .map(Listing::One),
    }
}

/// One upstream's model objects, and until when they are kept.
type Listed = (Instant, Arc<Vec<Value>>);

/// The upstreams' own model lists, by key name, shared by every worker.
#[derive(Default)]
pub struct ModelCatalog {
    lists: Mutex<HashMap<Arc<str>, Listed>>,
}

impl ModelCatalog {
    fn cached(&self, key: &str) -> Option<Arc<Vec<Value>>> {
        let lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        lists
            .get(key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, l)| l.clone())
    }

    /// The model objects `key`'s upstream lists at `GET {endpoint}/models`.
    async fn upstream_list(&self, http: &reqwest::Client, key: &UpstreamKey) -> Arc<Vec<Value>> {
        if let Some(l) = self.cached(&key.name) {
            return l;
        }
        let url = format!("{}/models", key.endpoint);
        let fetched = async {
            let resp = http
                .get(&url)
                .bearer_auth(key.sk.expose())
                .timeout(FETCH_TIMEOUT)
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status().as_u16()));
            }
            let body: Value = resp.json().await.map_err(|e| e.without_url().to_string())?;
            Ok::<_, String>(match body.get("data") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter(|m| m.get("id").is_some_and(Value::is_string))
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            })
        }
        .await;
        let (list, ttl) = match fetched {
            Ok(l) => (Arc::new(l), LIST_TTL),
            Err(e) => {
                tracing::warn!(key = %key.name, error = %e, "cannot list the upstream's models");
                (Arc::new(Vec::new()), FAILED_TTL)
            }
        };
        self.lists
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.name.clone(), (Instant::now() + ttl, list.clone()));
        list
    }
}

fn entry(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "keypool"})
}

/// Every model the caller may reach through `gw`, as OpenAI model objects.
async fn reachable(
    catalog: &ModelCatalog,
    http: &reqwest::Client,
    keys: &[Arc<UpstreamKey>],
    access: &KeyAccess,
    gw: &GatewayRuntime,
) -> Vec<Value> {
    let usable: Vec<&Arc<UpstreamKey>> = keys
        .iter()
        .filter(|k| k.unusable.is_none() && access.allows(k))
        .collect();
    // keys with no exact names: their upstream's own list (an `sk: asis` key has no credential
    // of its own to ask with; Replicate has no such list)
    let lists = futures::future::join_all(usable.iter().map(|k| async move {
        let exact = k.allow.iter().any(|r| matches!(r, ModelRule::Exact(_)));
        if exact || k.passthrough_auth || k.kind != UpstreamKind::OpenAi {
            Arc::new(Vec::new())
        } else {
            catalog.upstream_list(http, k).await
        }
    }))
    .await;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (k, listed) in usable.iter().zip(&lists) {
        let named = k.allow.iter().filter_map(|r| match r {
            ModelRule::Exact(m) if !m.starts_with('/') => Some(entry(m)),
            _ => None,
        });
        for m in named.chain(listed.iter().cloned()) {
            let Some(id) = m.get("id").and_then(Value::as_str) else {
                continue;
            };
            if k.allows_model(id, "") && gw.spec.allows_model(id) && seen.insert(id.to_owned()) {
                out.push(m);
            }
        }
    }
    out
}

/// The answer to a models request.
pub(crate) async fn answer(
    catalog: &ModelCatalog,
    http: &reqwest::Client,
    keys: &[Arc<UpstreamKey>],
    access: &KeyAccess,
    gw: &GatewayRuntime,
    what: &Listing<'_>,
) -> Result<HttpResponse, ApiError> {
    let models = reachable(catalog, http, keys, access, gw).await;
    match what {
        Listing::All => Ok(HttpResponse::Ok().json(json!({"object": "list", "data": models}))),
        Listing::One(id) => models
            .into_iter()
            .find(|m| m.get("id").and_then(Value::as_str) == Some(id))
            .map(|m| HttpResponse::Ok().json(m))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::ModelNotFound,
                    format!("The model `{id}` does not exist or you do not have access to it."),
                )
            }),
    }
}
