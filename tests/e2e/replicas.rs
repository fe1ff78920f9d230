//! Several replicas sharing the real Redis (unique key prefix per test) behave as one gateway:
//! key rpm, gateway limits and quotas hold across them; key health spreads. The scenarios run
//! over `keypool serve` processes and over `keypool frontend`s fed by a control plane.

use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, MockServer, config, hello, mock};

const T: &str = "client-token";

fn redis_block(prefix: &str) -> String {
    format!("redis: {{url: \"redis://127.0.0.1:6379/0\", prefix: \"{prefix}\"}}")
}

fn prefix() -> String {
    format!("kp-e2e-{:016x}:", fastrand::u64(..))
}

/// Waits until `n` replicas subscribed to `channel` (a replica reports "listening" before its
/// Redis subscriptions are up; a message published before would be missed).
async fn subscribed(channel: &str, n: i64) -> anyhow::Result<()> {
    let client = redis::Client::open("redis://127.0.0.1:6379/0")?;
    let mut c = client.get_multiplexed_async_connection().await?;
    for _ in 0..200 {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await?;
        if counts.first().is_some_and(|(_, k)| *k >= n) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{n} subscribers to {channel} never showed up")
}

/// How the replicas are deployed: all-in-one `keypool serve` processes sharing Redis, or
/// `keypool frontend`s fed by one control plane (on a fresh PostgreSQL database) sharing Redis.
#[derive(Debug, Clone, Copy)]
enum Topo {
    Serve,
    Frontends,
}

/// The replicas of one test, with the control plane and database they need.
struct Cluster {
    gws: Vec<Gateway>,
    _control_plane: Option<(Gateway, keypool_e2e::PgDb)>,
}

impl std::ops::Deref for Cluster {
    type Target = [Gateway];
    fn deref(&self) -> &[Gateway] {
        &self.gws
    }
}

/// A frontend's Redis flags for the shared Redis with `prefix`.
fn shared_redis(prefix: &str) -> Vec<String> {
    [
        "--redis",
        "redis://127.0.0.1:6379/0",
        "--redis-prefix",
        prefix,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `n` replicas of `yaml`; as frontends, with `redis` flags (the same Redis as `yaml`'s), and
/// `yaml` is the control plane's config (its `dbtype: none` replaced by the test's database).
async fn replicas(topo: Topo, n: usize, yaml: &str, redis: &[String]) -> anyhow::Result<Cluster> {
    let mut gws = Vec::new();
    let control_plane = match topo {
        Topo::Serve => {
            for _ in 0..n {
                gws.push(Gateway::start(yaml).await?);
            }
            None
        }
        Topo::Frontends => {
            let db = keypool_e2e::PgDb::create()?;
            let cp_yaml = format!(
                "{}admin: {{token: topo-admin, secret_key: topo-seal}}\n",
                yaml.replacen(
                    "dbtype: none",
                    &format!("dbtype: postgres\ndbaddr: \"{}\"", db.url()),
                    1
                )
            );
            let cp = Gateway::start_control_plane(&cp_yaml, "127.0.0.1:0").await?;
            let admin = cp.admin_url().await?;
            let redis: Vec<&str> = redis.iter().map(String::as_str).collect();
            for _ in 0..n {
                gws.push(Gateway::start_frontend(&admin, "topo-admin", &redis).await?);
            }
            Some((cp, db))
        }
    };
    Ok(Cluster {
        gws,
        _control_plane: control_plane,
    })
}

/// Runs each scenario twice: over `keypool serve` replicas and over `keypool frontend`s.
macro_rules! in_both_topologies {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn serve() -> anyhow::Result<()> {
                super::$name(super::Topo::Serve).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn frontends() -> anyhow::Result<()> {
                super::$name(super::Topo::Frontends).await
            }
        }
    )*};
}

in_both_topologies!(
    three_replicas_admit_exactly_a_keys_rpm,
    three_replicas_hold_a_keys_tpm_as_one,
    a_dead_redis_never_hangs_requests_and_replicas_rejoin,
    three_replicas_spread_load_over_keys_as_evenly_as_one,
    gateway_limits_and_quotas_hold_across_replicas,
    a_429_seen_by_one_replica_cools_the_key_on_all,
    a_redis_cluster_holds_limits_and_survives_a_dead_master,
    leased_budgets_hold_exactly_and_unspent_calls_go_back,
    leased_gateway_limits_hold_exactly_and_unspent_calls_go_back,
    leased_limits_of_both_scopes_hold_exactly,
    a_leased_tpm_holds_exactly_and_unspent_tokens_go_back,
);

async fn post(gw: &Gateway, path: &str, model: &str) -> anyhow::Result<u16> {
    let resp = gw
        .http()
        .post(gw.url(path))
        .bearer_auth(T)
        .json(&hello(model))
        .send()
        .await?;
    let s = resp.status().as_u16();
    let _ = resp.bytes().await;
    Ok(s)
}

async fn three_replicas_admit_exactly_a_keys_rpm(topo: Topo) -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .set("queue_timeout", "0.05")
        .key(&up, "up", "rpm: 10")
        .block(&redis_block(&pfx))
        .yaml();
    let gws = replicas(topo, 3, &yaml, &shared_redis(&pfx)).await?;
    let mut calls = Vec::new();
    for i in 0..30 {
        let gw = &gws[i % 3];
        calls.push(post(gw, "/v1/chat/completions", "gpt-4o-mini"));
    }
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| matches!(r, Ok(200))).count();
    let limited = results.iter().filter(|r| matches!(r, Ok(429))).count();
    assert_eq!((ok, limited), (10, 20), "{results:?}");
    assert_eq!(up.requests(), 10);
    Ok(())
}

