//! The `keypool` binary's library: wires config, the key pool, the engine and the HTTP server.
//!
//! [`run`] serves one validated [`Config`] on an already-bound listener until `shutdown` fires,
//! then drains in-flight requests and streams for up to `shutdown_grace`. `main.rs` only parses
//! arguments, loads config and calls it; tests and `keypool demo` call it the same way.

pub mod actors;
pub mod app;
pub mod demo;
pub mod frontend;
pub mod limits;
pub mod mock;
pub mod monitor;
mod serving;
pub mod usage;
mod wiring;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::web;
use keypool_config::Config;
use keypool_proxy::Engine;
use keypool_proxy::adapter::Adapters;
use tokio_util::sync::CancellationToken;

/// Installs the process-wide TLS provider reqwest needs; call once before building any client.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Warnings about a configuration that works but is probably not what the operator wants.
pub(crate) fn startup_warnings(config: &Config, default: &keypool_config::Gateway) {
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
    for g in std::iter::once(default).chain(config.gateways.iter().map(AsRef::as_ref)) {
        if config.redis.is_none()
            && g.routing
                .cache
                .is_some_and(|c| c.backend == keypool_config::routing::CacheBackend::Redis)
        {
            tracing::warn!(
                gateway = %g.name,
                "cache backend is redis but no `redis:` is configured: each process keeps its own entries"
            );
        }
    }
    if config.upstreams.is_empty() {
        tracing::warn!("no upstreams configured: every request will get 404 model_not_found");
    }
}

/// HTTP workers: `KEYPOOL_WORKERS` (1 to 1024), else one per core. A value that is not such a
/// number is an error (`main` exits 2 on it before binding anything).
pub fn workers() -> Result<usize, String> {
    match std::env::var("KEYPOOL_WORKERS") {
        Err(std::env::VarError::NotPresent) => {
            Ok(std::thread::available_parallelism().map_or(2, usize::from))
        }
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "KEYPOOL_WORKERS must be a number of workers from 1 to 1024, got {v:?}"
            )),
        },
        Err(std::env::VarError::NotUnicode(_)) => {
            Err("KEYPOOL_WORKERS must be a number of workers from 1 to 1024".to_owned())
        }
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

/// Where a process serves, once every port is bound.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub api: std::net::SocketAddr,
    /// `None` when the admin API is off (or its default address was taken).
    pub admin: Option<std::net::SocketAddr>,
    /// The console; `None` when off (or its default address was taken).
    pub console: Option<std::net::SocketAddr>,
}

/// [`run`] in a given [`Role`]: the process's parts, built in order (each builder in
/// `wiring.rs` says what it starts), then the HTTP server until `shutdown`, then the drain.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    role: Role,
) -> anyhow::Result<()> {
    run_until(config, listener, shutdown, role, Options::default()).await
}

/// What [`run_until`] is told besides the config.
#[derive(Default)]
pub struct Options {
    /// Told where the process serves once every port is bound (`keypool demo` prints its
    /// banner then, `main` its `listening` line).
    pub ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    /// The file the config came from: SIGHUP reloads it. Without one, SIGHUP is logged and
    /// ignored (it never stops the process).
    pub config_file: Option<std::path::PathBuf>,
    /// The metrics registry `/metrics` serves (`main`'s, which its log layer counts into too);
    /// `None`: one of this server's own.
    pub metrics: Option<std::sync::Arc<keypool_telemetry::Metrics>>,
    /// Traces are exported: requests get spans.
    pub traced: bool,
}

/// [`run_with`] with [`Options`].
pub async fn run_until(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    role: Role,
    options: Options,
) -> anyhow::Result<()> {
    let config = wiring::bound_config(config, &listener);
    let (telemetry, alerts) = wiring::telemetry(&config, &options);
    let store = usage::open_store(&config).await?;
    let redis = wiring::connect_redis(&config, &telemetry).await?;
    let gateways = wiring::gateways(&config, redis.as_ref(), store.as_ref(), &telemetry).await;
    let parts = (redis.as_ref(), store.as_ref(), &telemetry);
    let (actors, pool) = wiring::key_pool(&config, parts, &shutdown).await?;
    let proxying = !matches!(role, Role::ControlPlane);
    let (usage, link) = wiring::usage(role, store.as_ref(), &config, &pool, &telemetry);
    let monitor = web::Data::new(monitor::Monitor {
        proxying,
        store: store.clone(),
        pool: pool.clone(),
        writer_stats: usage.writer_stats(),
        metrics_token: config.telemetry.metrics_token.clone(),
        telemetry,
    });
    let engine = Arc::new(arc_swap::ArcSwap::from_pointee(engine_for(
        config.clone(),
        &pool,
    )));
    let (control, sink) = wiring::control(
        &config,
        &gateways,
        &pool,
        store,
        redis.as_ref(),
        usage.sink.clone(),
    )
    .await?;
    let link_free = link.is_none();
    if let Some(link) = link {
        wiring::follow_control_plane(*link, &control, &config, &engine, &pool).await?;
    }
    if let Some(r) = &redis {
        wiring::share_admin_changes(r, &control, &shutdown, listener.local_addr()?);
    }
    wiring::reload_on_hangup(
        options.config_file.filter(|_| link_free),
        &control,
        &engine,
        &pool,
        &shutdown,
    );
    let admin = wiring::admin_api(&config, &control, &shutdown).await?;
    let console = wiring::console(&config, &control, link_free, &shutdown)?;
    let addr = listener.local_addr()?;
    let gateways_served = gateways.all().len();
    let at_stop = gateways.clone();
    let server = wiring::http_server(
        &config, listener, engine, gateways, sink, monitor, &shutdown,
    )?;
    let ready = Ready {
        api: addr,
        admin: admin.as_ref().map(|(_, a)| *a),
        console,
    };
    wiring::announce(&config, &pool, gateways_served, ready, options.ready);
    let outcome = server.wait().await;
    // the server has drained: every finished request's event is queued; flush them, and give
    // back what this replica holds of the shared limits and budgets (awaited: not left to a
    // task at exit)
    usage.shutdown(&pool).await;
    let give_back = async {
        pool.give_back_leases().await;
        at_stop.give_back_shared().await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), give_back).await;
    if let Some((t, _)) = admin {
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
pub(crate) fn engine_for(config: Arc<Config>, pool: &keypool_pool::PoolHandle) -> Engine {
    Engine {
        keeps_headers: config.upstreams.iter().any(|u| u.keep_header),
        config,
        pool: pool.clone(),
        adapters: Adapters::new(),
    }
}

/// How alerts name this process: the host name and the listen address.
pub(crate) fn instance_name(config: &Config) -> String {
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
