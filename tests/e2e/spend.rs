//! USD budgets and prices over real `keypool` processes: a gateway budget held across three
//! replicas sharing Redis under concurrency, caller and key budgets, a failure that costs
//! nothing, budgets that survive a restart, a price override pushed to every frontend (from
//! the file and from the admin API), spend by caller and day, and the budget alerts.
//!
//! Prices here are the tests' own (`pricing:`, 10 cents a token for model `m`), so a call to
//! the mock (5 prompt tokens, 5 completion tokens) costs exactly $1, and its estimate (a quarter
//! of the body's ~72 bytes, plus `completion_estimate: 5`) is $2.3: never less than the cost.

use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, MockServer, Receiver, config, hello, mock, served_by};
use serde_json::Value;

const PRICING: &str =
    "pricing: [{models: [m], input: 100000, output: 100000}]\ncompletion_estimate: 5";

/// A call's estimate: never less than its cost ($1).
const ESTIMATE_USD: f64 = 2.3;

fn redis_block(prefix: &str) -> String {
    format!("redis: {{url: \"redis://127.0.0.1:6379/0\", prefix: \"{prefix}\"}}")
}

/// One call: its status, its cost (`x-keypool-cost`, 0 without one) and its body.
async fn call(gw: &Gateway, path: &str, token: Option<&str>) -> anyhow::Result<(u16, f64, Value)> {
    let mut req = gw.http().post(gw.url(path)).json(&hello("m"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let cost = resp
        .headers()
        .get("x-keypool-cost")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let retry_after = resp.headers().get("retry-after").cloned();
    let mut body: Value = resp.json().await.unwrap_or(Value::Null);
    if let Some(r) = retry_after {
        body["retry_after"] = Value::from(r.to_str().unwrap_or_default());
    }
    Ok((status, cost, body))
}

fn team_config(up: &MockServer, extra: &str) -> String {
    config()
        .key(up, "up", "")
        .block(&format!(
            "{PRICING}\n{extra}\ngateways:\n  - {{name: team, budget: {{usd: 10, period: day}}}}"
        ))
        .yaml()
}

/// 30 calls at once over three replicas, then one at a time until refused: the spend never
/// passes the $10 budget by more than one estimate (every estimate covers its cost, and a call
/// is admitted only while spend plus holds is under the budget), and once refused, every
/// replica refuses with 429 `insufficient_quota`, the budget named, `Retry-After` its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usd_budget_holds_across_three_replicas() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let prefix = format!("kp-e2e-{:016x}:", fastrand::u64(..));
    let yaml = team_config(&up, &redis_block(&prefix));
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&yaml).await?);
    }
    let path = "/llm/api/team/v1/chat/completions";
    let burst = futures::future::join_all((0..30).map(|i| call(&gws[i % 3], path, None))).await;
    let mut spent = 0.0;
    for r in burst {
        let (status, cost, body) = r?;
        assert!(status == 200 || status == 429, "{status} {body}");
        if status == 200 {
            assert!((cost - 1.0).abs() < 1e-9, "each call costs $1: {cost}");
        }
        spent += cost;
    }
    assert!(
        spent <= 10.0 + ESTIMATE_USD,
        "spent ${spent} of $10 in a burst"
    );
    let mut refused = None;
    for i in 0..20 {
        // the previous call's settlement lands first: a refusal means the budget is spent
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (status, cost, body) = call(&gws[i % 3], path, None).await?;
        spent += cost;
        if status == 429 {
            refused = Some(body);
            break;
        }
    }
    let refused = refused.expect("refused once the budget was spent");
    assert!(
        (10.0..=10.0 + ESTIMATE_USD).contains(&spent),
        "spent ${spent} of $10"
    );
    assert_eq!(refused["error"]["code"], "insufficient_quota", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("The gateway `team` has reached its daily budget of $10"),
        "{message}"
    );
    let retry: u64 = refused["retry_after"].as_str().unwrap_or("0").parse()?;
    assert!((1..=86_400).contains(&retry), "{refused}");
    for gw in &gws {
        assert_eq!(call(gw, path, None).await?.0, 429);
    }
    // `/v1` has no budget: unaffected
    let free = gws[0].chat("any", hello("m")).await?;
    assert_eq!(free.status(), 200);
    Ok(())
}

