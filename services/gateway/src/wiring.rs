//! The builders [`crate::run_with`] calls in order, one part of the process each: what it
//! starts, what it needs, what it hands on.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{HttpServer, web};
use anyhow::Context as _;
use keypool_config::Config;
use keypool_control::Control;
use keypool_policy::gateway::Gateways;
use keypool_pool::PoolHandle;
use keypool_proxy::{Engine, Frontend};
use keypool_shared::RedisState;
use keypool_store::Store;
use tokio_util::sync::CancellationToken;

use crate::actors::ActorHost;
use crate::{engine_for, frontend, monitor, startup_warnings, usage};

/// The config with the address actually bound (`127.0.0.1:0` becomes its port: for
/// `GetStatus` and alerts).
pub fn bound_config(mut config: Config, listener: &TcpListener) -> Arc<Config> {
    if let Ok(bound) = listener.local_addr() {
        config.address = bound.to_string();
    }
    Arc::new(config)
}

/// The shared state in Redis, when configured (reachable at start-up, or the process stops).
pub async fn connect_redis(config: &Config) -> anyhow::Result<Option<Arc<RedisState>>> {
    let Some(r) = &config.redis else {
        return Ok(None);
    };
    let mut state = RedisState::connect(r.url.expose(), &r.prefix, r.timeout)
        .await
        .context("cannot reach redis.url at start-up")?;
    state.closed = r.fail_closed;
    state.replicas_hint = r.replicas_hint;
    Ok(Some(Arc::new(state)))
}

/// Every gateway, `default` (`/v1/*`) first, their quotas restored from the store; the control
/// plane keeps them in line from here.
pub async fn gateways(
    config: &Config,
    redis: Option<&Arc<RedisState>>,
    store: Option<&Store>,
) -> Arc<Gateways> {
    let default = config
        .default_gateway
        .with_client_tokens(&config.client_tokens, &config.upstreams);
    startup_warnings(config, &default);
    let mut specs = vec![Arc::new(default)];
    specs.extend(config.gateways.iter().cloned());
    let shared = redis.map(|r| r.clone() as Arc<dyn keypool_shared::SharedState>);
    let gateways = Arc::new(Gateways::with_shared(&specs, shared));
    if let Some(store) = store {
        usage::restore_gateway_usage(store, &gateways).await;
    }
    gateways
}

/// The key actors (their counters restored from the store) and the pool; with Redis, key health
/// and budgets shared with the other replicas.
pub async fn key_pool(
    config: &Config,
    redis: Option<&Arc<RedisState>>,
    store: Option<&Store>,
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
    let (actors, pool) =
        ActorHost::start(config.upstreams.clone(), config.lb_policy, seeds, announcer)?;
    let (Some(r), Some(rc), Some(announcements)) = (redis, &config.redis, announcements) else {
        return Ok((actors, pool));
    };
    let remote = pool.clone();
    keypool_shared::share_health(
        r,
        rc.url.expose().to_owned(),
        announcements,
        move |key, event| remote.apply_health(key, event),
        shutdown.clone(),
    );
    tracing::info!("shared state: Redis (limits, quotas and key health hold across replicas)");
    let shared = r.clone() as Arc<dyn keypool_shared::SharedState>;
    Ok((actors, pool.with_shared(shared)))
}

