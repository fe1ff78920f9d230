//! A gateway's policy at run time: the checks in their order, and the state they keep.
//!
//! Order (each step refuses with its own code): gateway exists → active → not expired → auth →
//! whitelist/blacklist → rate limits → quota → model allowed → transforms. The HTTP layer calls
//! the steps in that order; the steps themselves are pure functions of the request, the gateway's
//! spec, its state and the clock they are given, so tests drive them with a fixed clock.
//!
//! State ([`GatewayState`]: rate windows and tokens used) lives apart from the spec, so a spec
//! replaced by the admin service keeps its counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Timelike, Utc};
use keypool_config::Gateway;
use keypool_config::gateway::{AuthMethod, LimitScope, ListRule, Position, RateLimit, secret_hash};
use keypool_pool::{Admit, SharedState, WindowReq};
use keypool_types::{ApiError, ErrorKind, constant_time_eq};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::{caller_id, strip_bearer};

/// Leeway for JWT `exp` / `nbf`, for clocks that disagree a little.
pub const JWT_LEEWAY_SECS: u64 = 5;

/// The JWT claims keypool reads (`exp` / `nbf` are checked by the validator).
#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
}

/// Who a gateway caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What `secret:` limits, usage and logs use: the JWT `sub`, else `tok-<hash>` of the
    /// credential; `None` for an open gateway.
    pub id: Option<Arc<str>>,
}

/// A gateway's spec and state, as requests see it.
pub struct GatewayRuntime {
    pub spec: Arc<Gateway>,
    pub state: Arc<GatewayState>,
}

/// What a gateway remembers between requests.
#[derive(Default)]
pub struct GatewayState {
    /// Total tokens used, settled from real usage (restored from the store at start-up).
    tokens_used: AtomicU64,
    /// This replica's windows (all of them without Redis; a fallback with it).
    local: keypool_pool::InMemory,
    /// Across replicas (Redis): windows and the quota counter live there too.
    shared: Option<(Arc<dyn SharedState>, String)>,
}

/// The `x-ratelimit-*-requests` values of the tightest limit, sent with every response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window is empty again (OpenAI's "resets to its initial state").
    pub reset: Duration,
}

impl RateHeaders {
    /// `1s`, `6m0s`, `250ms`: OpenAI's duration format.
    pub fn reset_text(&self) -> String {
        let ms = self.reset.as_millis();
        if ms < 1000 {
            return format!("{ms}ms");
        }
        let secs = self.reset.as_secs() + u64::from(self.reset.subsec_nanos() > 0);
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            format!("{h}h{m}m{s}s")
        } else if m > 0 {
            format!("{m}m{s}s")
        } else {
            format!("{s}s")
        }
    }
}

/// A refusal by a rate limit: the error plus the headers that still go out with it.
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    pub headers: Option<RateHeaders>,
}

fn refuse(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message)
}

impl GatewayState {
    pub fn tokens_used(&self) -> u64 {
        self.tokens_used.load(Ordering::Relaxed)
    }

    /// Adds real usage (a request's total tokens); with shared state, also to the replicas'
    /// common counter (in the background: the request never waits for it).
    pub fn add_tokens(&self, n: u64) {
        self.tokens_used.fetch_add(n, Ordering::Relaxed);
        if let Some((shared, gateway)) = &self.shared
            && n > 0
        {
            let (shared, key) = (shared.clone(), quota_counter(gateway));
            tokio::spawn(async move {
                if let Err(e) = shared.add(&key, n).await {
                    keypool_pool::shared_failed(&e);
                }
            });
        }
    }

    /// Sets the total at start-up, from the store (the shared counter only if it has none yet).
    pub async fn restore_tokens(&self, n: u64) {
        self.tokens_used.store(n, Ordering::Relaxed);
        if let Some((shared, gateway)) = &self.shared
            && let Err(e) = shared.init(&quota_counter(gateway), n).await
        {
            keypool_pool::shared_failed(&e);
        }
    }