/// Sequential calls (each settled before the next) with a small completion estimate, counted.
async fn tpm_admitted(gws: &[Gateway], calls: usize) -> anyhow::Result<usize> {
    // the settled count reaches Redis
    tpm_admitted_pausing(gws, calls, Duration::from_millis(150)).await
}

/// [`tpm_admitted`] with `pause` after each call. Each call is estimated at 25 tokens (98 bytes
/// of body / 4, `max_tokens: 1`) and uses 10 (the mock's 5 + 5).
async fn tpm_admitted_pausing(
    gws: &[Gateway],
    calls: usize,
    pause: Duration,
) -> anyhow::Result<usize> {
    let mut ok = 0;
    for i in 0..calls {
        let gw = &gws[i % gws.len()];
        let mut body = hello("gpt-4o-mini");
        body["max_tokens"] = 1.into();
        let resp = gw
            .http()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(T)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let _ = resp.bytes().await;
        assert!(status == 200 || status == 429, "{status}");
        ok += usize::from(status == 200);
        tokio::time::sleep(pause).await;
    }
    Ok(ok)
}

async fn three_replicas_hold_a_keys_tpm_as_one(topo: Topo) -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let pfx = prefix();
    let base = config()
        .token(T)
        .set("queue_timeout", "0.05")
        .key(&up, "up", "tpm: 45");
    // what one process admits of 9 calls (estimates reserved, real usage settled)
    let alone = Gateway::start(&base.yaml()).await?;
    let one = tpm_admitted(std::slice::from_ref(&alone), 9).await?;
    assert!((1..9).contains(&one), "{one}");
    drop(alone);
    let before = up.requests();
    let gws = replicas(
        topo,
        3,
        &base.block(&redis_block(&pfx)).yaml(),
        &shared_redis(&pfx),
    )
    .await?;
    assert_eq!(
        tpm_admitted(&gws, 9).await?,
        one,
        "three replicas admit as one"
    );
    assert_eq!(up.requests() - before, one as u64);
    Ok(())
}

