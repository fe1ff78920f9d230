//! [`RedisState`]: the shared state in Redis — one Lua script per decision (`scripts/`), run
//! on Redis's clock, so every replica's calls are counted atomically in one place.

use std::time::Duration;

use tokio::time::Instant;

use crate::connect::{Conn, RedisTarget, Source};
use crate::{
    Admit, BudgetReq, HealthEvent, Held, Picked, SessionReq, SharedError, SharedState, Spent,
    Stick, TokenReq, WindowReq, process_id,
};

mod decide;
mod keys;
mod pick;

/// Redis: sorted sets of admission times (scored in Redis's milliseconds), plain counters, and a
/// pub/sub channel for key health. Calls time out after `timeout`, so a dead Redis never holds a
/// request; the connection reconnects by itself (and follows a master Sentinel moves).
pub struct RedisState {
    /// `on_failure: closed`.
    pub closed: bool,
    /// `redis.replicas_hint` (1 when unset).
    pub replicas_hint: u32,
    source: Source,
    target: RedisTarget,
    layout: keys::Layout,
    timeout: Duration,
    script: redis::Script,
    pick_script: redis::Script,
    settle_script: redis::Script,
    lease_return: redis::Script,
    budget_hold: redis::Script,
    budget_settle: redis::Script,
    budget_init: redis::Script,
    failures: std::sync::Arc<crate::Failures>,
}

/// Settles a token reservation: KEYS[1] the token window; ARGV: id, estimated cost, actual.
const SETTLE_TOKENS: &str = include_str!("scripts/settle_tokens.lua");

impl RedisState {
    /// Connects to one server (or fails within a few `timeout`s).
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SharedError> {
        Self::connect_to(&RedisTarget::Single(url.to_owned()), prefix, timeout).await
    }

    /// [`RedisState::connect_with`] with a telemetry handle of its own (tests and tools).
    pub async fn connect_to(
        target: &RedisTarget,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, SharedError> {
        Self::connect_with(
            target,
            prefix,
            timeout,
            keypool_telemetry::Telemetry::default(),
        )
        .await
    }

    /// Connects to a server, a cluster or a Sentinel-watched master (or fails within a few
    /// `timeout`s); its failures are counted, logged and alerted through `telemetry`. In a
    /// cluster the keys one script touches share a hash tag (a gateway's, the pool's, or a
    /// lone key's own: `keys.rs`), so its decision is as atomic as on one server, and the
    /// gateways spread over the masters.
    pub async fn connect_with(
        target: &RedisTarget,
        prefix: &str,
        timeout: Duration,
        telemetry: keypool_telemetry::Telemetry,
    ) -> Result<Self, SharedError> {
        let failures = crate::Failures::new(telemetry);
        let source = crate::connect::connect(target, timeout, &failures).await?;
        Ok(Self {
            failures,
            closed: false,
            replicas_hint: 1,
            source,
            layout: keys::Layout::new(prefix, matches!(target, RedisTarget::Cluster(_))),
            target: target.clone(),
            timeout,
            script: redis::Script::new(decide::ADMIT),
            pick_script: redis::Script::new(pick::PICK),
            settle_script: redis::Script::new(SETTLE_TOKENS),
            lease_return: redis::Script::new(pick::LEASE_RETURN),
            budget_hold: redis::Script::new(include_str!("scripts/budget_hold.lua")),
            budget_settle: redis::Script::new(include_str!("scripts/budget_settle.lua")),
            budget_init: redis::Script::new(include_str!("scripts/budget_init.lua")),
        })
    }

    fn key(&self, k: &str) -> String {
        self.layout.key(k)
    }

    fn conn(&self) -> Conn {
        self.source.conn()
    }

    /// Where this state's Redis is (what subscriptions connect to).
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Where this state's failures are counted, logged and alerted.
    pub fn failures(&self) -> std::sync::Arc<crate::Failures> {
        self.failures.clone()
    }

    /// The longest wait for one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
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
        let mut conn = self.conn();
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
        let mut conn = self.conn();
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
        let mut conn = self.conn();
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
        let out = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => SharedError(e.to_string()),
            Err(_) => SharedError("Redis did not answer in time".into()),
        };
        self.source.failed();
        Err(out)
    }
}

/// A budget's time to live for the scripts: milliseconds, 0 for none.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| {
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

#[async_trait::async_trait]
impl SharedState for RedisState {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn fail_closed(&self) -> bool {
        self.closed
    }

