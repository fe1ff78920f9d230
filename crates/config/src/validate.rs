//! Raw → validated, collecting every mistake with its field path.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keypool_types::Secret;

use crate::key_validate::validate_upstream;
use crate::raw::{RawConfig, RawUpstream, Seconds};
use crate::sections::{
    normalise_address, validate_admin, validate_log, validate_notify, validate_telemetry,
};
use crate::{
    Config, ConfigError, FieldError, Gateway, LbPolicy, RawGateway, StoreConfig, UpstreamKey,
};

/// Headers never recorded, whatever the configuration says.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "proxy-authorization",
];

/// Collects field errors while walking the raw config.
#[derive(Default)]
pub(crate) struct Errors(pub(crate) Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// A `pricing:` list (at `path`) as a catalog; a mistake names its entry.
    pub(crate) fn prices_at(
        &mut self,
        path: &str,
        entries: &[keypool_pricing::RawPrice],
    ) -> keypool_pricing::Catalog {
        keypool_pricing::Catalog::from_entries(entries, path).unwrap_or_else(|e| {
            match e {
                keypool_pricing::CatalogError::Entry { at, why } => self.push(at, why),
                keypool_pricing::CatalogError::Yaml(why) => self.push(path, why),
            }
            keypool_pricing::Catalog::default()
        })
    }

    fn prices(&mut self, entries: &[keypool_pricing::RawPrice]) -> keypool_pricing::Catalog {
        self.prices_at("pricing", entries)
    }

    /// A count that must lie in `range` (each numeric field has one, documented in the README):
    /// outside it, the field's error and the default, so nothing downstream ever sees it.
    pub(crate) fn ranged<T>(
        &mut self,
        path: &str,
        value: Option<T>,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> T
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        match value {
            None => default,
            Some(v) if range.contains(&v) => v,
            Some(v) => {
                self.push(
                    path,
                    format!(
                        "must be between {} and {}, got {v}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    pub(crate) fn seconds(
        &mut self,
        path: &str,
        value: Option<Seconds>,
        default: Duration,
    ) -> Duration {
        match value {
            None => default,
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Duration::from_secs_f64(s),
            Some(s) => {
                self.push(
                    path,
                    format!("must be a positive number of seconds, got {s}"),
                );
                default
            }
        }
    }
}

/// Validates a parsed file into a [`Config`], reporting every invalid field at once.
#[allow(clippy::too_many_lines)] // the file's top level, field after field, in the file's order
pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut errs = Errors::default();
    let policy = Arc::new(raw.policy());

    let address = normalise_address(raw.address.as_deref().unwrap_or(":8888"));
    if address
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        errs.push(
            "address",
            format!("expected host:port or :port, got {address:?}"),
        );
    }
    let client_tokens = raw
        .authorization
        .as_ref()
        .map(crate::raw::StringOrList::entries)
        .unwrap_or_default();
    let timeout = errs.seconds("timeout", raw.timeout, Duration::from_secs(120));
    let stream_timeout = errs.seconds(
        "stream_timeout",
        raw.stream_timeout,
        Duration::from_secs(10),
    );
    let idle_timeout = errs.seconds("idle_timeout", raw.idle_timeout, Duration::from_secs(60));
    // 0: never wait for a key with budget (429 at once)
    let queue_timeout = match raw.queue_timeout {
        Some(0.0) => Duration::ZERO,
        s => errs.seconds("queue_timeout", s, Duration::from_secs(30)),
    };
    let shutdown_grace = errs.seconds(
        "shutdown_grace",
        raw.shutdown_grace,
        Duration::from_secs(30),
    );

    let store = validate_store(raw.dbtype.as_deref(), raw.dbaddr, &mut errs);

    let lb_policy = match raw.lb_policy.as_deref() {
        None | Some("least-used") => LbPolicy::LeastUsed,
        Some("order") => LbPolicy::Order,
        Some("random") => LbPolicy::Random,
        Some("latency") => LbPolicy::Latency,
        Some(other) => {
            errs.push(
                "lb_policy",
                format!("expected least-used, order, random or latency, got {other:?}"),
            );
            LbPolicy::LeastUsed
        }
    };

    let max_body_bytes =
        errs.ranged("max_body_bytes", raw.max_body_bytes, 32 << 20, 1..=1 << 30) as usize;
    let max_response_bytes = errs.ranged(
        "max_response_bytes",
        raw.max_response_bytes,
        64 << 20,
        1024..=4 << 30,
    ) as usize;
    let max_stream_event_bytes = errs.ranged(
        "max_stream_event_bytes",
        raw.max_stream_event_bytes,
        4 << 20,
        1024..=256 << 20,
    ) as usize;
    let body_timeout = errs.seconds("body_timeout", raw.body_timeout, Duration::from_secs(30));
    let max_buffered_request_bytes = errs.ranged(
        "max_buffered_request_bytes",
        raw.max_buffered_request_bytes,
        512 << 20,
        1 << 20..=64 << 30,
    ) as usize;
    let stream_deadline = raw
        .stream_deadline
        .map(|s| errs.seconds("stream_deadline", Some(s), Duration::ZERO));

    if let Some(r) = raw.retries {
        errs.ranged("retries", Some(r), 0, 0..=100);
    }
    let upstreams = validate_upstreams(raw.upstreams, timeout, stream_timeout, &mut errs);
    let retries = raw
        .retries
        .unwrap_or_else(|| u32::try_from(upstreams.len().saturating_sub(1)).unwrap_or(u32::MAX));

    let log = validate_log(raw.log.unwrap_or_default(), &store, &mut errs);
    let mut trusted_proxies = Vec::new();
    for (i, cidr) in raw.trusted_proxies.iter().enumerate() {
        match cidr
            .parse::<ipnet::IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => errs.push(
                format!("trusted_proxies[{i}]"),
                format!("expected a CIDR or an IP, got {cidr:?}"),
            ),
        }
    }
    let (default_gateway, gateways) =
        validate_gateways(&policy.default_gateway, &raw.gateways, &mut errs);
    let telemetry = validate_telemetry(raw.telemetry.unwrap_or_default(), &mut errs);
    let notify = validate_notify(raw.notify.unwrap_or_default(), &mut errs);
    let admin = validate_admin(raw.admin.unwrap_or_default(), &mut errs);
    let redis = raw.redis.map(|r| validate_redis(r, &mut errs));
    let prices = errs.prices(&raw.pricing);
    let completion_estimate = errs.ranged(
        "completion_estimate",
        raw.completion_estimate,
        256,
        1..=10_000_000,
    );
    if !errs.0.is_empty() {
        return Err(ConfigError::Invalid(errs.0));
    }
    Ok(Config {
        address,
        client_tokens,
        timeout,
        stream_timeout,
        idle_timeout,
        store,
        lb_policy,
        queue_timeout,
        max_body_bytes,
        max_response_bytes,
        max_stream_event_bytes,
        stream_deadline,
        body_timeout,
        max_buffered_request_bytes,
        retries,
        shutdown_grace,
        upstreams,
        log,
        trusted_proxies,
        default_gateway,
        gateways,
        raw_gateways: raw
            .gateways
            .iter()
            .map(crate::gateway::RawGateway::hashed)
            .collect(),
        telemetry,
        notify,
        admin,
        redis,
        policy,
        prices: Arc::new(keypool_pricing::Prices::new(prices)),
        completion_estimate,
    })
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;

fn validate_store(dbtype: Option<&str>, dbaddr: Option<String>, errs: &mut Errors) -> StoreConfig {
    match (dbtype.unwrap_or("sqlite"), dbaddr) {
        ("sqlite", addr) => StoreConfig::Sqlite {
            path: addr.unwrap_or_else(|| "./keypool.sqlite".to_owned()),
        },
        ("postgres", Some(dsn)) => StoreConfig::Postgres { dsn },
        ("postgres", None) => {
            errs.push(
                "dbaddr",
                "dbtype postgres needs dbaddr (a URL or host=... port=...)",
            );
            StoreConfig::None
        }
        ("none", _) => StoreConfig::None,
        (other, _) => {
            errs.push(
                "dbtype",
                format!("expected sqlite, postgres or none, got {other:?}"),
            );
            StoreConfig::None
        }
    }
}

/// The keys in config order; names unique.
fn validate_upstreams(
    raw: Vec<RawUpstream>,
    timeout: Duration,
    stream_timeout: Duration,
    errs: &mut Errors,
) -> Vec<std::sync::Arc<UpstreamKey>> {
    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.len());
    for (i, up) in raw.into_iter().enumerate() {
        let path = format!("upstreams[{i}]");
        if let Some(key) = validate_upstream(&path, up, timeout, stream_timeout, errs) {
            if !names.insert(key.name.clone()) {
                errs.push(
                    format!("{path}.name"),
                    format!(
                        "duplicate upstream name {:?} (same endpoint and key twice?)",
                        key.name
                    ),
                );
            }
            upstreams.push(Arc::new(key));
        }
    }
    upstreams
}

/// The `default` gateway (the top-level fields: their paths without a prefix) and the named
/// ones (unique, none named `default`).
fn validate_gateways(
    default: &RawGateway,
    named: &[RawGateway],
    errs: &mut Errors,
) -> (Arc<Gateway>, Vec<Arc<Gateway>>) {
    let default_gateway = match crate::gateway::validate_gateway(default, "") {
        Ok(g) => Arc::new(g),
        Err(e) => {
            // the top-level fields: no `default.` in front of their paths
            for f in e {
                errs.push(f.path.trim_start_matches('.'), f.reason);
            }
            Arc::new(crate::Gateway::open(crate::DEFAULT_GATEWAY))
        }
    };
    let mut gateways = Vec::with_capacity(named.len());
    let mut gateway_names = HashSet::new();
    for (i, g) in named.iter().enumerate() {
        let at = format!("gateways[{i}]");
        match crate::gateway::validate_gateway(g, &at) {
            Ok(g) => {
                if g.name == crate::DEFAULT_GATEWAY {
                    errs.push(
                        format!("{at}.name"),
                        "`default` is the gateway at /v1/*: set its policy at the top level",
                    );
                } else if !gateway_names.insert(g.name.clone()) {
                    errs.push(
                        format!("{at}.name"),
                        format!("duplicate gateway name {:?}", g.name),
                    );
                }
                gateways.push(Arc::new(g));
            }
            Err(e) => errs.0.extend(e),
        }
    }
    (default_gateway, gateways)
}

fn redis_url(at: &str, u: &str, errs: &mut Errors) -> Secret {
    // never echo the value: it may hold a password
    if url::Url::parse(u).map_or(true, |u| !matches!(u.scheme(), "redis" | "rediss")) {
        errs.push(at, "expected redis://host:port[/db]");
    }
    Secret::new(u.to_owned())
}

fn redis_servers(r: &crate::raw::RawRedis, errs: &mut Errors) -> crate::RedisServers {
    use crate::RedisServers;
    let given = usize::from(r.url.is_some())
        + usize::from(r.cluster.is_some())
        + usize::from(r.sentinel.is_some());
    if given != 1 {
        errs.push("redis", "expected exactly one of url, cluster and sentinel");
    }
    if let Some(nodes) = &r.cluster {
        if nodes.is_empty() {
            errs.push("redis.cluster", "expected at least one seed node");
        }
        return RedisServers::Cluster(
            nodes
                .iter()
                .enumerate()
                .map(|(i, u)| redis_url(&format!("redis.cluster[{i}]"), u, errs))
                .collect(),
        );
    }
    if let Some(s) = &r.sentinel {
        if s.nodes.is_empty() {
            errs.push("redis.sentinel.nodes", "expected at least one Sentinel");
        }
        if s.master.trim().is_empty() {
            errs.push(
                "redis.sentinel.master",
                "expected the monitored master's name",
            );
        }
        let db = s.db.unwrap_or(0);
        if !(0..=1_000_000).contains(&db) {
            errs.push("redis.sentinel.db", "must be between 0 and 1000000");
        }
        return RedisServers::Sentinel {
            master: s.master.clone(),
            nodes: s
                .nodes
                .iter()
                .enumerate()
                .map(|(i, u)| redis_url(&format!("redis.sentinel.nodes[{i}]"), u, errs))
                .collect(),
            password: s.password.clone().map(Secret::new),
            db,
        };
    }
    RedisServers::Url(redis_url("redis.url", r.url.as_deref().unwrap_or(""), errs))
}

fn validate_redis(r: crate::raw::RawRedis, errs: &mut Errors) -> crate::Redis {
    let servers = redis_servers(&r, errs);
    let fail_closed = match r.on_failure.as_deref() {
        None | Some("local") => false,
        Some("closed") => true,
        Some(other) => {
            errs.push(
                "redis.on_failure",
                format!("expected local or closed, got {other:?}"),
            );
            false
        }
    };
    crate::Redis {
        servers,
        prefix: r.prefix.unwrap_or_else(|| "keypool:".to_owned()),
        timeout: Duration::from_millis(errs.ranged(
            "redis.timeout_ms",
            r.timeout_ms,
            250,
            1..=60_000,
        )),
        fail_closed,
        replicas_hint: match r.replicas_hint {
            Some(0) => {
                errs.push("redis.replicas_hint", "must be at least 1");
                1
            }
            n => n.unwrap_or(1),
        },
        lease: errs.ranged("redis.lease", r.lease, 0, 0..=4096),
        lease_ms: Duration::from_millis(errs.ranged(
            "redis.lease_ms",
            r.lease_ms,
            1000,
            10..=crate::MAX_LEASE_MS,
        )),
    }
}
