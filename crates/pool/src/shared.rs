//! [`SharedState`]: the counters that must hold across replicas — sliding windows (key rpm,
//! gateway `ingress:`/`secret:` limits), token counters (quotas) and key health events — with an
//! in-process implementation ([`InMemory`]) and a Redis one ([`RedisState`]).
//!
//! Both give the same contract, tested by one suite over both: `admit` checks every window of a
//! call and, only when all have room, counts the call in all of them — atomically (a mutex in
//! process; one Lua script in Redis, on Redis's clock), so concurrent callers on any number of
//! replicas never admit more than a limit. "n per minute" means at most n in any trailing minute.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One sliding window a call must fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowReq {
    /// Identifies the window (the prefix is added by the implementation).
    pub key: String,
    pub limit: u64,
    pub per: Duration,
}

/// A key's token window a pick must also fit in (its `tpm`): `cost` estimated tokens, settled
/// later with [`SharedState::settle_tokens`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReq {
    pub key: String,
    pub limit: u64,
    pub cost: u64,
}

/// What `admit` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Counted in every window; calls left in each (in request order) after this one.
    Admitted { remaining: Vec<u64> },
    /// Window `index` is full until one call leaves it, in `free_in`; nothing was counted.
    Refused { index: usize, free_in: Duration },
}

/// What `pick` chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Picked {
    /// Candidate `i` had room and the call is counted in its window.
    Index(usize),
    /// None had room; the first frees up in this long.
    Busy(Duration),
}

/// A key's health as one replica saw it, for the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// Cooling down for this long from now.
    Cooling(Duration),
    /// Rejected by its upstream (401/403).
    Disabled(String),
}

/// The shared state is unreachable or answered nonsense.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shared state unavailable: {0}")]
pub struct SharedError(pub String);

#[async_trait::async_trait]
pub trait SharedState: Send + Sync {
    /// `"memory"` or `"redis"`.
    fn kind(&self) -> &'static str;

    /// Checks every window and counts the call in all of them, or in none. `now` is the
    /// in-process clock (a shared implementation uses its own, the same for all replicas).
    async fn admit(&self, windows: &[WindowReq], now: Instant) -> Result<Admit, SharedError>;

    /// Chooses among candidate windows (in preference order) the one with room — the least
    /// used (`least_used`, ties to the earlier) or the first — and counts the call in it: the
    /// pick and the reservation in one step (one round trip in Redis). A window with limit
    /// `u64::MAX` is unbudgeted: it only ranks, and may be counted approximately.
    async fn pick(
        &self,
        candidates: &[WindowReq],
        least_used: bool,
        now: Instant,
    ) -> Result<Picked, SharedError> {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.pick_reserving(candidates, &[], least_used, &id, now)
            .await
    }

    /// [`Self::pick`] where candidate `i` must also fit `tokens[i]` (when given: its key's
    /// token window, a trailing sum); the chosen one's tokens are reserved under `id`.
    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        now: Instant,
    ) -> Result<Picked, SharedError>;

    /// Replaces the estimate reserved under `id` in a token window by the real count (nothing
    /// when the reservation already left the window).
    async fn settle_tokens(&self, req: &TokenReq, id: &str, actual: u64)
    -> Result<(), SharedError>;

    /// Adds `n` to a counter; answers the new total.
    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError>;

    /// A counter's total (0 when absent).
    async fn get(&self, counter: &str) -> Result<u64, SharedError>;

    /// Sets a counter unless it exists (start-up restore: the first replica's value wins).
    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError>;

    /// Tells the other replicas about a key's health.
    async fn publish_health(&self, key: &str, event: &HealthEvent) -> Result<(), SharedError>;

    /// While unavailable, refuse (`true`, `on_failure: closed`) rather than fall back to local
    /// limits.
    fn fail_closed(&self) -> bool {
        false
    }

    /// How many replicas share the limits (`redis.replicas_hint`): while the shared state is
    /// unavailable, each replica enforces `1/N` of every rate budget on its own.
    fn replicas_hint(&self) -> u32 {
        1
    }
}

