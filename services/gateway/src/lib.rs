//! The `keypool` binary's library: wires config, the key pool, the engine and the HTTP server.
//!
//! [`run`] serves one validated [`Config`] on an already-bound listener until `shutdown` fires,
//! then drains in-flight requests and streams for up to `shutdown_grace`. `main.rs` only parses
//! arguments, loads config and calls it; tests and `keypool demo` call it the same way.

pub mod actors;
pub mod app;
pub mod demo;
pub mod frontend;
pub mod mock;
pub mod monitor;
pub mod usage;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{HttpServer, web};
use anyhow::Context as _;
use keypool_config::Config;
use keypool_proxy::adapter::Adapters;
use keypool_proxy::{Engine, Frontend};
use tokio_util::sync::CancellationToken;

use crate::actors::ActorHost;

/// Installs the process-wide TLS provider reqwest needs; call once before building any client.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Warnings about a configuration that works but is probably not what the operator wants.
fn startup_warnings(config: &Config, default: &keypool_config::Gateway) {
    if default.auth.is_none() {
        tracing::warn!(
            "NO `authorization` IS CONFIGURED: this gateway is open to anyone who can reach it"
        );
    }
    for key in &config.upstreams {
        if let Some(reason) = &key.unusable {
            tracing::warn!(key = %key.name, "{reason}");
        }
    }
    for g in &config.gateways {
        if g.auth.is_none() {
            tracing::warn!(gateway = %g.name, "gateway has no auth: open to anyone who can reach it");
        }
    }
    if config.upstreams.is_empty() {
        tracing::warn!("no upstreams configured: every request will get 404 model_not_found");
    }
}

/// What a process is (see the README's topology): all of keypool, the control plane, or a
/// data-plane replica fed by one.
pub enum Role {
    /// `keypool serve`: one process with everything.
    AllInOne,
    /// `keypool admin`: the store, the admin API (with `WatchConfig` and `PublishUsage`) and
    /// the usage writer. Its HTTP address serves health, metrics and gateway usage only.
    ControlPlane,
    /// `keypool frontend`: API traffic, configured and collected by a control plane.
    Frontend(Box<frontend::Link>),
}

/// Serves `config` on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(config, listener, shutdown, Role::AllInOne).await
}

