//! `keypool`: parse arguments, load and validate config, start logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keypool_gateway::mock::MockArgs;
use tokio_util::sync::CancellationToken;

/// mimalloc: the request path allocates small, short-lived buffers; glibc malloc showed up as ~15%
/// of keypool's CPU under load in the benchmark.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's purge delay, in ms, unless `MIMALLOC_PURGE_DELAY` is set: freed memory goes
/// back to the system 100 ms after it was freed instead of mimalloc's 1 s, which in practice
/// meant after a burst's memory was kept (2,048 connections: ~100 MB ten seconds after the
/// burst instead of ~130), at no throughput cost measured (0 ms cost ~11%).
#[cfg(feature = "mimalloc")]
const PURGE_DELAY_MS: &str = "100";

/// mimalloc reads its options from the environment when the process starts, and setting them
/// from inside needs `unsafe` (the workspace forbids it): so keypool runs itself again, at
/// once, with the setting in its environment (the same process id, arguments and
/// environment otherwise). If that fails it goes on with mimalloc's defaults.
#[cfg(feature = "mimalloc")]
fn allocator_settings() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        again.arg0(arg0);
    }
    // returns only when the exec failed
    let _ = again
        .args(args)
        .env("MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS)
        .exec();
}

/// keypool: an OpenAI-compatible gateway that spreads calls over a pool of upstream API keys.
#[derive(Debug, Parser)]
#[command(name = "keypool", version)]
struct Cli {
    /// Config file for the default `serve` (openai-api-route's `-config PATH` works too).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Listen address for the default `serve`, overriding the config's `address`.
    #[arg(long, value_name = "HOST:PORT")]
    address: Option<String>,
    /// The admin API's listen address for the default `serve`.
    #[arg(long, value_name = "HOST:PORT")]
    admin_address: Option<String>,
    /// The console's listen address for the default `serve` (`none`: off).
    #[arg(long, value_name = "HOST:PORT")]
    console_address: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// A config file and the listen addresses that override it.
#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// Config file.
    #[arg(long, value_name = "PATH", default_value = "./config.yaml")]
    config: PathBuf,
    /// Listen address, overriding the config's `address` (e.g. `127.0.0.1:0`).
    #[arg(long, value_name = "HOST:PORT")]
    address: Option<String>,
    /// The admin API's listen address, overriding the config's `admin.address`.
    #[arg(long, value_name = "HOST:PORT")]
    admin_address: Option<String>,
    /// The console's listen address, overriding the config's `admin.http_address` (`none`:
    /// off).
    #[arg(long, value_name = "HOST:PORT")]
    console_address: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gateway (the default command).
    Serve(ConfigArgs),
    /// The control plane: store (dbtype sqlite or postgres), admin API (pushes config to
    /// frontends, collects their usage) and usage writer. Its `address` serves health and
    /// metrics only.
    Admin(ConfigArgs),
    /// A data-plane replica: configured by a control plane, no database.
    Frontend(keypool_gateway::frontend::FrontendArgs),
    /// Three mock upstream keys and the gateway in one process, offline.
    Demo {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8888")]
        address: String,
        /// The admin API's listen address.
        #[arg(long, default_value = "127.0.0.1:8889")]
        admin_address: String,
        /// The console's listen address.
        #[arg(long, default_value = "127.0.0.1:8890")]
        console_address: String,
    },
    /// Validate a config file and print what it serves (exit 2 naming every mistake).
    Check {
        /// Config file.
        #[arg(long, value_name = "PATH", default_value = "./config.yaml")]
        config: PathBuf,
    },
    /// Run the OpenAI-compatible mock upstream alone.
    Mock(MockArgs),
    /// Run the store's migrations and exit (`serve` runs them too).
    Migrate {
        /// Config file (its dbtype / dbaddr).
        #[arg(long, value_name = "PATH", default_value = "./config.yaml")]
        config: PathBuf,
        /// Revert every migration instead (drops every table: needs `--yes`).
        #[arg(long)]
        down: bool,
        /// Confirms `--down`.
        #[arg(long)]
        yes: bool,
    },
}