/// A token reservation: when, under which id, how many.
type TokenEntry = (Instant, String, u64);

/// One process's state: windows of admission instants, counters.
#[derive(Default)]
pub struct InMemory {
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Token windows.
    tokens: Mutex<HashMap<String, VecDeque<TokenEntry>>>,
    counters: Mutex<HashMap<String, u64>>,
}

fn prune(q: &mut VecDeque<Instant>, now: Instant, per: Duration) {
    while q
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= per)
    {
        q.pop_front();
    }
}

#[async_trait::async_trait]
impl SharedState for InMemory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn admit(&self, windows: &[WindowReq], now: Instant) -> Result<Admit, SharedError> {
        Ok(self.admit_now(windows, now))
    }

    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        now: Instant,
    ) -> Result<Picked, SharedError> {
        let mut all = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut toks = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut best: Option<(usize, usize)> = None;
        let mut earliest: Option<Duration> = None;
        for (i, w) in candidates.iter().enumerate() {
            if let Some(Some(t)) = tokens.get(i) {
                let q = toks.entry(t.key.clone()).or_default();
                while q
                    .front()
                    .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= w.per)
                {
                    q.pop_front();
                }
                let used: u64 = q.iter().map(|(_, _, n)| n).sum();
                let cost = t.cost.min(t.limit);
                if used + cost > t.limit {
                    let mut must_free = used + cost - t.limit;
                    let mut free = w.per;
                    for (at, _, n) in q.iter() {
                        if *n >= must_free {
                            free = (*at + w.per).saturating_duration_since(now);
                            break;
                        }
                        must_free -= n;
                    }
                    earliest = Some(earliest.map_or(free, |e| e.min(free)));
                    continue;
                }
            }
            let q = all.entry(w.key.clone()).or_default();
            prune(q, now, w.per);
            if (q.len() as u64) < w.limit {
                if best.is_none_or(|(_, n)| q.len() < n) {
                    best = Some((i, q.len()));
                }
                if !least_used {
                    break;
                }
            } else {
                let free = q.front().map_or(Duration::ZERO, |t| {
                    (*t + w.per).saturating_duration_since(now)
                });
                earliest = Some(earliest.map_or(free, |e| e.min(free)));
            }
        }
        Ok(match best {
            Some((i, _)) => {
                all.entry(candidates[i].key.clone())
                    .or_default()
                    .push_back(now);
                if let Some(Some(t)) = tokens.get(i) {
                    toks.entry(t.key.clone()).or_default().push_back((
                        now,
                        id.to_owned(),
                        t.cost.min(t.limit),
                    ));
                }
                Picked::Index(i)
            }
            None => Picked::Busy(earliest.unwrap_or_default()),
        })
    }

    async fn settle_tokens(
        &self,
        req: &TokenReq,
        id: &str,
        actual: u64,
    ) -> Result<(), SharedError> {
        let mut toks = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = toks
            .get_mut(&req.key)
            .and_then(|q| q.iter_mut().rev().find(|(_, i, _)| i == id))
        {
            e.2 = actual;
        }
        Ok(())
    }

    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError> {
        let mut c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = c.entry(counter.to_owned()).or_default();
        *v += n;
        Ok(*v)
    }

    async fn get(&self, counter: &str) -> Result<u64, SharedError> {
        Ok(self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(counter)
            .copied()
            .unwrap_or(0))
    }

    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(counter.to_owned())
            .or_insert(n);
        Ok(())
    }

    async fn publish_health(&self, _: &str, _: &HealthEvent) -> Result<(), SharedError> {
        Ok(()) // one process: its actors already know
    }
}

