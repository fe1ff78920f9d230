//! The builders [`crate::run_with`] calls in order, one part of the process each: what it
//! starts, what it needs, what it hands on.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::Context as _;
use keypool_config::Config;
use keypool_control::Control;
use keypool_policy::gateway::Gateways;
use keypool_pool::PoolHandle;
use keypool_proxy::Engine;
use keypool_shared::RedisState;
use keypool_store::Store;
use keypool_telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

use crate::actors::ActorHost;
pub use crate::serving::{admin_api, console, http_server};
use crate::{engine_for, frontend, startup_warnings, usage};

/// The config with the address actually bound (`127.0.0.1:0` becomes its port: for
/// `GetStatus` and alerts).
pub fn bound_config(mut config: Config, listener: &TcpListener) -> Arc<Config> {
    if let Ok(bound) = listener.local_addr() {
        config.address = bound.to_string();
    }
    Arc::new(config)
}

/// What the process records into: `options`' metrics registry (or one of its own), its alerts
/// as `notify:` says (the task that sends them, when a channel is configured).
pub fn telemetry(
    config: &Config,
    options: &crate::Options,
) -> (Telemetry, Option<tokio::task::JoinHandle<()>>) {
    let metrics = options
        .metrics
        .clone()
        .unwrap_or_else(|| Arc::new(keypool_telemetry::Metrics::new()));
    let instance = crate::instance_name(config);
    Telemetry::start(metrics, &config.notify, &instance, options.traced)
}

/// The shared state in Redis, when configured (reachable at start-up, or the process stops).
pub async fn connect_redis(
    config: &Config,
    telemetry: &Telemetry,
) -> anyhow::Result<Option<Arc<RedisState>>> {
    let Some(r) = &config.redis else {
        return Ok(None);
    };
    let target = redis_target(&r.servers);
    let mut state = RedisState::connect_with(&target, &r.prefix, r.timeout, telemetry.clone())
        .await
        .context("cannot reach the shared state's Redis at start-up")?;
    state.closed = r.fail_closed;
    state.replicas_hint = r.replicas_hint;
    Ok(Some(Arc::new(state)))
}

fn redis_target(servers: &keypool_config::RedisServers) -> keypool_shared::RedisTarget {
    use keypool_config::RedisServers;
    use keypool_shared::RedisTarget;
    let urls = |v: &[keypool_types::Secret]| v.iter().map(|u| u.expose().to_owned()).collect();
    match servers {
        RedisServers::Url(u) => RedisTarget::Single(u.expose().to_owned()),
        RedisServers::Cluster(nodes) => RedisTarget::Cluster(urls(nodes)),
        RedisServers::Sentinel {
            master,
            nodes,
            password,
            db,
        } => RedisTarget::Sentinel {
            master: master.clone(),
            nodes: urls(nodes),
            password: password.as_ref().map(|p| p.expose().to_owned()),
            db: *db,
        },
    }
}

/// Every gateway, `default` (`/v1/*`) first, their quotas restored from the store; the control
/// plane keeps them in line from here.
pub async fn gateways(
    config: &Config,
    redis: Option<&Arc<RedisState>>,
    store: Option<&Store>,
    telemetry: &Telemetry,
) -> Arc<Gateways> {
    let default = config
        .default_gateway
        .with_client_tokens(&config.client_tokens, &config.upstreams);
    startup_warnings(config, &default);
    let mut specs = vec![Arc::new(default)];
    specs.extend(config.gateways.iter().cloned());
    let shared = redis.map(|r| r.clone() as Arc<dyn keypool_shared::SharedState>);
    let lease = config
        .redis
        .as_ref()
        .filter(|c| c.lease > 1)
        .map(|c| keypool_shared::LeaseReq {
            calls: c.lease,
            within: c.lease_ms,
        });
    let gateways = Arc::new(Gateways::with_shared(
        &specs,
        shared,
        lease,
        telemetry.clone(),
    ));
    // the control plane adds the admin API's prices once it has read them
    gateways.set_prices(config.prices.clone());
    if let Some(store) = store {
        usage::restore_gateway_usage(store, &gateways).await;
        usage::restore_budgets(store, &gateways, &config.upstreams).await;
    }
    gateways
}

