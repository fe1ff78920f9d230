//! `validate` over whole files: every mistake with its path, defaults, compatibility.

#[test]
fn an_admin_api_beyond_loopback_needs_a_token() {
    let err = crate::from_yaml("admin: {address: '0.0.0.0:8889'}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin.token"), "{err}");
    assert!(crate::from_yaml("admin: {address: '0.0.0.0:8889', token: t}\n").is_ok());
    assert!(crate::from_yaml("admin: {address: '127.0.0.1:8889'}\n").is_ok());
    assert!(crate::from_yaml("admin: {address: '0.0.0.0:8889', enabled: false}\n").is_ok());
}

use crate::{ConfigError, LbPolicy, StoreConfig, from_yaml};

/// openai-api-route's `config.sample.yaml`, unchanged.
pub const OPENAI_API_ROUTE_SAMPLE: &str = include_str!("../tests/openai-api-route.sample.yaml");

#[test]
fn openai_api_route_sample_loads() {
    let cfg = from_yaml(OPENAI_API_ROUTE_SAMPLE).unwrap();
    assert_eq!(cfg.client_tokens, vec!["woshimima"]);
    assert_eq!(cfg.address, "0.0.0.0:8888");
    assert_eq!(cfg.upstreams.len(), 4);
    assert_eq!(
        cfg.store,
        StoreConfig::Sqlite {
            path: "./db.sqlite".into()
        }
    );
    assert_eq!(cfg.upstreams[2].timeout.as_secs(), 30);
    assert_eq!(cfg.upstreams[3].endpoint, "https://api.replicate.com/v1");
    assert_eq!(cfg.upstreams[3].kind, crate::UpstreamKind::Replicate);
    // names are derived, distinct and free of the secret
    assert!(cfg.upstreams[1].name.starts_with("api.openai.com-"));
    assert!(!cfg.upstreams[1].name.contains("secret_key"));
    assert_eq!(cfg.retries, 3);
    assert_eq!(cfg.lb_policy, LbPolicy::LeastUsed);
}

#[test]
fn comma_separated_tokens() {
    let cfg = from_yaml("authorization: woshimima, iampassword\n").unwrap();
    assert_eq!(cfg.client_tokens, vec!["woshimima", "iampassword"]);
}

#[test]
fn reports_every_field_path() {
    let text = "lb_policy: fastest\ntimeout: -1\nupstreams:\n  - sk: a\n  - endpoint: ftp://x\n    sk: b\n    rpm: 0\n";
    let Err(ConfigError::Invalid(errs)) = from_yaml(text) else {
        panic!("expected invalid")
    };
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "timeout",
            "lb_policy",
            "upstreams[0].endpoint",
            "upstreams[1].endpoint",
            "upstreams[1].rpm"
        ]
    );
}