impl InMemory {
    /// The synchronous core of [`SharedState::admit`].
    pub fn admit_now(&self, windows: &[WindowReq], now: Instant) -> Admit {
        let mut all = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut refused: Option<(usize, Duration)> = None;
        for (i, w) in windows.iter().enumerate() {
            let q = all.entry(w.key.clone()).or_default();
            prune(q, now, w.per);
            if q.len() as u64 >= w.limit {
                let free_in = q.front().map_or(Duration::ZERO, |t| {
                    (*t + w.per).saturating_duration_since(now)
                });
                if refused.is_none_or(|(_, d)| free_in > d) {
                    refused = Some((i, free_in));
                }
            }
        }
        if let Some((index, free_in)) = refused {
            return Admit::Refused { index, free_in };
        }
        let remaining = windows
            .iter()
            .map(|w| {
                let q = all.entry(w.key.clone()).or_default();
                q.push_back(now);
                w.limit.saturating_sub(q.len() as u64)
            })
            .collect();
        if all.len() > 4096 {
            let longest = windows.iter().map(|w| w.per).max().unwrap_or_default();
            all.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < longest)
            });
        }
        Admit::Admitted { remaining }
    }
}

/// Redis: sorted sets of admission times (scored in Redis's milliseconds), plain counters, and a
/// pub/sub channel for key health. Calls time out after `timeout`, so a dead Redis never holds a
/// request; the connection manager reconnects by itself.
pub struct RedisState {
    /// `on_failure: closed`.
    pub closed: bool,
    /// `redis.replicas_hint` (1 when unset).
    pub replicas_hint: u32,
    conn: redis::aio::ConnectionManager,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
    pick_script: redis::Script,
    settle_script: redis::Script,
}

