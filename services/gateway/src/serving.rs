//! The builders of what listens: the admin API, the console, the HTTP server and its stop (the
//! rest of start-up is in `wiring.rs`, which re-exports these in `run_with`'s order).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::web;
use anyhow::Context as _;
use keypool_config::Config;
use keypool_control::Control;
use keypool_policy::gateway::Gateways;
use keypool_proxy::{Engine, Frontend};
use tokio_util::sync::CancellationToken;

use crate::monitor;

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

/// The console and its REST API on `admin.http_address` (not on a frontend: its control plane
/// has them), where it listens. Bound now, as the admin API is: a taken port stops start-up
/// when the operator asked for the address, and is logged and skipped when it is the default.
pub fn console(
    config: &Config,
    control: &Arc<Control>,
    served_here: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(address) = config.admin.http_address.as_deref() else {
        return Ok(None);
    };
    if !config.admin.enabled || !served_here {
        return Ok(None);
    }
    let listener = match TcpListener::bind(address) {
        Ok(l) => l,
        Err(e) if !config.admin.http_requested => {
            tracing::warn!(
                %address,
                error = %e,
                "console not started: its default address is taken (set admin.http_address to choose one, or none)"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot listen on admin.http_address {address}"));
        }
    };
    let at = listener.local_addr()?;
    let server = keypool_console::serve(control.clone(), listener, shutdown.clone())?;
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "console stopped");
        }
    });
    let scheme = if config.admin.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("keypool console at {scheme}://{at}/");
    tracing::info!(%at, "console listening");
    Ok(Some(at))
}

/// The HTTP server (keypool's own: [`keypool_proxy::edge`]): `KEYPOOL_WORKERS` workers
/// (default one per core), each with its own upstream client, `TCP_NODELAY` on every accepted
/// connection, as many client connections and concurrent upstream requests per worker as its
/// share of the open-files limit (raised to the hard one) allows ([`crate::limits`]); it stops
/// taking connections and drains the requests in flight once `shutdown` is cancelled.
pub fn http_server(
    config: &Config,
    listener: TcpListener,
    engine: Arc<arc_swap::ArcSwap<Engine>>,
    gateways: Arc<Gateways>,
    sink: Arc<dyn keypool_types::UsageSink>,
    monitor: web::Data<monitor::Monitor>,
    shutdown: &CancellationToken,
) -> std::io::Result<keypool_proxy::edge::Server> {
    let use_env_proxies = ["https_proxy", "http_proxy", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some() || std::env::var_os(v.to_uppercase()).is_some());
    let fds = crate::limits::raise_nofile();
    let workers = crate::workers().unwrap_or(2);
    if let Some(streams) = fds.streams {
        tracing::info!(
            open_files = fds.nofile,
            concurrent_streams = streams,
            client_connections = fds.connections,
            "open-files limit raised to the hard limit"
        );
    } else {
        tracing::info!("no open-files limit");
    }
    let models = Arc::new(keypool_proxy::models::ModelCatalog::default());
    let receiving = Arc::new(keypool_proxy::pipeline::Receiving::default());
    let settings = keypool_proxy::edge::Settings::new(
        workers,
        fds.connections_per_worker(workers),
        config.shutdown_grace.max(std::time::Duration::from_secs(1)),
    );
    let announce = shutdown.clone();
    tokio::spawn(async move {
        announce.cancelled().await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
    });
    keypool_proxy::edge::serve(listener, settings, shutdown, move || {
        crate::app::app(
            web::Data::new(Frontend {
                engine: engine.clone(),
                gateways: gateways.clone(),
                sink: sink.clone(),
                client: keypool_proxy::UpstreamClient::new(use_env_proxies),
                models: models.clone(),
                receiving: receiving.clone(),
                inflight: Arc::new(keypool_proxy::inflight::InFlight::new(
                    fds.streams_per_worker(workers),
                )),
            }),
            monitor.clone(),
        )
    })
}
