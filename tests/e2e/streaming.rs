//! Streams through the real binary: pacing, exact usage, cancellation, broken upstreams.

use std::time::{Duration, Instant};

use futures::StreamExt;
use keypool_e2e::{Behavior, Gateway, config, mock, served_by};
use serde_json::{Value, json};

const T: &str = "client-token-abc";

fn stream_req(include_usage: bool) -> Value {
    let mut v = json!({"model": "gpt-4o-mini", "stream": true,
                       "messages": [{"role": "user", "content": "Tell me a story"}]});
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

/// Reads a whole SSE body, noting when each piece arrived.
async fn read_timed(resp: reqwest::Response) -> (Vec<(Duration, String)>, String) {
    let start = Instant::now();
    let mut pieces = Vec::new();
    let mut all = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        let text = String::from_utf8_lossy(&chunk).into_owned();
        all.push_str(&text);
        pieces.push((start.elapsed(), text));
    }
    (pieces, all)
}

/// The JSON payloads of `data:` events (not `[DONE]`).
fn events(all: &str) -> Vec<Value> {
    all.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_arrive_spread_over_time_not_at_the_end() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            chunk_interval_ms: 150,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;
    let resp = gw.chat(T, stream_req(false)).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert!(
        resp.headers()["content-type"]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let (pieces, all) = read_timed(resp).await;
    assert!(pieces.len() >= 5, "arrived in {} pieces", pieces.len());
    let first = pieces[0].0;
    let last = pieces[pieces.len() - 1].0;
    assert!(
        first < Duration::from_millis(400),
        "first piece at {first:?}"
    );
    assert!(
        last.saturating_sub(first) > Duration::from_millis(700),
        "spread {:?}",
        last.saturating_sub(first)
    );
    assert!(all.ends_with("data: [DONE]\n\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_requested_upstream_and_stripped_unless_asked() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;

    let (_, all) = read_timed(gw.chat(T, stream_req(false)).await?).await;
    let seen: Value = serde_json::from_slice(&a.last_request().expect("recorded").body)?;
    assert_eq!(
        seen["stream_options"]["include_usage"], true,
        "keypool asked for usage"
    );
    assert!(
        events(&all).iter().all(|e| e.get("usage").is_none()),
        "usage chunk stripped: {all}"
    );
    let text: String = events(&all)
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Hello from a the mock");
    assert!(all.ends_with("data: [DONE]\n\n"));
    // keypool recorded the exact usage anyway (prompt: 4 words + 2; completion: 5 words)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = gw.logs();
    let line = logs
        .lines()
        .rfind(|l| l.contains("stream=true"))
        .unwrap_or_default();
    assert!(
        line.contains("prompt_tokens=6") && line.contains("completion_tokens=5"),
        "{line}"
    );

    // a client that asked gets the stream as OpenAI sends it: `"usage": null` in every chunk
    // but the last, which has the usage
    let (_, all) = read_timed(gw.chat(T, stream_req(true)).await?).await;
    let usage: Vec<Value> = events(&all)
        .into_iter()
        .filter_map(|e| e.get("usage").cloned())
        .collect();
    let (last, before) = usage.split_last().expect("chunks");
    assert!(
        before.len() > 5 && before.iter().all(Value::is_null),
        "{all}"
    );
    assert_eq!(
        *last,
        json!({"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_request() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            chunk_interval_ms: 200,
            reply_words: 30,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;
    let resp = gw.chat(T, stream_req(false)).await?;
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk")?;
    assert!(!first.is_empty());
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.streams_cancelled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.streams_cancelled(), 1, "the upstream stream was dropped");
    assert_eq!(a.streams_completed(), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        gw.logs().contains("client_cancelled"),
        "recorded as a client cancellation"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_stream_cut_ends_with_an_error_event() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            cut_after: Some(2),
            chunk_interval_ms: 20,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;
    let resp = gw.chat(T, stream_req(false)).await?;
    assert_eq!(resp.status(), 200);
    let (_, all) = read_timed(resp).await;
    let evs = events(&all);
    let last = evs.last().expect("events");
    assert_eq!(last["error"]["code"], "upstream_stream_broken", "{all}");
    assert!(!all.contains("[DONE]"), "never a silent clean end");
    assert_eq!(a.requests(), 1, "no retry after the first byte");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_to_first_byte_is_bounded_and_fails_over() -> anyhow::Result<()> {
    let slow = mock(
        "slow",
        Behavior {
            ttfb_ms: 3000,
            ..Behavior::default()
        },
    );
    let fast = mock("fast", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&slow, "slow", "stream_timeout: 0.5")
            .key(&fast, "fast", "")
            .yaml(),
    )
    .await?;
    let started = Instant::now();
    let resp = gw.chat(T, stream_req(false)).await?;
    assert_eq!(served_by(&resp), "fast");
    let (_, all) = read_timed(resp).await;
    assert!(all.ends_with("data: [DONE]\n\n"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.requests(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gap_ends_the_stream_with_an_error_event() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            chunk_interval_ms: 1500,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("idle_timeout", "0.5")
            .key(&a, "a", "")
            .yaml(),
    )
    .await?;
    let started = Instant::now();
    let (_, all) = read_timed(gw.chat(T, stream_req(false)).await?).await;
    let last = events(&all).pop().expect("events");
    assert_eq!(last["error"]["code"], "upstream_stream_broken");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no data")
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    Ok(())
}

/// With 400 open files and one worker, 144 are left after the reserve: 64 streams (upstream
/// connections) and 80 client connections. The 65th stream at once is answered 503
/// `server_busy` with `Retry-After: 1`, before anything is sent upstream; the 64 run to their
/// end; once they are over, streams are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_open_files_limit_are_refused_not_cut() -> anyhow::Result<()> {
    let slow = mock(
        "slow",
        Behavior {
            chunk_interval_ms: 250,
            ..Behavior::default()
        },
    );
    let yaml = config().token(T).key(&slow, "slow", "").yaml();
    let gw = Gateway::start_nofile(&yaml, &[("KEYPOOL_WORKERS", "1")], 400).await?;
    let mut open = Vec::new();
    for _ in 0..64 {
        let resp = gw.chat(T, stream_req(false)).await?;
        assert_eq!(resp.status(), 200);
        open.push(tokio::spawn(read_timed(resp)));
    }
    let sent = slow.requests();
    let resp = gw.chat(T, stream_req(false)).await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "server_busy", "{body}");
    assert_eq!(slow.requests(), sent, "nothing sent upstream for it");
    for s in open {
        let (_, all) = s.await?;
        assert!(all.ends_with("data: [DONE]\n\n"), "cut: {all}");
    }
    let resp = gw.chat(T, stream_req(false)).await?;
    assert_eq!(resp.status(), 200);
    assert!(read_timed(resp).await.1.ends_with("data: [DONE]\n\n"));
    Ok(())
}
