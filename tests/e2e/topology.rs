//! The production topology with real processes: one control plane (`keypool admin`) on the real
//! PostgreSQL and `keypool frontend` replicas fed by it (config over `WatchConfig`, usage back
//! over `PublishUsage`), sharing the real Redis (a unique key prefix per test).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use keypool_e2e::{Behavior, Gateway, PgDb, config, hello, keypoolctl_bin, mock, test_pki};
use keypool_proto::admin::v1 as pb;
use keypool_proto::admin::v1::admin_client::AdminClient;

const ADMIN: &str = "topology-admin-token";
const T: &str = "client-token";

fn authed<M>(msg: M) -> tonic::Request<M> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

fn prefix() -> String {
    format!("kp-topo-{:016x}:", fastrand::u64(..))
}

/// A control-plane config on `db` with the given upstream lines.
fn control_yaml(db: &PgDb, up: &keypool_e2e::MockServer, key_extra: &str) -> String {
    config()
        .token(T)
        .set("dbtype", "postgres")
        .set("dbaddr", &format!("\"{}\"", db.url()))
        .set("queue_timeout", "0.05")
        .key(up, "up", key_extra)
        .block(&format!(
            "admin: {{token: {ADMIN}, secret_key: topology-seal-key}}"
        ))
        .yaml()
}

async fn frontends(admin: &str, n: usize, redis_prefix: &str) -> anyhow::Result<Vec<Gateway>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Gateway::start_frontend(
                admin,
                ADMIN,
                &[
                    "--redis",
                    "redis://127.0.0.1:6379/0",
                    "--redis-prefix",
                    redis_prefix,
                ],
            )
            .await?,
        );
    }
    Ok(out)
}

async fn post(gw: &Gateway, path: &str, token: &str) -> anyhow::Result<u16> {
    let resp = gw
        .http()
        .post(gw.url(path))
        .bearer_auth(token)
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    let s = resp.status().as_u16();
    let _ = resp.bytes().await;
    Ok(s)
}

/// Events in the control plane's database.
async fn stored_events(db: &PgDb) -> anyhow::Result<u64> {
    let store = keypool_store::Store::connect_only(&db.url()).await?;
    let n = store.count_events().await?;
    store.close().await;
    Ok(n)
}

