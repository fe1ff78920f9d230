//! The binary's life: config loading and mistakes, the demo, graceful shutdown.

use std::time::Duration;

use futures::StreamExt;
use keypool_e2e::{Behavior, Gateway, REPO_ROOT, config, hello, json, keypool_bin, mock};
use serde_json::json;

const T: &str = "client-token-abc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_api_route_sample_config_loads_unchanged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sample = format!("{REPO_ROOT}/crates/config/tests/openai-api-route.sample.yaml");
    // openai-api-route's own flag spelling
    let gw = Gateway::start_with(
        dir,
        &[
            "-config",
            &sample,
            "--address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ],
    )
    .await?;
    let resp = gw.chat("not-woshimima", hello("gpt-4")).await?;
    assert_eq!(resp.status(), 401);
    // gpt-4 is denied on the only key that would take it (the replicate key allows only mixtral)
    let resp = gw.chat("woshimima", hello("gpt-4")).await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(json(resp).await?["error"]["code"], "model_not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_offline_with_its_printed_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start_with(
        dir,
        &[
            "demo",
            "--address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ],
    )
    .await?;
    let resp = gw.chat("demo-token", hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 200);
    let body = json(resp).await?;
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .starts_with("Hello from mock-")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits_zero() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            chunk_interval_ms: 100,
            reply_words: 15,
            ..Behavior::default()
        },
    );
    let mut gw = Gateway::start(
        &config()
            .token(T)
            .set("shutdown_grace", "10")
            .key(&a, "a", "")
            .yaml(),
    )
    .await?;
    let req = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = gw.chat(T, req).await?;
    let mut body = resp.bytes_stream();
    let mut all = String::from_utf8_lossy(&body.next().await.expect("first chunk")?).into_owned();
    gw.terminate()?;
    while let Some(chunk) = body.next().await {
        all.push_str(&String::from_utf8_lossy(&chunk?));
    }
    assert!(
        all.ends_with("data: [DONE]\n\n"),
        "the stream finished: {all}"
    );
    let status = gw.wait(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status:?}");
    assert!(
        gw.chat(T, hello("gpt-4o-mini")).await.is_err(),
        "no longer accepting"
    );
    Ok(())
}

#[test]
fn keypool_migrate_applies_and_reverts_the_migrations() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("m.sqlite");
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!("dbtype: sqlite\ndbaddr: \"{}\"\n", db.display()),
    )?;
    let run = |extra: &[&str]| {
        let mut args = vec!["migrate", "--config", path.to_str().unwrap_or_default()];
        args.extend_from_slice(extra);
        std::process::Command::new(keypool_bin())
            .args(args)
            .output()
    };
    let up = run(&[])?;
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let text = String::from_utf8_lossy(&up.stdout);
    assert!(
        text.contains("m20261122_000001_usage") && text.contains("m20261122_000002_provider"),
        "{text}"
    );
    let down = run(&["--down"])?;
    assert!(down.status.success());
    assert!(String::from_utf8_lossy(&down.stdout).contains("applied migrations: []"));
    std::fs::write(&path, "dbtype: none\n")?;
    assert!(
        !run(&[])?.status.success(),
        "nothing to migrate without a store"
    );
    Ok(())
}