async fn three_replicas_spread_load_over_keys_as_evenly_as_one(topo: Topo) -> anyhow::Result<()> {
    let keys = [
        mock("k1", Behavior::default()),
        mock("k2", Behavior::default()),
        mock("k3", Behavior::default()),
    ];
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .key(&keys[0], "k1", "")
        .key(&keys[1], "k2", "")
        .key(&keys[2], "k3", "")
        .block(&redis_block(&pfx))
        .yaml();
    let gws = replicas(topo, 3, &yaml, &shared_redis(&pfx)).await?;
    // round robin over the replicas; alone, each would start at k1 (12/9/9 in all)
    for i in 0..30 {
        assert_eq!(post(&gws[i % 3], "/v1/chat/completions", "m").await?, 200);
    }
    let counts: Vec<u64> = keys.iter().map(MockServer::requests).collect();
    assert_eq!(counts, [10, 10, 10]);
    Ok(())
}

async fn gateway_limits_and_quotas_hold_across_replicas(topo: Topo) -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .key(&up, "up", "")
        .block(&format!(
            "{}\ngateways:\n  - {{name: four, rate_limits: [\"ingress:4/minute\"]}}\n  - {{name: quota, token_quota: 15}}",
            redis_block(&pfx)
        ))
        .yaml();
    let gws = replicas(topo, 3, &yaml, &shared_redis(&pfx)).await?;
    let mut admitted = 0;
    for i in 0..9 {
        let s = post(&gws[i % 3], "/llm/api/four/v1/chat/completions", "m").await?;
        assert!(s == 200 || s == 429);
        admitted += usize::from(s == 200);
    }
    assert_eq!(admitted, 4, "ingress:4/minute across three replicas");

    // each call uses 10 tokens: 0 → 10 on A, 10 < 15 → 20 on B, then every replica refuses
    assert_eq!(
        post(&gws[0], "/llm/api/quota/v1/chat/completions", "m").await?,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // the settled count reaches Redis
    assert_eq!(
        post(&gws[1], "/llm/api/quota/v1/chat/completions", "m").await?,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for gw in gws.iter() {
        assert_eq!(
            post(gw, "/llm/api/quota/v1/chat/completions", "m").await?,
            429
        );
    }
    Ok(())
}

async fn a_429_seen_by_one_replica_cools_the_key_on_all(topo: Topo) -> anyhow::Result<()> {
    let limited: MockServer = mock(
        "limited",
        Behavior {
            status: Some(429),
            retry_after: Some("5".into()),
            ..Behavior::default()
        },
    );
    let good = mock("good", Behavior::default());
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .set("lb_policy", "order")
        .key(&limited, "limited", "")
        .key(&good, "good", "")
        .block(&redis_block(&pfx))
        .yaml();
    let gws = replicas(topo, 2, &yaml, &shared_redis(&pfx)).await?;
    subscribed(&format!("{pfx}health"), 2).await?;
    assert_eq!(post(&gws[0], "/v1/chat/completions", "m").await?, 200);
    assert_eq!(limited.requests(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await; // pub/sub delivery
    for _ in 0..5 {
        assert_eq!(post(&gws[1], "/v1/chat/completions", "m").await?, 200);
    }
    assert_eq!(limited.requests(), 1, "B never tried the key A saw cooling");
    Ok(())
}

/// A 3-master Redis Cluster of the test's own: a gateway limit holds across three replicas as
/// on one Redis; the master holding the pool's slot is killed mid-load and every request is still
/// answered (`on_failure: local`), none waiting much past the Redis timeout. (The gateways'
/// keys have tags of their own: cluster_spread.rs in keypool-shared.)
async fn a_redis_cluster_holds_limits_and_survives_a_dead_master(topo: Topo) -> anyhow::Result<()> {
    let mut servers =
        keypool_shared::testing::Servers::cluster(3).map_err(|e| anyhow::anyhow!(e))?;
    let nodes = servers.urls(0);
    let up = mock("up", Behavior::default());
    let yaml = config()
        .token(T)
        .key(&up, "up", "rpm: 100000")
        .block(&format!(
            "redis: {{cluster: [{}], timeout_ms: 200}}\ngateways:\n  - {{name: four, rate_limits: [\"ingress:4/minute\"]}}\n  - {{name: g, rate_limits: [\"ingress:100000/minute\"]}}",
            nodes.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
        ))
        .yaml();
    let flags = [
        "--redis-cluster".to_owned(),
        nodes.join(","),
        "--redis-timeout-ms".to_owned(),
        "200".to_owned(),
    ];
    let gws = replicas(topo, 3, &yaml, &flags).await?;
    let mut admitted = 0;
    for i in 0..9 {
        let s = post(&gws[i % 3], "/llm/api/four/v1/chat/completions", "m").await?;
        assert!(s == 200 || s == 429, "{s}");
        admitted += usize::from(s == 200);
    }
    assert_eq!(
        admitted, 4,
        "ingress:4/minute across three replicas on a cluster"
    );

    let holder = servers
        .master_of("{keypool:}x")
        .map_err(|e| anyhow::anyhow!(e))?;
    let victim = servers.index_of(holder).unwrap_or(0);
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        servers.kill(victim);
        servers
    });
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        let t = std::time::Instant::now();
        let s = post(&gws[i % 3], "/llm/api/g/v1/chat/completions", "m").await?;
        assert_eq!(s, 200, "request {i}");
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _servers = killer.await?;
    assert!(slowest < Duration::from_millis(1500), "slowest {slowest:?}");
    let mut felt = false;
    for gw in gws.iter() {
        let metrics = gw.metrics().await?;
        felt |= metrics
            .lines()
            .any(|l| l.starts_with("keypool_redis_errors_total ") && !l.ends_with(" 0"));
    }
    assert!(
        felt,
        "the dead master was noticed (and the replicas fell back to local limits)"
    );
    Ok(())
}

/// A `redis-server` of the test's own, on a free port, without persistence.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    fn on_a_free_port() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Self::start(port)
    }

    fn start(port: u16) -> anyhow::Result<Self> {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self { child, port });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("redis-server did not start on {port}")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn a_dead_redis_never_hangs_requests_and_replicas_rejoin(topo: Topo) -> anyhow::Result<()> {
    let mut redis = OwnRedis::on_a_free_port()?;
    let port = redis.port;
    let up = mock("up", Behavior::default());
    let yaml = config()
        .token(T)
        .key(&up, "up", "rpm: 1000")
        .block(&format!(
            "redis: {{url: \"redis://127.0.0.1:{}/0\", timeout_ms: 100}}\ngateways:\n  - {{name: g, rate_limits: [\"ingress:1000/minute\"]}}",
            redis.port
        ))
        .yaml();
    let url = format!("redis://127.0.0.1:{port}/0");
    let flags = ["--redis", &url, "--redis-timeout-ms", "100"].map(str::to_owned);
    let cluster = replicas(topo, 1, &yaml, &flags).await?;
    let gw = &cluster[0];
    assert_eq!(post(gw, "/llm/api/g/v1/chat/completions", "m").await?, 200);
    redis.stop();
    // local mode: every request is answered, none waits much past the Redis timeout
    for _ in 0..10 {
        let t = std::time::Instant::now();
        assert_eq!(post(gw, "/llm/api/g/v1/chat/completions", "m").await?, 200);
        assert!(
            t.elapsed() < Duration::from_millis(800),
            "{:?}",
            t.elapsed()
        );
    }
    let metrics = gw.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keypool_redis_errors_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Redis returns on the same port: the replica uses it again by itself
    let _redis = OwnRedis::start(port)?;
    let mut rejoined = false;
    for _ in 0..50 {
        assert_eq!(post(gw, "/llm/api/g/v1/chat/completions", "m").await?, 200);
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("keypool:gw:*")
            .query_async(&mut c)
            .await?;
        if !keys.is_empty() {
            rejoined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rejoined, "windows are kept in Redis again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_hint_divides_budgets_while_redis_is_down() -> anyhow::Result<()> {
    let mut redis = OwnRedis::on_a_free_port()?;
    let port = redis.port;
    let up = mock("up", Behavior::default());
    let yaml = config()
        .token(T)
        .set("queue_timeout", "0.05")
        .key(&up, "up", "rpm: 10")
        .block(&format!(
            "redis: {{url: \"redis://127.0.0.1:{port}/0\", timeout_ms: 100, replicas_hint: 2}}\ngateways:\n  - {{name: g, rate_limits: [\"ingress:6/minute\"]}}"
        ))
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    redis.stop();
    // this replica's share: ingress 6 / 2 = 3 on the gateway, rpm 10 / 2 = 5 on the key
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(post(&gw, "/llm/api/g/v1/chat/completions", "m").await?);
    }
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(post(&gw, "/v1/chat/completions", "m").await?);
    }
    assert_eq!(codes, [200, 200, 429, 429, 429], "the key's other 2 of 5");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_closed_refuses_until_redis_returns() -> anyhow::Result<()> {
    let mut redis = OwnRedis::on_a_free_port()?;
    let port = redis.port;
    let up = mock("up", Behavior::default());
    let yaml = config()
        .token(T)
        .key(&up, "up", "rpm: 1000")
        .block(&format!(
            "redis: {{url: \"redis://127.0.0.1:{port}/0\", timeout_ms: 100, on_failure: closed}}\ngateways:\n  - {{name: g, rate_limits: [\"ingress:1000/minute\"]}}"
        ))
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    assert_eq!(post(&gw, "/llm/api/g/v1/chat/completions", "m").await?, 200);
    redis.stop();
    let before = up.requests();
    for path in ["/llm/api/g/v1/chat/completions", "/v1/chat/completions"] {
        let t = std::time::Instant::now();
        let resp = gw
            .http()
            .post(gw.url(path))
            .bearer_auth(T)
            .json(&hello("m"))
            .send()
            .await?;
        assert_eq!(resp.status(), 503, "{path}");
        assert!(t.elapsed() < Duration::from_millis(800));
        let body: serde_json::Value = resp.json().await?;
        assert_eq!(body["error"]["code"], "shared_state_unavailable");
    }
    assert_eq!(
        up.requests(),
        before,
        "nothing reached the upstream unlimited"
    );
    // the log says what the process does, not "using local state"
    gw.wait_log("on_failure: closed", 1).await?;
    assert!(!gw.logs().contains("using local state"), "{}", gw.logs());
    let _redis = OwnRedis::start(port)?;
    let mut back = false;
    for _ in 0..50 {
        if post(&gw, "/llm/api/g/v1/chat/completions", "m").await? == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back, "serving again once Redis is back");
    Ok(())
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_on_one_replica_reaches_the_others_within_a_second() -> anyhow::Result<()> {
    use keypool_proto::admin::v1 as pb;
    let db = keypool_e2e::PgDb::create()?;
    let a = mock("a", Behavior::default());
    let b = mock("b", Behavior::default());
    let c = mock("c", Behavior::default());
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .set("dbtype", "postgres")
        .set("dbaddr", &format!("\"{}\"", db.url()))
        .key(&a, "a", "")
        .key(&b, "b", "")
        .block(&format!(
            "{}\nadmin: {{token: adm, secret_key: shared-seal-key}}",
            redis_block(&pfx)
        ))
        .yaml();
    let gws = replicas(Topo::Serve, 2, &yaml, &shared_redis(&pfx)).await?;
    subscribed(&format!("{pfx}config"), 2).await?;
    let mut admin =
        keypool_proto::admin::v1::admin_client::AdminClient::connect(gws[0].admin_url().await?)
            .await?;
    let started = std::time::Instant::now();
    admin
        .create_gateway(authed(pb::CreateGatewayRequest {
            gateway: Some(keypool_e2e::gateway_spec(
                "name: fresh\nauth: {method: exact, secrets: [f-1]}\n",
            )),
        }))
        .await?;
    let path = "/llm/api/fresh/v1/chat/completions";
    let on_b = || async {
        let resp = gws[1]
            .http()
            .post(gws[1].url(path))
            .bearer_auth("f-1")
            .json(&hello("m"))
            .send()
            .await?;
        anyhow::Ok(resp.status().as_u16())
    };
    while on_b().await? != 200 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1),
            "not on B within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // a key disabled on A gets no traffic from B; a key added on A serves B
    let mut admin2 = admin.clone();
    admin2
        .update_key(authed(pb::UpdateKeyRequest {
            name: "a".into(),
            enabled: Some(false),
            ..Default::default()
        }))
        .await?;
    admin
        .add_key(authed(pb::AddKeyRequest {
            key: Some(keypool_e2e::key_spec(&format!(
                "{{name: c, sk: sk-added-c-1234, endpoint: \"{}\"}}",
                c.url()
            ))),
        }))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = a.requests();
    for _ in 0..6 {
        assert_eq!(post(&gws[1], "/v1/chat/completions", "m").await?, 200);
    }
    assert_eq!(
        a.requests(),
        before,
        "B no longer uses the key disabled on A"
    );
    assert!(c.requests() > 0, "B uses the key added on A");
    // GetStatus on A lists both replicas (heartbeats in Redis)
    let st = admin
        .get_status(authed(pb::GetStatusRequest {}))
        .await?
        .into_inner();
    assert_eq!(st.replicas.len(), 2, "{st:?}");
    assert_eq!((st.store.as_str(), st.redis.as_str()), ("ok", "ok"));
    assert_eq!(
        c.last_request().unwrap().header("authorization"),
        Some("Bearer sk-added-c-1234")
    );
    Ok(())
}

fn authed<M>(m: M) -> tonic::Request<M> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::from_static("Bearer adm"),
    );
    r
}