async fn wait_for_events(db: &PgDb, want: u64, limit: Duration) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        let n = stored_events(db).await?;
        if n >= want || started.elapsed() > limit {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A port nobody listens on right now (for a control plane restarted on the same address).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_pushes_config_to_three_frontends_and_collects_their_usage()
-> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let db = PgDb::create()?;
    let cp = Gateway::start_control_plane(&control_yaml(&db, &up, ""), "127.0.0.1:0").await?;
    let admin = cp.admin_url().await?;
    let fes = frontends(&admin, 3, &prefix()).await?;

    // the control plane serves no API traffic itself
    assert_eq!(post(&cp, "/v1/chat/completions", T).await?, 404);

    let mut cl = AdminClient::connect(admin.clone()).await?;
    let mut feed = cl
        .stream_usage(authed(pb::StreamUsageRequest::default()))
        .await?
        .into_inner();

    // a gateway created with keypoolctl answers on every frontend within a second
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("team.yaml");
    std::fs::write(
        &spec,
        "name: team\nauth: {method: exact, secrets: [team-secret]}\n",
    )?;
    let out = Command::new(keypoolctl_bin())
        .args(["--server", &admin, "gateways", "create", "-f"])
        .arg(&spec)
        .env("KEYPOOL_ADMIN_TOKEN", ADMIN)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let created = Instant::now();
    for fe in &fes {
        loop {
            let s = post(fe, "/llm/api/team/v1/chat/completions", "team-secret").await?;
            if s == 200 {
                // one usage event each (the 404s before were refusals: no events)
                break;
            }
            assert_eq!(s, 404, "before the push the gateway is unknown");
            assert!(
                created.elapsed() < Duration::from_secs(1),
                "gateway not on {} within 1 s",
                fe.origin
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let applied_in = created.elapsed();

    // usage from all three lands in PostgreSQL exactly once and shows in StreamUsage (the
    // writer batches for up to 200 ms: count what was sent, not what is stored by now)
    let before = 3;
    for i in 0..30 {
        let fe = &fes[i % 3];
        assert_eq!(post(fe, "/v1/chat/completions", T).await?, 200);
    }
    let total = before + 30;
    assert_eq!(
        wait_for_events(&db, total, Duration::from_secs(15)).await?,
        total
    );
    let mut ids = HashSet::new();
    while ids.len() < usize::try_from(total).unwrap() {
        let e = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await??
            .expect("usage feed ended");
        assert!(ids.insert(e.id.clone()), "event {} streamed twice", e.id);
    }
    // nothing more trickles in: every event was stored and streamed once
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stored_events(&db).await?, total);

    // GetStatus lists the frontends with the version they applied
    let status = cl
        .get_status(authed(pb::GetStatusRequest {}))
        .await?
        .into_inner();
    let seen: Vec<&pb::Replica> = status
        .replicas
        .iter()
        .filter(|r| fes.iter().any(|f| f.origin.ends_with(&r.address)))
        .collect();
    assert_eq!(seen.len(), 3, "{:?}", status.replicas);
    for r in seen {
        assert_eq!(r.config_version, status.config_version, "{r:?}");
    }
    eprintln!("gateway on all three frontends in {applied_in:?}");
    Ok(())
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_outlive_the_control_plane_and_every_event_lands_once() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let db = PgDb::create()?;
    let admin_address = format!("127.0.0.1:{}", free_port()?);
    let yaml = control_yaml(&db, &up, "");
    let mut cp = Gateway::start_control_plane(&yaml, &admin_address).await?;
    let admin = format!("http://{admin_address}");
    let state = tempfile::tempdir()?;
    let state_a = state.path().join("a").display().to_string();
    let redis_prefix = prefix();
    let redis = ["--redis", "redis://127.0.0.1:6379/0", "--redis-prefix"];
    let args_a = [&redis[..], &[&redis_prefix, "--state-dir", &state_a]].concat();
    let mut fe_a = Gateway::start_frontend(&admin, ADMIN, &args_a).await?;
    let fe_b = Gateway::start_frontend(
        &admin,
        ADMIN,
        &[&redis[..], &[redis_prefix.as_str()]].concat(),
    )
    .await?;

    // load on both frontends while the control plane is killed
    let mut sent = 0u64;
    for i in 0..20 {
        let fe = if i % 2 == 0 { &fe_a } else { &fe_b };
        assert_eq!(post(fe, "/v1/chat/completions", T).await?, 200);
        sent += 1;
    }
    Command::new("kill")
        .args(["-KILL", &cp.pid().to_string()])
        .status()?;
    cp.wait(Duration::from_secs(5)).await?;
    for i in 0..40 {
        let fe = if i % 2 == 0 { &fe_a } else { &fe_b };
        assert_eq!(
            post(fe, "/v1/chat/completions", T).await?,
            200,
            "frontends keep serving on their snapshot"
        );
        sent += 1;
    }

    // a frontend restarted while the control plane is down serves its persisted snapshot
    // (its unsent events stay in its spool)
    fe_a.terminate()?;
    fe_a.wait(Duration::from_secs(15)).await?;
    drop(fe_a);
    let fe_a = Gateway::start_frontend(&admin, ADMIN, &args_a).await?;
    for _ in 0..10 {
        assert_eq!(post(&fe_a, "/v1/chat/completions", T).await?, 200);
        sent += 1;
    }
    assert!(
        fe_a.logs()
            .contains("serving the persisted config snapshot"),
        "{}",
        fe_a.logs()
    );

    assert!(
        fe_b.logs()
            .contains("control plane unavailable: spilling usage events to disk"),
        "{}",
        fe_b.logs()
    );

    // the control plane comes back on the same address, with a second client token and a
    // rate limit for `/v1` (the `default` gateway) in its file: every event lands, once
    let edited = yaml.replacen(
        &format!("authorization: {T}"),
        &format!("authorization: {T},second-token\nrate_limits: ['ingress:100000/minute']"),
        1,
    );
    assert_ne!(edited, yaml);
    assert_eq!(
        post(&fe_b, "/v1/chat/completions", "second-token").await?,
        401
    );
    let cp = Gateway::start_control_plane(&edited, &admin_address).await?;
    let landed = wait_for_events(&db, sent, Duration::from_secs(30)).await?;
    assert_eq!(landed, sent);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored_events(&db).await?, sent, "an event landed twice");
    assert_eq!(up.requests(), sent);

    // and a change made now reaches the frontends that reconnected
    let mut cl = AdminClient::connect(cp.admin_url().await?).await?;
    cl.create_gateway(authed(pb::CreateGatewayRequest {
        gateway: Some(keypool_e2e::gateway_spec(
            "name: late\nauth: {method: exact, secrets: [late-secret]}\n",
        )),
    }))
    .await?;
    for fe in [&fe_a, &fe_b] {
        let started = Instant::now();
        // the new top-level policy applies without a restart
        while post(fe, "/v1/chat/completions", "second-token").await? != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{} never accepted the new client token",
                fe.origin
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // and so does the `default` gateway's top-level policy, typed in the snapshot
        let resp = fe
            .http()
            .post(fe.url("/v1/chat/completions"))
            .bearer_auth(T)
            .json(&hello("gpt-4o-mini"))
            .send()
            .await?;
        assert_eq!(
            resp.headers()
                .get("x-ratelimit-limit-requests")
                .and_then(|v| v.to_str().ok()),
            Some("100000"),
            "{}",
            fe.origin
        );
        while post(fe, "/llm/api/late/v1/chat/completions", "late-secret").await? != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{} never got the new gateway",
                fe.origin
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Usage batches are sent in messages under gRPC's 4 MiB limit: events spooled during an outage,
/// each carrying a 150 KB request body in its log, reach the control plane when it is back
/// (7 MB in one replay; as one message the control plane refused it, and nothing landed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_logs_reach_the_control_plane_in_messages_under_the_grpc_limit()
-> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let db = PgDb::create()?;
    let admin_address = format!("127.0.0.1:{}", free_port()?);
    let yaml = format!(
        "{}log: {{request_body: true, max_field_bytes: 200000}}\n",
        control_yaml(&db, &up, "")
    );
    let mut cp = Gateway::start_control_plane(&yaml, &admin_address).await?;
    let admin = format!("http://{admin_address}");
    let fe = Gateway::start_frontend(&admin, ADMIN, &[]).await?;
    assert_eq!(post(&fe, "/v1/chat/completions", T).await?, 200);
    let mut sent = 1u64;
    Command::new("kill")
        .args(["-KILL", &cp.pid().to_string()])
        .status()?;
    cp.wait(Duration::from_secs(5)).await?;
    let text = "x".repeat(150_000);
    for _ in 0..48 {
        let resp = fe
            .http()
            .post(fe.url("/v1/chat/completions"))
            .bearer_auth(T)
            .json(&serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": text}],
            }))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        sent += 1;
    }
    let _cp = Gateway::start_control_plane(&yaml, &admin_address).await?;
    let landed = wait_for_events(&db, sent, Duration::from_secs(30)).await?;
    assert_eq!(landed, sent, "{}", fe.logs());
    let store = keypool_store::Store::connect_only(&db.url()).await?;
    let mut logged = 0;
    for e in store.events_since(0, 100).await? {
        let body = store.request_log(&e.id).await?.and_then(|l| l.request_body);
        logged += usize::from(body.is_some_and(|b| b.len() > 150_000));
    }
    store.close().await;
    assert_eq!(logged, 48, "every large body was stored whole");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_and_keypoolctl_reach_a_tls_control_plane() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let db = PgDb::create()?;
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = test_pki(dir.path())?;
    let yaml = control_yaml(&db, &up, "").replace(
        &format!("admin: {{token: {ADMIN}, "),
        &format!("admin: {{tls_cert: \"{cert}\", tls_key: \"{key}\", token: {ADMIN}, "),
    );
    assert!(yaml.contains("tls_cert"), "{yaml}");
    let cp = Gateway::start_control_plane(&yaml, "127.0.0.1:0").await?;
    let admin = cp.admin_url().await?;
    assert!(admin.starts_with("https://"), "{admin}");

    // the snapshot (upstream keys included) and the usage travel over TLS
    let fe = Gateway::start_frontend(&admin, ADMIN, &["--admin-ca", &ca]).await?;
    assert_eq!(post(&fe, "/v1/chat/completions", T).await?, 200);
    assert_eq!(wait_for_events(&db, 1, Duration::from_secs(15)).await?, 1);

    // keypoolctl with the CA; without it the test CA's certificate is refused; plaintext
    // to the TLS port fails
    let ctl = |args: &[&str]| {
        Command::new(keypoolctl_bin())
            .args(["--server", &admin])
            .args(args)
            .env("KEYPOOL_ADMIN_TOKEN", ADMIN)
            .output()
    };
    let ok = ctl(&["--ca", &ca, "status"])?;
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("replica "),
        "{ok:?}"
    );
    assert!(!ctl(&["status"])?.status.success());
    let plain = Command::new(keypoolctl_bin())
        .args(["--server", &admin.replace("https://", "http://"), "status"])
        .env("KEYPOOL_ADMIN_TOKEN", ADMIN)
        .output()?;
    assert!(!plain.status.success());

    // the console speaks TLS too, its session cookie `Secure`
    let console = cp.console_url().await?;
    assert!(console.starts_with("https://"), "{console}");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .build()?;
    let login = trusting
        .post(format!("{console}/api/login"))
        .json(&serde_json::json!({"token": ADMIN}))
        .send()
        .await?;
    assert_eq!(login.status(), 200);
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cookie.contains("; Secure"), "{cookie}");
    let plain_console = keypool_e2e::client()
        .get(console.replace("https://", "http://") + "/api/status")
        .send()
        .await;
    assert!(
        plain_console.is_err(),
        "plaintext to the TLS console answered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_applied_mid_stream_leaves_the_stream_whole() -> anyhow::Result<()> {
    let slow = mock(
        "up",
        Behavior {
            chunk_interval_ms: 100,
            reply_words: 12,
            ..Behavior::default()
        },
    );
    let db = PgDb::create()?;
    let cp = Gateway::start_control_plane(&control_yaml(&db, &slow, ""), "127.0.0.1:0").await?;
    let admin = cp.admin_url().await?;
    let fe = Gateway::start_frontend(&admin, ADMIN, &[]).await?;
    let mut body = hello("gpt-4o-mini");
    body["stream"] = true.into();
    let resp = fe
        .http()
        .post(fe.url("/v1/chat/completions"))
        .bearer_auth(T)
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let reading = tokio::spawn(async move { resp.text().await });

    // while the stream runs: a new gateway and the serving key re-limited, pushed and applied
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut cl = AdminClient::connect(admin).await?;
    cl.create_gateway(authed(pb::CreateGatewayRequest {
        gateway: Some(keypool_e2e::gateway_spec(
            "name: mid\nauth: {method: exact, secrets: [mid-secret]}\n",
        )),
    }))
    .await?;
    cl.update_key(authed(pb::UpdateKeyRequest {
        name: "up".into(),
        rpm: Some(1000),
        ..Default::default()
    }))
    .await?;
    let started = Instant::now();
    while post(&fe, "/llm/api/mid/v1/chat/completions", "mid-secret").await? != 200 {
        assert!(started.elapsed() < Duration::from_secs(1), "not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!reading.is_finished(), "the stream should still be running");

    let text = reading.await??;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    let chunks = text.matches("data: {").count();
    assert!(chunks >= 12, "{chunks} chunks: {text}");
    Ok(())
}
