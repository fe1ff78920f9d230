//! `keypoolctl`: the admin API from a terminal. Human tables by default, `--json` for scripts;
//! a failed call exits non-zero with the gRPC status and message.

mod cli;
mod prices;
mod print;
mod spend;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cli::{Cli, Cmd, GatewayCmd, KeyCmd};
use keypool_config::RawGateway;
use keypool_config::raw::RawUpstream;
use keypool_proto::admin::v1 as pb;
use keypool_proto::admin::v1::admin_client::AdminClient;
use print::{gateway_json, print_gateways, print_keys, time};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keypoolctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) if s.code() == tonic::Code::Unauthenticated => eprintln!(
                    "keypoolctl: Unauthenticated: {} (pass --token or set KEYPOOL_ADMIN_TOKEN; \
                     the server is --server or KEYPOOL_ADMIN_URL)",
                    s.message()
                ),
                Some(s) => eprintln!("keypoolctl: {:?}: {}", s.code(), s.message()),
                None => eprintln!("keypoolctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
pub(crate) type Client =
    AdminClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let mut endpoint =
        Channel::from_shared(cli.server.clone())?.connect_timeout(Duration::from_secs(5));
    if cli.server.starts_with("https://") {
        let tls = match &cli.ca {
            Some(path) => tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(path)?)),
            None => tonic::transport::ClientTlsConfig::new().with_webpki_roots(),
        };
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {}: {e}", cli.server))?;
    let header: Option<MetadataValue<_>> = match &cli.token {
        Some(t) => Some(format!("Bearer {t}").parse()?),
        None => None,
    };
    let auth: Auth = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    Ok(AdminClient::with_interceptor(channel, auth))
}

