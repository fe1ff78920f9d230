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
            "--console-address",
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
    let down = run(&["--down", "--yes"])?;
    assert!(down.status.success());
    assert!(String::from_utf8_lossy(&down.stdout).contains("applied migrations: []"));
    std::fs::write(&path, "dbtype: none\n")?;
    assert!(
        !run(&[])?.status.success(),
        "nothing to migrate without a store"
    );
    Ok(())
}

/// Every command the demo's banner prints runs as printed (`keypoolctl` through the binary
/// this test build made instead of `cargo run --release`, `python3` from the test venv with
/// the `openai` and `anthropic` SDKs installed), and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_the_demo_prints_runs() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::BufRead as _;
    let venv = tokio::task::spawn_blocking(keypool_e2e::python_venv).await??;
    let mut child = std::process::Command::new(keypool_e2e::keypool_bin())
        .args([
            "demo",
            "--address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
            "--console-address",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let banner = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let done = line.starts_with("keypool listening on");
            text.push_str(&line);
            text.push('\n');
            if done {
                break;
            }
        }
        text
    })
    .await?;
    // a command: a line indented by two spaces, up to the next blank line
    let mut commands = Vec::new();
    let mut current: Option<String> = None;
    for line in banner.lines() {
        match (&mut current, line) {
            (Some(c), l) if !l.trim().is_empty() => {
                c.push('\n');
                c.push_str(l);
            }
            (Some(_), _) => commands.extend(current.take()),
            (None, l) if l.starts_with("  ") && !l.starts_with("   ") => {
                current = Some(l.to_owned());
            }
            _ => {}
        }
    }
    commands.extend(current);
    assert_eq!(commands.len(), 8, "{banner}");
    let ctl = keypool_e2e::keypoolctl_bin().display().to_string();
    let python = venv.join("bin/python").display().to_string();
    for command in &commands {
        let runnable = command
            .replace(keypool_gateway::demo::KEYPOOLCTL, &ctl)
            .replacen("python3 -c", &format!("{python} -c"), 1);
        let out = tokio::process::Command::new("bash")
            .args(["-c", &runnable])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.trim().is_empty(),
            "{command}\n-> {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if ["chat/completions", "/messages", "python"]
            .iter()
            .any(|c| command.contains(c))
        {
            assert!(text.contains("Hello"), "{command}\n-> {text}");
        }
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// With a port taken, the demo exits non-zero before printing its banner.
#[test]
fn the_demo_with_its_port_taken_exits_before_the_banner() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.to_string();
    let any = "127.0.0.1:0";
    for [api, admin, console] in [[any, &port, any], [&port, any, any], [any, any, &port]] {
        let args = [
            "--address",
            api,
            "--admin-address",
            admin,
            "--console-address",
            console,
        ];
        let out = std::process::Command::new(keypool_e2e::keypool_bin())
            .arg("demo")
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stdout}");
        assert!(!stdout.contains("Try it"), "{stdout}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&port));
    }
    Ok(())
}

/// `serve` with no admin settings uses the default admin address only when it is free: with it
/// taken, keypool serves anyway and its log says the admin API was not started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_skips_a_taken_default_admin_port_and_says_so() -> anyhow::Result<()> {
    // held by this test, or by someone else: taken either way
    let _taken = std::net::TcpListener::bind("127.0.0.1:8889");
    let a = mock("a", Behavior::default());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config().token("t").key(&a, "a", "").yaml())?;
    let path = path.display().to_string();
    let gw = Gateway::start_with(
        dir,
        &["serve", "--config", &path, "--address", "127.0.0.1:0"],
    )
    .await?;
    assert_eq!(gw.chat("t", hello("gpt-4o-mini")).await?.status(), 200);
    assert!(
        gw.logs()
            .contains("admin API not started: its default address is taken"),
        "{}",
        gw.logs()
    );
    Ok(())
}

/// The API port has a listening socket a worker (`SO_REUSEPORT`); a second keypool started on
/// the same port must still fail, as it did on a plain socket, and not join the first one's
/// listeners and take a share of its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_keypool_on_the_same_port_fails_to_start() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&config().token("t").key(&a, "a", "").yaml()).await?;
    let taken = gw.origin.trim_start_matches("http://").to_owned();
    let second = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(keypool_bin())
            .args(["serve", "--config"])
            .arg(gw.config_file())
            .args(["--address", &taken, "--admin-address", "127.0.0.1:0"])
            .args(["--console-address", "127.0.0.1:0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the second keypool started on {taken}"))??;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {taken}"))
            && stderr.contains("Address already in use"),
        "{stderr}"
    );
    // the first serves every new connection, on each of its workers' listeners
    for _ in 0..8 {
        let resp = keypool_e2e::client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth("t")
            .json(&hello("gpt-4o-mini"))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
    }
    Ok(())
}

/// SIGHUP reloads the config file: a good file's new token works at once and the old one is
/// refused, while a stream begun before finishes; a bad file is refused, its mistake logged,
/// and the running config kept. The process never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_keeps_it_when_the_new_one_is_bad() -> anyhow::Result<()>
{
    let a = mock(
        "a",
        Behavior {
            chunk_interval_ms: 100,
            reply_words: 15,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(&config().token("old-token").key(&a, "a", "").yaml()).await?;
    let req = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = gw.chat("old-token", req).await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut all = String::from_utf8_lossy(&body.next().await.expect("first chunk")?).into_owned();

    std::fs::write(
        gw.config_file(),
        config()
            .token("new-token")
            .key(&a, "a", "")
            .block("gateways:\n- {name: added, auth: {method: exact, secrets: [g-secret]}}")
            .yaml(),
    )?;
    gw.signal("HUP")?;
    gw.wait_log("config reloaded", 1).await?;
    // audited (in the log without a store): who, and what the file now declares
    gw.wait_log("action=\"config.reload\"", 1).await?;
    assert!(
        gw.logs().contains("who=\"config file (SIGHUP)\""),
        "{}",
        gw.logs()
    );
    assert_eq!(
        gw.chat("new-token", hello("gpt-4o-mini")).await?.status(),
        200
    );
    assert_eq!(
        gw.chat("old-token", hello("gpt-4o-mini")).await?.status(),
        401
    );
    let added = gw
        .http()
        .post(gw.url("/llm/api/added/v1/chat/completions"))
        .bearer_auth("g-secret")
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    assert_eq!(added.status(), 200);
    while let Some(chunk) = body.next().await {
        all.push_str(&String::from_utf8_lossy(&chunk?));
    }
    assert!(
        all.ends_with("data: [DONE]\n\n"),
        "the stream finished: {all}"
    );

    std::fs::write(
        gw.config_file(),
        "authorization: x\nupstreams: 3\nmistake: true\n",
    )?;
    gw.signal("HUP")?;
    gw.wait_log("config not reloaded", 1).await?;
    assert!(
        gw.logs().contains("unknown field `mistake`"),
        "{}",
        gw.logs()
    );
    assert_eq!(
        gw.chat("new-token", hello("gpt-4o-mini")).await?.status(),
        200
    );
    Ok(())
}