/// The control plane's state (what the admin API changes), restored from the store, and the
/// usage sink that also feeds `StreamUsage` subscribers.
pub async fn control(
    config: &Arc<Config>,
    gateways: &Arc<Gateways>,
    pool: &PoolHandle,
    store: Option<Store>,
    usage: Arc<dyn keypool_types::UsageSink>,
) -> anyhow::Result<(Arc<Control>, Arc<dyn keypool_types::UsageSink>)> {
    let (feed, _) = tokio::sync::broadcast::channel(config.admin.stream_buffer);
    let sink: Arc<dyn keypool_types::UsageSink> = Arc::new(keypool_control::FeedSink {
        inner: usage,
        feed: feed.clone(),
    });
    let control =
        Control::start(config.clone(), gateways.clone(), pool.clone(), store, feed).await?;
    control.refresh_default(); // admin keys restored from the store count too
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
        .apply_snapshot(config, &link.first.disabled, link.first.version)
        .await?;
    link.applied.send_replace(link.first.version);
    let (c, engine, pool) = (control.clone(), engine.clone(), pool.clone());
    tokio::spawn(async move {
        while let Some(p) = link.updates.recv().await {
            match c.apply_snapshot(&p.config, &p.disabled, p.version).await {
                Ok(()) => {
                    engine.store(Arc::new(engine_for(Arc::new(p.config), &pool)));
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
    rc: &keypool_config::Redis,
    control: &Arc<Control>,
    shutdown: &CancellationToken,
    address: SocketAddr,
) {
    *control
        .redis
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(redis.clone());
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
                keypool_shared::shared_failed(&e);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
        }
    });
    let c = control.clone();
    keypool_shared::subscribe(
        rc.url.expose().to_owned(),
        redis.config_channel(),
        shutdown.clone(),
        move |_| {
            let c = c.clone();
            async move {
                if let Err(e) = c.reload().await {
                    tracing::error!(error = %e, "cannot apply another replica's admin change");
                }
            }
        },
    );
}

/// The admin API on `admin.address`, when enabled, and where it listens. Bound now: a taken
/// port stops start-up when the operator asked for the API, and is logged and skipped when it
/// is only the default.
pub async fn admin_api(
    config: &Config,
    control: &Arc<Control>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, SocketAddr)>> {
    if !config.admin.enabled {
        return Ok(None);
    }
    let listener = match tokio::net::TcpListener::bind(&config.admin.address).await {
        Ok(l) => l,
        Err(e) if !config.admin.requested => {
            tracing::warn!(
                address = %config.admin.address,
                error = %e,
                "admin API not started: its default address is taken (set admin.address to choose one)"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot listen on admin.address {}", config.admin.address)
            });
        }
    };
    let admin_addr = listener.local_addr()?;
    if config.admin.token.is_none() {
        tracing::warn!(%admin_addr, "the admin API has no token: anyone on this machine may use it");
    }
    let scheme = if config.admin.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("keypool admin listening on {scheme}://{admin_addr}");
    tracing::info!(%admin_addr, "admin API listening");
    let (control, stop) = (control.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = keypool_admin::serve(control, listener, stop).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    Ok(Some((task, admin_addr)))
}

/// The HTTP server: `KEYPOOL_WORKERS` workers (default one per core), each with its own
/// upstream client, `TCP_NODELAY` on every accepted connection, signals left to the caller.
pub fn http_server(
    config: &Config,
    listener: TcpListener,
    engine: Arc<arc_swap::ArcSwap<Engine>>,
    gateways: Arc<Gateways>,
    sink: Arc<dyn keypool_types::UsageSink>,
    monitor: web::Data<monitor::Monitor>,
) -> std::io::Result<actix_web::dev::Server> {
    let use_env_proxies = ["https_proxy", "http_proxy", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some() || std::env::var_os(v.to_uppercase()).is_some());
    let models = Arc::new(keypool_proxy::models::ModelCatalog::default());
    Ok(HttpServer::new(move || {
        crate::app::app(
            web::Data::new(Frontend {
                engine: engine.clone(),
                gateways: gateways.clone(),
                sink: sink.clone(),
                client: keypool_proxy::UpstreamClient::new(use_env_proxies),
                models: models.clone(),
            }),
            monitor.clone(),
        )
    })
    .workers(crate::workers().unwrap_or(2))
    .disable_signals()
    .shutdown_timeout(config.shutdown_grace.as_secs().max(1))
    .on_connect(|conn, _| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
    })
    .listen(listener)?
    .run())
}