/// The gateway `team` with a $100 daily budget held in slices (`lease: 4`, `lease_ms`), and
/// output priced alone: a call costs $0.50 and so does its estimate.
fn sliced_config(up: &MockServer, prefix: &str, lease_ms: u64) -> String {
    config()
        .key(up, "up", "")
        .block(&format!(
            "pricing: [{{models: [m], input: 0, output: 100000}}]\ncompletion_estimate: 5\nredis: {{url: \"redis://127.0.0.1:6379/0\", prefix: \"{prefix}\", lease: 4, lease_ms: {lease_ms}}}\ngateways:\n  - {{name: team, budget: {{usd: 100, period: day}}}}"
        ))
        .yaml()
}

/// The same with `redis.lease: 4`, output priced alone (a call costs $0.50, its estimate
/// $0.50): each replica holds a slice of two estimates (a hundredth of a $100 budget) and
/// spends its calls from it without a round trip. Calls one at a time over three replicas
/// until one refuses, then again once the slices have lapsed (300 ms) and been settled, until
/// all three refuse: the spend ends between $100 and $100 plus one estimate, as without
/// slices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usd_budget_in_slices_holds_across_three_replicas() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let prefix = format!("kp-e2e-{:016x}:", fastrand::u64(..));
    let yaml = sliced_config(&up, &prefix, 300);
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&yaml).await?);
    }
    let path = "/llm/api/team/v1/chat/completions";
    // the first call holds a slice: $1 held in Redis while it is open, not its own $0.50
    let (status, mut spent, _) = call(&gws[0], path, None).await?;
    assert_eq!(status, 200);
    assert_eq!(
        held_nanos(&format!("{prefix}budget:gw:team:*")).await?,
        1_000_000_000
    );
    let mut refused_in_a_row = 0;
    for i in 0..600 {
        let (status, cost, body) = call(&gws[i % 3], path, None).await?;
        assert!(status == 200 || status == 429, "{status} {body}");
        spent += cost;
        if status == 200 {
            refused_in_a_row = 0;
            continue;
        }
        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        refused_in_a_row += 1;
        if refused_in_a_row == 3 {
            break;
        }
        // the slices other replicas hold lapse and are settled
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(refused_in_a_row, 3, "every replica refuses in the end");
    assert!((100.0..=100.5).contains(&spent), "spent ${spent} of $100");
    Ok(())
}

/// A replica stopped with SIGTERM gives back the budget slice it holds before it exits (a
/// slice lasts 60 s here, so only the stop can have settled it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_gives_its_budget_slice_back() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let prefix = format!("kp-e2e-{:016x}:", fastrand::u64(..));
    let yaml = sliced_config(&up, &prefix, 60000);
    let mut gw = Gateway::start(&yaml).await?;
    let budget = format!("{prefix}budget:gw:team:*");
    assert_eq!(
        call(&gw, "/llm/api/team/v1/chat/completions", None)
            .await?
            .0,
        200
    );
    assert_eq!(held_nanos(&budget).await?, 1_000_000_000);
    gw.terminate()?;
    assert!(gw.wait(Duration::from_secs(10)).await?.success());
    assert_eq!(held_nanos(&budget).await?, 0);
    Ok(())
}

/// What the budgets whose Redis keys match `pattern` hold, in nano-dollars.
async fn held_nanos(pattern: &str) -> anyhow::Result<u64> {
    let mut c = redis::Client::open("redis://127.0.0.1:6379/0")?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut c).await?;
    let mut held = 0;
    for k in keys {
        let h: Option<u64> = redis::cmd("HGET")
            .arg(k)
            .arg("held")
            .query_async(&mut c)
            .await?;
        held += h.unwrap_or(0);
    }
    Ok(held)
}