/// The key actors (their counters restored from the store) and the pool; with Redis, key health
/// and budgets shared with the other replicas.
pub async fn key_pool(
    config: &Config,
    (redis, store, telemetry): (Option<&Arc<RedisState>>, Option<&Store>, &Telemetry),
    shutdown: &CancellationToken,
) -> anyhow::Result<(ActorHost, PoolHandle)> {
    let seeds = match store {
        Some(s) => usage::seeds(s).await,
        None => std::collections::HashMap::new(),
    };
    // key actors announce their keys' health to the other replicas only when there are any
    let (announcer, announcements) = match redis {
        Some(_) => {
            let (a, rx) = keypool_shared::HealthAnnouncer::channel();
            (a, Some(rx))
        }
        None => (keypool_shared::HealthAnnouncer::default(), None),
    };
    let (actors, pool) = ActorHost::start(
        config.upstreams.clone(),
        config.lb_policy,
        seeds,
        announcer,
        telemetry.clone(),
    )?;
    let (Some(r), Some(announcements)) = (redis, announcements) else {
        return Ok((actors, pool));
    };
    let remote = pool.clone();
    keypool_shared::share_health(
        r,
        announcements,
        move |key, event| remote.apply_health(key, event),
        shutdown.clone(),
    );
    tracing::info!("shared state: Redis (limits, quotas and key health hold across replicas)");
    let shared = r.clone() as Arc<dyn keypool_shared::SharedState>;
    let pool = match &config.redis {
        Some(c) if c.lease > 1 => {
            tracing::info!(
                calls = c.lease,
                within_ms = c.lease_ms.as_millis(),
                "rpm budgets leased from Redis in slices"
            );
            pool.with_shared(shared).with_leasing(c.lease, c.lease_ms)
        }
        _ => pool.with_shared(shared),
    };
    Ok((actors, pool))
}

/// Where usage events go: the store's batched writer (with its counter snapshots and
/// retention), or on a frontend the uplink to its control plane (then its link is handed on).
pub fn usage(
    role: crate::Role,
    store: Option<&Store>,
    config: &Config,
    pool: &PoolHandle,
    telemetry: &Telemetry,
) -> (usage::Usage, Option<Box<frontend::Link>>) {
    match role {
        crate::Role::Frontend(link) => {
            let target = frontend::UplinkTarget(link.uplink.clone());
            let usage = usage::Usage::start_uplink(target, config, telemetry);
            (usage, Some(link))
        }
        _ => (
            usage::Usage::start(store.cloned(), config, pool, telemetry),
            None,
        ),
    }
}

/// The control plane's state (what the admin API changes), restored from the store, and the
/// usage sink that also feeds `StreamUsage` subscribers.
pub async fn control(
    config: &Arc<Config>,
    gateways: &Arc<Gateways>,
    pool: &PoolHandle,
    store: Option<Store>,
    redis: Option<&Arc<RedisState>>,
    usage: Arc<dyn keypool_types::UsageSink>,
) -> anyhow::Result<(Arc<Control>, Arc<dyn keypool_types::UsageSink>)> {
    let (feed, _) = tokio::sync::broadcast::channel(config.admin.stream_buffer);
    let sink: Arc<dyn keypool_types::UsageSink> = Arc::new(keypool_control::FeedSink {
        inner: usage,
        feed: feed.clone(),
    });
    let control = Control::start(keypool_control::Parts {
        config: config.clone(),
        gateways: gateways.clone(),
        pool: pool.clone(),
        store,
        redis: redis.cloned(),
        feed,
    })
    .await?;
    Ok((control, sink))
}

/// A frontend: applies the first snapshot (its disabled keys and version), then every later
/// one as it comes; the engine's policy follows each (requests in flight keep theirs).
pub async fn follow_control_plane(
    mut link: frontend::Link,
    control: &Arc<Control>,
    config: &Config,
    engine: &Arc<arc_swap::ArcSwap<Engine>>,
    pool: &PoolHandle,
) -> anyhow::Result<()> {
    control
        .apply_snapshot(
            Arc::new(config.clone()),
            link.first.disabled.clone(),
            link.first.version,
        )
        .await?;
    link.applied.send_replace(link.first.version);
    let (c, engine, pool) = (control.clone(), engine.clone(), pool.clone());
    tokio::spawn(async move {
        while let Some(p) = link.updates.recv().await {
            let config = Arc::new(p.config);
            match c
                .apply_snapshot(config.clone(), p.disabled, p.version)
                .await
            {
                Ok(()) => {
                    engine.store(Arc::new(engine_for(config, &pool)));
                    tracing::info!(version = p.version, "config snapshot applied");
                    link.applied.send_replace(p.version);
                }
                Err(e) => {
                    tracing::error!(version = p.version, error = %e, "config snapshot not applied");
                }
            }
        }
    });
    Ok(())
}