/// The Redis block with `lease: 4` and `lease_ms`, then `rest` of the config.
fn leased_redis(prefix: &str, lease_ms: u64, rest: &str) -> String {
    format!(
        "redis: {{url: \"redis://127.0.0.1:6379/0\", prefix: \"{prefix}\", lease: 4, lease_ms: {lease_ms}}}{rest}"
    )
}

/// A frontend's flags for the same.
fn leased_flags(prefix: &str, lease_ms: u64) -> Vec<String> {
    let mut flags = shared_redis(prefix);
    flags.extend([
        "--redis-lease".into(),
        "4".into(),
        "--redis-lease-ms".into(),
        lease_ms.to_string(),
    ]);
    flags
}

/// How many of `n` calls, one after another, `gw` admits (the others answered 429).
async fn admitted(gw: &Gateway, path: &str, model: &str, n: usize) -> anyhow::Result<usize> {
    let mut ok = 0;
    for _ in 0..n {
        let s = post(gw, path, model).await?;
        assert!(s == 200 || s == 429, "{s}");
        ok += usize::from(s == 200);
    }
    Ok(ok)
}

/// `redis.lease`: a replica reserves up to 4 calls of the key's rpm (10) at once and spends
/// them locally; the limit still holds exactly across replicas, and calls a replica leased but
/// did not spend go back once its lease lapses (400 ms), for another to spend.
async fn leased_budgets_hold_exactly_and_unspent_calls_go_back(topo: Topo) -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .set("queue_timeout", "0.05")
        .key(&up, "up", "rpm: 10")
        .block(&leased_redis(&pfx, 400, ""))
        .yaml();
    let gws = replicas(topo, 2, &yaml, &leased_flags(&pfx, 400)).await?;
    let run = async |gw: &Gateway, n| admitted(gw, "/v1/chat/completions", "gpt-4o-mini", n).await;
    // a spends one of the 4 it leases; b gets the 6 left, in leases of 4 and 2
    assert_eq!(run(&gws[0], 1).await?, 1);
    assert_eq!(run(&gws[1], 10).await?, 6);
    // a's 3 unspent calls go back when its lease lapses: b spends them, and no more
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(run(&gws[1], 6).await?, 3);
    assert_eq!(up.requests(), 10);
    Ok(())
}

