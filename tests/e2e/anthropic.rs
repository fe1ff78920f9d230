//! Anthropic's Messages API through keypool: `type: anthropic` keys, `/v1/messages` and
//! `/v1/messages/count_tokens` on `/v1` and on named gateways, the client's key as `x-api-key`,
//! Anthropic-shaped errors, streams relayed event by event, failover past a 529, and usage with
//! cache tokens stored exactly. Driven by raw HTTP and by the official `anthropic` SDK.

#![allow(clippy::expect_used)]

use keypool_e2e::{Behavior, Gateway, MockServer, config, mock, run_python_check_with};
use serde_json::{Value, json};

const T: &str = "client-token-anthropic";

fn message(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
           "system": [{"type": "text", "text": "Be brief", "cache_control": {"type": "ephemeral"}}],
           "messages": [{"role": "user", "content": "Hello there friend"}]})
}

async fn post(
    gw: &Gateway,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> anyhow::Result<reqwest::Response> {
    let mut req = gw.http().post(gw.url(path)).json(body);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    Ok(req
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .send()
        .await?)
}

fn both(gpt: &MockServer, claude: &MockServer) -> String {
    config()
        .token(T)
        .key(gpt, "gpt", "")
        .key(claude, "claude", "type: anthropic")
        .yaml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_to_anthropic_keys_with_their_own_header() -> anyhow::Result<()> {
    let gpt = mock("gpt", Behavior::default());
    let claude = mock("claude", Behavior::default());
    let gw = Gateway::start(&both(&gpt, &claude)).await?;
    let body = message(false);
    let resp = post(&gw, "/v1/messages", &body, Some(T)).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-upstream"], "claude");
    let v: Value = resp.json().await?;
    assert_eq!(v["type"], "message");
    assert!(
        v["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("Hello from claude"))
    );
    assert_eq!(v["usage"]["cache_read_input_tokens"], 1024);
    assert_eq!((gpt.requests(), claude.requests()), (0, 1));
    let seen = claude.last_request().expect("recorded");
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some("sk-test-claude-0123456789"));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!(seen.header("authorization"), None);
    // the body is passed as it came: cache_control untouched, no re-serialisation
    assert_eq!(seen.body, serde_json::to_vec(&body)?);

    // a client's own anthropic-version is kept; Authorization: Bearer works too
    let resp = gw
        .http()
        .post(gw.url("/v1/messages/count_tokens"))
        .bearer_auth(T)
        .header("anthropic-version", "2023-01-01")
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await?["input_tokens"], 7);
    let seen = claude.last_request().expect("recorded");
    assert_eq!(seen.header("anthropic-version"), Some("2023-01-01"));

    // OpenAI's surface never reaches the Anthropic key
    let chat = gw
        .chat(
            T,
            json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await?;
    assert_eq!(chat.status(), 200);
    assert_eq!((gpt.requests(), claude.requests()), (1, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_on_the_messages_surface_are_anthropic_shaped() -> anyhow::Result<()> {
    let gpt = mock("gpt", Behavior::default());
    let claude = mock("claude", Behavior::default());
    let gw = Gateway::start(&both(&gpt, &claude)).await?;
    let resp = post(&gw, "/v1/messages", &message(false), None).await?;
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await?;
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let resp = post(&gw, "/v1/messages", &json!("not an object"), Some(T)).await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    assert_eq!(
        (status.as_u16(), v["type"].as_str()),
        (400, Some("error")),
        "{v}"
    );
    // OpenAI's surface keeps OpenAI's shape
    let resp = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await?["error"]["code"],
        "invalid_api_key"
    );

    // no Anthropic key at all: count_tokens (which does not translate) says so in its shape
    let only_gpt = Gateway::start(&config().token(T).key(&gpt, "gpt", "").yaml()).await?;
    let resp = post(
        &only_gpt,
        "/v1/messages/count_tokens",
        &message(false),
        Some(T),
    )
    .await?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await?;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (404, Some("not_found_error")),
        "{v}"
    );
    assert_eq!(gpt.requests(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_relayed_and_a_truncated_one_ends_with_an_error_event() -> anyhow::Result<()> {
    let claude = mock("claude", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .key(&claude, "claude", "type: anthropic")
            .yaml(),
    )
    .await?;
    let resp = post(&gw, "/v1/messages", &message(true), Some(T)).await?;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await?;
    assert!(text.starts_with("event: message_start\n"), "{text}");
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );

    claude.set(Behavior {
        name: "claude".into(),
        cut_after: Some(2),
        chunk_interval_ms: 20,
        ..Behavior::default()
    });
    let text = post(&gw, "/v1/messages", &message(true), Some(T))
        .await?
        .text()
        .await?;
    assert!(text.contains("\"text\":\" from\""), "{text}");
    assert!(!text.contains("message_stop"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
    assert!(last.starts_with("event: error\ndata: "), "{text}");
    let v: Value = serde_json::from_str(last.trim_start_matches("event: error\ndata: "))?;
    assert_eq!(v["type"], "error");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_529_fails_over_to_the_next_anthropic_key() -> anyhow::Result<()> {
    let busy = mock(
        "busy",
        Behavior {
            status: Some(529),
            ..Behavior::default()
        },
    );
    let ok = mock("ok", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&busy, "busy", "type: anthropic")
            .key(&ok, "ok", "type: anthropic")
            .yaml(),
    )
    .await?;
    let resp = post(&gw, "/v1/messages", &message(false), Some(T)).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-upstream"], "ok");
    assert_eq!((busy.requests(), ok.requests()), (1, 1));
    Ok(())
}

/// Cache tokens are parts of the prompt, counted once, and kept in their own columns and
/// metrics: Anthropic's reads and one-hour writes, plain and streamed, and OpenAI's
/// `cached_tokens`.
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom: requests, rows, rollups, metrics
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_cache_tokens_exactly_plain_and_streamed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let claude = mock("claude", Behavior::default());
    let gpt = mock("gpt", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("dbtype", "sqlite")
            .set(
                "dbaddr",
                &format!("\"{}/usage.sqlite\"", dir.path().display()),
            )
            .key(&claude, "claude", "type: anthropic")
            .key(&gpt, "gpt", "")
            .yaml(),
    )
    .await?;
    let plain = post(&gw, "/v1/messages", &message(false), Some(T)).await?;
    assert_eq!(plain.status(), 200);
    // at claude-sonnet-4-5's catalog prices: 7 x 3 + 1,024 read x 0.30 + 5 out x 15 per million
    assert_eq!(plain.headers()["x-keypool-cost"], "0.0004032");
    // the stream's system block is cached for an hour: 256 tokens written, 1,024 read
    let mut streamed = message(true);
    streamed["system"][0]["cache_control"]["ttl"] = json!("1h");
    let _ = post(&gw, "/v1/messages", &streamed, Some(T))
        .await?
        .text()
        .await?;
    let chat = json!({"model": "gpt-4o-mini", "prompt_cache_key": "conv-1", "messages": [
        {"role": "system", "content": "You are a careful assistant"},
        {"role": "user", "content": "Hello there"}]});
    assert_eq!(gw.chat(T, chat).await?.status(), 200);
    let url = format!("sqlite://{}/usage.sqlite?mode=rwc", dir.path().display());
    let mut events = keypool_e2e::stored_events(&url, 3).await?;
    events.sort_by_key(|e| e.id.clone());
    // input: "Be brief" 2 + message 3 + 2 = 7, plus 1,024 read (and 256 written) in the cache;
    // output 5 words. The chat: 5 + 2 and 2 + 2, the system message's 7 cached.
    let tokens: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.prompt_tokens,
                e.completion_tokens,
                e.total_tokens,
                e.cache_read_tokens,
                e.cache_write_tokens,
                e.cache_write_1h_tokens,
            )
        })
        .collect();
    let some = |v: [i64; 6]| v.map(Some).into();
    assert_eq!(
        tokens,
        vec![
            some([1031, 5, 1036, 1024, 0, 0]),
            some([1287, 5, 1292, 1024, 256, 256]),
            some([11, 5, 16, 7, 0, 0]),
        ]
    );
    // costs in pico-dollars: the stream adds 256 one-hour writes x 6; the chat is gpt-4o-mini's
    // 4 x 0.15 + 7 cached x 0.075 + 5 x 0.60
    let costs: Vec<_> = events.iter().map(|e| e.cost_pico).collect();
    assert_eq!(
        costs,
        [Some(403_200_000), Some(1_939_200_000), Some(4_125_000)]
    );
    let providers: Vec<_> = events.iter().map(|e| e.provider.as_deref()).collect();
    assert_eq!(
        providers,
        [Some("anthropic"), Some("anthropic"), Some("openai")]
    );
    let rollup = keypool_store::Store::connect_only(&url)
        .await?
        .usage_totals(0, i64::MAX, keypool_store::Grouping::Key, None)
        .await?;
    let claude_total = rollup
        .iter()
        .find(|t| t.group == "claude")
        .expect("rolled up");
    assert_eq!(
        (
            claude_total.prompt_tokens,
            claude_total.cache_read_tokens,
            claude_total.cache_write_tokens,
            claude_total.cache_write_1h_tokens
        ),
        (2318, 2048, 256, 256)
    );
    assert_eq!(claude_total.cost_pico, 2_342_400_000, "rolled up exactly");
    let metrics = gw.metrics().await?;
    for line in [
        "keypool_cache_read_tokens_total{gateway=\"default\",key=\"claude\",model=\"claude-sonnet-4-5\"} 2048",
        "keypool_cache_write_tokens_total{gateway=\"default\",key=\"claude\",model=\"claude-sonnet-4-5\"} 256",
        "keypool_cache_read_tokens_total{gateway=\"default\",key=\"gpt\",model=\"gpt-4o-mini\"} 7",
        "keypool_spend_usd_total{gateway=\"default\",key=\"claude\",model=\"claude-sonnet-4-5\"} 0.0023424",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    Ok(())
}

/// The official `anthropic` SDK, on `/v1` and on a named gateway with a rate limit, its first
/// call failing over from an overloaded key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_sdk_against_keypool() -> anyhow::Result<()> {
    // the first key is overloaded (529): the SDK's first call fails over from it unseen
    let overloaded = mock(
        "overloaded",
        Behavior {
            status: Some(529),
            ..Behavior::default()
        },
    );
    let claude = mock("claude", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&overloaded, "overloaded", "type: anthropic")
            .key(&claude, "claude", "type: anthropic")
            .block(
                "gateways:\n  - {name: team, auth: {method: exact, secrets: [team-secret]}, rate_limits: [\"ingress:7/minute\"]}",
            )
            .yaml(),
    )
    .await?;
    let root = gw.url("");
    let root = root.trim_end_matches('/').to_owned();
    let (ok, out) = run_python_check_with("anthropic_check.py", root.clone(), T, &[]).await?;
    anyhow::ensure!(ok, "anthropic_check.py on /v1 failed:\n{out}");
    let (ok, out) = run_python_check_with(
        "anthropic_check.py",
        format!("{root}/llm/api/team"),
        "team-secret",
        &[("KEYPOOL_LIMITED", "1")],
    )
    .await?;
    anyhow::ensure!(ok, "anthropic_check.py on a gateway failed:\n{out}");
    assert!(overloaded.requests() >= 1, "the overloaded key was tried");
    Ok(())
}

/// Anthropic's 429 (its `retry-after` and `anthropic-ratelimit-*-reset` times) cools the key
/// for that long; the next key serves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_cools_the_anthropic_key_until_its_reset() -> anyhow::Result<()> {
    let limited = mock(
        "limited",
        Behavior {
            status: Some(429),
            retry_after: Some("30".into()),
            ..Behavior::default()
        },
    );
    let ok = mock("ok", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&limited, "limited", "type: anthropic")
            .key(&ok, "ok", "type: anthropic")
            .yaml(),
    )
    .await?;
    for _ in 0..3 {
        let resp = post(&gw, "/v1/messages", &message(false), Some(T)).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-keypool-upstream"], "ok");
    }
    assert_eq!(limited.requests(), 1, "tried once, then cooling");
    let metrics = gw.metrics().await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("keypool_key_cooldown_seconds{key=\"limited\"}"))
        .expect("a cooldown gauge");
    let seconds: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
    assert!((20.0..=31.0).contains(&seconds), "{line}");
    Ok(())
}