    /// Tokens used by the gateway on every replica (this replica's count when not shared or
    /// when the shared state is down).
    pub async fn tokens_used_everywhere(&self) -> u64 {
        match &self.shared {
            None => self.tokens_used(),
            Some((shared, gateway)) => match shared.get(&quota_counter(gateway)).await {
                Ok(n) => n,
                Err(e) => {
                    keypool_pool::shared_failed(&e);
                    self.tokens_used()
                }
            },
        }
    }
}

impl GatewayRuntime {
    pub fn new(spec: Arc<Gateway>) -> Self {
        Self {
            spec,
            state: Arc::default(),
        }
    }

    /// Active and not expired.
    pub fn check_open(&self, now: SystemTime) -> Result<(), ApiError> {
        if !self.spec.active {
            return Err(refuse(
                ErrorKind::GatewayInactive,
                format!("The gateway `{}` is not active.", self.spec.name),
            ));
        }
        if self.spec.expires_at.is_some_and(|t| now >= t) {
            return Err(refuse(
                ErrorKind::GatewayExpired,
                format!(
                    "该网关已过有效期 (the gateway `{}` has expired).",
                    self.spec.name
                ),
            ));
        }
        Ok(())
    }

    /// Where the credential is, when the gateway has auth.
    pub fn position(&self) -> Option<&Position> {
        self.spec.auth.as_ref().map(|a| &a.position)
    }

    /// Checks the credential found at the gateway's position (`Bearer ` already stripped or
    /// not: both are accepted).
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Identity, ApiError> {
        let Some(auth) = &self.spec.auth else {
            return Ok(Identity { id: None });
        };
        let missing = || {
            refuse(
                ErrorKind::InvalidApiKey,
                format!(
                    "Missing credential: this gateway reads it from {}.",
                    describe(&auth.position)
                ),
            )
        };
        let wrong = || refuse(ErrorKind::InvalidApiKey, "Incorrect API key provided.");
        let raw = credential.ok_or_else(missing)?;
        let cred = std::str::from_utf8(strip_bearer(raw.as_bytes())).unwrap_or("");
        if cred.is_empty() {
            return Err(missing());
        }
        match &auth.method {
            AuthMethod::Exact(hashes) => {
                let h = secret_hash(cred.as_bytes());
                let mut ok = false;
                for stored in hashes {
                    ok |= constant_time_eq(stored, &h);
                }
                if ok {
                    Ok(Identity {
                        id: Some(Arc::from(caller_id(cred))),
                    })
                } else {
                    Err(wrong())
                }
            }
            AuthMethod::Regex(re) => {
                if re.is_match(cred) {
                    Ok(Identity {
                        id: Some(Arc::from(caller_id(cred))),
                    })
                } else {
                    Err(wrong())
                }
            }
            AuthMethod::Jwt { key, algorithms } => {
                let mut v = jsonwebtoken::Validation::new(algorithms[0]);
                v.algorithms.clone_from(algorithms);
                v.leeway = JWT_LEEWAY_SECS;
                v.validate_nbf = true;
                v.validate_aud = false;
                match jsonwebtoken::decode::<Claims>(cred, key, &v) {
                    Ok(data) => Ok(Identity {
                        id: Some(Arc::from(
                            data.claims
                                .sub
                                .filter(|s| !s.is_empty())
                                .unwrap_or_else(|| caller_id(cred)),
                        )),
                    }),
                    Err(e) => {
                        use jsonwebtoken::errors::ErrorKind as J;
                        let why = match e.kind() {
                            J::ExpiredSignature => "the token has expired",
                            J::ImmatureSignature => "the token is not valid yet (nbf)",
                            J::InvalidAlgorithm => "the token's algorithm is not accepted",
                            J::InvalidSignature => "the token's signature is invalid",
                            J::MissingRequiredClaim(_) => "the token has no exp claim",
                            _ => "the token is malformed",
                        };
                        Err(refuse(
                            ErrorKind::InvalidApiKey,
                            format!("Incorrect API key provided: {why}."),
                        ))
                    }
                }
            }
        }
    }