/// `redis.lease` on a gateway's `ingress:40/minute`: a replica leases 4 calls (a tenth of the
/// limit, and `lease: 4`) and spends them locally; the limit holds exactly across replicas,
/// and what a replica leased but did not spend goes back once its lease lapses. a spends one
/// of the 4 it leases; b gets the 36 left; a's 3 unspent calls go back when its lease lapses:
/// b spends them, and no more.
async fn leased_gateway_limits_hold_exactly_and_unspent_calls_go_back(
    topo: Topo,
) -> anyhow::Result<()> {
    a_leased_gateway_admits(topo, "\"ingress:40/minute\"", (36, 3)).await
}

/// `redis.lease` on a gateway with `ingress:40/minute` and `secret:30/minute`: the gateway's
/// calls and the caller's are leased by holders of their own (4 and 3 at once, the smaller for
/// both in one round trip). a spends one call of its leases; b gets the caller's 27 left (its
/// calls past those spend its gateway lease, are refused by the caller's limit and give the
/// gateway's call back); after a's leases lapse b gets their 2, and no more: 30 in all.
async fn leased_limits_of_both_scopes_hold_exactly(topo: Topo) -> anyhow::Result<()> {
    a_leased_gateway_admits(topo, "\"ingress:40/minute\", \"secret:30/minute\"", (27, 2)).await
}

