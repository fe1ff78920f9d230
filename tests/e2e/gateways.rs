//! Named gateways (`/llm/api/{name}/v1/*`) through the real binary: every refusal code, the
//! order of checks, credentials removed before forwarding, rate-limit headers, quotas settled
//! after streams, transforms as the upstream sees them, and the `openai` Python SDK.

use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, config, hello, json, mock, run_python_check};
use serde_json::{Value, json};

const GATEWAYS: &str = r#"
gateways:
  - name: team
    auth: {method: exact, secrets: [team-secret]}
    models: [gpt-4o-mini, deepseek]
    rate_limits: ["secret:3/minute"]
    prompt_template: "Answer briefly: {{query}}"
    param_map: {model: [deepseek, gpt-4o-mini]}
    param_fixed: {temperature: 0.2, metadata.tenant: team}
  - name: off
    active: false
    auth: {method: exact, secrets: [s]}
  - name: old
    expires_at: "2020-01-01T00:00:00Z"
    auth: {method: exact, secrets: [s]}
  - name: byarg
    auth: {method: regex, position: "arg:token", pattern: "ok-.+"}
  - name: bybody
    auth: {method: exact, position: "body:user_id", secrets: [u-1]}
  - name: byheader
    auth: {method: exact, position: "header:X-Team-Key", secrets: [h-1]}
  - name: blocked
    blacklist: ["ip:127.0.0.0/8"]
  - name: vip
    whitelist: ["ip:10.0.0.0/8", "secret:^vip-"]
    blacklist: ["secret:^vip-banned"]
    auth: {method: regex, pattern: "(vip|std)-.+"}
  - name: ingress
    rate_limits: ["ingress:2/minute", "ingress:100/day"]
  - name: quota
    token_quota: 15
"#;