/// Replicas sharing Redis and a store: a heartbeat every 5 s (so `GetStatus` lists the replicas
/// seen), and an admin change on one reaches the others at once.
pub fn share_admin_changes(
    redis: &Arc<RedisState>,
    control: &Arc<Control>,
    shutdown: &CancellationToken,
    address: SocketAddr,
) {
    let (beat, c, stop) = (redis.clone(), control.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            let info = serde_json::json!({
                "address": address.to_string(),
                "config_version": c.version(),
                "last_seen_ms": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
            })
            .to_string();
            if let Err(e) = beat.heartbeat(&info).await {
                beat.failures().background(&e);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
        }
    });
    let c = control.clone();
    keypool_shared::subscribe(redis, redis.config_channel(), shutdown.clone(), move |_| {
        let c = c.clone();
        async move {
            if let Err(e) = c.reload().await {
                tracing::error!(error = %e, "cannot apply another replica's admin change");
            }
        }
    });
}

/// SIGHUP reloads `file` (never stops the process): a file that does not validate is refused,
/// its mistakes logged, the running config kept; a valid one goes through the same
/// reconcile as an admin change ([`Control::apply_file`]), then new requests take the new
/// policy while in-flight ones keep theirs. What only a restart changes (listen address,
/// store, admin, redis, telemetry, notify, log writer, `lb_policy`) keeps its running value,
/// and a change to it is logged.
pub fn reload_on_hangup(
    file: Option<std::path::PathBuf>,
    control: &Arc<Control>,
    engine: &Arc<arc_swap::ArcSwap<Engine>>,
    pool: &PoolHandle,
    shutdown: &CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        let (control, engine, pool, stop) = (
            control.clone(),
            engine.clone(),
            pool.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                let Some(file) = &file else {
                    tracing::warn!("SIGHUP ignored: this process has no config file to reload");
                    continue;
                };
                reload(file, &control, &engine, &pool).await;
            }
        });
    }
}

async fn reload(
    file: &std::path::Path,
    control: &Arc<Control>,
    engine: &Arc<arc_swap::ArcSwap<Engine>>,
    pool: &PoolHandle,
) {
    let mut new = match keypool_config::load(file) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                file = %file.display(),
                "config not reloaded, the running one is kept:\n{e}"
            );
            return;
        }
    };
    let old = control.config();
    let mut restart_only = Vec::new();
    if new.address != old.address {
        restart_only.push("address");
    }
    if new.store != old.store {
        restart_only.push("dbtype/dbaddr");
    }
    if new.lb_policy != old.lb_policy {
        restart_only.push("lb_policy");
    }
    if new.admin.address != old.admin.address || new.admin.enabled != old.admin.enabled {
        restart_only.push("admin");
    }
    if new.redis.is_some() != old.redis.is_some() {
        restart_only.push("redis");
    }
    if !restart_only.is_empty() {
        tracing::warn!(
            fields = %restart_only.join(", "),
            "these fields change only on a restart; their running values are kept"
        );
    }
    new.address.clone_from(&old.address);
    new.store = old.store.clone();
    new.lb_policy = old.lb_policy;
    new.admin = old.admin.clone();
    new.redis = old.redis.clone();
    new.telemetry = old.telemetry.clone();
    new.notify = old.notify.clone();
    new.log.queue_capacity = old.log.queue_capacity;
    new.log.spill_path.clone_from(&old.log.spill_path);
    new.log.spill_max_bytes = old.log.spill_max_bytes;
    new.log.retention_days = old.log.retention_days;
    let new = Arc::new(new);
    match control.apply_file(new.clone()).await {
        Ok(()) => {
            engine.store(Arc::new(engine_for(new.clone(), pool)));
            tracing::info!(
                file = %file.display(),
                keys = pool.keys().len(),
                file_gateways = new.gateways.len(),
                version = control.version(),
                "config reloaded"
            );
        }
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "config not reloaded, the running one is kept");
        }
    }
}

/// The one start-up line (store without its password, keys in service after the store's were
/// restored, gateways, auth, admin), then `ready` is told.
pub fn announce(
    config: &Config,
    pool: &PoolHandle,
    gateways: usize,
    ready: crate::Ready,
    tell: Option<tokio::sync::oneshot::Sender<crate::Ready>>,
) {
    tracing::info!(
        addr = %ready.api,
        store = %config.store.describe(),
        keys = pool.keys().len(),
        gateways,
        auth = if config.client_tokens.is_empty() { "open" } else { "client tokens" },
        admin = %ready.admin.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        "keypool listening"
    );
    if let Some(tell) = tell {
        let _ = tell.send(ready);
    }
}