/// Accepts Go-style `-config PATH` / `-config=PATH` as openai-api-route did.
fn normalise_args() -> Vec<String> {
    std::env::args()
        .map(|a| {
            if a == "-config" {
                "--config".to_owned()
            } else if let Some(rest) = a.strip_prefix("-config=") {
                format!("--config={rest}")
            } else {
                a
            }
        })
        .collect()
}

#[allow(clippy::too_many_lines)] // arguments, config, runtime, run: each failure its own exit code and message
fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    allocator_settings();
    let cli = Cli::parse_from(normalise_args());
    let command = cli.command.unwrap_or(Command::Serve(ConfigArgs {
        config: cli.config.unwrap_or_else(|| PathBuf::from("./config.yaml")),
        address: cli.address,
        admin_address: cli.admin_address,
        console_address: cli.console_address,
    }));
    // Validate before anything binds a port.
    if let Err(e) = keypool_gateway::workers() {
        eprintln!("keypool: {e}");
        return ExitCode::from(2);
    }
    if let Command::Migrate {
        down: true,
        yes: false,
        config,
    } = &command
    {
        eprintln!(
            "keypool: `migrate --down` drops every table of the store in {} and its usage history; \
             add --yes to do it",
            config.display()
        );
        return ExitCode::from(2);
    }
    let serve = match &command {
        Command::Check { config } => {
            return match keypool_config::load(config) {
                Ok(cfg) => {
                    println!("{}: OK\n{}", config.display(), cfg.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keypool: invalid config {}:\n{e}", config.display());
                    ExitCode::from(2)
                }
            };
        }
        Command::Migrate { config, .. } => match keypool_config::load(config) {
            Ok(cfg) => Some(cfg),
            Err(e) => {
                eprintln!("keypool: invalid config {}:\n{e}", config.display());
                return ExitCode::from(2);
            }
        },
        Command::Serve(ConfigArgs {
            config,
            address,
            admin_address,
            console_address,
        })
        | Command::Admin(ConfigArgs {
            config,
            address,
            admin_address,
            console_address,
        }) => match keypool_config::load(config) {
            Ok(mut cfg) => {
                if let Some(a) = address {
                    cfg.address.clone_from(a);
                }
                if let Some(a) = admin_address {
                    cfg.admin.address.clone_from(a);
                    cfg.admin.requested = true;
                }
                if let Some(a) = console_address {
                    cfg.admin.http_address = (a != "none").then(|| a.clone());
                    cfg.admin.http_requested = true;
                }
                if matches!(command, Command::Admin(_)) {
                    cfg.admin.requested = true;
                }
                if matches!(command, Command::Admin(_)) {
                    if cfg.store == keypool_config::StoreConfig::None {
                        eprintln!(
                            "keypool: invalid config {}:\ndbtype: the control plane keeps the store: use sqlite or postgres",
                            config.display()
                        );
                        return ExitCode::from(2);
                    }
                    if !cfg.admin.enabled {
                        eprintln!(
                            "keypool: invalid config {}:\nadmin.enabled: the control plane serves the admin API",
                            config.display()
                        );
                        return ExitCode::from(2);
                    }
                }
                Some(cfg)
            }
            Err(e) => {
                eprintln!("keypool: invalid config {}:\n{e}", config.display());
                return ExitCode::from(2);
            }
        },
        // a frontend's telemetry comes from the OTEL_* variables (its config is pushed later)
        Command::Frontend(_) => keypool_config::from_yaml("dbtype: none").ok(),
        _ => None,
    };
    keypool_gateway::install_tls_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keypool: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // logging (and traces, when configured) start inside the runtime the exporter needs
        // one metrics registry for the process: its log layer counts into it, `/metrics` reads it
        let metrics = std::sync::Arc::new(keypool_telemetry::Metrics::new());
        let traces = keypool_telemetry::trace::init(serve.as_ref().map(|c| &c.telemetry), &metrics);
        let recorded = Recorded {
            metrics,
            traced: traces.exporting(),
        };
        let result = Box::pin(run(command, serve, recorded)).await;
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keypool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where the process records: its metrics registry, and whether traces are exported.
struct Recorded {
    metrics: std::sync::Arc<keypool_telemetry::Metrics>,
    traced: bool,
}

impl Recorded {
    fn options(
        &self,
        ready: Option<tokio::sync::oneshot::Sender<keypool_gateway::Ready>>,
        config_file: Option<std::path::PathBuf>,
    ) -> keypool_gateway::Options {
        keypool_gateway::Options {
            ready,
            config_file,
            metrics: Some(self.metrics.clone()),
            traced: self.traced,
        }
    }
}

async fn run(
    command: Command,
    serve: Option<keypool_config::Config>,
    recorded: Recorded,
) -> anyhow::Result<()> {
    {
        let shutdown = CancellationToken::new();
        keypool_gateway::cancel_on_signals(shutdown.clone());
        match (command, serve) {
            (command @ (Command::Serve(_) | Command::Admin(_)), Some(cfg)) => {
                let (Command::Serve(a) | Command::Admin(a)) = &command else {
                    unreachable!("matched above")
                };
                let config_file = a.config.clone();
                let listener = keypool_proxy::edge::bind(&cfg.address)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.address))?;
                let control_plane = matches!(command, Command::Admin(_));
                let role = if control_plane {
                    keypool_gateway::Role::ControlPlane
                } else {
                    keypool_gateway::Role::AllInOne
                };
                // said once every port is bound and the store is open, not before
                let (ready, bound) = tokio::sync::oneshot::channel::<keypool_gateway::Ready>();
                tokio::spawn(async move {
                    if let Ok(r) = bound.await {
                        if control_plane {
                            println!("keypool control plane listening on http://{}", r.api);
                        } else {
                            println!("keypool listening on http://{}/v1", r.api);
                        }
                    }
                });
                let options = recorded.options(Some(ready), Some(config_file));
                keypool_gateway::run_until(cfg, listener, shutdown, role, options).await
            }
            (Command::Frontend(args), _) => {
                let listener = keypool_proxy::edge::bind(&args.address)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.address))?;
                let addr = listener.local_addr()?;
                let Some(link) =
                    keypool_gateway::frontend::connect(&args, addr.to_string(), &shutdown).await?
                else {
                    return Ok(());
                };
                let cfg = link.first.config.clone();
                println!("keypool frontend listening on http://{addr}/v1");
                keypool_gateway::run_until(
                    cfg,
                    listener,
                    shutdown,
                    keypool_gateway::Role::Frontend(Box::new(link)),
                    recorded.options(None, None),
                )
                .await
            }
            (
                Command::Demo {
                    address,
                    admin_address,
                    console_address,
                },
                _,
            ) => {
                let options = recorded.options(None, None);
                let addresses = [address.as_str(), &admin_address, &console_address];
                keypool_gateway::demo::run(addresses, shutdown, options).await
            }
            (Command::Mock(args), _) => keypool_gateway::mock::run(args, shutdown).await,
            (Command::Migrate { down, .. }, Some(cfg)) => {
                keypool_gateway::usage::migrate(&cfg, down).await
            }
            (
                Command::Serve(_)
                | Command::Admin(_)
                | Command::Migrate { .. }
                | Command::Check { .. },
                _,
            ) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                out.push(format!("{path} <{id}>"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let path = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() {
                out.push(path.clone());
            }
            undocumented(sub, &path, out);
        }
    }

    #[test]
    fn every_command_and_flag_has_help() {
        let mut out = Vec::new();
        undocumented(&super::Cli::command(), "keypool", &mut out);
        assert!(out.is_empty(), "no help text: {out:?}");
    }
}