/// Each caller spends its own `caller_budget`; a key with its own budget is skipped once spent
/// (the next key serves), and with every key spent the answer is 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_and_key_budgets() -> anyhow::Result<()> {
    let capped = mock("capped", Behavior::default());
    let spare = mock("spare", Behavior::default());
    let yaml = config()
        .set("lb_policy", "order")
        .key(&capped, "capped", "budget: {usd: 2, period: total}")
        .key(&spare, "spare", "allow: [m]")
        .block(&format!(
            "{PRICING}\ngateways:\n  - {{name: shared, auth: {{secrets: [alice-secret, bob-secret]}}, caller_budget: {{usd: 3}}}}"
        ))
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let path = "/llm/api/shared/v1/chat/completions";
    let mut served = Vec::new();
    let mut alice = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = gw
            .http()
            .post(gw.url(path))
            .bearer_auth("alice-secret")
            .json(&hello("m"))
            .send()
            .await?;
        if resp.status() == 429 {
            let body: Value = resp.json().await?;
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.starts_with(
                    "Your credential on the gateway `shared` has reached its monthly budget of $3"
                ),
                "{body}"
            );
            break;
        }
        assert_eq!(resp.status(), 200);
        served.push(served_by(&resp));
        alice += 1;
        assert!(alice <= 4, "alice's $3 budget never ran out");
    }
    // $3 at $1 a call, each admitted while under: three calls (a fourth only if a settlement
    // were late)
    assert_eq!(alice, 3, "{served:?}");
    // the capped key served its $2, then the spare one took over
    assert_eq!(served, ["capped", "capped", "spare"]);
    let (bob, _, _) = call(&gw, path, Some("bob-secret")).await?;
    assert_eq!(bob, 200, "bob has his own budget");

    // with only the spent key able to serve: 429 insufficient_quota, not "no such model"
    let only = config()
        .key(&capped, "capped", "budget: {usd: 1, period: total}")
        .block(PRICING)
        .yaml();
    let gw = Gateway::start(&only).await?;
    assert_eq!(gw.chat("t", hello("m")).await?.status(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = gw.chat("t", hello("m")).await?;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    Ok(())
}

/// A failure with no output costs its budget nothing; what was spent survives a restart (the
/// budget restored from the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_failures_are_free_and_spend_survives_a_restart() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let broken = mock(
        "broken",
        Behavior {
            status: Some(500),
            ..Behavior::default()
        },
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("usage.sqlite").display().to_string();
    let yaml = config()
        .set("dbtype", "sqlite")
        .set("dbaddr", &format!("\"{db}\""))
        .set("retries", "0")
        .set("queue_timeout", "0")
        .key(&up, "up", "allow: [m]")
        .key(&broken, "broken", "allow: [broken-model]")
        .block("pricing: [{models: [m, broken-model], input: 100000, output: 100000}]\ncompletion_estimate: 5\nbudget: {usd: 2, period: total}")
        .yaml();
    let mut gw = Gateway::start(&yaml).await?;
    for _ in 0..5 {
        // the upstream's 500, or keypool's refusal while the key cools down: no output either way
        let resp = gw.chat("t", hello("broken-model")).await?;
        assert!(resp.status().as_u16() >= 429, "{}", resp.status());
    }
    // five failures later the $2 is untouched: two $1 calls pass
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(gw.chat("t", hello("m")).await?.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.chat("t", hello("m")).await?.status(), 429);
    gw.terminate()?;
    gw.wait(Duration::from_secs(10)).await?;
    let gw = Gateway::start(&yaml).await?;
    let resp = gw.chat("t", hello("m")).await?;
    assert_eq!(
        resp.status(),
        429,
        "the $2 spent before the restart still counts"
    );
    Ok(())
}

