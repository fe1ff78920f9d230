//! `keypool frontend`: a data-plane replica. It holds no database: its gateways, keys and
//! request policy come from the control plane (`keypool admin`) over `WatchConfig`, and its
//! usage events go back over `PublishUsage`.
//!
//! - **Config.** The first snapshot is awaited for up to [`FIRST_SNAPSHOT_WAIT`]; without one
//!   the last snapshot persisted in `--state-dir` is served (sealed with a key derived from the
//!   admin token, since it holds upstream secrets). Every snapshot received is persisted, then
//!   applied at once ([`keypool_control::Control::apply_snapshot`]). A lost control plane is
//!   retried with backoff (0.5 s doubling to 10 s) while the last snapshot keeps serving.
//! - **Usage.** The store's own batched writer runs with the control plane as its target
//!   ([`Uplink`]): a batch is sent and counts as written only when its acknowledgement comes
//!   back; while the control plane is unreachable, batches go to the spool file in `--state-dir`
//!   (fsync'd, bounded by `--spool-max-bytes`) and are resent later. Event ids make resends
//!   land once.
//! - **Liveness.** An empty batch every 5 s (and right after a snapshot is applied) tells the
//!   control plane this replica's address and applied config version, for `GetStatus`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use keypool_config::raw::{RawAdmin, RawConfig, RawLog, RawPolicy, RawRedis, RawUpstream};
use keypool_config::{Config, RawGateway};
use keypool_proto::admin::v1 as pb;
use keypool_proto::admin::v1::admin_client::AdminClient;
use keypool_types::Secret;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How long start-up waits for the control plane before serving the persisted snapshot.
pub const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
const ACK_WAIT: Duration = Duration::from_secs(10);
const CONNECT_WAIT: Duration = Duration::from_secs(3);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const SNAPSHOT_FILE: &str = "config-snapshot.sealed";
const SPOOL_FILE: &str = "usage-spool.jsonl";

mod uplink;
pub use uplink::{Uplink, UplinkError, UplinkTarget};

/// A frontend's own settings: where the control plane is, and what must stay local.
#[derive(Debug, Clone, clap::Args)]
pub struct FrontendArgs {
    /// The control plane's admin API, e.g. `http://keypool-admin:8889`.
    #[arg(long, value_name = "URL")]
    pub admin: String,
    /// With an `https://` control plane: a PEM CA certificate to trust for it (default: the
    /// public web PKI roots).
    #[arg(long, value_name = "PATH")]
    pub admin_ca: Option<PathBuf>,
    /// The control plane's admin token (better: the `KEYPOOL_ADMIN_TOKEN` variable).
    #[arg(long, env = "KEYPOOL_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Listen address for API traffic.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:8888")]
    pub address: String,
    /// Redis for limits, quotas and key health shared with the other replicas.
    #[arg(
        long,
        value_name = "URL",
        env = "KEYPOOL_REDIS_URL",
        hide_env_values = true
    )]
    pub redis: Option<String>,
    /// A Redis Cluster instead: its seed nodes, comma-separated (`redis://h1:7000,redis://h2:7000`).
    #[arg(
        long,
        value_name = "URL,...",
        env = "KEYPOOL_REDIS_CLUSTER",
        hide_env_values = true,
        value_delimiter = ',',
        conflicts_with = "redis"
    )]
    pub redis_cluster: Vec<String>,
    /// Prefix of every Redis key (the same on every replica).
    #[arg(long, default_value = "keypool:")]
    pub redis_prefix: String,
    /// Longest wait for one Redis call, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    pub redis_timeout_ms: u64,
    /// `local` (per-replica limits while Redis is down) or `closed` (503 until it is back).
    #[arg(long, default_value = "local")]
    pub redis_on_failure: String,
    /// With `local`: how many replicas share the limits (each enforces 1/N of them while
    /// Redis is down).
    #[arg(long, value_name = "N")]
    pub redis_replicas_hint: Option<u32>,
    /// Calls (a key's picks, a gateway's admissions) or a USD budget's estimates reserved in
    /// Redis at once and spent here (`redis.lease`; default 0: one round trip per call).
    #[arg(long, value_name = "CALLS")]
    pub redis_lease: Option<u32>,
    /// How long a lease may be spent before what is left goes back, in ms (default 1000).
    #[arg(long, value_name = "MS")]
    pub redis_lease_ms: Option<u64>,
    /// Where the last config snapshot (sealed) and the usage spool are kept.
    #[arg(long, value_name = "DIR", default_value = "./keypool-frontend")]
    pub state_dir: PathBuf,
    /// Largest usage spool file, in bytes; past it events are dropped, counted and logged.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    pub spool_max_bytes: u64,
}

