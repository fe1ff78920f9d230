//! The gateway checks one by one, with fixed clocks.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{TimeZone, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use keypool_config::gateway::{RawGateway, validate_gateway};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::Caller;
use crate::gateway::{GatewayRuntime, query_arg, remove_query_arg, transform};

fn runtime(yaml: &str) -> GatewayRuntime {
    let raw: RawGateway = serde_norway::from_str(yaml).unwrap();
    GatewayRuntime::new(Arc::new(validate_gateway(&raw, "g").unwrap()))
}

fn code(e: &keypool_types::ApiError) -> &'static str {
    e.kind.wire().code
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const HS_KEY: &str = "hs256-test-secret";
const RS_PUBLIC: &str = include_str!("../tests/data/rs256-test-public.pem");
const RS_PRIVATE: &[u8] = include_bytes!("../tests/data/rs256-test-private.pem");
const RS_OTHER_PRIVATE: &[u8] = include_bytes!("../tests/data/rs256-other-private.pem");

fn hs_token(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(HS_KEY.as_bytes()),
    )
    .unwrap()
}

#[test]
fn exact_auth_hashes_strips_bearer_and_names_the_caller() {
    let g = runtime("name: t\nauth: {method: exact, secrets: [s3cret]}\n");
    let id = g.authenticate(Some("Bearer s3cret")).unwrap();
    assert_eq!(id.id.as_deref(), Some(crate::caller_id("s3cret").as_str()));
    assert_eq!(g.authenticate(Some("s3cret")).unwrap(), id);
    assert_eq!(
        code(&g.authenticate(Some("Bearer nope")).unwrap_err()),
        "invalid_api_key"
    );
    let missing = g.authenticate(None).unwrap_err();
    assert_eq!(missing.status(), 401);
    assert!(missing.message.contains("authorization"));
    // a stored hash authenticates the secret it hashes
    let hex =
        keypool_config::gateway::secret_hash(b"hashed")
            .iter()
            .fold(String::new(), |mut s, b| {
                use std::fmt::Write;
                let _ = write!(s, "{b:02x}");
                s
            });
    let h = runtime(&format!(
        "name: t\nauth: {{method: exact, secrets: [\"sha256:{hex}\"]}}\n"
    ));
    assert!(h.authenticate(Some("hashed")).is_ok());
    assert!(h.authenticate(Some(&format!("sha256:{hex}"))).is_err());
}

#[test]
fn regex_auth() {
    let g = runtime("name: t\nauth: {method: regex, pattern: '^team-[a-z]+$'}\n");
    assert!(g.authenticate(Some("Bearer team-blue")).is_ok());
    assert!(g.authenticate(Some("Bearer team-Blue")).is_err());
    assert!(g.authenticate(Some("team-blue-1")).is_err());
}

