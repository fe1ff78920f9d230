//! The exact response cache (issue 23) over two real `keypool serve` replicas sharing Redis:
//! a miss on one replica is a hit on the other, plain and streamed (replayed byte for byte);
//! `refresh` and `no-store`; no entry crosses gateways; a hit spends no budget and is marked in
//! its usage event.

use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, config, hello, mock};
use serde_json::Value;

const GATEWAYS: &str = "gateways:
  - name: team
    auth: {secrets: [team-secret]}
    cache: {ttl: 300, backend: redis}
  - name: capped
    auth: {secrets: [capped-secret]}
    cache: {ttl: 300, backend: redis}
    budget: {usd: 0.000001, period: day}";

struct Call<'a> {
    gw: &'a Gateway,
    gateway: &'a str,
    body: Value,
    header: Option<&'a str>,
}

/// (status, `x-keypool-cache`, `x-keypool-cost` present, body)
async fn send(c: Call<'_>) -> anyhow::Result<(u16, String, bool, String)> {
    let mut req =
        c.gw.http()
            .post(c.gw.url(&format!("/llm/api/{}/v1/chat/completions", c.gateway)))
            .bearer_auth(format!("{}-secret", c.gateway))
            .json(&c.body);
    if let Some(h) = c.header {
        req = req.header("x-keypool-cache", h);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-keypool-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let cost = resp.headers().contains_key("x-keypool-cost");
    Ok((status, cache, cost, resp.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_are_shared_by_replicas_per_gateway_and_cost_nothing() -> anyhow::Result<()>
{
    let up = mock("up", Behavior::default());
    let dir = tempfile::tempdir()?;
    let prefix = format!("kp-e2e-{:016x}:", fastrand::u64(..));
    let redis = format!("redis: {{url: \"redis://127.0.0.1:6379/0\", prefix: \"{prefix}\"}}");
    let base = config().key(&up, "up", "").block(GATEWAYS).block(&redis);
    // the first replica keeps its usage events, to read back
    let with_store = base.clone().set("dbtype", "sqlite").set(
        "dbaddr",
        &format!("\"{}/usage.sqlite\"", dir.path().display()),
    );
    let r0 = Gateway::start(&with_store.yaml()).await?;
    let r1 = Gateway::start(&base.yaml()).await?;
    let call = |gw, gateway, body: &Value, header| Call {
        gw,
        gateway,
        body: body.clone(),
        header,
    };
    let plain = hello("gpt-4o-mini");
    let mut streamed = hello("gpt-4o-mini");
    streamed["stream"] = Value::Bool(true);
    // entries are written just after the answer
    let settle = || tokio::time::sleep(Duration::from_millis(300));

    let (s, cache, cost, first) = send(call(&r0, "team", &plain, None)).await?;
    assert_eq!((s, cache.as_str(), cost), (200, "miss", true));
    settle().await;
    let (s, cache, cost, again) = send(call(&r1, "team", &plain, None)).await?;
    assert_eq!((s, cache.as_str(), cost), (200, "hit", false));
    assert_eq!(again, first);
    assert_eq!(up.requests(), 1);
    // key order is not part of the request's identity
    let reordered: Value = serde_json::from_str(
        r#"{"messages": [{"content": "Hello there friend", "role": "user"}], "model": "gpt-4o-mini"}"#,
    )?;
    assert_eq!(send(call(&r0, "team", &reordered, None)).await?.1, "hit");
    // refresh: forwarded and kept; no-store: forwarded, not looked up
    assert_eq!(
        send(call(&r1, "team", &plain, Some("refresh"))).await?.1,
        "refresh"
    );
    assert_eq!(
        send(call(&r0, "team", &plain, Some("no-store"))).await?.1,
        "bypass"
    );
    assert_eq!(up.requests(), 3);

    // streamed: replayed as the client first received it
    let (s, cache, _, text) = send(call(&r0, "team", &streamed, None)).await?;
    assert_eq!((s, cache.as_str()), (200, "miss"));
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    settle().await;
    let (s, cache, _, replayed) = send(call(&r1, "team", &streamed, None)).await?;
    assert_eq!((s, cache.as_str()), (200, "hit"));
    assert_eq!(replayed, text);
    assert_eq!(up.requests(), 4);

    // another gateway never gets team's entry; its own hit costs nothing from its tiny budget
    let (s, cache, _, _) = send(call(&r1, "capped", &plain, None)).await?;
    assert_eq!((s, cache.as_str()), (200, "miss"));
    assert_eq!(up.requests(), 5);
    settle().await;
    let (s, cache, _, _) = send(call(&r0, "capped", &plain, None)).await?;
    assert_eq!(
        (s, cache.as_str()),
        (200, "hit"),
        "a spent budget does not stop a hit"
    );
    let mut other = plain.clone();
    other["messages"][0]["content"] = Value::from("Something new");
    let (s, _, _, body) = send(call(&r0, "capped", &other, None)).await?;
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("insufficient_quota"), "{body}");
    assert_eq!(up.requests(), 5);

    hits_are_recorded(&r1, dir.path()).await
}

/// The hits counted (r1 saw team's plain and streamed hits and the refresh) and in r0's usage
/// events: no key, no usage, no cost.
async fn hits_are_recorded(r1: &Gateway, dir: &std::path::Path) -> anyhow::Result<()> {
    let metrics = r1.metrics().await?;
    for (outcome, n) in [("hit", 2), ("refresh", 1)] {
        let line =
            format!("keypool_response_cache_total{{gateway=\"team\",outcome=\"{outcome}\"}} {n}");
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
    let url = format!("sqlite://{}/usage.sqlite?mode=rwc", dir.display());
    let events = keypool_e2e::stored_events(&url, 5).await?;
    let hits: Vec<_> = events.iter().filter(|e| e.cache_hit).collect();
    assert_eq!(hits.len(), 2, "{events:?}");
    for e in hits {
        assert_eq!(
            (e.status, e.key_name.as_deref(), e.total_tokens, e.cost_pico),
            (200, None, None, None)
        );
    }
    Ok(())
}

/// `backend: redis` without a `redis:` section works from each process's memory, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cache_without_redis_is_warned_about_and_still_caches() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(&config().key(&up, "up", "").block(GATEWAYS).yaml()).await?;
    gw.wait_log("cache backend is redis but no `redis:` is configured", 2)
        .await?;
    let call = |body: &Value| Call {
        gw: &gw,
        gateway: "team",
        body: body.clone(),
        header: None,
    };
    let plain = hello("gpt-4o-mini");
    assert_eq!(send(call(&plain)).await?.1, "miss");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(call(&plain)).await?.1, "hit");
    assert_eq!(up.requests(), 1);
    Ok(())
}
