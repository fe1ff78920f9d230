//! Azure OpenAI keys (`type: azure`) in the pool: a model goes to its deployment's URL with
//! `api-version` and the `api-key` header, OpenAI's wire format both ways, streams with exact
//! usage, Azure's 429 cooling the key down, and failover between Azure and OpenAI keys.

#![allow(clippy::expect_used)]

use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, config, hello, json, mock};

const T: &str = "client-token-azure";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_goes_to_its_deployment_with_the_api_key_header() -> anyhow::Result<()> {
    let az = mock(
        "az",
        Behavior {
            require_key: Some("azure-key-az-0123456789".into()),
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .azure_key(
                &az,
                "az",
                "api_version: 2025-01-01-preview, deployments: {gpt-4o: prod-4o, gpt-4o-mini: mini-eu}",
            )
            .yaml(),
    )
    .await?;
    let resp = gw.chat(T, hello("gpt-4o")).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-upstream"], "az");
    let body = json(resp).await?;
    assert!(body["choices"][0]["message"]["content"].is_string());
    let seen = az.last_request().expect("recorded");
    assert_eq!(seen.path, "/openai/deployments/prod-4o/chat/completions");
    assert_eq!(seen.query, "api-version=2025-01-01-preview");
    assert_eq!(seen.header("api-key"), Some("azure-key-az-0123456789"));
    assert_eq!(
        seen.header("authorization"),
        None,
        "the client's token stays"
    );
    // the body is the client's, model included
    let sent: serde_json::Value = serde_json::from_slice(&seen.body)?;
    assert_eq!(sent["model"], "gpt-4o");

    // a stream, its usage exact
    let req = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hello there"}]});
    let text = gw.chat(T, req).await?.text().await?;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"prompt_tokens\":4"), "{text}");
    let seen = az.last_request().expect("recorded");
    assert_eq!(seen.path, "/openai/deployments/mini-eu/chat/completions");

    // a model with no deployment is not sent to this key
    let resp = gw.chat(T, hello("gpt-4.1")).await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(json(resp).await?["error"]["code"], "model_not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azures_429_cools_the_key_and_the_next_key_serves() -> anyhow::Result<()> {
    let az = mock(
        "az",
        Behavior {
            status: Some(429),
            retry_after: Some("30".into()),
            ..Behavior::default()
        },
    );
    let openai = mock("openai", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .azure_key(&az, "az", "deployments: {gpt-4o-mini: mini}")
            .key(&openai, "openai", "")
            .yaml(),
    )
    .await?;
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-upstream"], "openai");
    assert_eq!(az.requests(), 1);
    // cooling down for Azure's retry-after: the next calls skip it
    for _ in 0..3 {
        let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
        assert_eq!(resp.headers()["x-keypool-upstream"], "openai");
    }
    assert_eq!(az.requests(), 1);
    let keys = gw
        .http()
        .get(gw.url("/v1/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .text()
        .await?;
    let cooling = keys
        .lines()
        .find(|l| l.starts_with("keypool_key_cooldown_seconds{key=\"az\"}"))
        .expect("a cooldown gauge");
    let seconds: f64 = cooling.rsplit(' ').next().unwrap_or("0").parse()?;
    assert!((20.0..=30.0).contains(&seconds), "{cooling}");
    Ok(())
}
