//! Metrics and alerts through the real binary: `/v1/metrics` after a mixed workload (checked by
//! `promtool`), webhook receivers for Feishu, Matrix and a generic hook, dedup, a dead webhook.

use std::time::{Duration, Instant};

use keypool_e2e::{Behavior, Gateway, Receiver, config, hello, json, mock, promtool};
use serde_json::json;

const T: &str = "client-token-abc";

/// The value of one sample (`name{labels} value`), matched by its exact series text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(gw: &Gateway, path: &str) -> anyhow::Result<String> {
    let resp = gw.http().get(gw.url(path)).send().await?;
    anyhow::ensure!(resp.status() == 200, "scrape: {}", resp.status());
    Ok(resp.text().await?)
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_mixed_workload_pass_promtool() -> anyhow::Result<()> {
    let broken = mock(
        "broken",
        Behavior {
            status: Some(429),
            retry_after: Some("60".into()),
            ..Behavior::default()
        },
    );
    let good = mock("good", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&broken, "broken", "")
            .key(&good, "good", "rpm: 100")
            .block("gateways:\n  - name: team\n    rate_limits: [\"ingress:1/minute\"]\n")
            .yaml(),
    )
    .await?;
    // the first call fails over from broken (429, Retry-After: 60) to good; broken cools down
    for _ in 0..3 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    // a stream, straight to good
    let mut req = hello("gpt-4o-mini");
    req["stream"] = json!(true);
    let resp = gw.chat(T, req).await?;
    assert!(resp.text().await?.contains("[DONE]"));
    // a client error (passed through), a bad token, a gateway limit refusal
    let mut bad = hello("gpt-4o-mini");
    bad["temperature"] = json!(5);
    assert_eq!(gw.chat(T, bad).await?.status(), 400);
    assert_eq!(gw.chat("wrong", hello("gpt-4o-mini")).await?.status(), 401);
    let team = gw.url("/llm/api/team/v1/chat/completions");
    assert_eq!(
        gw.http()
            .post(&team)
            .json(&hello("gpt-4o-mini"))
            .send()
            .await?
            .status(),
        200
    );
    assert_eq!(
        gw.http()
            .post(&team)
            .json(&hello("gpt-4o-mini"))
            .send()
            .await?
            .status(),
        429
    );

    // attempt metrics are counted by the key actors as attempts settle: give them a moment
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(&gw, "/v1/metrics").await?;
        if sample(
            &text,
            r#"keypool_upstream_attempts_total{key="good",outcome="client_error",provider="openai"}"#,
        ) == Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    };
    expect(
        r#"keypool_requests_total{gateway="default",key="good",model="gpt-4o-mini",status_class="2xx"}"#,
        4.0,
    );
    expect(
        r#"keypool_requests_total{gateway="default",key="good",model="gpt-4o-mini",status_class="4xx"}"#,
        1.0,
    );
    expect(
        r#"keypool_requests_total{gateway="team",key="good",model="gpt-4o-mini",status_class="2xx"}"#,
        1.0,
    );
    expect(r#"keypool_failovers_total{reason="rate_limited"}"#, 1.0);
    expect(
        r#"keypool_upstream_attempts_total{key="broken",outcome="rate_limited",provider="openai"}"#,
        1.0,
    );
    expect(
        r#"keypool_rate_limited_total{reason="upstream_429",source="upstream"}"#,
        1.0,
    );
    expect(
        r#"keypool_upstream_attempts_total{key="good",outcome="success",provider="openai"}"#,
        5.0,
    );
    // 5 calls answered with usage: 5 prompt + 5 completion tokens each
    expect(
        r#"keypool_prompt_tokens_total{gateway="default",key="good",model="gpt-4o-mini"}"#,
        20.0,
    );
    expect(
        r#"keypool_completion_tokens_total{gateway="default",key="good",model="gpt-4o-mini"}"#,
        20.0,
    );
    expect(
        r#"keypool_refusals_total{code="invalid_api_key",gateway="default"}"#,
        1.0,
    );
    expect(
        r#"keypool_refusals_total{code="rate_limit_exceeded",gateway="team"}"#,
        1.0,
    );
    expect(
        r#"keypool_rate_limited_total{reason="rate_limit",source="policy"}"#,
        1.0,
    );
    expect(r#"keypool_key_healthy{key="good"}"#, 1.0);
    expect(r#"keypool_key_healthy{key="broken"}"#, 0.0);
    expect(r#"keypool_key_rpm_limit{key="good"}"#, 100.0);
    expect(r#"keypool_key_window_requests{key="good"}"#, 6.0);
    // refusals before the engine (the bad token) are not requests of a gateway's latency
    expect(
        r#"keypool_request_duration_seconds_count{gateway="default"}"#,
        5.0,
    );
    expect(r#"keypool_upstream_ttfb_seconds_count{key="broken"}"#, 1.0);
    // the 4 non-stream answered calls of the default gateway and the gateway's one
    expect("keypool_overhead_seconds_count", 5.0);
    assert!(
        sample(&text, r#"keypool_key_cooldown_seconds{key="broken"}"#).is_some_and(|v| v > 0.0)
    );
    assert!(
        !text.contains(T) && !text.contains("sk-test-"),
        "no secrets in metrics"
    );
    // the same registry at /metrics
    assert!(
        scrape(&gw, "/metrics")
            .await?
            .contains("keypool_requests_total")
    );

    // promtool's linter accepts the exposition
    let promtool = tokio::task::spawn_blocking(promtool).await??;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_token() -> anyhow::Result<()> {
    let good = mock("good", Behavior::default());
    let gw = Gateway::start(
        &config()
            .key(&good, "good", "")
            .block("telemetry: {metrics_token: scrape-secret}")
            .yaml(),
    )
    .await?;
    let resp = gw.http().get(gw.url("/metrics")).send().await?;
    assert_eq!(resp.status(), 401);
    let resp = gw
        .http()
        .get(gw.url("/v1/metrics"))
        .bearer_auth("scrape-secret")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    Ok(())
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_feishu_matrix_and_a_webhook_once_per_cause() -> anyhow::Result<()> {
    let feishu = Receiver::start(true).await?;
    let matrix = Receiver::start(true).await?;
    let hook = Receiver::start(true).await?;
    let rejected = mock(
        "rejected",
        Behavior {
            require_key: Some("some-other-key".into()),
            ..Behavior::default()
        },
    );
    let good = mock("good", Behavior::default());
    let notify = format!(
        r#"notify:
  feishu: {{webhook: "{}/open-apis/bot/v2/hook/abc", secret: feishu-sign-secret}}
  matrix: {{homeserver: "{}", access_token: matrix-access-token, room_id: "!ops:example.org"}}
  webhook: {{url: "{}/hook"}}
  dedup_seconds: 2"#,
        feishu.url, matrix.url, hook.url
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .key(&rejected, "rejected", "allow: [bad-model]")
            .key(&good, "good", "allow: [gpt-4o-mini]")
            .block(&notify)
            .yaml(),
    )
    .await?;
    // client errors and successes alert nobody
    let mut bad = hello("gpt-4o-mini");
    bad["temperature"] = json!(5);
    assert_eq!(gw.chat(T, bad).await?.status(), 400);
    assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    // 100 failures for bad-model: the first disables the key (401), the rest find it disabled
    // (a call racing the key actor's settlement may still try the key and get its 401)
    let started = Instant::now();
    let mut last = 0;
    for i in 0..100 {
        last = gw.chat(T, hello("bad-model")).await?.status().as_u16();
        assert!(last == 503 || (last == 401 && i < 5), "call {i}: {last}");
    }
    assert_eq!(last, 503);
    assert!(started.elapsed() < Duration::from_secs(10));
    // within the dedup window: one "key disabled" and one "all upstreams failed" per channel
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in [&feishu, &matrix, &hook] {
        assert_eq!(r.received().len(), 2, "{:?}", r.received());
    }
    // the two causes are raised on different threads: either may arrive first
    let hooks = hook.received();
    let disabled = hooks
        .iter()
        .find(|h| h.body["cause"] == "key_disabled")
        .unwrap();
    assert_eq!(disabled.body["subject"], "rejected");
    assert!(
        hooks
            .iter()
            .any(|h| h.body["cause"] == "all_upstreams_failed")
    );
    // after the window: one summary with the suppressed count
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hooks = hook.received();
    assert_eq!(hooks.len(), 3, "{hooks:?}");
    assert_eq!(hooks[2].body["cause"], "all_upstreams_failed");
    assert_eq!(hooks[2].body["repeats"], 99);
    assert!(
        hooks[2].body["text"]
            .as_str()
            .unwrap()
            .contains("repeated 99 more times")
    );

    // Feishu: a signed text message
    let all = feishu.received();
    let f = all
        .iter()
        .find(|f| {
            f.body["content"]["text"]
                .as_str()
                .unwrap()
                .contains("disabled")
        })
        .unwrap();
    assert_eq!(
        (f.method.as_str(), f.path.as_str()),
        ("POST", "/open-apis/bot/v2/hook/abc")
    );
    assert_eq!(f.body["msg_type"], "text");
    assert!(
        f.body["content"]["text"]
            .as_str()
            .unwrap()
            .contains("key rejected disabled")
    );
    let ts: u64 = f.body["timestamp"].as_str().unwrap().parse()?;
    assert_eq!(
        f.body["sign"].as_str().unwrap(),
        keypool_telemetry::notify::feishu_sign(ts, "feishu-sign-secret")
    );
    // Matrix: PUT m.room.message with the access token
    let all = matrix.received();
    let m = all
        .iter()
        .find(|m| {
            m.body["body"]
                .as_str()
                .unwrap()
                .contains("all upstreams failed")
        })
        .unwrap();
    assert_eq!(m.method, "PUT");
    assert!(
        m.path
            .starts_with("/_matrix/client/v3/rooms/%21ops%3Aexample.org/send/m.room.message/"),
        "{}",
        m.path
    );
    let auth = m
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.as_str());
    assert_eq!(auth, Some("Bearer matrix-access-token"));
    assert_eq!(m.body["msgtype"], "m.text");
    assert!(
        m.body["body"]
            .as_str()
            .unwrap()
            .contains("all upstreams failed for model bad-model")
    );
    // no secret in any message
    for r in feishu
        .received()
        .iter()
        .chain(&matrix.received())
        .chain(&hook.received())
    {
        let s = r.body.to_string();
        assert!(!s.contains("sk-test-") && !s.contains(T) && !s.contains("feishu-sign-secret"));
    }
    let metrics = scrape(&gw, "/metrics").await?;
    assert_eq!(
        sample(
            &metrics,
            r#"keypool_alerts_total{channel="webhook",result="sent"}"#
        ),
        Some(3.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_never_slows_requests() -> anyhow::Result<()> {
    let dead = Receiver::start(false).await?;
    let broken = mock(
        "broken",
        Behavior {
            status: Some(502),
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("queue_timeout", "0.05")
            .key(&broken, "broken", "")
            .block(&format!(
                "notify:\n  webhook: {{url: \"{}/hook\"}}\n  dedup_seconds: 0.01",
                dead.url
            ))
            .yaml(),
    )
    .await?;
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let t = Instant::now();
        let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
        assert!(matches!(resp.status().as_u16(), 502 | 429));
        let _ = json(resp).await;
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "slowest request {slowest:?}"
    );
    Ok(())
}
