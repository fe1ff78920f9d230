//! Chat completions ↔ Messages translation: a model only Anthropic keys serve answers
//! `/v1/chat/completions`, a model only OpenAI keys serve answers `/v1/messages`, whole and
//! streamed, with exact usage; a model both serve goes to the native kind; what does not
//! translate is a 400 in the client's shape. Driven by raw HTTP and by both official SDKs.

#![allow(clippy::expect_used)]

use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, MockServer, config, json, mock, run_python_check_with};
use serde_json::{Value, json as j};

const T: &str = "client-token-translate";

/// An OpenAI key for `gpt-*` and an Anthropic key for `claude-*`.
async fn both(gpt: &MockServer, claude: &MockServer, extra: &str) -> anyhow::Result<Gateway> {
    Gateway::start(
        &config()
            .token(T)
            .set("dbtype", extra)
            .key(gpt, "gpt", "allow: ['gpt-*']")
            .key(claude, "claude", "type: anthropic, allow: ['claude-*']")
            .yaml(),
    )
    .await
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
    Ok(gw
        .http()
        .post(gw.url(path))
        .header("x-api-key", T)
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_for_a_claude_model_is_answered_by_the_anthropic_key() -> anyhow::Result<()> {
    let (gpt, claude) = (
        mock("gpt", Behavior::default()),
        mock("claude", Behavior::default()),
    );
    let gw = both(&gpt, &claude, "none").await?;
    let chat = j!({"model": "claude-sonnet-4-5", "temperature": 1.5, "stop": "END",
        "messages": [{"role": "system", "content": "Be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "Hello there"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]});
    let resp = post(&gw, "/v1/chat/completions", &chat).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-upstream"], "claude");
    let body = json(resp).await?;
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("Hello from claude"))
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    let sent: Value = serde_json::from_slice(&claude.last_request().expect("sent").body)?;
    assert_eq!(sent["system"], "Be brief");
    assert_eq!(sent["max_tokens"], 4096);
    assert_eq!(sent["temperature"], 1.0, "clamped to Anthropic's range");
    assert_eq!(sent["stop_sequences"], j!(["END"]));
    assert_eq!(
        sent["messages"][0]["content"][1]["source"],
        j!({"type": "base64", "media_type": "image/png", "data": "iVBO"})
    );
    assert_eq!(gpt.requests(), 0);

    // streamed: chunks, the usage chunk keypool asked for stripped, [DONE]
    let mut streamed = chat.clone();
    streamed["stream"] = j!(true);
    let text = post(&gw, "/v1/chat/completions", &streamed)
        .await?
        .text()
        .await?;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"object\":\"chat.completion.chunk\""));
    assert!(!text.contains("\"usage\""), "not asked for: {text}");

    // what does not translate: a 400 in OpenAI's shape, naming the field
    let mut two = chat.clone();
    two["n"] = j!(2);
    let resp = post(&gw, "/v1/chat/completions", &two).await?;
    assert_eq!(resp.status(), 400);
    let err = json(resp).await?;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("`n`"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_a_gpt_model_are_answered_by_the_openai_key() -> anyhow::Result<()> {
    let (gpt, claude) = (
        mock("gpt", Behavior::default()),
        mock("claude", Behavior::default()),
    );
    let gw = both(&gpt, &claude, "none").await?;
    let msg = j!({"model": "gpt-4o-mini", "max_tokens": 64, "system": "Be brief",
        "messages": [{"role": "user", "content": "Hello there friend"}]});
    let resp = post(&gw, "/v1/messages", &msg).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-upstream"], "gpt");
    let body = json(resp).await?;
    assert_eq!(body["type"], "message");
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(
        (
            body["usage"]["input_tokens"].as_u64(),
            body["usage"]["output_tokens"].as_u64()
        ),
        (Some(9), Some(5))
    );
    let seen = gpt.last_request().expect("sent");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-test-gpt-0123456789")
    );
    let sent: Value = serde_json::from_slice(&seen.body)?;
    assert_eq!(
        sent["messages"][0],
        j!({"role": "system", "content": "Be brief"})
    );

    let mut streamed = msg.clone();
    streamed["stream"] = j!(true);
    let text = post(&gw, "/v1/messages", &streamed).await?.text().await?;
    assert!(text.starts_with("event: message_start\n"), "{text}");
    assert!(text.contains("event: content_block_delta\n"));
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
    assert!(text.contains("\"output_tokens\":5"), "{text}");

    // a Messages field with no chat counterpart: a 400 in Anthropic's shape
    let mut thinking = msg.clone();
    thinking["thinking"] = j!({"type": "enabled", "budget_tokens": 1024});
    let resp = post(&gw, "/v1/messages", &thinking).await?;
    assert_eq!(resp.status(), 400);
    let err = json(resp).await?;
    assert_eq!(err["type"], "error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("`thinking`"),
        "{err}"
    );
    // count_tokens does not translate: no key serves it
    let resp = post(&gw, "/v1/messages/count_tokens", &msg).await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(claude.requests(), 0);
    Ok(())
}

/// A model both kinds serve goes to the kind that speaks the request's API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_both_serve_prefers_the_native_surface() -> anyhow::Result<()> {
    let (gpt, claude) = (
        mock("gpt", Behavior::default()),
        mock("claude", Behavior::default()),
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .key(&gpt, "gpt", "")
            .key(&claude, "claude", "type: anthropic")
            .yaml(),
    )
    .await?;
    for _ in 0..3 {
        let chat =
            j!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]});
        let resp = post(&gw, "/v1/chat/completions", &chat).await?;
        assert_eq!(resp.headers()["x-keypool-upstream"], "gpt");
        let msg = j!({"model": "gpt-4o-mini", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]});
        let resp = post(&gw, "/v1/messages", &msg).await?;
        assert_eq!(resp.headers()["x-keypool-upstream"], "claude");
    }
    Ok(())
}

/// Both official SDKs, each asking for the other provider's model: plain, streamed, tools;
/// the usage stored exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sdks_through_translation_with_exact_usage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (gpt, claude) = (
        mock("gpt", Behavior::default()),
        mock("claude", Behavior::default()),
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("dbtype", "sqlite")
            .set(
                "dbaddr",
                &format!("\"{}/usage.sqlite\"", dir.path().display()),
            )
            .key(&gpt, "gpt", "allow: ['gpt-*']")
            .key(&claude, "claude", "type: anthropic, allow: ['claude-*']")
            .yaml(),
    )
    .await?;
    let root = gw.url("");
    let (ok, out) = run_python_check_with(
        "translate_check.py",
        root.trim_end_matches('/').to_owned(),
        T,
        &[],
    )
    .await?;
    assert!(ok && out.contains("ok"), "{out}");
    let url = format!("sqlite://{}/usage.sqlite?mode=rwc", dir.path().display());
    let events = keypool_e2e::stored_events(&url, 6).await?;
    let mut seen: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.key_name.clone().unwrap_or_default(),
                e.stream,
                e.prompt_tokens,
                e.completion_tokens,
            )
        })
        .collect();
    seen.sort();
    let row = |k: &str, s, p, c| (k.to_owned(), s, Some(p), Some(c));
    assert_eq!(
        seen,
        vec![
            row("claude", false, 5, 5),
            row("claude", false, 7, 5),
            row("claude", true, 5, 5),
            row("gpt", false, 5, 5),
            row("gpt", false, 9, 5),
            row("gpt", true, 5, 5),
        ]
    );
    Ok(())
}