#[test]
fn jwt_hs256_valid_expired_not_yet_valid_tampered_and_alg_none() {
    let g = runtime(&format!(
        "name: t\nauth: {{method: jwt, jwt_key: {HS_KEY}, jwt_algorithms: [HS256]}}\n"
    ));
    let now = now_secs();
    let ok = hs_token(&json!({"sub": "alice", "exp": now + 600}));
    assert_eq!(
        g.authenticate(Some(&format!("Bearer {ok}")))
            .unwrap()
            .id
            .as_deref(),
        Some("alice")
    );
    // no sub: the token's hash
    let anon = hs_token(&json!({"exp": now + 600}));
    assert!(
        g.authenticate(Some(&anon))
            .unwrap()
            .id
            .unwrap()
            .starts_with("tok-")
    );

    let expired = hs_token(&json!({"sub": "alice", "exp": now - 60}));
    let e = g.authenticate(Some(&expired)).unwrap_err();
    assert_eq!(e.status(), 401);
    assert!(e.message.contains("expired"), "{}", e.message);
    // inside the leeway still passes
    let just = hs_token(&json!({"sub": "alice", "exp": now - 2}));
    assert!(g.authenticate(Some(&just)).is_ok());

    let early = hs_token(&json!({"sub": "alice", "exp": now + 600, "nbf": now + 300}));
    assert!(
        g.authenticate(Some(&early))
            .unwrap_err()
            .message
            .contains("nbf")
    );

    let no_exp = hs_token(&json!({"sub": "alice"}));
    assert!(g.authenticate(Some(&no_exp)).is_err());

    // tampered payload: same signature, sub changed
    let mut parts: Vec<String> = ok.split('.').map(str::to_owned).collect();
    let forged = hs_token(&json!({"sub": "mallory", "exp": now + 600}));
    parts[1] = forged.split('.').nth(1).unwrap().to_owned();
    let tampered = parts.join(".");
    assert!(
        g.authenticate(Some(&tampered))
            .unwrap_err()
            .message
            .contains("signature")
    );

    // alg none, unsigned
    let none = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(format!(r#"{{"sub":"mallory","exp":{}}}"#, now + 600).as_bytes())
    );
    assert!(g.authenticate(Some(&none)).is_err());
    // an algorithm that is not pinned
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &json!({"sub": "alice", "exp": now + 600}),
        &EncodingKey::from_secret(HS_KEY.as_bytes()),
    )
    .unwrap();
    assert!(
        g.authenticate(Some(&hs512))
            .unwrap_err()
            .message
            .contains("algorithm")
    );
    // signed with another secret
    let other = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": now + 600}),
        &EncodingKey::from_secret(b"another"),
    )
    .unwrap();
    assert!(g.authenticate(Some(&other)).is_err());
}

/// Unpadded base64url, for hand-made tokens.
fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn jwt_rs256_with_a_pem_public_key() {
    let yaml = format!(
        "name: t\nauth:\n  method: jwt\n  jwt_algorithms: [RS256]\n  jwt_key: |\n{}\n",
        RS_PUBLIC
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let g = runtime(&yaml);
    let claims = json!({"sub": "svc-1", "exp": now_secs() + 600});
    let good = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(RS_PRIVATE).unwrap(),
    )
    .unwrap();
    assert_eq!(
        g.authenticate(Some(&good)).unwrap().id.as_deref(),
        Some("svc-1")
    );
    let foreign = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(RS_OTHER_PRIVATE).unwrap(),
    )
    .unwrap();
    assert!(g.authenticate(Some(&foreign)).is_err());
    // HS256 signed with the public key as the secret (the classic confusion) is refused
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(RS_PUBLIC.as_bytes()),
    )
    .unwrap();
    assert!(g.authenticate(Some(&confused)).is_err());
}

#[test]
fn whitelist_wins_blacklist_refuses_and_ips_match_cidrs() {
    let t = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let black = runtime("name: t\nblacklist: ['ip:203.0.113.0/24', 'secret:^banned-']\n");
    assert!(black.check_lists(ip("203.0.113.7"), None, || t).is_err());
    assert_eq!(
        code(
            &black
                .check_lists(ip("203.0.113.7"), None, || t)
                .unwrap_err()
        ),
        "access_denied"
    );
    assert!(
        black
            .check_lists(ip("::ffff:203.0.113.9"), None, || t)
            .is_err()
    );
    assert!(
        black
            .check_lists(ip("198.51.100.1"), Some("Bearer banned-x"), || t)
            .is_err()
    );
    assert!(
        black
            .check_lists(ip("198.51.100.1"), Some("Bearer fine"), || t)
            .is_ok()
    );

    let white = runtime(
        "name: t\nwhitelist: ['ip:10.0.0.0/8', 'ip:fd00::/8', 'secret:^vip-']\nblacklist: ['ip:10.1.2.3/32']\n",
    );
    assert!(
        white.check_lists(ip("10.1.2.3"), None, || t).is_ok(),
        "whitelist wins"
    );
    assert!(white.check_lists(ip("fd00::1"), None, || t).is_ok());
    assert!(
        white
            .check_lists(ip("192.0.2.1"), Some("vip-anna"), || t)
            .is_ok()
    );
    assert!(
        white
            .check_lists(ip("192.0.2.1"), Some("anna"), || t)
            .is_err()
    );
    assert!(white.check_lists(None, None, || t).is_err());
}