/// [`run`] in a given [`Role`].
#[allow(clippy::too_many_lines)] // the wiring of a whole process; to become named builders (issue 19, item 4)
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    role: Role,
) -> anyhow::Result<()> {
    let mut config = config;
    if let Ok(bound) = listener.local_addr() {
        // `127.0.0.1:0` becomes the port actually bound (for GetStatus and alerts)
        config.address = bound.to_string();
    }
    let config = Arc::new(config);
    let proxying = !matches!(role, Role::ControlPlane);
    // every gateway, `default` (`/v1/*`) first; the control plane keeps them in line from here
    let default = config
        .default_gateway
        .with_client_tokens(&config.client_tokens, &config.upstreams);
    startup_warnings(&config, &default);
    let mut specs = vec![Arc::new(default)];
    specs.extend(config.gateways.iter().cloned());
    let store = usage::open_store(&config).await?;
    let redis = match &config.redis {
        None => None,
        Some(r) => {
            let mut state =
                keypool_shared::RedisState::connect(r.url.expose(), &r.prefix, r.timeout)
                    .await
                    .context("cannot reach redis.url at start-up")?;
            state.closed = r.fail_closed;
            state.replicas_hint = r.replicas_hint;
            Some(Arc::new(state))
        }
    };
    let shared: Option<Arc<dyn keypool_shared::SharedState>> = redis
        .clone()
        .map(|r| r as Arc<dyn keypool_shared::SharedState>);
    let gateways = Arc::new(keypool_policy::gateway::Gateways::with_shared(
        &specs,
        shared.clone(),
    ));
    if let Some(store) = &store {
        usage::restore_gateway_usage(store, &gateways).await;
    }
    let seeds = match &store {
        Some(s) => usage::seeds(s).await,
        None => std::collections::HashMap::new(),
    };
    // key actors announce their keys' health to the other replicas only when there are any
    let (announcer, announcements) = match &redis {
        Some(_) => {
            let (a, rx) = keypool_shared::HealthAnnouncer::channel();
            (a, Some(rx))
        }
        None => (keypool_shared::HealthAnnouncer::default(), None),
    };
    let (actors, pool) =
        ActorHost::start(config.upstreams.clone(), config.lb_policy, seeds, announcer)?;
    let pool = match (&shared, &redis, &config.redis, announcements) {
        (Some(s), Some(r), Some(rc), Some(announcements)) => {
            let remote = pool.clone();
            keypool_shared::share_health(
                r,
                rc.url.expose().to_owned(),
                announcements,
                move |key, event| remote.apply_health(key, event),
                shutdown.clone(),
            );
            tracing::info!(
                "shared state: Redis (limits, quotas and key health hold across replicas)"
            );
            pool.with_shared(s.clone())
        }
        _ => pool,
    };
    let store_for_monitor = store.clone();
    let (usage, link) = match role {
        Role::Frontend(link) => (
            usage::Usage::start_uplink(frontend::UplinkTarget(link.uplink.clone()), &config),
            Some(link),
        ),
        _ => (usage::Usage::start(store, &config, &pool), None),
    };
    let monitor = web::Data::new(monitor::Monitor {
        proxying,
        store: store_for_monitor,
        pool: pool.clone(),
        writer_stats: usage.writer_stats(),
        metrics_token: config.telemetry.metrics_token.clone(),
    });
    let alerts = keypool_telemetry::notify::start(&config.notify, &instance_name(&config));
    let engine = Arc::new(arc_swap::ArcSwap::from_pointee(engine_for(
        config.clone(),
        &pool,
    )));
    let (feed, _) = tokio::sync::broadcast::channel(config.admin.stream_buffer);
    let sink: Arc<dyn keypool_types::UsageSink> = Arc::new(keypool_control::FeedSink {
        inner: usage.sink.clone(),
        feed: feed.clone(),
    });
    let control = keypool_control::Control::start(
        config.clone(),
        gateways.clone(),
        pool.clone(),
        monitor.store.clone(),
        feed,
    )
    .await?;
    control.refresh_default(); // admin keys restored from the store count too
    if let Some(mut link) = link {
        // a frontend: the first snapshot's disabled keys and version, then every later snapshot
        control
            .apply_snapshot(&config, &link.first.disabled, link.first.version)
            .await?;
        link.applied.send_replace(link.first.version);
        let (c, engine, pool) = (control.clone(), engine.clone(), pool.clone());
        tokio::spawn(async move {
            while let Some(p) = link.updates.recv().await {
                match c.apply_snapshot(&p.config, &p.disabled, p.version).await {
                    Ok(()) => {
                        // the policy (timeouts, limits on bodies, ...) follows the snapshot
                        // too (the `default` gateway did in `apply_snapshot`); requests in
                        // flight keep theirs
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
    }
    // replicas sharing Redis and a store: an admin change on one reaches the others at once
    if let (Some(r), Some(rc)) = (&redis, &config.redis) {
        *control
            .redis
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r.clone());
        // a heartbeat every 5 s, so GetStatus lists the replicas seen
        let (beat, c, stop, address) = (
            r.clone(),
            control.clone(),
            shutdown.clone(),
            format!("{}", listener.local_addr()?),
        );
        tokio::spawn(async move {
            loop {
                let info = serde_json::json!({
                    "address": address,
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
            r.config_channel(),
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
    let admin_task = if config.admin.enabled {
        let listener = tokio::net::TcpListener::bind(&config.admin.address)
            .await
            .with_context(|| format!("cannot listen on admin.address {}", config.admin.address))?;
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
        Some(tokio::spawn(async move {
            if let Err(e) = keypool_admin::serve(control, listener, stop).await {
                tracing::error!(error = %e, "admin API stopped");
            }
        }))
    } else {
        None
    };
    let addr = listener.local_addr()?;
    let use_env_proxies = ["https_proxy", "http_proxy", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some() || std::env::var_os(v.to_uppercase()).is_some());
    let server = HttpServer::new(move || {
        crate::app::app(
            web::Data::new(Frontend {
                engine: engine.clone(),
                gateways: gateways.clone(),
                sink: sink.clone(),
                client: keypool_proxy::UpstreamClient::new(use_env_proxies),
            }),
            monitor.clone(),
        )
    })
    .workers(
        std::env::var("KEYPOOL_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from)),
    )
    .disable_signals()
    .shutdown_timeout(config.shutdown_grace.as_secs().max(1))
    .on_connect(|conn, _| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
    })
    .listen(listener)?
    .run();
    let handle = server.handle();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        handle.stop(true).await;
    });
    tracing::info!(%addr, keys = config.upstreams.len(), "keypool listening");
    let outcome = server.await;
    // the server has drained: every finished request's event is queued; flush them
    usage.shutdown(&pool).await;
    if let Some(t) = admin_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
    }
    actors.stop();
    if let Some(a) = alerts {
        // alerts queued during shutdown get a moment to go out
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        a.abort();
    }
    outcome?;
    tracing::info!("keypool stopped");
    Ok(())
}

/// The forwarding engine for one configuration.
fn engine_for(config: Arc<Config>, pool: &keypool_pool::PoolHandle) -> Engine {
    Engine {
        keeps_headers: config.upstreams.iter().any(|u| u.keep_header),
        config,
        pool: pool.clone(),
        adapters: Adapters::new(),
    }
}

/// How alerts name this process: the host name and the listen address.
fn instance_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "keypool".to_owned());
    format!("{host} {}", config.address)
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}