/// Two replicas leasing the rate `limits` of one gateway (`lease: 4`, `lease_ms: 1500`: b's 40
/// calls run within it, also on a loaded machine): a admits one call; b admits `b_first` of
/// 40; once a's leases lapsed, b admits `b_after` of 6 and a none of 2; the upstream saw each
/// admitted call.
async fn a_leased_gateway_admits(
    topo: Topo,
    limits: &str,
    (b_first, b_after): (usize, usize),
) -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let pfx = prefix();
    let gateway = format!("\ngateways:\n  - {{name: lim, rate_limits: [{limits}]}}");
    let yaml = config()
        .token(T)
        .key(&up, "up", "")
        .block(&leased_redis(&pfx, 1500, &gateway))
        .yaml();
    let gws = replicas(topo, 2, &yaml, &leased_flags(&pfx, 1500)).await?;
    let path = "/llm/api/lim/v1/chat/completions";
    let run = async |gw: &Gateway, n| admitted(gw, path, "m", n).await;
    assert_eq!(run(&gws[0], 1).await?, 1);
    assert_eq!(run(&gws[1], 40).await?, b_first);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(run(&gws[1], 6).await?, b_after);
    assert_eq!(run(&gws[0], 2).await?, 0);
    assert_eq!(up.requests(), u64::try_from(1 + b_first + b_after)?);
    Ok(())
}