#[test]
fn time_rules_cross_midnight_in_the_gateway_timezone() {
    // 22:00-06:00 in Shanghai (UTC+8)
    let g = runtime("name: t\ntimezone: Asia/Shanghai\nwhitelist: ['time:22:00-06:00']\n");
    let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 11, 22, h, m, 0).unwrap();
    // 13:59 UTC = 21:59 local: refused; 14:00 UTC = 22:00 local: admitted
    assert!(g.check_lists(None, None, || at(13, 59)).is_err());
    assert!(g.check_lists(None, None, || at(14, 0)).is_ok());
    // 16:00 UTC = 00:00 local; 21:59 UTC = 05:59 local; 22:00 UTC = 06:00 local (end excluded)
    assert!(g.check_lists(None, None, || at(16, 0)).is_ok());
    assert!(g.check_lists(None, None, || at(21, 59)).is_ok());
    assert!(g.check_lists(None, None, || at(22, 0)).is_err());
    // a blacklist window during the day
    let b = runtime("name: t\nblacklist: ['time:09:00-18:00']\n");
    assert!(b.check_lists(None, None, || at(9, 0)).is_err());
    assert!(b.check_lists(None, None, || at(18, 0)).is_ok());
}

/// The clock is passed in: `t0` and exact offsets from it, no sleeping.
#[test]
fn sliding_windows_are_exact_at_their_edges() {
    let g = runtime("name: t\nrate_limits: ['ingress:3/minute', 'secret:2/second']\n");
    let alice = Caller {
        id: Some(Arc::from("alice")),
        ..Caller::ANONYMOUS
    };
    let bob = Caller {
        id: Some(Arc::from("bob")),
        ..Caller::ANONYMOUS
    };
    let t0 = Instant::now();
    let h = g.admit(&alice, None, t0).unwrap().unwrap();
    // tightest: secret 2/second with 1 left
    assert_eq!((h.limit, h.remaining), (2, 1));
    assert_eq!(h.reset_text(), "1s");
    g.admit(&alice, None, t0).unwrap();
    // alice's per-second limit is exhausted; bob still has his own
    let r = g.admit(&alice, None, t0).unwrap_err();
    assert_eq!(code(&r.error), "rate_limit_exceeded");
    assert!(
        r.error.message.contains("secret:2/second"),
        "{}",
        r.error.message
    );
    assert_eq!(r.error.retry_after_secs, Some(1));
    assert_eq!(r.headers.unwrap().remaining, 0);
    let h = g
        .admit(&bob, None, t0 + Duration::from_millis(500))
        .unwrap()
        .unwrap();
    assert_eq!(
        (h.limit, h.remaining),
        (3, 0),
        "ingress is now the tightest"
    );
    // the ingress window is full until exactly t0 + 60 s
    let edge = t0 + Duration::from_secs(60);
    let r = g
        .admit(&bob, None, edge - Duration::from_millis(1))
        .unwrap_err();
    assert!(r.error.message.contains("ingress:3/minute"));
    assert_eq!(r.error.retry_after_secs, Some(1));
    // refusals counted nothing: at the edge the first two calls expire, exactly
    g.admit(&bob, None, edge).unwrap();
    g.admit(&alice, None, edge).unwrap();
    // ingress holds t0+0.5 s, edge, edge: full until t0 + 60.5 s
    let r = g.admit(&alice, None, edge).unwrap_err();
    assert!(
        r.error.message.contains("ingress:3/minute"),
        "{}",
        r.error.message
    );
    let r = g
        .admit(&bob, None, edge + Duration::from_millis(499))
        .unwrap_err();
    assert!(
        r.error.message.contains("ingress"),
        "the 3rd call (t0+0.5s) is still in the window"
    );
    let later = edge + Duration::from_millis(500);
    assert!(g.admit(&alice, None, later).is_ok());
    // now both are exhausted; the message names the one that frees last
    let r = g.admit(&alice, None, later).unwrap_err();
    assert!(r.error.message.contains("ingress"), "{}", r.error.message);
    assert_eq!(r.error.retry_after_secs, Some(60));
}

