//! `keypoolctl`'s command line: global options, subcommands, their flags and help texts.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "keypoolctl",
    version,
    about = "Manage a running keypool through its admin API"
)]
pub struct Cli {
    /// The admin API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8889")]
    pub server: String,
    /// Admin token (sent as `authorization: Bearer <token>`).
    #[arg(
        long,
        global = true,
        env = "KEYPOOL_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// With an `https://` server: a PEM CA certificate to trust (default: the web PKI roots).
    #[arg(long, global = true, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Gateways at /llm/api/{name}/v1.
    #[command(subcommand)]
    Gateways(GatewayCmd),
    /// Upstream keys and their live state.
    #[command(subcommand)]
    Keys(KeyCmd),
    /// Tokens and calls per gateway / key / model, or live events with --follow.
    Usage {
        #[arg(long)]
        gateway: Option<String>,
        /// Only with --follow.
        #[arg(long)]
        model: Option<String>,
        /// Only with --follow.
        #[arg(long)]
        key: Option<String>,
        /// How far back: 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Stream live usage events until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Version, uptime, replicas, store and Redis health.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    List,
    Get {
        name: String,
    },
    /// Create from a YAML/JSON file holding one `gateways:` entry.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Replace a gateway's spec with the file's.
    Update {
        name: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    Delete {
        name: String,
    },
    /// Replace the gateway's secrets with one new secret, printed once.
    RotateSecret {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    List,
    /// Add from a YAML/JSON file holding one `upstreams:` entry.
    Add {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    Update {
        name: String,
        #[arg(long)]
        rpm: Option<u32>,
        #[arg(long)]
        tpm: Option<u64>,
        #[arg(long, conflicts_with = "rpm")]
        clear_rpm: bool,
        #[arg(long, conflicts_with = "tpm")]
        clear_tpm: bool,
        /// Comma-separated models (`prefix*` allowed); empty clears.
        #[arg(long)]
        allow: Option<String>,
        #[arg(long)]
        deny: Option<String>,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    /// Stop using a key, wait for its in-flight requests, forget it.
    Remove {
        name: String,
    },
}