/// A price changed in the control plane's file (SIGHUP) reaches every frontend at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_override_reaches_every_frontend() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let db = keypool_e2e::PgDb::create()?;
    let yaml = |price: u32| {
        config()
            .set("dbtype", "postgres")
            .set("dbaddr", &format!("\"{}\"", db.url()))
            .key(&up, "up", "")
            .block(&format!(
                "pricing: [{{models: [m], input: {price}, output: {price}}}]\nadmin: {{token: spend-admin, secret_key: spend-seal}}"
            ))
            .yaml()
    };
    let cp = Gateway::start_control_plane(&yaml(100_000), "127.0.0.1:0").await?;
    let admin = cp.admin_url().await?;
    let mut frontends = Vec::new();
    for _ in 0..3 {
        frontends.push(Gateway::start_frontend(&admin, "spend-admin", &[]).await?);
    }
    let cost = |resp: &reqwest::Response| {
        resp.headers()
            .get("x-keypool-cost")
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    };
    for fe in &frontends {
        // 10 tokens at 10 cents each
        let resp = fe.chat("t", hello("m")).await?;
        assert_eq!(cost(&resp).as_deref(), Some("1"));
    }
    std::fs::write(cp.config_file(), yaml(200_000))?;
    cp.signal("HUP")?;
    for fe in &frontends {
        let mut seen = None;
        for _ in 0..50 {
            let resp = fe.chat("t", hello("m")).await?;
            seen = cost(&resp);
            if seen.as_deref() == Some("2") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            seen.as_deref(),
            Some("2"),
            "the new price on every frontend"
        );
    }
    Ok(())
}

/// `x-keypool-cost` of one call through `fe`, polled (up to 5 s) until it is `want`.
async fn cost_becomes(fe: &Gateway, want: &str) -> anyhow::Result<Option<String>> {
    let mut seen = None;
    for _ in 0..50 {
        let resp = fe.chat("t", hello("m")).await?;
        seen = resp
            .headers()
            .get("x-keypool-cost")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        if seen.as_deref() == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(seen)
}

/// `keypoolctl <args>` against `server` with the tests' admin token, from a blocking thread.
async fn ctl(server: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let (server, args): (String, Vec<String>) = (
        server.to_owned(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keypool_e2e::keypoolctl(&server, "spend-admin", &args)
    })
    .await?
}

/// Prices set through the admin API (`keypoolctl prices set`) win over the file's, reach every
/// frontend at once, are refused with the entry named when wrong, outlive the control plane
/// (another one on the same store has them), and clear back to the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_set_at_run_time_reach_every_frontend_and_stay() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let db = keypool_e2e::PgDb::create()?;
    let yaml = config()
        .set("dbtype", "postgres")
        .set("dbaddr", &format!("\"{}\"", db.url()))
        .key(&up, "up", "")
        .block("pricing: [{models: [m], input: 100000, output: 100000}]\nadmin: {token: spend-admin, secret_key: spend-seal}")
        .yaml();
    let cp = Gateway::start_control_plane(&yaml, "127.0.0.1:0").await?;
    let admin = cp.admin_url().await?;
    let frontends = [
        Gateway::start_frontend(&admin, "spend-admin", &[]).await?,
        Gateway::start_frontend(&admin, "spend-admin", &[]).await?,
    ];
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("prices.yaml");
    std::fs::write(
        &file,
        "pricing:\n  - {models: [m], input: 300000, output: 300000}\n",
    )?;
    let (ok, out, err) = ctl(
        &admin,
        &["prices", "set", "-f", &file.display().to_string()],
    )
    .await?;
    assert!(ok, "{out}{err}");
    for fe in &frontends {
        assert_eq!(cost_becomes(fe, "3").await?.as_deref(), Some("3"));
    }
    let (ok, out, err) = ctl(&admin, &["--json", "prices", "list"]).await?;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out)?;
    assert_eq!(listed["admin"][0]["input"], 300_000.0, "{listed}");
    assert_eq!(listed["file"][0]["input"], 100_000.0, "{listed}");
    assert!(listed["updated_at_ms"].as_i64() > Some(0), "{listed}");

    std::fs::write(&file, "[{models: [m], input: -1, output: 1}]")?;
    let (ok, _, err) = ctl(
        &admin,
        &["prices", "set", "-f", &file.display().to_string()],
    )
    .await?;
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("pricing[0]"),
        "{err}"
    );

    // a second control plane on the same store starts with them
    let other = Gateway::start_control_plane(&yaml, "127.0.0.1:0").await?;
    let (_, out, _) = ctl(&other.admin_url().await?, &["--json", "prices", "list"]).await?;
    assert_eq!(
        serde_json::from_str::<Value>(&out)?["admin"],
        listed["admin"]
    );

    let (ok, _, err) = ctl(&admin, &["prices", "clear"]).await?;
    assert!(ok, "{err}");
    for fe in &frontends {
        assert_eq!(cost_becomes(fe, "1").await?.as_deref(), Some("1"));
    }
    Ok(())
}