#[test]
fn quota_refuses_once_reached() {
    let g = runtime("name: t\ntoken_quota: 100\n");
    assert!(g.check_quota().is_ok());
    g.add_tokens(99);
    assert!(g.check_quota().is_ok());
    g.add_tokens(1);
    let e = g.check_quota().unwrap_err();
    assert_eq!((e.status(), code(&e)), (429, "insufficient_quota"));
}

#[test]
fn model_list() {
    let g = runtime("name: t\nmodels: [gpt-4o-mini, 'deepseek*']\n");
    assert!(g.check_model("gpt-4o-mini").is_ok());
    assert!(g.check_model("deepseek-r1").is_ok());
    let e = g.check_model("gpt-4o").unwrap_err();
    assert_eq!((e.status(), code(&e)), (404, "model_not_found"));
}

#[test]
fn open_checks_active_then_expiry() {
    let off = runtime("name: t\nactive: false\nexpires_at: '2020-01-01T00:00:00Z'\n");
    assert_eq!(
        code(&off.check_open(SystemTime::now).unwrap_err()),
        "gateway_inactive"
    );
    let old = runtime("name: t\nexpires_at: '2020-01-01T00:00:00Z'\n");
    let e = old.check_open(SystemTime::now).unwrap_err();
    assert_eq!((e.status(), code(&e)), (403, "gateway_expired"));
    assert!(e.message.contains("该网关已过有效期"));
    let later = runtime("name: t\nexpires_at: '2999-01-01T00:00:00+08:00'\n");
    assert!(later.check_open(SystemTime::now).is_ok());
    // a gateway without an expiry or lists does not read the clock (the request path's cost)
    let plain = runtime("name: t\n");
    assert!(plain.check_open(|| unreachable!("no expiry")).is_ok());
    assert!(
        plain
            .check_lists(None, None, || unreachable!("no lists"))
            .is_ok()
    );
}

#[test]
fn transforms_rewrite_what_the_upstream_sees() {
    let raw: RawGateway = serde_norway::from_str(
        r#"
name: t
prompt_template: "Answer in French: {{query}}"
param_map: {model: ["deepseek", "deepseek-qwen2-7b"], temperature: [1, 0.5]}
param_fixed: {stream_options.include_usage: true, top_p: 0.9}
"#,
    )
    .unwrap();
    let g = validate_gateway(&raw, "g").unwrap();
    let mut body = json!({
        "model": "deepseek",
        "temperature": 1,
        "stream_options": "bogus",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "hello"},
            {"role": "system", "content": "be nice"}
        ]
    });
    transform(&g, body.as_object_mut().unwrap());
    assert_eq!(body["model"], "deepseek-qwen2-7b");
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["top_p"], 0.9);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["messages"][0]["content"], "first");
    assert_eq!(body["messages"][2]["content"], "Answer in French: hello");
    // a value that is not the old one is left alone
    let mut other = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "data:"}},
        {"type": "text", "text": "b"}
    ]}]});
    transform(&g, other.as_object_mut().unwrap());
    assert_eq!(other["model"], "gpt-4o");
    assert_eq!(
        other["messages"][0]["content"],
        json!([
            {"type": "text", "text": "Answer in French: a\nb"},
            {"type": "image_url", "image_url": {"url": "data:"}}
        ])
    );
}

#[test]
fn query_args_are_read_and_removed() {
    assert_eq!(
        query_arg("a=1&token=x%2By&b=2", "token").as_deref(),
        Some("x+y")
    );
    assert_eq!(remove_query_arg("a=1&token=x%2By&b=2", "token"), "a=1&b=2");
    assert_eq!(remove_query_arg("token=x", "token"), "");
    assert_eq!(remove_query_arg("tok%65n=x&c", "token"), "c");
}

/// The `default` gateway as the config's top level builds it, with its keys' tokens.
fn default_gateway(yaml: &str) -> GatewayRuntime {
    let config = keypool_config::from_yaml(yaml).unwrap();
    GatewayRuntime::new(Arc::new(
        config
            .default_gateway
            .with_client_tokens(&config.client_tokens, &config.upstreams),
    ))
}