#[test]
fn unknown_field_is_refused_with_its_path() {
    let err = from_yaml("upstreams:\n  - sk: a\n    endpoint: http://x\n    rmp: 3\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("upstreams[0]"), "{text}");
    assert!(text.contains("rmp"), "{text}");
}

#[test]
fn duplicate_names_refused() {
    let text =
        "upstreams:\n  - {sk: a, endpoint: 'http://x/v1'}\n  - {sk: a, endpoint: 'http://x/v1'}\n";
    assert!(
        from_yaml(text)
            .unwrap_err()
            .to_string()
            .contains("upstreams[1].name")
    );
}

#[test]
fn empty_file_is_a_valid_open_gateway_with_no_keys() {
    let cfg = from_yaml("").unwrap();
    assert!(cfg.client_tokens.is_empty());
    assert!(cfg.upstreams.is_empty());
}

/// Values that crashed keypool (a panic, or memory reserved until the kernel killed it) are
/// refused at load, each naming its field and its range.
#[test]
fn numeric_fields_outside_their_range_are_refused() {
    let text = "admin: {stream_buffer: 18446744073709551615}\nlog: {queue_capacity: 2305843009213693952, max_field_bytes: 0, spill_max_bytes: 0}\nmax_body_bytes: 99999999999999\nretries: 1000\nredis: {url: 'redis://127.0.0.1:6379', timeout_ms: 0}\n";
    let err = crate::from_yaml(text).unwrap_err().to_string();
    for field in [
        "admin.stream_buffer: must be between 1 and 1048576",
        "log.queue_capacity: must be between 1 and 10000000",
        "log.max_field_bytes: must be between 1 and",
        "log.spill_max_bytes: must be between 1 and",
        "max_body_bytes: must be between 1 and 1073741824",
        "retries: must be between 0 and 100",
        "redis.timeout_ms: must be between 1 and 60000",
    ] {
        assert!(err.contains(field), "{field} missing from:\n{err}");
    }
    let err = crate::from_yaml(
        "upstreams: [{sk: a, tpm: 18446744073709551615}]\ngateways: [{name: g, retries: 4294967295}]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstreams[0].tpm: must be between 1 and"),
        "{err}"
    );
    assert!(
        err.contains("gateways[0].retries: must be between 0 and 100"),
        "{err}"
    );
    let ok = crate::from_yaml("admin: {stream_buffer: 1048576}\nlog: {queue_capacity: 1}\n");
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn every_parse_mistake_of_a_file_is_named_in_one_run() {
    let err = from_yaml(
        "addres: ':8888'\n\
         timeout: soon\n\
         upstreams:\n\
         - {sk: sk-a, endpoint: 'http://a/v1', rpm: many, alow: [x]}\n\
         - {sk: sk-b, endpoint: 'http://b/v1'}\n\
         gateways:\n\
         - {name: team, retries: -1}\n\
         log: {headers: maybe}\n",
    )
    .unwrap_err();
    let ConfigError::Invalid(errors) = &err else {
        panic!("{err}");
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "addres",
        "timeout",
        "upstreams[0].rpm",
        "upstreams[0].alow",
        "gateways[0].retries",
        "log.headers",
    ] {
        assert!(paths.contains(&want), "{want} missing from {err}");
    }
    assert_eq!(errors.len(), 6, "{err}");
    assert!(err.to_string().contains("unknown field `addres`"), "{err}");
}

#[test]
fn a_scalar_is_a_one_item_list() {
    let cfg = from_yaml(
        "models: gpt-4o\nupstreams:\n- {sk: sk-a, endpoint: 'http://a/v1', allow: gpt-4o, deny: [o1]}\n\
         gateways:\n- {name: team, whitelist: 'ip:10.0.0.0/8', models: gpt-4o}\n",
    )
    .unwrap();
    assert_eq!(cfg.upstreams[0].allow.len(), 1);
    assert_eq!(cfg.upstreams[0].deny.len(), 1);
    assert_eq!(cfg.gateways[0].whitelist.len(), 1);
    assert_eq!(cfg.gateways[0].models.as_ref().map(Vec::len), Some(1));
    assert_eq!(cfg.default_gateway.models.as_ref().map(Vec::len), Some(1));
    let err = from_yaml("upstreams:\n- {sk: a, endpoint: 'http://a/v1', allow: 3}\n").unwrap_err();
    assert!(err.to_string().contains("upstreams[0].allow"), "{err}");
}

#[test]
fn queue_timeout_zero_never_waits() {
    let cfg = from_yaml("queue_timeout: 0\n").unwrap();
    assert_eq!(cfg.queue_timeout, std::time::Duration::ZERO);
    assert!(from_yaml("queue_timeout: -1\n").is_err());
}

#[test]
fn environment_variables_fill_string_values() {
    // cargo and nextest set CARGO_MANIFEST_DIR for the test process
    let cfg = from_yaml(
        "authorization: ${CARGO_MANIFEST_DIR}\n\
         dbtype: sqlite\n\
         dbaddr: ${KEYPOOL_TEST_CFG_UNSET:-./fallback.db}\n",
    )
    .unwrap();
    assert_eq!(cfg.client_tokens, vec![env!("CARGO_MANIFEST_DIR")]);
    assert_eq!(
        cfg.store,
        StoreConfig::Sqlite {
            path: "./fallback.db".into()
        }
    );
    let err =
        from_yaml("upstreams:\n- {sk: '${KEYPOOL_TEST_CFG_UNSET}', endpoint: 'http://a/v1'}\n")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("upstreams[0].sk") && err.contains("KEYPOOL_TEST_CFG_UNSET is not set"),
        "{err}"
    );
}