/// `redis.lease: 4` on a key's `tpm: 500`: a pick that asks Redis leases 2 calls and a token
/// slice of 2 estimates of 25 (a tenth of the tpm holds two), and the calls it spends here
/// hold their estimates against the slice; each slice settles as what its calls used (10
/// each). Alone, a process admits 48 such calls (470 used + 25 fits, 480 + 25 does not).
/// Alternating over two replicas admits no more than that (a slice's unspent part may refuse
/// some meanwhile); once the slices lapsed, one replica admits the rest: 48 in all, exactly.
async fn a_leased_tpm_holds_exactly_and_unspent_tokens_go_back(topo: Topo) -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let pfx = prefix();
    let yaml = config()
        .token(T)
        .set("queue_timeout", "0.05")
        .key(&up, "up", "tpm: 500")
        .block(&leased_redis(&pfx, 1000, ""))
        .yaml();
    let gws = replicas(topo, 2, &yaml, &leased_flags(&pfx, 1000)).await?;
    let now = Duration::ZERO;
    let alternating = tpm_admitted_pausing(&gws, 60, now).await?;
    assert!((30..=48).contains(&alternating), "{alternating}");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let rest = tpm_admitted_pausing(&gws[..1], 30, now).await?;
    assert_eq!(alternating + rest, 48, "{alternating} + {rest}");
    assert_eq!(up.requests(), 48);
    Ok(())
}