    /// Whitelist / blacklist. `credential` is the extracted credential (`secret:` rules),
    /// `now` the clock for `time:` rules.
    pub fn check_lists(
        &self,
        ip: Option<IpAddr>,
        credential: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let g = &self.spec;
        let minute = {
            let local = now.with_timezone(&g.timezone);
            (local.hour() * 60 + local.minute()) as u16
        };
        let cred =
            credential.map(|c| std::str::from_utf8(strip_bearer(c.as_bytes())).unwrap_or(""));
        let hit = |r: &ListRule| match r {
            ListRule::Ip(net) => ip.is_some_and(|ip| net.contains(&canonical(ip))),
            ListRule::Secret(re) => cred.is_some_and(|c| re.is_match(c)),
            ListRule::Time { from, to } => in_range(minute, *from, *to),
        };
        let denied = if g.whitelist.is_empty() {
            g.blacklist.iter().any(hit)
        } else {
            !g.whitelist.iter().any(hit)
        };
        if denied {
            return Err(refuse(
                ErrorKind::AccessDenied,
                if g.whitelist.is_empty() {
                    "Access denied by this gateway's blacklist."
                } else {
                    "Access denied: the request matches none of this gateway's whitelist."
                },
            ));
        }
        Ok(())
    }

    /// Counts the call against every rate limit, or refuses it (counting nothing) when one is
    /// exhausted. Returns the headers of the tightest limit.
    pub fn admit(
        &self,
        identity: &Identity,
        client_ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<RateHeaders>, Refused> {
        if self.spec.rate_limits.is_empty() {
            return Ok(None);
        }
        let windows = self.windows(identity, client_ip);
        self.verdict(self.state.local.admit_now(&windows, now))
    }

    /// [`Self::admit`] with every limit divided by `share_of` (this replica's share while the
    /// shared state is unavailable).
    fn admit_share(
        &self,
        identity: &Identity,
        client_ip: Option<IpAddr>,
        now: Instant,
        share_of: u32,
    ) -> Result<Option<RateHeaders>, Refused> {
        let share = u64::from(share_of.max(1));
        let mut windows = self.windows(identity, client_ip);
        for w in &mut windows {
            w.limit = (w.limit / share).max(1);
        }
        self.verdict(self.state.local.admit_now(&windows, now))
    }

    /// The windows a call counts in: one per limit (`secret:` ones per caller).
    fn windows(&self, identity: &Identity, client_ip: Option<IpAddr>) -> Vec<WindowReq> {
        let who = who(identity, client_ip);
        let gateway = &self.spec.name;
        self.spec
            .rate_limits
            .iter()
            .map(|l| WindowReq {
                key: match l.scope {
                    LimitScope::Ingress => format!("gw:{gateway}:{}", l.text),
                    LimitScope::Secret => format!("gw:{gateway}:{}:{who}", l.text),
                },
                limit: l.limit,
                per: l.per,
            })
            .collect()
    }

    /// An admission's answer as headers (the tightest limit: fewest calls left; its window is
    /// empty `per` after this call) or a refusal naming the full limit.
    fn verdict(&self, outcome: Admit) -> Result<Option<RateHeaders>, Refused> {
        let limits = &self.spec.rate_limits;
        match outcome {
            Admit::Admitted { remaining } => Ok(limits
                .iter()
                .zip(&remaining)
                .min_by_key(|(l, r)| (**r, std::cmp::Reverse(l.per)))
                .map(|(l, r)| RateHeaders {
                    limit: l.limit,
                    remaining: *r,
                    reset: l.per,
                })),
            Admit::Refused { index, free_in } => {
                let l = &limits[index.min(limits.len() - 1)];
                let secs = (free_in.as_secs() + u64::from(free_in.subsec_nanos() > 0)).max(1);
                Err(Refused {
                    error: limit_error(l, secs),
                    headers: Some(RateHeaders {
                        limit: l.limit,
                        remaining: 0,
                        reset: free_in,
                    }),
                })
            }
        }
    }

    /// [`Self::admit`] across replicas: through the shared state when there is one (falling back
    /// to this replica's windows while it is unavailable).
    pub async fn admit_everywhere(
        &self,
        identity: &Identity,
        client_ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<RateHeaders>, Refused> {
        let limits = &self.spec.rate_limits;
        let Some((shared, _)) = &self.state.shared else {
            return self.admit(identity, client_ip, now);
        };
        if limits.is_empty() {
            return Ok(None);
        }
        match shared.admit(&self.windows(identity, client_ip), now).await {
            Ok(outcome) => self.verdict(outcome),
            Err(e) => {
                keypool_pool::shared_failed(&e);
                if shared.fail_closed() {
                    return Err(Refused {
                        error: shared_unavailable(),
                        headers: None,
                    });
                }
                self.admit_share(identity, client_ip, now, shared.replicas_hint())
            }
        }
    }

    /// Refuses once the tokens used (on every replica, with shared state) reached the quota.
    pub async fn check_quota_everywhere(&self) -> Result<(), ApiError> {
        if self.spec.token_quota.is_none() {
            return Ok(());
        }
        if let Some((shared, gateway)) = &self.state.shared {
            return match shared.get(&quota_counter(gateway)).await {
                Ok(used) => self.quota_verdict(used),
                Err(e) => {
                    keypool_pool::shared_failed(&e);
                    if shared.fail_closed() {
                        Err(shared_unavailable())
                    } else {
                        self.quota_verdict(self.state.tokens_used())
                    }
                }
            };
        }
        self.quota_verdict(self.state.tokens_used())
    }

    /// Refuses once the tokens used reached the quota.
    pub fn check_quota(&self) -> Result<(), ApiError> {
        self.quota_verdict(self.state.tokens_used())
    }

    fn quota_verdict(&self, used: u64) -> Result<(), ApiError> {
        match self.spec.token_quota {
            Some(q) if used >= q => Err(refuse(
                ErrorKind::InsufficientQuota,
                format!(
                    "This gateway has used its token quota ({q} tokens). Ask its admin for more."
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a model the gateway does not serve.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.spec.allows_model(model) {
            Ok(())
        } else {
            Err(refuse(
                ErrorKind::ModelNotFound,
                format!("The model `{model}` does not exist or you do not have access to it."),
            ))
        }
    }
}

/// Whom `secret:` limits count: the identity, else (open gateways) the client IP.
fn who(identity: &Identity, client_ip: Option<IpAddr>) -> Arc<str> {
    match (&identity.id, client_ip) {
        (Some(id), _) => id.clone(),
        (None, Some(ip)) => Arc::from(format!("ip:{ip}")),
        (None, None) => Arc::from("anonymous"),
    }
}

fn shared_unavailable() -> ApiError {
    refuse(
        ErrorKind::SharedStateUnavailable,
        "The shared rate-limit state is unavailable and this gateway refuses rather than guess.",
    )
    .retry_after(1)
}

fn quota_counter(gateway: &str) -> String {
    format!("quota:{gateway}")
}

fn limit_error(l: &RateLimit, secs: u64) -> ApiError {
    refuse(
        ErrorKind::RateLimitExceeded,
        format!(
            "Rate limit reached: {} on this gateway{}. Retry after {secs} s.",
            l.text,
            if l.scope == LimitScope::Secret {
                " for your credential"
            } else {
                ""
            }
        ),
    )
    .retry_after(secs)
}

fn describe(p: &Position) -> String {
    match p {
        Position::Header(h) => format!("the `{h}` header"),
        Position::Body(f) => format!("the `{f}` body field"),
        Position::Arg(a) => format!("the `{a}` query parameter"),
    }
}

/// An IPv4-mapped IPv6 address is matched as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// `[from, to)` in minutes of the day; `from > to` crosses midnight; `from == to` is all day.
fn in_range(minute: u16, from: u16, to: u16) -> bool {
    match from.cmp(&to) {
        std::cmp::Ordering::Less => (from..to).contains(&minute),
        std::cmp::Ordering::Greater => minute >= from || minute < to,
        std::cmp::Ordering::Equal => true,
    }
}

/// Every gateway by name; replaced whole when the configuration changes (state kept by name).
#[derive(Default)]
pub struct Gateways {
    map: RwLock<Arc<HashMap<String, Arc<GatewayRuntime>>>>,
    shared: Option<Arc<dyn SharedState>>,
}

impl Gateways {
    pub fn new(specs: &[Arc<Gateway>]) -> Self {
        Self::with_shared(specs, None)
    }

    /// Gateways whose limits and quotas hold across replicas through `shared`.
    pub fn with_shared(specs: &[Arc<Gateway>], shared: Option<Arc<dyn SharedState>>) -> Self {
        let g = Self {
            map: RwLock::default(),
            shared,
        };
        g.replace(specs);
        g
    }

    pub fn get(&self, name: &str) -> Option<Arc<GatewayRuntime>> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<GatewayRuntime>> {
        let map = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// Installs a new set of specs atomically; a gateway that keeps its name keeps its state.
    pub fn replace(&self, specs: &[Arc<Gateway>]) {
        let mut guard = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = HashMap::with_capacity(specs.len());
        for spec in specs {
            let state = guard.get(&spec.name).map_or_else(
                || {
                    Arc::new(GatewayState {
                        shared: self.shared.clone().map(|s| (s, spec.name.clone())),
                        ..GatewayState::default()
                    })
                },
                |r| r.state.clone(),
            );
            next.insert(
                spec.name.clone(),
                Arc::new(GatewayRuntime {
                    spec: spec.clone(),
                    state,
                }),
            );
        }
        *guard = Arc::new(next);
    }
}

/// Reads a top-level string field of a JSON body, for `body:` positions.
pub fn body_credential(body: &Map<String, Value>, field: &str) -> Option<String> {
    match body.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The decoded value of query parameter `name`.
pub fn query_arg(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The query without parameter `name` (other parameters kept exactly as sent).
pub fn remove_query_arg(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            url::form_urlencoded::parse(key.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Applies `param_map`, `param_fixed` and `prompt_template`, in that order.
pub fn transform(g: &Gateway, body: &mut Map<String, Value>) {
    for (path, old, new) in &g.param_map {
        if let Some(v) = get_mut(body, path)
            && v == old
        {
            *v = new.clone();
        }
    }
    for (path, value) in &g.param_fixed {
        set(body, path, value.clone());
    }
    if let Some(t) = &g.prompt_template {
        apply_template(body, t);
    }
}

fn get_mut<'a>(body: &'a mut Map<String, Value>, path: &[String]) -> Option<&'a mut Value> {
    let (first, rest) = path.split_first()?;
    let mut v = body.get_mut(first)?;
    for p in rest {
        v = v.as_object_mut()?.get_mut(p)?;
    }
    Some(v)
}

fn set(body: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut obj = body;
    for p in parents {
        let slot = obj
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else {
            return;
        };
        obj = next;
    }
    obj.insert(last.clone(), value);
}

/// The last user message's text (a string, or its text parts joined by newlines into the first
/// text part) becomes the template with `{{query}}` replaced; a completions `prompt` string too.
fn apply_template(body: &mut Map<String, Value>, template: &str) {
    if let Some(Value::String(p)) = body.get_mut("prompt") {
        *p = template.replace("{{query}}", p);
    }
    let Some(Value::Array(messages)) = body.get_mut("messages") else {
        return;
    };
    let Some(last_user) = messages
        .iter_mut()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return;
    };
    let Some(content) = last_user.get_mut("content") else {
        return;
    };
    match content {
        Value::String(s) => *s = template.replace("{{query}}", s),
        Value::Array(parts) => {
            let is_text = |p: &Value| p.get("type").and_then(Value::as_str) == Some("text");
            let query = parts
                .iter()
                .filter(|p| is_text(p))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n");
            let mut first = true;
            parts.retain_mut(|p| {
                if !is_text(p) {
                    return true;
                }
                if std::mem::take(&mut first) {
                    if let Some(obj) = p.as_object_mut() {
                        obj.insert(
                            "text".into(),
                            Value::String(template.replace("{{query}}", &query)),
                        );
                    }
                    true
                } else {
                    false
                }
            });
        }
        _ => {}
    }
}