pub(crate) fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// A YAML or JSON file holding one `gateways:` entry of the config file, as its message.
fn read_gateway(path: &PathBuf) -> anyhow::Result<pb::GatewaySpec> {
    let raw: RawGateway = serde_norway::from_str(&read(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(pb::GatewaySpec::from(&raw))
}

/// A YAML or JSON file holding `upstreams:` entries of the config file: one entry, a list
/// of them, or a whole config file's `upstreams:` (openai-api-route's too).
fn read_keys(path: &PathBuf) -> anyhow::Result<Vec<pb::UpstreamSpec>> {
    let bad = |e: serde_norway::Error| anyhow::anyhow!("{}: {e}", path.display());
    let value: serde_norway::Value = serde_norway::from_str(&read(path)?).map_err(bad)?;
    let entries = match value {
        serde_norway::Value::Mapping(mut m) => match m.remove("upstreams") {
            Some(list) => list,
            None => serde_norway::Value::Sequence(vec![serde_norway::Value::Mapping(m)]),
        },
        list => list,
    };
    let raws: Vec<RawUpstream> = serde_norway::from_value(entries).map_err(bad)?;
    anyhow::ensure!(!raws.is_empty(), "{}: no upstreams in it", path.display());
    Ok(raws.iter().map(pb::UpstreamSpec::from).collect())
}

/// `30m`, `24h`, `7d`, `90s` → milliseconds.
fn since_ms(s: &str) -> anyhow::Result<i64> {
    let (n, unit) = s.split_at(s.trim_end_matches(char::is_alphabetic).len());
    let n: i64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("--since: expected e.g. 24h, got {s:?}"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("--since: unit must be s, m, h or d, got {s:?}"),
    };
    Ok(n * ms)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

#[allow(clippy::too_many_lines)] // one arm per subcommand, each a call and its printing
async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut c = connect(&cli).await?;
    match &cli.command {
        Cmd::Gateways(g) => match g {
            GatewayCmd::List => {
                let r = c
                    .list_gateways(pb::ListGatewaysRequest {})
                    .await?
                    .into_inner();
                print_gateways(&cli, &r.gateways);
            }
            GatewayCmd::Get { name } => {
                let r = c
                    .get_gateway(pb::GetGatewayRequest { name: name.clone() })
                    .await?
                    .into_inner();
                if cli.json {
                    println!("{}", gateway_json(&r));
                } else {
                    print_gateways(&cli, std::slice::from_ref(&r));
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&gateway_json(&r)["spec"])?
                    );
                }
            }
            GatewayCmd::Create { file } => {
                let r = c
                    .create_gateway(pb::CreateGatewayRequest {
                        gateway: Some(read_gateway(file)?),
                    })
                    .await?
                    .into_inner();
                print_gateways(&cli, &[r]);
            }
            GatewayCmd::Update { name, file } => {
                let r = c
                    .update_gateway(pb::UpdateGatewayRequest {
                        name: name.clone(),
                        gateway: Some(read_gateway(file)?),
                    })
                    .await?
                    .into_inner();
                print_gateways(&cli, &[r]);
            }
            GatewayCmd::Delete { name } => {
                c.delete_gateway(pb::DeleteGatewayRequest { name: name.clone() })
                    .await?;
                if cli.json {
                    println!("{}", json!({"deleted": name}));
                } else {
                    println!("gateway {name} deleted");
                }
            }
            GatewayCmd::RotateSecret { name } => {
                let r = c
                    .rotate_gateway_secret(pb::RotateGatewaySecretRequest { name: name.clone() })
                    .await?
                    .into_inner();
                if cli.json {
                    println!("{}", json!({"gateway": name, "secret": r.secret}));
                } else {
                    println!("new secret for gateway {name} (shown once):\n{}", r.secret);
                }
            }
        },
        Cmd::Keys(k) => match k {
            KeyCmd::List => {
                let r = c.list_keys(pb::ListKeysRequest {}).await?.into_inner();
                print_keys(&cli, &r.keys);
            }
            KeyCmd::Add { file } => {
                let mut added = Vec::new();
                for key in read_keys(file)? {
                    match c.add_key(pb::AddKeyRequest { key: Some(key) }).await {
                        Ok(r) => added.push(r.into_inner()),
                        Err(e) => {
                            print_keys(&cli, &added);
                            return Err(anyhow::Error::new(e).context(format!(
                                "{} of the file's keys added before this one was refused",
                                added.len()
                            )));
                        }
                    }
                }
                print_keys(&cli, &added);
            }
            KeyCmd::Update {
                name,
                rpm,
                tpm,
                clear_rpm,
                clear_tpm,
                allow,
                deny,
            } => {
                let r = c
                    .update_key(pb::UpdateKeyRequest {
                        name: name.clone(),
                        rpm: *rpm,
                        tpm: *tpm,
                        clear_rpm: *clear_rpm,
                        clear_tpm: *clear_tpm,
                        allow: allow.as_deref().map(|a| pb::AllowDeny {
                            entries: split_list(a),
                        }),
                        deny: deny.as_deref().map(|d| pb::AllowDeny {
                            entries: split_list(d),
                        }),
                        enabled: None,
                    })
                    .await?
                    .into_inner();
                print_keys(&cli, &[r]);
            }
            KeyCmd::Enable { name } | KeyCmd::Disable { name } => {
                let r = c
                    .update_key(pb::UpdateKeyRequest {
                        name: name.clone(),
                        enabled: Some(matches!(k, KeyCmd::Enable { .. })),
                        ..pb::UpdateKeyRequest::default()
                    })
                    .await?
                    .into_inner();
                print_keys(&cli, &[r]);
            }
            KeyCmd::Remove { name } => {
                c.remove_key(pb::RemoveKeyRequest { name: name.clone() })
                    .await?;
                if cli.json {
                    println!("{}", json!({"removed": name}));
                } else {
                    println!("key {name} removed");
                }
            }
        },
        Cmd::Usage {
            gateway,
            model,
            key,
            since,
            follow,
        } => {
            let gateway = gateway.clone().unwrap_or_default();
            if *follow {
                let filter = pb::StreamUsageRequest {
                    gateway,
                    model: model.clone().unwrap_or_default(),
                    key: key.clone().unwrap_or_default(),
                };
                return usage::follow(&mut c, &cli, filter).await;
            }
            let to = now_ms() + 1;
            let r = c
                .get_usage(pb::GetUsageRequest {
                    from_ms: to - since_ms(since)?,
                    to_ms: to,
                    gateway,
                    day_ms: 0,
                })
                .await?
                .into_inner();
            usage::print(&cli, &r);
        }
        Cmd::Prices(p) => prices::run(&mut c, &cli, p).await?,
        Cmd::Spend {
            by,
            from,
            to,
            gateway,
            format,
        } => {
            let range = spend::Range::parse(from.as_deref(), to.as_deref(), now_ms())?;
            let r = c
                .get_usage(pb::GetUsageRequest {
                    from_ms: range.from_ms,
                    to_ms: range.to_ms,
                    gateway: gateway.clone().unwrap_or_default(),
                    day_ms: 0,
                })
                .await?
                .into_inner();
            let rows = match by.as_str() {
                "gateway" => &r.by_gateway,
                "model" => &r.by_model,
                _ => &r.by_key,
            };
            let json = cli.json || format == "json";
            print!("{}", spend::render(by, &range, rows, json));
        }
        Cmd::Status => {
            let s = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
            if cli.json {
                println!(
                    "{}",
                    json!({"version": s.version, "uptime_seconds": s.uptime_seconds,
                        "store": s.store, "redis": s.redis, "config_version": s.config_version,
                        "keys": s.keys, "gateways": s.gateways,
                        "replicas": s.replicas.iter().map(|r| json!({"id": r.id, "address": r.address, "last_seen_ms": r.last_seen_ms, "config_version": r.config_version})).collect::<Vec<_>>()})
                );
            } else {
                println!("version         {}", s.version);
                println!("uptime          {} s", s.uptime_seconds);
                println!("store           {}", s.store);
                println!("redis           {}", s.redis);
                println!("config version  {}", s.config_version);
                println!("keys            {}", s.keys);
                println!("gateways        {}", s.gateways);
                for r in &s.replicas {
                    println!(
                        "replica         {} {} (config {}, seen {})",
                        r.id,
                        r.address,
                        r.config_version,
                        time(r.last_seen_ms)
                    );
                }
            }
        }
    }
    Ok(())
}