    fn background_failed(&self, e: &SharedError) {
        self.failures.background(e);
    }

    fn failed(&self, e: &SharedError) {
        self.failures.serving(e, self.closed);
    }

    fn replicas_hint(&self) -> u32 {
        self.replicas_hint.max(1)
    }

    async fn admit(&self, windows: &[WindowReq], _: Instant) -> Result<Admit, SharedError> {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.run_admit(windows, &id, None).await.map(|(a, _)| a)
    }

    async fn admit_leasing(
        &self,
        windows: &[WindowReq],
        id: &str,
        lease: crate::LeaseReq,
        _: Instant,
    ) -> Result<(Admit, u32), SharedError> {
        self.run_admit(windows, id, Some(lease)).await
    }

    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        _: Instant,
    ) -> Result<Picked, SharedError> {
        self.run_pick(candidates, tokens, least_used, id, None, None)
            .await
            .map(|(picked, _, _)| picked)
    }

    async fn pick_leasing(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        lease: crate::LeaseReq,
        _: Instant,
    ) -> Result<(Picked, crate::Granted), SharedError> {
        self.run_pick(candidates, tokens, least_used, id, None, Some(lease))
            .await
            .map(|(picked, _, granted)| (picked, granted))
    }

    async fn return_lease(
        &self,
        window: &WindowReq,
        id: &str,
        granted: u32,
        unused: u32,
    ) -> Result<u32, SharedError> {
        if window.limit == u64::MAX {
            // an unbudgeted window's lease only ranked it: nothing to give back
            return Ok(0);
        }
        self.run_return_lease(window, id, granted, unused).await
    }

    async fn pick_in_session(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        session: &SessionReq,
        _: Instant,
    ) -> Result<(Picked, Stick), SharedError> {
        self.run_pick(candidates, tokens, least_used, id, Some(session), None)
            .await
            .map(|(picked, stick, _)| (picked, stick))
    }

    async fn pick_in_session_leasing(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        (session, lease): (&SessionReq, crate::LeaseReq),
        _: Instant,
    ) -> Result<(Picked, Stick, crate::Granted), SharedError> {
        self.run_pick(
            candidates,
            tokens,
            least_used,
            id,
            Some(session),
            Some(lease),
        )
        .await
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
        let mut conn = self.conn();
        let _: i64 = self.run(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn hold(&self, budgets: &[BudgetReq], amount: u64) -> Result<Held, SharedError> {
        self.run_hold(budgets, amount, None).await.map(|(h, _)| h)
    }

    async fn hold_slice(
        &self,
        budgets: &[BudgetReq],
        amount: u64,
        slice: u64,
    ) -> Result<(Held, u64), SharedError> {
        self.run_hold(budgets, amount, Some(slice)).await
    }

    async fn settle_budgets(
        &self,
        budgets: &[BudgetReq],
        held: u64,
        spent: u64,
    ) -> Result<Vec<Spent>, SharedError> {
        let mut inv = self.budget_settle.prepare_invoke();
        inv.arg(held).arg(spent);
        for b in budgets {
            inv.key(self.key(&b.key));
            inv.arg(ttl_ms(b.ttl));
        }
        let mut conn = self.conn();
        let out: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(out
            .chunks_exact(2)
            .map(|p| Spent {
                before: n(p[0]),
                after: n(p[1]),
            })
            .collect())
    }

    async fn init_budget(&self, budget: &BudgetReq, spent: u64) -> Result<(), SharedError> {
        let mut inv = self.budget_init.prepare_invoke();
        inv.key(self.key(&budget.key));
        inv.arg(spent).arg(ttl_ms(budget.ttl));
        let mut conn = self.conn();
        let _: i64 = self.run(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError> {
        let mut conn = self.conn();
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
        let mut conn = self.conn();
        let key = self.key(counter);
        let v: Option<u64> = self
            .run(async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError> {
        let mut conn = self.conn();
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

    async fn pin(&self, name: &str, value: &str, ttl: Duration) -> Result<(), SharedError> {
        let mut conn = self.conn();
        let key = self.key(&format!("pin:{name}"));
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let value = value.to_owned();
        self.run(async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    async fn pinned(&self, name: &str) -> Result<Option<String>, SharedError> {
        let mut conn = self.conn();
        let key = self.key(&format!("pin:{name}"));
        self.run(async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
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
