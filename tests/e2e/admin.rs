//! The admin gRPC API through the real binary with a real tonic client: every RPC, auth,
//! validation, config seeding, hot apply, persistence across a restart, `StreamUsage`.

use std::time::{Duration, Instant};

use keypool_e2e::{Behavior, Gateway, config, hello, json, mock};
use keypool_proto::admin::v1 as pb;
use keypool_proto::admin::v1::admin_client::AdminClient;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

const ADMIN: &str = "admin-secret-token";
const ADMIN_BEARER: &str = "Bearer admin-secret-token";
const T: &str = "client-token";

type Client = AdminClient<Channel>;

async fn admin(gw: &Gateway) -> anyhow::Result<Client> {
    Ok(AdminClient::connect(gw.admin_url().await?).await?)
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::from_static(ADMIN_BEARER),
    );
    r
}

fn admin_config(db: &str) -> keypool_e2e::ConfigBuilder {
    config()
        .token(T)
        .set("dbtype", "sqlite")
        .set("dbaddr", &format!("\"{db}\""))
        .block(&format!(
            "admin: {{token: {ADMIN}, secret_key: seal-key-for-tests}}\ngateways:\n  - {{name: cfg, auth: {{method: exact, secrets: [cfg-secret]}}}}"
        ))
}

async fn chat_at(gw: &Gateway, path: &str, secret: &str, model: &str) -> anyhow::Result<u16> {
    let resp = gw
        .http()
        .post(gw.url(path))
        .bearer_auth(secret)
        .json(&hello(model))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    Ok(status)
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_with_auth_validation_and_hot_apply() -> anyhow::Result<()> {
    let key_a = mock("a", Behavior::default());
    let key_b = mock("b", Behavior::default());
    let key_c = mock(
        "c",
        Behavior {
            chunk_interval_ms: 150,
            ..Behavior::default()
        },
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("admin.sqlite").display().to_string();
    let yaml = admin_config(&db)
        .key(&key_a, "a", "")
        .key(&key_b, "b", "deny: [slow-model]")
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let mut cl = admin(&gw).await?;

    // auth: none, wrong, right
    let err = cl
        .list_gateways(pb::ListGatewaysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::ListGatewaysRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse()?);
    assert_eq!(
        cl.list_gateways(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // config seeding: `default` (the top level, `/v1`) first, then the file's gateway, both
    // owned by the config, secrets only hashed
    let list = cl
        .list_gateways(authed(pb::ListGatewaysRequest {}))
        .await?
        .into_inner();
    let names: Vec<(&str, &str)> = list
        .gateways
        .iter()
        .map(|g| (g.name.as_str(), g.owner.as_str()))
        .collect();
    assert_eq!(names, [("default", "config"), ("cfg", "config")]);
    let secrets = list.gateways[1]
        .spec
        .clone()
        .and_then(|s| s.auth)
        .map(|a| a.secrets)
        .unwrap_or_default();
    assert!(!secrets.is_empty() && secrets.iter().all(|s| s.starts_with("sha256:")));
    assert!(!secrets.iter().any(|s| s.contains("cfg-secret")));

    // validation errors name the field
    let err = cl
        .create_gateway(authed(pb::CreateGatewayRequest {
            gateway: Some(keypool_e2e::gateway_spec(
                "name: Bad_Name\nrate_limits: ['ingress:x/minute']\n",
            )),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("gateway.name") && err.message().contains("gateway.rate_limits[0]"),
        "{}",
        err.message()
    );

    // create → callable over HTTP within a second
    let created = Instant::now();
    let gw_created = cl
        .create_gateway(authed(pb::CreateGatewayRequest {
            gateway: Some(keypool_e2e::gateway_spec("name: team\nauth: {method: exact, secrets: [t-1]}\nrate_limits: ['ingress:100/minute']\n")),
        }))
        .await?
        .into_inner();
    assert_eq!(gw_created.owner, "admin");
    assert_eq!(
        chat_at(
            &gw,
            "/llm/api/team/v1/chat/completions",
            "t-1",
            "gpt-4o-mini"
        )
        .await?,
        200
    );
    assert!(created.elapsed() < Duration::from_secs(1));
    let err = cl
        .create_gateway(authed(pb::CreateGatewayRequest {
            gateway: Some(keypool_e2e::gateway_spec("name: team\n")),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // a request's tokens are counted by a task that runs just after its response was
    // written: the client may ask before that task ran
    let mut got = pb::Gateway::default();
    for _ in 0..40 {
        got = cl
            .get_gateway(authed(pb::GetGatewayRequest {
                name: "team".into(),
            }))
            .await?
            .into_inner();
        if got.tokens_used > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        got.spec.unwrap_or_default().rate_limits,
        ["ingress:100/minute"]
    );
    assert_eq!(got.tokens_used, 10);

    // update (full replace) applies at once; config-owned gateways are refused
    cl.update_gateway(authed(pb::UpdateGatewayRequest {
        name: "team".into(),
        gateway: Some(keypool_e2e::gateway_spec(
            "auth: {method: exact, secrets: [t-1]}\nmodels: [only-this]\n",
        )),
    }))
    .await?;
    assert_eq!(
        chat_at(
            &gw,
            "/llm/api/team/v1/chat/completions",
            "t-1",
            "gpt-4o-mini"
        )
        .await?,
        404
    );
    let err = cl
        .update_gateway(authed(pb::UpdateGatewayRequest {
            name: "cfg".into(),
            gateway: Some(keypool_e2e::gateway_spec("active: false\n")),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // `default` is the config's top level: edited in the file, never created or replaced here
    for spec in ["active: false\n", "name: default\n"] {
        let err = cl
            .update_gateway(authed(pb::UpdateGatewayRequest {
                name: "default".into(),
                gateway: Some(keypool_e2e::gateway_spec(spec)),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
    let err = cl
        .create_gateway(authed(pb::CreateGatewayRequest {
            gateway: Some(keypool_e2e::gateway_spec("name: default\n")),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // rotate: the new secret works once shown, the old one no longer
    let rotated = cl
        .rotate_gateway_secret(authed(pb::RotateGatewaySecretRequest {
            name: "team".into(),
        }))
        .await?
        .into_inner();
    assert!(rotated.secret.starts_with("kp-"));
    let stored = rotated
        .gateway
        .and_then(|g| g.spec)
        .and_then(|s| s.auth)
        .map(|a| a.secrets)
        .unwrap_or_default();
    assert!(
        stored
            .iter()
            .all(|s| s.starts_with("sha256:") && !s.contains(&rotated.secret))
    );
    assert_eq!(
        chat_at(
            &gw,
            "/llm/api/team/v1/chat/completions",
            &rotated.secret,
            "only-this"
        )
        .await?,
        200
    );
    assert_eq!(
        chat_at(&gw, "/llm/api/team/v1/chat/completions", "t-1", "only-this").await?,
        401
    );

    // delete
    cl.delete_gateway(authed(pb::DeleteGatewayRequest {
        name: "team".into(),
    }))
    .await?;
    assert_eq!(
        chat_at(
            &gw,
            "/llm/api/team/v1/chat/completions",
            &rotated.secret,
            "x"
        )
        .await?,
        404
    );
    assert_eq!(
        cl.delete_gateway(authed(pb::DeleteGatewayRequest {
            name: "team".into()
        }))
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // keys: live state, secrets masked
    let keys = cl
        .list_keys(authed(pb::ListKeysRequest {}))
        .await?
        .into_inner()
        .keys;
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(keys[0].secret_masked, "sk-…6789");
    assert!(
        keys.iter()
            .all(|k| k.owner == "config" && k.enabled && k.health == "healthy")
    );
    assert!(keys.iter().map(|k| k.used).sum::<u64>() >= 2);

    // disable a: no new traffic reaches it
    let key = cl
        .update_key(authed(pb::UpdateKeyRequest {
            name: "a".into(),
            enabled: Some(false),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert!(!key.enabled);
    let before = key_a.requests();
    for _ in 0..10 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert_eq!(key_a.requests(), before, "a disabled key gets no traffic");
    // limits
    let key = cl
        .update_key(authed(pb::UpdateKeyRequest {
            name: "b".into(),
            rpm: Some(1000),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(key.rpm, Some(1000));
    let err = cl
        .update_key(authed(pb::UpdateKeyRequest {
            name: "zz".into(),
            enabled: Some(true),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // add: validated like the file; the secret is sealed, never returned
    let err = cl
        .add_key(authed(pb::AddKeyRequest {
            key: Some(keypool_e2e::key_spec(
                "{name: c, sk: sk-x, endpoint: 'not a url'}",
            )),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("upstream.endpoint"),
        "{}",
        err.message()
    );
    let added = cl
        .add_key(authed(pb::AddKeyRequest {
            key: Some(keypool_e2e::key_spec(&format!(
                "{{name: c, sk: sk-added-secret-9999, endpoint: \"{}\", allow: [slow-model]}}",
                key_c.url()
            ))),
        }))
        .await?
        .into_inner();
    assert_eq!(
        (added.owner.as_str(), added.secret_masked.as_str()),
        ("admin", "sk-…9999")
    );
    assert_eq!(
        chat_at(&gw, "/v1/chat/completions", T, "slow-model").await?,
        200
    );
    assert_eq!(
        key_c.last_request().unwrap().header("authorization"),
        Some("Bearer sk-added-secret-9999")
    );

    // remove c while a stream is in flight on it: the stream completes
    let mut req = hello("slow-model");
    req["stream"] = json!(true);
    let stream = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(T)
        .json(&req)
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    let removing = tokio::spawn({
        let mut cl = cl.clone();
        async move {
            cl.remove_key(authed(pb::RemoveKeyRequest { name: "c".into() }))
                .await
        }
    });
    let body = stream.text().await?;
    assert!(body.contains("[DONE]"), "{body}");
    removing.await??;
    // c is gone; only a (disabled) would serve slow-model now
    assert_eq!(
        chat_at(&gw, "/v1/chat/completions", T, "slow-model").await?,
        503
    );
    let err = cl
        .remove_key(authed(pb::RemoveKeyRequest { name: "a".into() }))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "config-owned keys live in the file"
    );

    // usage from the rollups (written within about a second)
    let mut usage = pb::GetUsageResponse::default();
    for _ in 0..40 {
        usage = cl
            .get_usage(authed(pb::GetUsageRequest::default()))
            .await?
            .into_inner();
        if usage
            .by_gateway
            .iter()
            .any(|g| g.group == "default" && g.calls >= 13)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let default = usage
        .by_gateway
        .iter()
        .find(|g| g.group == "default")
        .unwrap();
    assert!(default.calls >= 13, "{usage:?}");
    assert!(usage.by_key.iter().any(|k| k.group == "b"));
    assert_eq!(usage.calls_per_hour.len(), 24);

    let st = cl
        .get_status(authed(pb::GetStatusRequest {}))
        .await?
        .into_inner();
    assert_eq!(st.store, "ok");
    assert_eq!((st.keys, st.gateways), (2, 2), "default and cfg");
    assert!(st.config_version > 1);
    assert_eq!(st.replicas.len(), 1);
    assert!(!gw.logs().contains("sk-added-secret-9999"));

    // every change made over gRPC is in the audit log, by its peer, without a secret
    let audit = gw
        .http()
        .get(format!("{}/api/audit", gw.console_url().await?))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .text()
        .await?;
    let rows: serde_json::Value = serde_json::from_str(&audit)?;
    let by_grpc = |action: &str| {
        rows.as_array().is_some_and(|a| {
            a.iter().any(|r| {
                r["action"] == action
                    && r["who"]
                        .as_str()
                        .is_some_and(|w| w.starts_with("grpc 127.0.0.1:"))
            })
        })
    };
    for action in ["gateway.create", "key.add", "key.update"] {
        assert!(by_grpc(action), "{action} not audited: {audit}");
    }
    assert!(
        !audit.contains("sk-added-secret-9999") && !audit.contains(ADMIN),
        "{audit}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_survive_a_restart_and_secrets_stay_sealed() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let d = mock("d", Behavior::default());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("admin.sqlite").display().to_string();
    let yaml = admin_config(&db).key(&a, "a", "").yaml();
    let mut gw = Gateway::start(&yaml).await?;
    let mut cl = admin(&gw).await?;
    cl.create_gateway(authed(pb::CreateGatewayRequest {
        gateway: Some(keypool_e2e::gateway_spec(
            "name: kept\nauth: {method: exact, secrets: [k-1]}\n",
        )),
    }))
    .await?;
    cl.add_key(authed(pb::AddKeyRequest {
        key: Some(keypool_e2e::key_spec(&format!(
            "{{name: d, sk: sk-sealed-secret-4242, endpoint: \"{}\", allow: [d-model], authorization: [d-only-token]}}",
            d.url()
        ))),
    }))
    .await?;
    // a token only the added key names is accepted at once
    assert_eq!(
        chat_at(&gw, "/v1/chat/completions", "d-only-token", "d-model").await?,
        200
    );
    cl.update_key(authed(pb::UpdateKeyRequest {
        name: "a".into(),
        enabled: Some(false),
        ..Default::default()
    }))
    .await?;
    gw.terminate()?;
    gw.wait(Duration::from_secs(10)).await?;
    // the database never holds the clear secret
    let raw = std::fs::read(&db)?;
    assert!(!raw.windows(20).any(|w| w == b"sk-sealed-secret-424"));
    assert!(!raw.windows(10).any(|w| w == b"sk-test-a-"));

    let gw = Gateway::start(&yaml).await?;
    let mut cl = admin(&gw).await?;
    assert_eq!(
        chat_at(&gw, "/llm/api/kept/v1/chat/completions", "k-1", "d-model").await?,
        200
    );
    assert_eq!(
        d.last_request().unwrap().header("authorization"),
        Some("Bearer sk-sealed-secret-4242")
    );
    // and after the restart, from the restored key
    assert_eq!(
        chat_at(&gw, "/v1/chat/completions", "d-only-token", "d-model").await?,
        200
    );
    let keys = cl
        .list_keys(authed(pb::ListKeysRequest {}))
        .await?
        .into_inner()
        .keys;
    let a_key = keys.iter().find(|k| k.name == "a").unwrap();
    assert!(!a_key.enabled, "disabled by hand stays disabled");
    assert_eq!(keys.iter().find(|k| k.name == "d").unwrap().owner, "admin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_filters_and_drops_a_stalled_subscriber() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .key(&up, "up", "")
            .block(&format!("admin: {{token: {ADMIN}, stream_buffer: 8}}"))
            .yaml(),
    )
    .await?;
    let url = gw.admin_url().await?;
    let mut cl = AdminClient::connect(url.clone()).await?;
    let mut events = cl
        .stream_usage(authed(pb::StreamUsageRequest {
            model: "m1".into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    // a subscriber that never reads, with a tiny HTTP/2 window so its backlog stays on the server
    let stalled_channel = tonic::transport::Endpoint::from_shared(url)?
        .initial_stream_window_size(Some(256))
        .connect()
        .await?;
    let mut stalled = AdminClient::new(stalled_channel)
        .stream_usage(authed(pb::StreamUsageRequest::default()))
        .await?
        .into_inner();

    let started = Instant::now();
    for i in 0..200 {
        let model = if i % 2 == 0 { "m1" } else { "m2" };
        assert_eq!(gw.chat(T, hello(model)).await?.status(), 200);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "200 requests took {took:?}");

    // the live subscriber saw exactly its 100 m1 events
    let mut seen = 0;
    while seen < 100 {
        let e = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await??
            .unwrap();
        assert_eq!(
            (
                e.model.as_str(),
                e.gateway.as_str(),
                e.key.as_deref(),
                e.status
            ),
            ("m1", "default", Some("up"), 200)
        );
        assert_eq!(e.total_tokens, Some(10));
        assert!(e.log.is_none(), "the live feed carries no request log");
        seen += 1;
    }
    // the stalled one is dropped with a clear status once it reads again
    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.message()).await? {
            Ok(Some(_)) => got += 1,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = end.expect("the stalled subscriber was dropped");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(got < 200, "{got}");
    let _ = json;
    Ok(())
}

/// Runs grpcurl; answers (success, stdout + stderr).
async fn grpcurl(args: Vec<String>) -> anyhow::Result<(bool, String)> {
    let bin = tokio::task::spawn_blocking(keypool_e2e::grpcurl).await??;
    let out = tokio::process::Command::new(bin)
        .args(args)
        .output()
        .await?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_and_is_refused_without_the_token()
-> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(
        &config()
            .key(&up, "up", "")
            .block(&format!("admin: {{token: {ADMIN}}}"))
            .yaml(),
    )
    .await?;
    let addr = gw
        .admin_url()
        .await?
        .trim_start_matches("http://")
        .to_owned();
    let run = |extra: &[&str]| {
        let mut args = vec!["-plaintext".to_owned()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let (ok, out) = grpcurl(run(&[&addr, "list"])).await?;
    assert!(ok, "{out}");
    assert!(
        out.contains("keypool.admin.v1.Admin") && out.contains("grpc.health.v1.Health"),
        "{out}"
    );
    let (ok, out) = grpcurl(run(&[&addr, "describe", "keypool.admin.v1.Admin"])).await?;
    assert!(
        ok && out.contains("rpc ListGateways") && out.contains("rpc StreamUsage"),
        "{out}"
    );
    let (ok, out) = grpcurl(run(&[
        "-d",
        r#"{"service":"keypool.admin.v1.Admin"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ]))
    .await?;
    assert!(ok && out.contains("SERVING"), "{out}");
    let (ok, out) = grpcurl(run(&[&addr, "keypool.admin.v1.Admin/ListKeys"])).await?;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = grpcurl(run(&[
        "-H",
        ADMIN_BEARER_HEADER,
        &addr,
        "keypool.admin.v1.Admin/ListKeys",
    ]))
    .await?;
    assert!(
        ok && out.contains("\"name\": \"up\"") && out.contains("sk-…6789"),
        "{out}"
    );
    assert!(!out.contains("sk-test-up-0123456789"));
    // the scheme is case-insensitive (RFC 9110)
    let (ok, out) = grpcurl(run(&[
        "-H",
        "authorization: bearer admin-secret-token",
        &addr,
        "keypool.admin.v1.Admin/ListKeys",
    ]))
    .await?;
    assert!(ok, "{out}");
    Ok(())
}

const ADMIN_BEARER_HEADER: &str = "authorization: Bearer admin-secret-token";

/// Admin changes apply one at a time through the control plane's one reconcile: twenty
/// gateways and five keys created at once all land, none lost to another change's stale copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admin_changes_all_land() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("k.sqlite").display().to_string();
    let gw = Gateway::start(&admin_config(&db).key(&up, "up", "").yaml()).await?;
    let cl = admin(&gw).await?;
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut c = cl.clone();
        calls.push(tokio::spawn(async move {
            c.create_gateway(authed(pb::CreateGatewayRequest {
                gateway: Some(keypool_e2e::gateway_spec(&format!(
                    "name: g{i}\nauth: {{method: exact, secrets: [s{i}]}}\n"
                ))),
            }))
            .await
            .map(|_| ())
        }));
    }
    for i in 0..5 {
        let mut c = cl.clone();
        let url = up.url();
        calls.push(tokio::spawn(async move {
            c.add_key(authed(pb::AddKeyRequest {
                key: Some(keypool_e2e::key_spec(&format!(
                    "{{name: k{i}, sk: sk-added-{i}-0123456789, endpoint: \"{url}\"}}"
                ))),
            }))
            .await
            .map(|_| ())
        }));
    }
    for c in calls {
        c.await??;
    }
    let mut c = cl.clone();
    let gateways = c
        .list_gateways(authed(pb::ListGatewaysRequest {}))
        .await?
        .into_inner()
        .gateways;
    assert_eq!(gateways.len(), 22, "default, cfg and the twenty");
    let keys = c
        .list_keys(authed(pb::ListKeysRequest {}))
        .await?
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 6, "up and the five");
    // every one of them is in use at once
    assert_eq!(
        chat_at(
            &gw,
            "/llm/api/g19/v1/chat/completions",
            "s19",
            "gpt-4o-mini"
        )
        .await?,
        200
    );
    Ok(())
}

/// A gateway's HMAC `jwt_key` added through the admin API is sealed in the store (never in
/// clear), masked in every answer, and still verifies tokens after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_jwt_key_is_sealed_at_rest_and_masked_in_answers() -> anyhow::Result<()> {
    const KEY: &str = "jwt-hmac-key-0123456789abcdef";
    let a = mock("a", Behavior::default());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("admin.sqlite").display().to_string();
    let yaml = admin_config(&db).key(&a, "a", "").yaml();
    let mut gw = Gateway::start(&yaml).await?;
    let mut cl = admin(&gw).await?;
    cl.create_gateway(authed(pb::CreateGatewayRequest {
        gateway: Some(keypool_e2e::gateway_spec(&format!(
            "name: jw\nauth: {{method: jwt, jwt_key: {KEY}}}\n"
        ))),
    }))
    .await?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "someone", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes()),
    )?;
    let path = "/llm/api/jw/v1/chat/completions";
    assert_eq!(chat_at(&gw, path, &token, "gpt-4o-mini").await?, 200);
    let listed = cl
        .list_gateways(authed(pb::ListGatewaysRequest {}))
        .await?
        .into_inner();
    let shown = format!("{listed:?}");
    assert!(!shown.contains(KEY), "{shown}");
    assert!(shown.contains("…cdef"), "masked as keys are: {shown}");
    gw.terminate()?;
    gw.wait(Duration::from_secs(10)).await?;
    let raw = std::fs::read(&db)?;
    assert!(
        !raw.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
        "clear jwt_key in the store"
    );
    let gw = Gateway::start(&yaml).await?;
    assert_eq!(
        chat_at(&gw, path, &token, "gpt-4o-mini").await?,
        200,
        "unsealed after restart"
    );
    Ok(())
}