/// A snapshot, validated into a runnable [`Config`].
pub struct Pushed {
    pub version: u64,
    pub config: Config,
    pub disabled: HashSet<String>,
}

/// What [`crate::run_with`] needs to run as a frontend.
pub struct Link {
    /// Snapshots after the first.
    pub updates: mpsc::Receiver<Pushed>,
    pub first: Pushed,
    pub uplink: Arc<Uplink>,
    /// The config version applied last (read by the heartbeat).
    pub applied: watch::Sender<u64>,
}

/// Adds the admin token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

type Client = AdminClient<InterceptedService<Channel, Bearer>>;

fn client(args: &FrontendArgs) -> anyhow::Result<Client> {
    let mut endpoint = Channel::from_shared(args.admin.clone())
        .context("--admin: expected a URL such as http://127.0.0.1:8889")?
        .connect_timeout(CONNECT_WAIT)
        .tcp_nodelay(true);
    if args.admin.starts_with("https://") {
        let tls = match &args.admin_ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("--admin-ca: cannot read {}", path.display()))?;
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tonic::transport::ClientTlsConfig::new().with_webpki_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .context("--admin: TLS setup failed")?;
    } else if args.admin_ca.is_some() {
        anyhow::bail!("--admin-ca needs an https:// --admin URL");
    }
    let channel = endpoint.connect_lazy();
    let header = match &args.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("--token: not a valid header value")?,
        ),
        None => None,
    };
    Ok(AdminClient::with_interceptor(channel, Bearer(header)))
}

/// The sealing key of the persisted snapshot: the admin token (without one, the file is only
/// obfuscated; a control plane without a token listens on loopback only).
fn snapshot_key(args: &FrontendArgs) -> Secret {
    Secret::new(format!(
        "keypool-frontend-snapshot:{}",
        args.token.as_deref().unwrap_or_default()
    ))
}

/// Validates a snapshot into this frontend's [`Config`]: the control plane's policy, keys and
/// gateways; this frontend's address, Redis and state directory; no database, no admin API.
pub fn build(args: &FrontendArgs, snap: &pb::ConfigSnapshot) -> anyhow::Result<Pushed> {
    let mut raw = RawConfig {
        address: Some(args.address.clone()),
        dbtype: Some("none".to_owned()),
        upstreams: snap
            .upstreams
            .iter()
            .cloned()
            .map(RawUpstream::from)
            .collect(),
        gateways: snap
            .gateways
            .iter()
            .cloned()
            .map(RawGateway::from)
            .collect(),
        log: Some(RawLog {
            spill_path: Some(args.state_dir.join(SPOOL_FILE).display().to_string()),
            spill_max_bytes: Some(args.spool_max_bytes),
            ..RawLog::default()
        }),
        admin: Some(RawAdmin {
            enabled: Some(false),
            ..RawAdmin::default()
        }),
        redis: (args.redis.is_some() || !args.redis_cluster.is_empty()).then(|| RawRedis {
            url: args.redis.clone(),
            cluster: (!args.redis_cluster.is_empty()).then(|| args.redis_cluster.clone()),
            sentinel: None,
            prefix: Some(args.redis_prefix.clone()),
            timeout_ms: Some(args.redis_timeout_ms),
            on_failure: Some(args.redis_on_failure.clone()),
            replicas_hint: args.redis_replicas_hint,
            lease: args.redis_lease,
            lease_ms: args.redis_lease_ms,
        }),
        ..RawConfig::default()
    };
    raw.set_policy(snap.policy.clone().map(RawPolicy::from).unwrap_or_default());
    let config = keypool_config::validate(raw).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Pushed {
        version: snap.version,
        config,
        disabled: snap.disabled.iter().cloned().collect(),
    })
}

