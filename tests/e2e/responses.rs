//! OpenAI's Responses API through keypool: `/v1/responses` created plain and streamed (its
//! typed events relayed, usage from `response.completed`), and every follow-up on a response
//! (`GET`, `DELETE`, `input_items`, `previous_response_id`) sent to the key that created it,
//! across replicas through the shared Redis. Driven by raw HTTP and the official `openai` SDK.

#![allow(clippy::expect_used)]

use keypool_e2e::{Behavior, Gateway, config, json, mock, run_python_check_with};
use serde_json::{Value, json as j};

const T: &str = "client-token-responses";

async fn create(gw: &Gateway, body: &Value) -> anyhow::Result<reqwest::Response> {
    Ok(gw
        .http()
        .post(gw.url("/v1/responses"))
        .bearer_auth(T)
        .json(body)
        .send()
        .await?)
}

async fn get(gw: &Gateway, path: &str) -> anyhow::Result<reqwest::Response> {
    Ok(gw.http().get(gw.url(path)).bearer_auth(T).send().await?)
}

/// Two keys, least-used first: without the pin, each follow-up would go to the key that did
/// not create the response (and get its 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_reach_the_key_that_created_the_response() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let b = mock("b", Behavior::default());
    let claude = mock("claude", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "least-used")
            .key(&a, "a", "")
            .key(&b, "b", "")
            .key(&claude, "claude", "type: anthropic")
            .yaml(),
    )
    .await?;
    let resp = create(&gw, &j!({"model": "gpt-4o-mini", "input": "Hello there"})).await?;
    assert_eq!(resp.status(), 200);
    let creator = resp.headers()["x-keypool-upstream"].to_str()?.to_owned();
    let body = json(resp).await?;
    let id = body["id"].as_str().expect("an id").to_owned();
    assert_eq!(body["usage"]["input_tokens"], 2);
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        for _ in 0..3 {
            let resp = get(&gw, &path).await?;
            assert_eq!(resp.status(), 200, "{path}");
            assert_eq!(resp.headers()["x-keypool-upstream"], creator.as_str());
        }
    }
    let next = create(
        &gw,
        &j!({"model": "gpt-4o-mini", "input": "Again", "previous_response_id": id}),
    )
    .await?;
    assert_eq!(next.status(), 200);
    assert_eq!(next.headers()["x-keypool-upstream"], creator.as_str());
    let resp = gw
        .http()
        .delete(gw.url(&format!("/v1/responses/{id}")))
        .bearer_auth(T)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await?["deleted"], true);
    // the Anthropic key never served any of it
    assert_eq!(claude.requests(), 0);
    // an id keypool never saw goes wherever the pick sends it (and its upstream says 404)
    let resp = get(&gw, "/v1/responses/resp_unknown").await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_relayed_with_its_usage_and_a_cut_one_ends_with_an_error() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("dbtype", "sqlite")
            .set(
                "dbaddr",
                &format!("\"{}/usage.sqlite\"", dir.path().display()),
            )
            .key(&a, "a", "")
            .yaml(),
    )
    .await?;
    let body = j!({"model": "gpt-4o-mini", "input": "Stream this please", "stream": true});
    let text = create(&gw, &body).await?.text().await?;
    assert!(text.starts_with("event: response.created\n"), "{text}");
    assert!(text.contains("event: response.output_text.delta\n"));
    assert!(text.trim_end().ends_with('}') && text.contains("event: response.completed\n"));
    // the created response is pinned as its stream passes
    let id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("an id")
        .to_owned();
    assert!(id.starts_with("resp_a_"), "{id}");
    let url = format!("sqlite://{}/usage.sqlite?mode=rwc", dir.path().display());
    let events = keypool_e2e::stored_events(&url, 1).await?;
    let e = &events[0];
    assert_eq!(
        (
            e.stream,
            e.prompt_tokens,
            e.completion_tokens,
            e.total_tokens
        ),
        (true, Some(3), Some(5), Some(8))
    );
    assert_eq!(e.error, None);

    // cut after two deltas: recorded as broken, the client told by an `error` event
    a.set(Behavior {
        name: "a".into(),
        cut_after: Some(2),
        chunk_interval_ms: 10,
        ..Behavior::default()
    });
    let text = create(&gw, &body).await?.text().await?;
    assert!(
        text.ends_with("\n\n") && text.contains("event: error\ndata: {"),
        "{text}"
    );
    assert!(
        text.contains("\"code\":\"upstream_stream_broken\""),
        "{text}"
    );
    Ok(())
}

/// The official SDK: create plain and streamed on one replica, then retrieve, list input
/// items and delete through another that shares its Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_responses_across_two_replicas() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let b = mock("b", Behavior::default());
    let prefix = format!("kp-e2e-responses-{:016x}:", fastrand::u64(..));
    let yaml = config()
        .token(T)
        .set("lb_policy", "least-used")
        .key(&a, "a", "")
        .key(&b, "b", "")
        .block(&format!(
            "redis: {{url: \"redis://127.0.0.1:6379/0\", prefix: \"{prefix}\"}}"
        ))
        .yaml();
    let one = Gateway::start(&yaml).await?;
    let two = Gateway::start(&yaml).await?;
    let (ok, out) = run_python_check_with(
        "responses_check.py",
        one.url("/v1"),
        T,
        &[("RETRIEVE_BASE_URL", &two.url("/v1"))],
    )
    .await?;
    assert!(ok, "{out}");
    assert!(out.contains("ok"), "{out}");
    // the pins were in Redis (a day's ttl): leave nothing behind
    let mut c = redis::Client::open("redis://127.0.0.1:6379/0")?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await?;
    assert!(keys.iter().any(|k| k.contains("pin:resp_")), "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut c).await?;
    Ok(())
}
