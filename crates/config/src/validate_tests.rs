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
    let ok = crate::from_yaml("admin: {stream_buffer: 1048576}\nlog: {queue_capacity: 1}\n");
    assert!(ok.is_ok(), "{ok:?}");
}
