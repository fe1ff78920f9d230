//! Usage plumbing for [`crate::run`]: the store, the batched writer, per-key counter snapshots and
//! retention. With `dbtype: none`, usage events go to the log and counters live in memory only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keypool_config::Config;
use keypool_policy::gateway::Gateways;
use keypool_pool::{KeyCounters, KeySeed, PoolHandle};
use keypool_proxy::{LogSink, UsageSink};
use keypool_store::{KeyCounterRow, Store, UsageWriter, database_url};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often key counters are saved.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// How long shutdown waits for the writer to flush.
const FLUSH_LIMIT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Restores each gateway's tokens used (its quota's count) from the store's rollups.
pub async fn restore_gateway_usage(store: &Store, gateways: &Gateways) {
    match store
        .usage_totals(0, i64::MAX, keypool_store::Grouping::Gateway, None)
        .await
    {
        Ok(totals) => {
            for g in gateways.all() {
                if let Some(t) = totals.iter().find(|t| t.group == g.spec.name) {
                    g.state
                        .restore_tokens(u64::try_from(t.total_tokens).unwrap_or(0))
                        .await;
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot restore gateway token usage; quotas start at 0");
        }
    }
}

/// Restores what each USD budget spent in its current period from the store: a gateway's and a
/// key's from the hourly rollups (from the hour its period starts in), a caller's from the
/// events. With Redis, a budget that already has counters there keeps them.
pub async fn restore_budgets(
    store: &Store,
    gateways: &Gateways,
    keys: &[Arc<keypool_config::UpstreamKey>],
) {
    use keypool_policy::budget::Wanted;
    let now = chrono::Utc::now();
    let budgets = gateways.budgets();
    let nanos = |pico: i64| u64::try_from(pico.max(0)).unwrap_or(0).div_ceil(1000);
    let since = |w: &Wanted| w.since.map_or(0, |(t, _)| t.timestamp_millis());
    let mut failed = None;
    for g in gateways.all() {
        if let Some(w) = Wanted::gateway(&g, now) {
            match store
                .usage_totals(
                    since(&w),
                    i64::MAX,
                    keypool_store::Grouping::Gateway,
                    Some(&g.name),
                )
                .await
            {
                Ok(t) => {
                    budgets
                        .restore(&w, t.first().map_or(0, |t| nanos(t.cost_pico)))
                        .await;
                }
                Err(e) => failed = Some(e),
            }
        }
        if g.spec.caller_budget.is_some() {
            let Some(period) = Wanted::caller_id(&g, "", now) else {
                continue;
            };
            match store.caller_spend(&g.name, since(&period)).await {
                Ok(rows) => {
                    for (caller, pico) in rows {
                        if let Some(w) = Wanted::caller_id(&g, &caller, now) {
                            budgets.restore(&w, nanos(pico)).await;
                        }
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
    }
    for k in keys {
        let Some(b) = k.budget else { continue };
        let w = Wanted::key(&k.name, b, now);
        match store
            .usage_totals(since(&w), i64::MAX, keypool_store::Grouping::Key, None)
            .await
        {
            Ok(t) => {
                let spent = t
                    .iter()
                    .find(|t| t.group == *k.name)
                    .map_or(0, |t| nanos(t.cost_pico));
                budgets.restore(&w, spent).await;
            }
            Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = failed {
        tracing::warn!(error = %e, "cannot restore some USD budgets' spend; they start at 0");
    }
}

/// Connects to the configured store and runs its migrations (`None` for `dbtype: none`).
pub async fn open_store(config: &Config) -> anyhow::Result<Option<Store>> {
    let Some(url) = database_url(&config.store) else {
        return Ok(None);
    };
    reachable(&config.store).await?;
    let store = Store::connect(&url)
        .await
        .map_err(|e| store_error(&config.store, &e))?;
    Ok(Some(store))
}

/// A store error as a person reads it: the store (never its password) and the root cause,
/// once (the driver's errors repeat their sources in their own text).
fn store_error(store: &keypool_config::StoreConfig, e: &dyn std::error::Error) -> anyhow::Error {
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    anyhow::anyhow!("cannot open the store ({}): {root}", store.describe())
}

/// PostgreSQL's host and port answer (the driver's own error for a refused connection is only
/// "pool timed out").
async fn reachable(store: &keypool_config::StoreConfig) -> anyhow::Result<()> {
    let keypool_config::StoreConfig::Postgres { dsn } = store else {
        return Ok(());
    };
    let Ok(url) = url::Url::parse(dsn) else {
        return Ok(());
    };
    let (Some(host), port) = (url.host_str(), url.port().unwrap_or(5432)) else {
        return Ok(()); // a Unix socket: the driver says what is wrong
    };
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => anyhow::bail!("cannot open the store ({}): {e}", store.describe()),
        Err(_) => anyhow::bail!(
            "cannot open the store ({}): no answer from {host}:{port} within 5 s",
            store.describe()
        ),
    }
}

/// `keypool migrate`: applies (or with `down`, reverts) every migration.
pub async fn migrate(config: &Config, down: bool) -> anyhow::Result<()> {
    let Some(url) = database_url(&config.store) else {
        anyhow::bail!("dbtype is none: there is nothing to migrate");
    };
    reachable(&config.store).await?;
    let store = Store::connect_only(&url)
        .await
        .map_err(|e| store_error(&config.store, &e))?;
    if down {
        store.migrate_down().await?;
    } else {
        store.migrate_up().await?;
    }
    println!(
        "applied migrations: {:?}",
        store.applied_migrations().await?
    );
    store.close().await;
    Ok(())
}

/// Each key's persisted counters and last minute of requests.
pub async fn seeds(store: &Store) -> HashMap<String, KeySeed> {
    let mut seeds: HashMap<String, KeySeed> = HashMap::new();
    match store.key_counters().await {
        Ok(rows) => {
            for r in rows {
                seeds.entry(r.key_name).or_default().counters = KeyCounters {
                    used: r.used.max(0) as u64,
                    success: r.success.max(0) as u64,
                    failure: r.failure.max(0) as u64,
                    last_error: r.last_error,
                };
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot restore key counters"),
    }
    let now = now_ms();
    match store.events_since(now - 60_000, 1_000_000).await {
        Ok(events) => {
            for e in events {
                if let Some(key) = e.key_name {
                    let age = Duration::from_millis((now - e.at_ms).max(0) as u64);
                    let tokens = e.total_tokens.unwrap_or(0).max(0) as u64;
                    seeds.entry(key).or_default().recent.push((age, tokens));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot restore the last minute of key usage"),
    }
    seeds
}

/// The running usage machinery.
pub struct Usage {
    pub sink: Arc<dyn UsageSink>,
    store: Option<Store>,
    writer: Option<UsageWriter>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

async fn snapshot(store: &Store, pool: &PoolHandle) {
    let rows: Vec<KeyCounterRow> = pool
        .list()
        .await
        .into_iter()
        .map(|s| KeyCounterRow {
            key_name: s.name,
            used: i64::try_from(s.counters.used).unwrap_or(i64::MAX),
            success: i64::try_from(s.counters.success).unwrap_or(i64::MAX),
            failure: i64::try_from(s.counters.failure).unwrap_or(i64::MAX),
            last_error: s.counters.last_error,
        })
        .collect();
    if let Err(e) = store.save_key_counters(&rows, now_ms()).await {
        tracing::warn!(error = %e, "cannot save key counters");
    }
}

impl Usage {
    /// Starts the writer and the background tasks (when a store is configured).
    pub fn start(
        store: Option<Store>,
        config: &Config,
        pool: &PoolHandle,
        telemetry: &keypool_telemetry::Telemetry,
    ) -> Self {
        let stop = CancellationToken::new();
        let Some(store) = store else {
            return Self {
                sink: Arc::new(LogSink),
                store: None,
                writer: None,
                stop,
                tasks: Vec::new(),
            };
        };
        let (writer, sink) = UsageWriter::start(store.clone(), &config.log, telemetry.clone());
        let mut tasks = Vec::new();
        {
            let (store, pool, stop) = (store.clone(), pool.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(SNAPSHOT_EVERY) => snapshot(&store, &pool).await,
                    }
                }
            }));
        }
        if let Some(days) = config.log.retention_days {
            let (store, stop) = (store.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let cutoff = now_ms() - i64::from(days) * 86_400_000;
                    match store.delete_older_than(cutoff).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(
                                deleted = n,
                                days,
                                "retention: old usage events deleted"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "retention failed"),
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETENTION_EVERY) => {}
                    }
                }
            }));
        }
        Self {
            sink: Arc::new(sink),
            store: Some(store),
            writer: Some(writer),
            stop,
            tasks,
        }
    }

    /// A frontend's usage: the batched writer with the control plane as its target (and its
    /// spill file as the spool); no store, no counter snapshots, no retention.
    pub fn start_uplink(
        target: impl keypool_store::BatchTarget,
        config: &Config,
        telemetry: &keypool_telemetry::Telemetry,
    ) -> Self {
        let (writer, sink) = UsageWriter::start(target, &config.log, telemetry.clone());
        Self {
            sink: Arc::new(sink),
            store: None,
            writer: Some(writer),
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// After the server drained: saves counters, flushes every queued event, stops the tasks.
    /// The writer's counters, for metrics (`None` with `dbtype: none`).
    pub fn writer_stats(&self) -> Option<Arc<keypool_store::WriterStats>> {
        self.writer.as_ref().map(|w| w.stats.clone())
    }

    pub async fn shutdown(self, pool: &PoolHandle) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(store) = &self.store {
            snapshot(store, pool).await;
        }
        if let Some(writer) = self.writer {
            writer.shutdown(FLUSH_LIMIT).await;
        }
        if let Some(store) = self.store {
            store.close().await;
        }
    }
}