/// Prunes, checks and (only if all fit) records, on Redis's clock. KEYS: windows. ARGV: member
/// id, then (limit, per_ms) per window. Returns {1, remaining...} or {0, index, free_in_ms}.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local worst, worst_free = 0, -1
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local per = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - per)
  if redis.call('ZCARD', KEYS[i]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local free = per
    if oldest[2] then free = tonumber(oldest[2]) + per - now end
    if free > worst_free then worst, worst_free = i, free end
  end
end
if worst > 0 then return {0, worst - 1, worst_free} end
local out = {1}
for i = 1, #KEYS do
  local per = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', KEYS[i], now, id)
  redis.call('PEXPIRE', KEYS[i], per)
  out[i + 1] = tonumber(ARGV[2 * i]) - redis.call('ZCARD', KEYS[i])
end
return out
";

/// Chooses and reserves in one step. KEYS: per candidate, in preference order, its request
/// window and its token window. ARGV: member id, `least` or `first`, then per candidate
/// (limit, per_ms, token_limit, token_cost); a limit of 0 means unbudgeted, a token limit of 0
/// no token budget. Returns {1, index} or {0, free_in_ms}.
///
/// A budgeted window is exact (a sorted set of admission times, bounded by its limit). An
/// unbudgeted one only ranks, so it is two per-window counters (this window and the last one,
/// weighted by how much of the last still overlaps): O(1), whatever the traffic. A token window
/// is a sorted set of `id:tokens` members with a running sum beside it (`<key>:sum`): members
/// leaving the window are subtracted once, so the check is O(1) amortised.
const PICK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local least = ARGV[2] == 'least'
local best, best_n, earliest = 0, -1, -1
local function tokens_used(k, per)
  local sum = tonumber(redis.call('GET', k .. ':sum') or '0')
  local old = redis.call('ZRANGEBYSCORE', k, '-inf', now - per)
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - tonumber(string.match(m, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
    if sum < 0 or redis.call('ZCARD', k) == 0 then sum = 0 end
    redis.call('SET', k .. ':sum', sum, 'PX', per)
  end
  return sum
end
for i = 1, #KEYS / 2 do
  local limit = tonumber(ARGV[4 * i - 1])
  local per = tonumber(ARGV[4 * i])
  local tlimit = tonumber(ARGV[4 * i + 1])
  local tk = KEYS[2 * i]
  local n
  local tokens_fit = true
  if tlimit > 0 then
    local cost = math.min(tonumber(ARGV[4 * i + 2]), tlimit)
    local used = tokens_used(tk, per)
    if used + cost > tlimit then
      tokens_fit = false
      local must_free = used + cost - tlimit
      local free = per
      local all = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
      for j = 1, #all, 2 do
        local m = tonumber(string.match(all[j], ':(%d+)$'))
        if m >= must_free then free = tonumber(all[j + 1]) + per - now break end
        must_free = must_free - m
      end
      if earliest < 0 or free < earliest then earliest = free end
    end
  end
  local k = KEYS[2 * i - 1]
  if not tokens_fit then
    n = nil
  elseif limit == 0 then
    local slot = math.floor(now / per)
    local cur = tonumber(redis.call('GET', k .. ':' .. slot) or '0')
    local prev = tonumber(redis.call('GET', k .. ':' .. (slot - 1)) or '0')
    n = cur + prev * (1 - (now % per) / per)
    limit = n + 1
  else
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
    n = redis.call('ZCARD', k)
  end
  if n == nil then
    -- no room for its tokens: ranked out
  elseif n < limit then
    if best == 0 or n < best_n then best, best_n = i, n end
    if not least then break end
  else
    local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
    local free = per
    if oldest[2] then free = tonumber(oldest[2]) + per - now end
    if earliest < 0 or free < earliest then earliest = free end
  end
end
if best == 0 then return {0, earliest} end
local per = tonumber(ARGV[4 * best])
local k = KEYS[2 * best - 1]
if tonumber(ARGV[4 * best - 1]) == 0 then
  local c = k .. ':' .. math.floor(now / per)
  redis.call('INCR', c)
  redis.call('PEXPIRE', c, 2 * per)
else
  redis.call('ZADD', k, now, ARGV[1])
  redis.call('PEXPIRE', k, per)
end
local tlimit = tonumber(ARGV[4 * best + 1])
if tlimit > 0 then
  local tk = KEYS[2 * best]
  local cost = math.min(tonumber(ARGV[4 * best + 2]), tlimit)
  redis.call('ZADD', tk, now, ARGV[1] .. ':' .. cost)
  redis.call('INCRBY', tk .. ':sum', cost)
  redis.call('PEXPIRE', tk, per)
  redis.call('PEXPIRE', tk .. ':sum', per)
end
return {1, best - 1}
";

/// Settles a token reservation: KEYS[1] the token window; ARGV: id, estimated cost, actual.
const SETTLE_TOKENS: &str = r"
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[1], old)
if not at then return 0 end
redis.call('ZREM', KEYS[1], old)
redis.call('ZADD', KEYS[1], at, ARGV[1] .. ':' .. ARGV[3])
local sum = redis.call('INCRBY', KEYS[1] .. ':sum', tonumber(ARGV[3]) - tonumber(ARGV[2]))
if sum < 0 then redis.call('SET', KEYS[1] .. ':sum', 0, 'KEEPTTL') end
return 1
";

impl RedisState {
    /// Connects (or fails within `timeout`).
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SharedError> {
        let client = redis::Client::open(url).map_err(|e| SharedError(e.to_string()))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            timeout * 4,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| SharedError("connecting to Redis timed out".into()))?
        .map_err(|e| SharedError(e.to_string()))?;
        Ok(Self {
            closed: false,
            replicas_hint: 1,
            conn,
            prefix: prefix.to_owned(),
            timeout,
            script: redis::Script::new(ADMIT),
            pick_script: redis::Script::new(PICK),
            settle_script: redis::Script::new(SETTLE_TOKENS),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// The health channel's name.
    pub fn health_channel(&self) -> String {
        self.key("health")
    }

    /// The channel replicas announce admin changes on.
    pub fn config_channel(&self) -> String {
        self.key("config")
    }

    /// Records this replica as alive (`info`: JSON the status call shows).
    pub async fn heartbeat(&self, info: &str) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        let key = self.key("replicas");
        let (field, value) = (process_id().to_owned(), info.to_owned());
        self.run(async move {
            redis::cmd("HSET")
                .arg(key)
                .arg(field)
                .arg(value)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Every replica's last heartbeat: (replica id, info JSON).
    pub async fn replicas(&self) -> Result<Vec<(String, String)>, SharedError> {
        let mut conn = self.conn.clone();
        let key = self.key("replicas");
        self.run(async move {
            redis::cmd("HGETALL")
                .arg(key)
                .query_async::<Vec<(String, String)>>(&mut conn)
                .await
        })
        .await
    }

    /// Tells the other replicas that the admin state in the store changed.
    pub async fn announce_config(&self, version: u64) -> Result<(), SharedError> {
        self.publish(
            self.config_channel(),
            format!("{}\t{version}", process_id()),
        )
        .await
    }

    async fn publish(&self, channel: String, msg: String) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        self.run(async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(msg)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SharedError(e.to_string())),
            Err(_) => Err(SharedError("Redis did not answer in time".into())),
        }
    }
}

#[async_trait::async_trait]
impl SharedState for RedisState {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn fail_closed(&self) -> bool {
        self.closed
    }

    fn replicas_hint(&self) -> u32 {
        self.replicas_hint.max(1)
    }

    async fn admit(&self, windows: &[WindowReq], _: Instant) -> Result<Admit, SharedError> {
        let mut inv = self.script.prepare_invoke();
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        inv.arg(id);
        for w in windows {
            inv.key(self.key(&w.key));
            inv.arg(w.limit).arg(w.per.as_millis() as u64);
        }
        let mut conn = self.conn.clone();
        let out: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        match out.as_slice() {
            [1, rest @ ..] => Ok(Admit::Admitted {
                remaining: rest
                    .iter()
                    .map(|r| u64::try_from(*r).unwrap_or(0))
                    .collect(),
            }),
            [0, index, free] => Ok(Admit::Refused {
                index: usize::try_from(*index).unwrap_or(0),
                free_in: Duration::from_millis(u64::try_from(*free).unwrap_or(0)),
            }),
            other => Err(SharedError(format!("unexpected admit answer {other:?}"))),
        }
    }

    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        _: Instant,
    ) -> Result<Picked, SharedError> {
        let mut inv = self.pick_script.prepare_invoke();
        inv.arg(id);
        inv.arg(if least_used { "least" } else { "first" });
        for (i, w) in candidates.iter().enumerate() {
            inv.key(self.key(&w.key));
            // unbudgeted (u64::MAX): 0 tells the script to count approximately
            let limit = if w.limit == u64::MAX { 0 } else { w.limit };
            inv.arg(limit).arg(w.per.as_millis() as u64);
            if let Some(Some(t)) = tokens.get(i) {
                inv.key(self.key(&t.key));
                inv.arg(t.limit).arg(t.cost);
            } else {
                // no token budget: a placeholder key the script never touches
                inv.key(self.key(&format!("{}:tok", w.key)));
                inv.arg(0).arg(0);
            }
        }
        let mut conn = self.conn.clone();
        let out: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        match out.as_slice() {
            [1, i] => Ok(Picked::Index(usize::try_from(*i).unwrap_or(0))),
            [0, free] => Ok(Picked::Busy(Duration::from_millis(
                u64::try_from(*free).unwrap_or(0),
            ))),
            other => Err(SharedError(format!("unexpected pick answer {other:?}"))),
        }
    }

    async fn settle_tokens(
        &self,
        req: &TokenReq,
        id: &str,
        actual: u64,
    ) -> Result<(), SharedError> {
        let mut inv = self.settle_script.prepare_invoke();
        inv.key(self.key(&req.key));
        inv.arg(id).arg(req.cost.min(req.limit)).arg(actual);
        let mut conn = self.conn.clone();
        let _: i64 = self.run(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError> {
        let mut conn = self.conn.clone();
        let key = self.key(counter);
        self.run(async move {
            redis::cmd("INCRBY")
                .arg(key)
                .arg(n)
                .query_async::<u64>(&mut conn)
                .await
        })
        .await
    }

    async fn get(&self, counter: &str) -> Result<u64, SharedError> {
        let mut conn = self.conn.clone();
        let key = self.key(counter);
        let v: Option<u64> = self
            .run(async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        let key = self.key(counter);
        self.run(async move {
            redis::cmd("SET")
                .arg(key)
                .arg(n)
                .arg("NX")
                .query_async::<Option<String>>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    async fn publish_health(&self, key: &str, event: &HealthEvent) -> Result<(), SharedError> {
        let msg = match event {
            HealthEvent::Cooling(d) => format!("{}\tcool\t{}\t{key}", process_id(), d.as_millis()),
            HealthEvent::Disabled(why) => {
                format!(
                    "{}\tdisable\t{}\t{key}",
                    process_id(),
                    why.replace('\t', " ")
                )
            }
        };
        self.publish(self.health_channel(), msg).await
    }
}

/// This process's id in health messages (its own are ignored when they come back).
pub fn process_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:016x}", fastrand::u64(..)))
}

/// Parses a health message from another replica: `(key, event)`; `None` for this process's own
/// messages and for garbage.
pub fn parse_health(msg: &str) -> Option<(String, HealthEvent)> {
    let mut parts = msg.splitn(4, '\t');
    let (from, what, arg, key) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if from == process_id() {
        return None;
    }
    let event = match what {
        "cool" => HealthEvent::Cooling(Duration::from_millis(arg.parse().ok()?)),
        "disable" => HealthEvent::Disabled(arg.to_owned()),
        _ => return None,
    };
    Some((key.to_owned(), event))
}

/// Where key actors announce health changes for the other replicas (set when Redis is on).
static ANNOUNCE: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(String, HealthEvent)>> =
    std::sync::OnceLock::new();

/// Called by key actors: hands a health change to the publisher task, if there is one.
pub(crate) fn announce(key: &str, event: HealthEvent) {
    if let Some(tx) = ANNOUNCE.get() {
        let _ = tx.send((key.to_owned(), event));
    }
}

/// Counts and logs a shared-state failure (the caller falls back to local state).
pub fn shared_failed(e: &SharedError) {
    keypool_telemetry::metrics().redis_errors.inc();
    tracing::warn!(error = %e, "shared state unavailable: using local state");
    keypool_telemetry::alert(
        keypool_telemetry::Cause::RedisUnavailable,
        "redis",
        format!("Redis (shared state) is unavailable: {e}; replicas fall back to local limits"),
    );
}

/// Calls `on_message` with every message another replica publishes on `channel`, through a
/// subscription that reconnects by itself, until `stop`.
pub fn subscribe<F, Fut>(
    url: String,
    channel: String,
    stop: tokio_util::sync::CancellationToken,
    on_message: F,
) where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        use futures_util::StreamExt;
        loop {
            let sub = async {
                let client = redis::Client::open(url.as_str())?;
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            match sub.await {
                Ok(ps) => {
                    let mut messages = ps.into_on_message();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            m = messages.next() => match m {
                                None => break,
                                Some(m) => {
                                    let payload: String = m.get_payload().unwrap_or_default();
                                    let from_us = payload
                                        .split('\t')
                                        .next()
                                        .is_some_and(|p| p == process_id());
                                    if !from_us {
                                        on_message(payload).await;
                                    }
                                }
                            },
                        }
                    }
                }
                Err(e) => shared_failed(&SharedError(e.to_string())),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}

/// Connects the pool to Redis health sharing: publishes this process's key health changes and
/// applies the other replicas' (through a pub/sub subscription that reconnects by itself).
pub fn share_health(
    state: &std::sync::Arc<RedisState>,
    url: String,
    pool: crate::PoolHandle,
    stop: tokio_util::sync::CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, HealthEvent)>();
    let _ = ANNOUNCE.set(tx);
    let publisher = state.clone();
    let stop_pub = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop_pub.cancelled() => return,
                msg = rx.recv() => match msg {
                    None => return,
                    Some((key, event)) => {
                        if let Err(e) = publisher.publish_health(&key, &event).await {
                            shared_failed(&e);
                        }
                    }
                },
            }
        }
    });
    subscribe(url, state.health_channel(), stop, move |payload| {
        if let Some((key, event)) = parse_health(&payload) {
            pool.apply_health(&key, event);
        }
        std::future::ready(())
    });
}