async fn post(
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> anyhow::Result<reqwest::Response> {
    let mut req = gw.http().post(gw.url(path)).json(&body);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    Ok(req.send().await?)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn code(resp: reqwest::Response) -> anyhow::Result<(u16, String, String)> {
    let status = resp.status().as_u16();
    let body = json(resp).await?;
    Ok((
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
        body["error"]["message"].as_str().unwrap_or("").to_owned(),
    ))
}

const CHAT: &str = "/v1/chat/completions";

fn at(gateway: &str) -> String {
    format!("/llm/api/{gateway}{CHAT}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_refuses_with_its_own_code_in_order() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token("default-token")
            .key(&up, "up", "keep_header: true")
            .block(GATEWAYS)
            .yaml(),
    )
    .await?;
    let team = bearer("team-secret");
    let auth = [("authorization", team.as_str())];

    // unknown gateway
    let (s, c, _) = code(post(&gw, &at("nope"), &auth, hello("gpt-4o-mini")).await?).await?;
    assert_eq!((s, c.as_str()), (404, "gateway_not_found"));
    // inactive, and expired even to a bad credential (expiry is checked before auth)
    let (s, c, _) = code(post(&gw, &at("off"), &[], hello("gpt-4o-mini")).await?).await?;
    assert_eq!((s, c.as_str()), (403, "gateway_inactive"));
    let bad = [("authorization", "Bearer wrong")];
    let (s, c, m) = code(post(&gw, &at("old"), &bad, hello("gpt-4o-mini")).await?).await?;
    assert_eq!((s, c.as_str()), (403, "gateway_expired"));
    assert!(m.contains("该网关已过有效期"), "{m}");
    // bad and missing credentials
    let (s, c, _) = code(post(&gw, &at("team"), &bad, hello("gpt-4o-mini")).await?).await?;
    assert_eq!((s, c.as_str()), (401, "invalid_api_key"));
    let (s, _, _) = code(post(&gw, &at("team"), &[], hello("gpt-4o-mini")).await?).await?;
    assert_eq!(s, 401);
    // the default gateway's token is not a gateway credential, and vice versa
    let d = [("authorization", "Bearer default-token")];
    assert_eq!(
        post(&gw, &at("team"), &d, hello("gpt-4o-mini"))
            .await?
            .status(),
        401
    );
    assert_eq!(
        post(&gw, CHAT, &auth, hello("gpt-4o-mini")).await?.status(),
        401
    );
    // lists: the test client is 127.0.0.1
    let (s, c, _) = code(post(&gw, &at("blocked"), &[], hello("gpt-4o-mini")).await?).await?;
    assert_eq!((s, c.as_str()), (403, "access_denied"));
    let std = [("authorization", "Bearer std-1")];
    let (s, c, _) = code(post(&gw, &at("vip"), &std, hello("gpt-4o-mini")).await?).await?;
    assert_eq!((s, c.as_str()), (403, "access_denied"));
    let vip = [("authorization", "Bearer vip-banned-1")];
    assert_eq!(
        post(&gw, &at("vip"), &vip, hello("gpt-4o-mini"))
            .await?
            .status(),
        200,
        "a whitelist match wins over the blacklist"
    );
    // a model the gateway does not serve; a refused call still counts against the limit
    let (s, c, _) = code(post(&gw, &at("team"), &auth, hello("gpt-4o")).await?).await?;
    assert_eq!((s, c.as_str()), (404, "model_not_found"));
    assert_eq!(up.requests(), 1);

    // team's limit is secret:3/minute; one call used above (the model refusal came after it)
    let ok = post(&gw, &at("team"), &auth, hello("gpt-4o-mini")).await?;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "1");
    assert!(ok.headers().contains_key("x-ratelimit-reset-requests"));
    assert_eq!(
        post(&gw, &at("team"), &auth, hello("gpt-4o-mini"))
            .await?
            .status(),
        200
    );
    let refused = post(&gw, &at("team"), &auth, hello("gpt-4o-mini")).await?;
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let retry: u64 = refused.headers()["retry-after"].to_str()?.parse()?;
    assert!((55..=60).contains(&retry), "{retry}");
    let (s, c, m) = code(refused).await?;
    assert_eq!((s, c.as_str()), (429, "rate_limit_exceeded"));
    assert!(m.contains("secret:3/minute"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_travel_upstream() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(
        &config()
            .key(&up, "up", "keep_header: true")
            .block(GATEWAYS)
            .yaml(),
    )
    .await?;
    // arg: removed from the query, other parameters kept
    let resp = post(
        &gw,
        &format!("{}?token=ok-123&keep=1", at("byarg")),
        &[],
        hello("gpt-4o-mini"),
    )
    .await?;
    assert_eq!(resp.status(), 200);
    let seen = up.last_request().unwrap();
    assert_eq!(seen.query, "keep=1");
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-test-up-0123456789")
    );
    let bad = post(
        &gw,
        &format!("{}?token=no", at("byarg")),
        &[],
        hello("gpt-4o-mini"),
    )
    .await?;
    assert_eq!(bad.status(), 401);

    // body: removed from the forwarded body
    let mut body = hello("gpt-4o-mini");
    body["user_id"] = json!("u-1");
    assert_eq!(post(&gw, &at("bybody"), &[], body).await?.status(), 200);
    let sent: Value = serde_json::from_slice(&up.last_request().unwrap().body)?;
    assert!(sent.get("user_id").is_none(), "{sent}");
    assert_eq!(sent["messages"], hello("gpt-4o-mini")["messages"]);

    // a header: not forwarded even to a keep_header key
    let resp = post(
        &gw,
        &at("byheader"),
        &[("x-team-key", "h-1"), ("x-other", "kept")],
        hello("gpt-4o-mini"),
    )
    .await?;
    assert_eq!(resp.status(), 200);
    let seen = up.last_request().unwrap();
    assert_eq!(seen.header("x-team-key"), None);
    assert_eq!(seen.header("x-other"), Some("kept"));
    assert!(!gw.logs().contains("h-1") && !gw.logs().contains("ok-123"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_reach_the_upstream_and_usage_stays_exact() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(&config().key(&up, "up", "").block(GATEWAYS).yaml()).await?;
    let auth = [("authorization", "Bearer team-secret")];
    let mut req = hello("deepseek");
    req["stream"] = json!(true);
    let resp = post(&gw, &at("team"), &auth, req).await?;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await?;
    assert!(text.contains("data: [DONE]"));
    assert!(
        !text.contains("\"usage\":{"),
        "the usage chunk keypool asked for is stripped"
    );
    let sent: Value = serde_json::from_slice(&up.last_request().unwrap().body)?;
    assert_eq!(sent["model"], "gpt-4o-mini", "param_map");
    assert_eq!(sent["temperature"], 0.2, "param_fixed");
    assert_eq!(sent["metadata"]["tenant"], "team", "nested param_fixed");
    assert_eq!(
        sent["messages"][0]["content"],
        "Answer briefly: Hello there friend"
    );
    assert_eq!(sent["stream_options"]["include_usage"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_limits_count_everyone_and_quota_settles_after_streams() -> anyhow::Result<()> {
    let up = mock(
        "up",
        Behavior {
            chunk_interval_ms: 100,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(&config().key(&up, "up", "").block(GATEWAYS).yaml()).await?;
    for _ in 0..2 {
        assert_eq!(
            post(&gw, &at("ingress"), &[], hello("m")).await?.status(),
            200
        );
    }
    let (s, c, m) = code(post(&gw, &at("ingress"), &[], hello("m")).await?).await?;
    assert_eq!((s, c.as_str()), (429, "rate_limit_exceeded"));
    assert!(m.contains("ingress:2/minute"), "{m}");

    // quota 15; each streamed call uses 10 tokens (5 prompt + 5 completion). Two streams start
    // while the quota is not reached; both finish (never cut), both are settled.
    let mut req = hello("m");
    req["stream"] = json!(true);
    let quota = at("quota");
    let (first, second) = tokio::join!(post(&gw, &quota, &[], req.clone()), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        post(&gw, &quota, &[], req.clone()).await
    });
    let (first, second) = (first?, second?);
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let (one, two) = (first.text().await?, second.text().await?);
    assert!(one.contains("[DONE]") && two.contains("[DONE]"));
    let (s, c, _) = code(post(&gw, &at("quota"), &[], hello("m")).await?).await?;
    assert_eq!((s, c.as_str()), (429, "insufficient_quota"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_through_a_gateway() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(&config().key(&up, "up", "").block(GATEWAYS).yaml()).await?;
    let (ok, stdout) = run_python_check(
        "gateway_check.py",
        gw.url("/llm/api/team/v1"),
        "team-secret",
    )
    .await?;
    assert!(ok, "SDK checks failed:\n{stdout}");
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_and_quota_survive_a_restart() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("usage.sqlite").display().to_string();
    let yaml = config()
        .set("dbtype", "sqlite")
        .set("dbaddr", &format!("\"{db}\""))
        .key(&up, "up", "")
        .block(GATEWAYS)
        .yaml();
    let mut gw = Gateway::start(&yaml).await?;
    let auth = [("authorization", "Bearer team-secret")];
    for _ in 0..2 {
        assert_eq!(
            post(&gw, &at("team"), &auth, hello("gpt-4o-mini"))
                .await?
                .status(),
            200
        );
    }
    assert_eq!(
        post(&gw, &at("quota"), &[], hello("m")).await?.status(),
        200
    );
    // the monitoring view needs the gateway's credential
    let denied = gw.http().get(gw.url("/llm/api/team/usage")).send().await?;
    assert_eq!(denied.status(), 401);
    // calls per hour come from the rollups, written within about a second
    let mut seen = Value::Null;
    for _ in 0..50 {
        let resp = gw
            .http()
            .get(gw.url("/llm/api/team/usage"))
            .header("authorization", "Bearer team-secret")
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        seen = json(resp).await?;
        let calls = total_calls(&seen);
        if calls == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // each call: 5 prompt tokens + 2 template words + 5 completion tokens
    assert_eq!(seen["tokens_used"], 24, "{seen}");
    assert_eq!(
        seen["calls_per_hour"].as_array().map(Vec::len),
        Some(24),
        "{seen}"
    );
    let calls = total_calls(&seen);
    assert_eq!(calls, 2, "{seen}");

    // after a restart the quota gateway still knows its 10 tokens (quota 15): one more call
    // passes, the next is refused
    gw.terminate()?;
    gw.wait(Duration::from_secs(10)).await?;
    let gw = Gateway::start(&yaml).await?;
    assert_eq!(
        post(&gw, &at("quota"), &[], hello("m")).await?.status(),
        200
    );
    let (s, c, _) = code(post(&gw, &at("quota"), &[], hello("m")).await?).await?;
    assert_eq!((s, c.as_str()), (429, "insufficient_quota"));
    Ok(())
}

fn total_calls(usage: &Value) -> i64 {
    usage["calls_per_hour"].as_array().map_or(0, |h| {
        h.iter().map(|x| x["calls"].as_i64().unwrap_or(0)).sum()
    })
}