#[test]
fn an_endpoint_with_credentials_is_refused_without_echoing_them() {
    let err = from_yaml("upstreams:\n- {sk: sk-a, endpoint: 'http://user:pw-secret-9@host/v1'}\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("upstreams[0].endpoint: must not carry credentials"),
        "{err}"
    );
    assert!(!err.contains("pw-secret-9"), "{err}");
    let err = from_yaml("upstreams:\n- {sk: sk-a, endpoint: 'ftp://u:pw-secret-9@host/v1'}\n")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("pw-secret-9"), "{err}");
}

#[test]
fn list_or_string_values_name_the_wrong_item() {
    let err = from_yaml("authorization: [tok, {a: b}]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("authorization[1]") && err.contains("expected a string"),
        "{err}"
    );
    let err = from_yaml("token_quota: [1]\n").unwrap_err().to_string();
    assert!(
        err.contains("token_quota") && err.contains("no-limit"),
        "{err}"
    );
    // a bare number is a token (YAML reads `123456` as an integer)
    assert_eq!(
        from_yaml("authorization: 123456\n").unwrap().client_tokens,
        vec!["123456"]
    );
}

#[test]
fn redis_is_one_server_a_cluster_or_a_sentinel() {
    let ok = from_yaml("redis: {cluster: ['redis://a:7000', 'redis://b:7000']}\n").unwrap();
    assert!(matches!(
        ok.redis.map(|r| r.servers),
        Some(crate::RedisServers::Cluster(n)) if n.len() == 2
    ));
    let ok =
        from_yaml("redis: {sentinel: {master: m, nodes: ['redis://s:26379'], db: 2}}\n").unwrap();
    assert!(matches!(
        ok.redis.map(|r| r.servers),
        Some(crate::RedisServers::Sentinel { db: 2, .. })
    ));
    for (text, says) in [
        (
            "redis: {prefix: x}\n",
            "redis: expected exactly one of url, cluster and sentinel",
        ),
        (
            "redis: {url: 'redis://a', cluster: ['redis://b']}\n",
            "redis: expected exactly one of url, cluster and sentinel",
        ),
        (
            "redis: {cluster: []}\n",
            "redis.cluster: expected at least one seed node",
        ),
        (
            "redis: {cluster: ['http://:hunter2@a']}\n",
            "redis.cluster[0]: expected redis://host:port[/db]",
        ),
        (
            "redis: {sentinel: {master: '', nodes: []}}\n",
            "redis.sentinel.nodes: expected at least one Sentinel",
        ),
    ] {
        let err = from_yaml(text).unwrap_err().to_string();
        assert!(err.contains(says), "{text}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn anthropic_keys_default_to_anthropics_v1() {
    let cfg = from_yaml(
        "upstreams:\n  - {type: anthropic, sk: a}\n  - {type: anthropic, sk: b, endpoint: 'https://api.anthropic.com/'}\n  - {type: anthropic, sk: c, endpoint: 'http://127.0.0.1:9/proxy/v1'}\n",
    )
    .unwrap();
    let endpoints: Vec<&str> = cfg.upstreams.iter().map(|u| u.endpoint.as_str()).collect();
    assert_eq!(
        endpoints,
        [
            "https://api.anthropic.com/v1",
            "https://api.anthropic.com/v1",
            "http://127.0.0.1:9/proxy/v1"
        ]
    );
    assert!(
        cfg.upstreams
            .iter()
            .all(|u| u.kind == crate::UpstreamKind::Anthropic)
    );
}

#[test]
fn azure_keys_map_models_to_deployments() {
    let cfg = from_yaml(
        "upstreams:\n  - {type: azure, sk: a, endpoint: 'https://res.openai.azure.com', deployments: {gpt-4o: prod-4o}}\n  - {type: azure, sk: b, endpoint: 'https://res2.openai.azure.com', api_version: 2025-01-01-preview}\n",
    )
    .unwrap();
    let a = cfg.upstreams[0].azure.as_ref().unwrap();
    assert_eq!(a.api_version, crate::AZURE_API_VERSION);
    assert_eq!(
        (a.deployment("gpt-4o"), a.deployment("gpt-4.1")),
        ("prod-4o", "gpt-4.1")
    );
    // deployments are the models an Azure key serves, unless `allow` says otherwise
    assert!(cfg.upstreams[0].allows_model("gpt-4o", "/v1/chat/completions"));
    assert!(!cfg.upstreams[0].allows_model("gpt-4o-mini", "/v1/chat/completions"));
    assert!(cfg.upstreams[1].allows_model("gpt-4o-mini", "/v1/chat/completions"));
    assert_eq!(
        cfg.upstreams[1].azure.as_ref().unwrap().api_version,
        "2025-01-01-preview"
    );
    // the key round-trips through its config entry
    let raw = cfg.upstreams[0].to_raw();
    assert_eq!(
        raw.deployments.get("gpt-4o").map(String::as_str),
        Some("prod-4o")
    );
    let err = from_yaml(
        "upstreams:\n  - {type: azure, sk: a}\n  - {sk: b, endpoint: 'http://x', deployments: {m: d}, api_version: v}\n  - {type: azure, sk: c, endpoint: 'http://y', deployments: {m: 'a/../b'}}\n",
    )
    .unwrap_err()
    .to_string();
    for field in [
        "upstreams[0].endpoint",
        "upstreams[1].api_version",
        "upstreams[1].deployments",
        "upstreams[2].deployments.m",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn budgets_and_prices_are_checked_with_their_paths() {
    let text = r"
completion_estimate: 0
pricing: [{models: [a], input: -1, output: 1}]
budget: {usd: 0}
gateways:
  - {name: g, budget: {usd: 5, period: year}, caller_budget: {usd: 2000000}}
upstreams:
  - endpoint: http://x
    sk: a
    budget: {usd: 1, period: week}
    price_multiplier: 0.5
    pricing: [{models: [a], input: 1, output: 1}]
  - endpoint: http://y
    sk: b
    price_multiplier: .nan
";
    let Err(ConfigError::Invalid(errs)) = from_yaml(text) else {
        panic!("expected invalid")
    };
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "completion_estimate",
        "pricing[0]",
        "budget.usd",
        "gateways[0].budget.period",
        "gateways[0].caller_budget.usd",
        "upstreams[0].price_multiplier",
        "upstreams[1].price_multiplier",
    ] {
        assert!(paths.contains(&p), "{p} not in {paths:?}");
    }
    // valid: every part lands in the config
    let cfg = from_yaml(
        "pricing: [{models: [\"house*\"], input: 1, output: 2}]\nbudget: {usd: 7.5, period: day}\nupstreams:\n  - {endpoint: http://x, sk: a, budget: {usd: 1}, price_multiplier: 0.8}\n",
    )
    .unwrap();
    assert!(cfg.prices.overrides.price("house-1").is_some());
    assert_eq!(
        cfg.default_gateway.budget.map(|b| (b.nanos, b.period)),
        Some((7_500_000_000, crate::Period::Day))
    );
    let key = &cfg.upstreams[0];
    assert_eq!(key.budget.map(|b| b.period), Some(crate::Period::Month));
    assert_eq!(
        key.pricing.as_ref().and_then(|p| p.multiplier_ppm),
        Some(800_000)
    );
    // and a key's spend settings survive the trip to a frontend
    let back = crate::validate_key(key.to_raw(), &cfg).unwrap();
    assert_eq!(back.budget, key.budget);
    assert_eq!(back.pricing.and_then(|p| p.multiplier_ppm), Some(800_000));
    assert_eq!(cfg.completion_estimate, 256);
}
