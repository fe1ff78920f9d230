//! A one-screen summary of a validated [`Config`] (`keypool check`), and the store's name for
//! the start-up line. Never a secret: tokens are counted, passwords dropped.

use std::fmt::Write as _;

use crate::gateway::{AuthMethod, Gateway};
use crate::{Config, ModelRule, StoreConfig};

impl StoreConfig {
    /// `sqlite ./keypool.db`, `postgres keypool@db:5432/keypool` (never the password), `none`.
    pub fn describe(&self) -> String {
        match self {
            Self::None => "none".to_owned(),
            Self::Sqlite { path } => format!("sqlite {path}"),
            Self::Postgres { dsn } => format!("postgres {}", postgres_target(dsn)),
        }
    }
}

/// `user@host:port/db` of a URL or key=value DSN, without the password or any other parameter.
fn postgres_target(dsn: &str) -> String {
    if let Ok(url) = url::Url::parse(dsn) {
        let user = match url.username() {
            "" => String::new(),
            u => format!("{u}@"),
        };
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        return format!(
            "{user}{}{port}{}",
            url.host_str().unwrap_or("localhost"),
            url.path()
        );
    }
    let field = |name: &str| {
        dsn.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    format!(
        "{}{}:{}/{}",
        field("user").map(|u| format!("{u}@")).unwrap_or_default(),
        field("host").unwrap_or_else(|| "localhost".to_owned()),
        field("port").unwrap_or_else(|| "5432".to_owned()),
        field("dbname").unwrap_or_default()
    )
}

fn models(rules: &[ModelRule]) -> String {
    rules
        .iter()
        .map(|r| match r {
            ModelRule::Exact(m) => m.clone(),
            ModelRule::Prefix(p) => format!("{p}*"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn gateway_line(g: &Gateway, client_tokens: usize) -> String {
    let auth = match g.auth.as_ref().map(|a| &a.method) {
        None if client_tokens > 0 => format!("{client_tokens} client token(s)"),
        None => "OPEN (no auth)".to_owned(),
        Some(AuthMethod::Exact(s)) => format!("exact, {} secret(s)", s.len()),
        Some(AuthMethod::Tokens(_)) => "client tokens".to_owned(),
        Some(AuthMethod::Regex(_)) => "regex".to_owned(),
        Some(AuthMethod::Jwt { .. }) => "jwt".to_owned(),
    };
    let mut line = format!("{} ({auth}", g.name);
    if let Some(m) = &g.models {
        let _ = write!(line, "; models {}", models(m));
    }
    if !g.rate_limits.is_empty() {
        let _ = write!(line, "; {} rate limit(s)", g.rate_limits.len());
    }
    if let Some(q) = g.token_quota {
        let _ = write!(line, "; quota {q} tokens");
    }
    for (what, b) in [("budget", g.budget), ("per caller", g.caller_budget)] {
        if let Some(b) = b {
            let _ = write!(
                line,
                "; {what} {} {}",
                crate::budget::dollars(b.nanos),
                b.period.adjective()
            );
        }
    }
    let r = &g.routing;
    if !r.fallbacks.is_empty() || !r.context_fallbacks.is_empty() {
        let _ = write!(
            line,
            "; fallbacks for {} model(s)",
            r.fallbacks.len() + r.context_fallbacks.len()
        );
    }
    if let Some(a) = r.affinity {
        let _ = write!(line, "; affinity {}s", a.ttl.as_secs());
    }
    if let Some(c) = r.cache {
        let backend = match c.backend {
            crate::routing::CacheBackend::Memory => "memory",
            crate::routing::CacheBackend::Redis => "redis",
        };
        let _ = write!(line, "; cache {}s {backend}", c.ttl.as_secs());
    }
    if let Some(m) = &g.data_masking {
        let _ = write!(
            line,
            "; masking {} rule(s){}",
            m.detectors.len() + m.custom.len(),
            if m.restore { ", restored" } else { "" }
        );
    }
    if let Some(c) = &g.content_safety {
        let _ = write!(
            line,
            "; content safety{}",
            if c.moderation.is_some() {
                " + moderation"
            } else {
                ""
            }
        );
    }
    if !g.active {
        line.push_str("; INACTIVE");
    }
    line.push(')');
    line
}

impl Config {
    /// What this config serves, one line per part (`keypool check` prints it).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "listen    http://{}/v1", self.address);
        let _ = writeln!(out, "store     {}", self.store.describe());
        let _ = writeln!(out, "keys      {}", self.upstreams.len());
        for k in &self.upstreams {
            let _ = writeln!(out, "{}", key_line(k));
        }
        let _ = writeln!(out, "gateways  {}", 1 + self.gateways.len());
        let _ = writeln!(
            out,
            "  {} at /v1",
            gateway_line(&self.default_gateway, self.client_tokens.len())
        );
        for g in &self.gateways {
            let _ = writeln!(out, "  {} at /llm/api/{}/v1", gateway_line(g, 0), g.name);
        }
        let _ = writeln!(
            out,
            "policy    lb_policy {}, retries {}, queue_timeout {:?}, timeout {:?}, stream_timeout {:?}",
            self.lb_policy.as_str(),
            self.retries,
            self.queue_timeout,
            self.timeout,
            self.stream_timeout
        );
        let admin = if self.admin.enabled {
            format!(
                "{}{}",
                self.admin.address,
                if self.admin.token.is_some() {
                    " (token set)"
                } else {
                    " (no token: loopback only)"
                }
            )
        } else {
            "off".to_owned()
        };
        let _ = writeln!(out, "admin     {admin}");
        let redis = self.redis.as_ref().map_or_else(
            || "none (limits and health in this process)".to_owned(),
            |r| {
                let what = match &r.servers {
                    crate::RedisServers::Url(_) => "one server".to_owned(),
                    crate::RedisServers::Cluster(n) => format!("cluster of {} seed nodes", n.len()),
                    crate::RedisServers::Sentinel { master, nodes, .. } => {
                        format!("master {master:?} through {} Sentinels", nodes.len())
                    }
                };
                format!("{what}, prefix {:?} (urls not shown)", r.prefix)
            },
        );
        let _ = write!(out, "redis     {redis}");
        out
    }
}

/// One key: its kind, endpoint and the limits it has.
fn key_line(k: &crate::UpstreamKey) -> String {
    let mut line = format!("  {} ({}, {}", k.name, k.kind.as_str(), k.endpoint);
    if k.passthrough_auth {
        line.push_str(", sk asis");
    }
    if !k.allow.is_empty() {
        let _ = write!(line, ", allow {}", models(&k.allow));
    }
    if let Some(rpm) = k.rpm {
        let _ = write!(line, ", rpm {rpm}");
    }
    if let Some(tpm) = k.tpm {
        let _ = write!(line, ", tpm {tpm}");
    }
    if let Some(b) = k.budget {
        let _ = write!(
            line,
            ", budget {} {}",
            crate::budget::dollars(b.nanos),
            b.period.adjective()
        );
    }
    if let Some(why) = &k.unusable {
        let _ = write!(line, "; UNUSABLE: {why}");
    }
    line.push(')');
    line
}

#[cfg(test)]
mod tests {
    use super::postgres_target;

    #[test]
    fn a_gateway_line_says_its_routing_and_guardrails() {
        let cfg = crate::from_yaml(
            "upstreams: [{sk: sk-1, endpoint: 'http://127.0.0.1:1/v1'}]
gateways:
  - name: team
    fallbacks: {gpt-4o: [gpt-4o-mini]}
    affinity: {ttl: 60}
    cache: {ttl: 30, backend: redis}
    data_masking: {detectors: [phone, email], restore: true}
    content_safety: {keywords: [x], moderation: {model: m}}
",
        )
        .unwrap();
        let summary = cfg.summary();
        assert!(
            summary.contains("team (OPEN (no auth); fallbacks for 1 model(s); affinity 60s; cache 30s redis; masking 2 rule(s), restored; content safety + moderation)"),
            "{summary}"
        );
    }

    #[test]
    fn a_postgres_target_never_shows_the_password() {
        assert_eq!(
            postgres_target("postgres://keypool:hunter2@db.internal:5433/usage?sslmode=require"),
            "keypool@db.internal:5433/usage"
        );
        assert_eq!(
            postgres_target("host=db user=k password=hunter2 dbname=usage"),
            "k@db:5432/usage"
        );
    }
}