/// Writes the snapshot (its protobuf encoding, sealed) so that a restart without the control
/// plane still serves.
fn persist(args: &FrontendArgs, snap: &pb::ConfigSnapshot) -> anyhow::Result<()> {
    use base64::Engine as _;
    use std::io::Write as _;
    std::fs::create_dir_all(&args.state_dir)?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(snap.encode_to_vec());
    let sealed = keypool_control::seal::seal(&snapshot_key(args), &encoded)?;
    let path = args.state_dir.join(SNAPSHOT_FILE);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(sealed.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// The persisted snapshot, if there is one this token can open (one persisted by a keypool
/// before snapshots were typed is ignored, with a warning: the control plane sends a new one).
fn load_persisted(args: &FrontendArgs) -> anyhow::Result<Option<pb::ConfigSnapshot>> {
    use base64::Engine as _;
    let path = args.state_dir.join(SNAPSHOT_FILE);
    let sealed = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let encoded = keypool_control::seal::open(&snapshot_key(args), sealed.trim())
        .with_context(|| format!("{} cannot be opened with this token", path.display()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| pb::ConfigSnapshot::decode(bytes.as_slice()).ok());
    if decoded.is_none() {
        tracing::warn!(path = %path.display(), "the persisted snapshot is in an older format: ignored");
    }
    Ok(decoded)
}

/// Follows `WatchConfig` for as long as the process runs: every snapshot is validated,
/// persisted and handed on; a lost stream is reopened with backoff.
fn watch_config(
    args: FrontendArgs,
    client: Client,
    uplink: Arc<Uplink>,
    applied: watch::Receiver<u64>,
    tx: mpsc::Sender<Pushed>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            let req = pb::WatchConfigRequest {
                replica_id: uplink.id.clone(),
                address: uplink.address.clone(),
                have_version: *applied.borrow(),
            };
            let mut c = client.clone();
            let opened = tokio::select! {
                () = stop.cancelled() => return,
                r = c.watch_config(req) => r,
            };
            match opened {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        let msg = tokio::select! {
                            () = stop.cancelled() => return,
                            m = stream.message() => m,
                        };
                        let Ok(Some(snap)) = msg else { break };
                        backoff = Duration::from_millis(500);
                        match build(&args, &snap) {
                            Ok(pushed) => {
                                if let Err(e) = persist(&args, &snap) {
                                    tracing::error!(error = %e, "cannot persist the config snapshot");
                                }
                                if tx.send(pushed).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => tracing::error!(
                                version = snap.version,
                                error = %format!("{e:#}"),
                                "config snapshot refused; still serving the previous one"
                            ),
                        }
                    }
                    tracing::warn!(
                        version = *applied.borrow(),
                        "lost the control plane: serving on the last config snapshot"
                    );
                }
                Err(e) => tracing::warn!(
                    error = %e.message(),
                    retry_in = ?backoff,
                    version = *applied.borrow(),
                    "control plane unreachable (version 0: nothing to serve yet)"
                ),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    });
}

/// Connects to the control plane and obtains the first configuration: a fresh snapshot, or
/// after [`FIRST_SNAPSHOT_WAIT`] the persisted one, or (with neither) whatever comes first.
pub async fn connect(
    args: &FrontendArgs,
    address: String,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Link>> {
    let client = client(args)?;
    let (applied, applied_rx) = watch::channel(0);
    let uplink = Arc::new(Uplink {
        client: client.clone(),
        conn: tokio::sync::Mutex::new(None),
        seq: AtomicU64::new(0),
        id: keypool_shared::process_id().to_owned(),
        address,
        applied: applied_rx.clone(),
    });
    let (tx, mut rx) = mpsc::channel(4);
    watch_config(
        args.clone(),
        client,
        uplink.clone(),
        applied_rx.clone(),
        tx,
        stop.clone(),
    );
    let first = match tokio::time::timeout(FIRST_SNAPSHOT_WAIT, rx.recv()).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        Err(_) => {
            if let Some(snap) = load_persisted(args)? {
                tracing::warn!(
                    version = snap.version,
                    "control plane unreachable: serving the persisted config snapshot"
                );
                build(args, &snap).context("the persisted snapshot is invalid")?
            } else {
                tracing::warn!(
                    "control plane unreachable and no persisted snapshot: waiting for the control plane"
                );
                tokio::select! {
                    () = stop.cancelled() => return Ok(None),
                    p = rx.recv() => match p {
                        Some(p) => p,
                        None => return Ok(None),
                    },
                }
            }
        }
    };
    heartbeat(uplink.clone(), applied_rx, stop.clone());
    Ok(Some(Link {
        updates: rx,
        first,
        uplink,
        applied,
    }))
}

/// An empty batch every [`HEARTBEAT_EVERY`] and after each applied snapshot.
fn heartbeat(uplink: Arc<Uplink>, mut applied: watch::Receiver<u64>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = applied.changed() => if r.is_err() { return },
                () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            }
            applied.borrow_and_update();
            if let Err(e) = uplink.send(Vec::new()).await {
                tracing::debug!(error = %e, "heartbeat to the control plane failed");
            }
        }
    });
}