/// `GetUsage` (through `keypoolctl usage --json`) shows spend by caller and by day, the same
/// total as by gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_spend_by_caller_and_day() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let dir = tempfile::tempdir()?;
    let yaml = config()
        .set("authorization", "[t, u]")
        .set("dbtype", "sqlite")
        .set(
            "dbaddr",
            &format!("\"{}/usage.sqlite\"", dir.path().display()),
        )
        .key(&up, "up", "")
        .block(&format!("{PRICING}\nadmin: {{token: spend-admin}}"))
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    for token in ["t", "t", "u"] {
        assert_eq!(gw.chat(token, hello("m")).await?.status(), 200);
    }
    let admin = gw.admin_url().await?;
    let mut usage = Value::Null;
    for _ in 0..50 {
        let (ok, out, err) = ctl(&admin, &["--json", "usage"]).await?;
        assert!(ok, "{err}");
        usage = serde_json::from_str(&out)?;
        if usage["by_caller"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let callers = usage["by_caller"].as_array().cloned().unwrap_or_default();
    let spent: Vec<(&str, i64, &str)> = callers
        .iter()
        .map(|c| {
            let group = c["group"].as_str().unwrap_or_default();
            (
                group,
                c["calls"].as_i64().unwrap_or(0),
                c["cost_usd"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(spent.len(), 2, "{usage}");
    assert!(
        spent.iter().all(|(g, _, _)| g.starts_with("tok-")),
        "{usage}"
    );
    assert_eq!((spent[0].1, spent[0].2), (2, "2"), "{usage}");
    assert_eq!((spent[1].1, spent[1].2), (1, "1"), "{usage}");
    assert_eq!(usage["by_gateway"][0]["cost_usd"], "3", "{usage}");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(usage["by_day"][0]["group"], today.as_str(), "{usage}");
    assert_eq!(usage["by_day"][0]["cost_usd"], "3", "{usage}");
    let hourly = usage["calls_per_hour"]
        .as_array()
        .map_or(0, |h| h.iter().filter(|h| h["cost_usd"] == "3").count());
    assert_eq!(hourly, 1, "{usage}");
    Ok(())
}

/// Crossing 80% and 100% of a budget alerts once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_alerts_at_80_and_100_percent_once() -> anyhow::Result<()> {
    let hook = Receiver::start(true).await?;
    let up = mock("up", Behavior::default());
    let yaml = config()
        .key(&up, "up", "")
        .block(&format!(
            "{PRICING}\nbudget: {{usd: 5, period: week}}\nnotify: {{webhook: {{url: \"{}/hook\"}}}}",
            hook.url
        ))
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = gw.chat("t", hello("m")).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts: Vec<String> = hook
        .received()
        .iter()
        .filter(|r| r.body["cause"] == "budget")
        .map(|r| r.body["text"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(
        texts[0].contains("The gateway `default` has spent $4 of its weekly budget of $5 (80%)"),
        "{texts:?}"
    );
    assert!(texts[1].contains("(100%)"), "{texts:?}");
    Ok(())
}