#[test]
fn client_tokens_accept_bearer_and_choose_keys() {
    use keypool_pool::KeyAccess;
    let g = default_gateway("authorization: one,two\n");
    let two = g.authenticate(Some("Bearer two")).unwrap();
    assert_eq!(two.keys, KeyAccess::Token(Some(Arc::from("two"))));
    assert_eq!(two.id.as_deref(), Some(crate::caller_id("two").as_str()));
    assert!(
        two.authorization_consumed,
        "a keypool token is never forwarded"
    );
    assert!(g.authenticate(Some("bearer  one ")).is_ok());
    assert_eq!(
        g.authenticate(Some("Bearer three")).unwrap_err().status(),
        401
    );
    assert!(
        g.authenticate(None)
            .unwrap_err()
            .message
            .contains("Missing")
    );
}

#[test]
fn key_tokens_count_and_noauth_admits_anonymous_callers() {
    use keypool_pool::KeyAccess;
    let g = default_gateway(
        "authorization: g\nupstreams:\n  - {sk: k, endpoint: 'http://x/v1', authorization: u}\n",
    );
    assert!(g.authenticate(Some("Bearer u")).is_ok());
    assert!(g.authenticate(None).is_err());
    let open = default_gateway(
        "authorization: g\nupstreams:\n  - {sk: k, endpoint: 'http://x/v1', noauth: true}\n",
    );
    for presented in [None, Some("Bearer nope")] {
        let anonymous = open.authenticate(presented).unwrap();
        assert_eq!(anonymous.keys, KeyAccess::Token(None));
        assert!(
            !anonymous.authorization_consumed,
            "not a keypool token: the caller's own, which `sk: asis` keys may forward"
        );
    }
}

#[test]
fn no_tokens_is_an_open_default_gateway() {
    let g = default_gateway("upstreams: []\n");
    assert!(g.spec.auth.is_none());
    assert_eq!(g.authenticate(None).unwrap(), Caller::ANONYMOUS);
}

#[test]
fn the_top_level_policy_is_the_default_gateways() {
    let g = default_gateway(
        "rate_limits: ['ingress:2/minute']\nwhitelist: ['ip:10.0.0.0/8']\ntoken_quota: 5\nmodels: [gpt-4o*]\nretries: 1\n",
    );
    assert_eq!(g.spec.name, "default");
    assert_eq!(g.spec.rate_limits.len(), 1);
    assert_eq!(g.spec.token_quota, Some(5));
    assert_eq!(g.spec.retries, Some(1));
    assert!(g.check_model("gpt-4o-mini").is_ok() && g.check_model("o1").is_err());
    let outside: IpAddr = "192.0.2.1".parse().unwrap();
    assert!(g.check_lists(Some(outside), None, Utc::now).is_err());
    // mistakes in the top-level fields name the field itself
    let err = keypool_config::from_yaml(
        "rate_limits: ['ingress:x/minute']\ngateways:\n  - name: default\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rate_limits[0]:") && !err.contains(".rate_limits"),
        "{err}"
    );
    assert!(err.contains("gateways[0].name"), "{err}");
}

#[test]
fn a_regex_must_match_the_whole_credential() {
    let g = runtime("name: t\nauth: {method: regex, pattern: 'team-[a-z]+'}\n");
    assert!(g.authenticate(Some("team-abc")).is_ok());
    for partial in ["xx-team-a-!!", "team-abc!", "my-team-x"] {
        assert!(g.authenticate(Some(partial)).is_err(), "{partial}");
    }
}

