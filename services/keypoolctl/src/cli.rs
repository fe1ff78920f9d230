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
    /// The admin API (`https://` for one serving TLS).
    #[arg(
        long,
        global = true,
        env = "KEYPOOL_ADMIN_URL",
        default_value = "http://127.0.0.1:8889"
    )]
    pub server: String,
    /// Admin token (sent as `authorization: Bearer <token>`); the API's `admin.token`.
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
    /// Tokens, calls and spend per gateway / key / model / caller / day, or live events with
    /// --follow.
    Usage {
        /// Only this gateway (`default` is `/v1`).
        #[arg(long)]
        gateway: Option<String>,
        /// Only this model (with --follow).
        #[arg(long)]
        model: Option<String>,
        /// Only this key (with --follow).
        #[arg(long)]
        key: Option<String>,
        /// How far back: 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Stream live usage events until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Spend per upstream key (or gateway, or model) over a time range, as CSV or JSON: for
    /// reconciling with a provider's bill.
    Spend {
        /// What each row is: key, gateway or model.
        #[arg(long, default_value = "key", value_parser = ["key", "gateway", "model"])]
        by: String,
        /// From (inclusive): a UTC date `2026-11-01`, an RFC 3339 time, or unix milliseconds.
        /// Default: 30 days ago.
        #[arg(long)]
        from: Option<String>,
        /// To (exclusive), in the same forms. Default: now.
        #[arg(long)]
        to: Option<String>,
        /// Only this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// csv (default) or json (`--json` too).
        #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
        format: String,
    },
    /// Prices set at run time, in force before the config file's `pricing:` and the built-in
    /// catalog (USD per million tokens).
    #[command(subcommand)]
    Prices(PriceCmd),
    /// Version, uptime, replicas, store and Redis health.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum PriceCmd {
    /// The prices in force: the admin API's, then the config file's.
    List,
    /// Replace the admin API's prices with a YAML/JSON file's `pricing:` list (a config file's
    /// too) or a list of entries; every frontend charges them from its next request.
    Set {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Remove the admin API's prices (the config file's and the built-in ones apply).
    Clear,
}

#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Every gateway, `default` (`/v1`) first: owner, auth, quota and use.
    List,
    /// One gateway and its spec (secrets hashed).
    Get {
        /// The gateway's name.
        name: String,
    },
    /// Create from a YAML/JSON file holding one `gateways:` entry.
    Create {
        /// The file (`name`, `auth`, `models`, `rate_limits`, ... as in the config file).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Replace a gateway's spec with the file's.
    Update {
        /// The gateway's name.
        name: String,
        /// The file holding its new spec.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Delete an admin-owned gateway (a config file's gateways change in the file).
    Delete {
        /// The gateway's name.
        name: String,
    },
    /// Replace the gateway's secrets with one new secret, printed once.
    RotateSecret {
        /// The gateway's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Every key: secret (masked), health, cooldown, rpm/tpm use, counts, last error.
    List,
    /// Add keys from a YAML/JSON file: one `upstreams:` entry, a list of them, or a config
    /// file's `upstreams:` (openai-api-route's included). The secrets are sealed before they
    /// are stored.
    Add {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Change a key's budgets or model lists (admin-owned keys; `enabled` for any).
    Update {
        /// The key's name.
        name: String,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// Remove the rpm budget.
        #[arg(long, conflicts_with = "rpm")]
        clear_rpm: bool,
        /// Remove the tpm budget.
        #[arg(long, conflicts_with = "tpm")]
        clear_tpm: bool,
        /// Comma-separated models (`prefix*` allowed); empty clears.
        #[arg(long)]
        allow: Option<String>,
        /// Comma-separated models refused (`prefix*` allowed); empty clears.
        #[arg(long)]
        deny: Option<String>,
    },
    /// Put a disabled key back in service.
    Enable {
        /// The key's name.
        name: String,
    },
    /// Stop picking a key (in-flight requests finish); kept across restarts.
    Disable {
        /// The key's name.
        name: String,
    },
    /// Stop using a key, wait for its in-flight requests, forget it.
    Remove {
        /// The key's name.
        name: String,
    },
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
    fn every_subcommand_and_flag_has_help() {
        let mut out = Vec::new();
        undocumented(&super::Cli::command(), "keypoolctl", &mut out);
        assert!(out.is_empty(), "no help text: {out:?}");
    }
}