#[test]
fn jwt_audience_issuer_and_crit_headers() {
    let g = runtime(&format!(
        "name: t\nauth: {{method: jwt, jwt_key: {HS_KEY}, jwt_audience: keypool-team, jwt_issuer: https://idp.example}}\n"
    ));
    let exp = now_secs() + 600;
    let ok = hs_token(
        &json!({"sub": "a", "exp": exp, "aud": "keypool-team", "iss": "https://idp.example"}),
    );
    assert!(g.authenticate(Some(&ok)).is_ok());
    for (claims, why) in [
        (
            json!({"sub": "a", "exp": exp, "aud": "other", "iss": "https://idp.example"}),
            "aud",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": "https://idp.example"}),
            "aud",
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "keypool-team", "iss": "https://evil"}),
            "iss",
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "keypool-team"}),
            "iss",
        ),
    ] {
        let e = g.authenticate(Some(&hs_token(&claims))).unwrap_err();
        assert!(e.message.contains(why), "{claims}: {}", e.message);
    }
    // a critical header parameter keypool does not understand
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["x-must-understand".to_owned()]);
    let crit = jsonwebtoken::encode(
        &header,
        &json!({"sub": "a", "exp": exp, "aud": "keypool-team", "iss": "https://idp.example"}),
        &jsonwebtoken::EncodingKey::from_secret(HS_KEY.as_bytes()),
    )
    .unwrap();
    let e = g.authenticate(Some(&crit)).unwrap_err();
    assert!(e.message.contains("critical"), "{}", e.message);
}

/// Each scope's limits are leased by a holder of their own (the gateway's `ingress:` calls, each
/// caller's `secret:` ones), at most a tenth of the scope's smallest limit at once, all within
/// the shortest window; a scope's small limit, or no lease asked, leases nothing.
#[test]
fn leases_each_scope_a_tenth_of_its_smallest_limit() {
    use keypool_config::gateway::LimitScope::{Ingress, Secret};
    let shared: Arc<dyn keypool_shared::SharedState> =
        Arc::new(keypool_shared::InMemory::default());
    let req = keypool_shared::LeaseReq {
        calls: 64,
        within: Duration::from_secs(1),
    };
    let leased = |yaml: &str, lease| {
        let g = runtime(yaml);
        crate::gateway::lease_for(&g.spec, Some(&shared), lease).map(|l| l.reqs())
    };
    let limits = |l: &str| format!("name: t\nrate_limits: [{l}]\n");
    let calls = |c| keypool_shared::LeaseReq { calls: c, ..req };
    assert_eq!(
        leased(&limits("'ingress:100000/minute'"), Some(req)),
        Some(vec![(Ingress, req)])
    );
    assert_eq!(
        leased(
            &limits("'ingress:100000/minute', 'ingress:200/second'"),
            Some(req)
        ),
        Some(vec![(Ingress, calls(20))])
    );
    assert_eq!(
        leased(
            &limits("'ingress:500/minute', 'ingress:20000/hour'"),
            Some(req)
        ),
        Some(vec![(Ingress, calls(50))])
    );
    let short = leased(
        &limits("'ingress:5000/second'"),
        Some(keypool_shared::LeaseReq {
            within: Duration::from_secs(5),
            ..req
        }),
    );
    assert_eq!(short.unwrap()[0].1.within, Duration::from_secs(1));
    assert_eq!(leased(&limits("'ingress:19/minute'"), Some(req)), None);
    assert_eq!(
        leased(
            &limits("'secret:300/minute', 'secret:10000/day'"),
            Some(req)
        ),
        Some(vec![(Secret, calls(30))])
    );
    // both scopes: a holder each, sized by its own limits, spent within the shortest window
    let both = leased(
        &limits("'secret:1000/second', 'ingress:100000/minute'"),
        Some(keypool_shared::LeaseReq {
            within: Duration::from_secs(5),
            ..req
        }),
    );
    let one_s = |c| keypool_shared::LeaseReq {
        calls: c,
        within: Duration::from_secs(1),
    };
    assert_eq!(both, Some(vec![(Ingress, one_s(64)), (Secret, one_s(64))]));
    assert_eq!(
        leased(
            &limits("'ingress:100000/minute', 'secret:150/minute'"),
            Some(req)
        ),
        Some(vec![(Ingress, req), (Secret, calls(15))])
    );
    // a scope too small to lease: its admissions go to the shared state anyway
    assert_eq!(
        leased(
            &limits("'ingress:100000/minute', 'secret:15/minute'"),
            Some(req)
        ),
        None
    );
    assert_eq!(leased(&limits("'ingress:100000/minute'"), None), None);
    assert_eq!(leased("name: t\n", Some(req)), None);
}
