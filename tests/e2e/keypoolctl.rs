//! `keypoolctl` end to end against a running keypool: gateways create/list, keys
//! list/disable, usage, `usage --follow`, errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use keypool_e2e::{Behavior, Gateway, config, hello, keypoolctl_bin, mock};
use serde_json::Value;

const ADMIN: &str = "ctl-admin-token";
const T: &str = "client-token";

fn ctl(server: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    keypool_e2e::keypoolctl(server, ADMIN, args)
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keypoolctl_manages_a_running_keypool() -> anyhow::Result<()> {
    let up_a = mock("a", Behavior::default());
    let up_b = mock("b", Behavior::default());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("ctl.sqlite").display().to_string();
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("dbtype", "sqlite")
            .set("dbaddr", &format!("\"{db}\""))
            .key(&up_a, "a", "")
            .key(&up_b, "b", "")
            .block(&format!("admin: {{token: {ADMIN}}}"))
            .yaml(),
    )
    .await?;
    let server = gw.admin_url().await?;
    let s = server.clone();
    let run = move |args: Vec<&'static str>| {
        let s = s.clone();
        async move { tokio::task::spawn_blocking(move || ctl(&s, &args)).await? }
    };

    // gateways create -f, list (table and JSON)
    let spec = dir.path().join("team.yaml");
    std::fs::write(
        &spec,
        "name: team\nauth: {method: exact, secrets: [team-secret]}\ntoken_quota: 5000\n",
    )?;
    let spec_arg: &'static str = Box::leak(spec.display().to_string().into_boxed_str());
    let (ok, out, err) = run(vec!["gateways", "create", "-f", spec_arg]).await?;
    assert!(ok, "{out}{err}");
    assert!(out.contains("team") && out.contains("admin"), "{out}");
    let (ok, out, _) = run(vec!["gateways", "list"]).await?;
    assert!(
        ok && out.starts_with("NAME") && out.contains("team") && out.contains("5000"),
        "{out}"
    );
    let (ok, out, _) = run(vec!["--json", "gateways", "list"]).await?;
    assert!(ok);
    let list: Value = serde_json::from_str(&out)?;
    assert_eq!(list[0]["name"], "default", "`/v1`, the config's top level");
    assert_eq!(list[0]["spec"]["auth"]["method"], "tokens", "{list}");
    assert!(
        list[0]["spec"]["auth"]["secrets"].is_null(),
        "tokens are never shown: {list}"
    );
    assert_eq!(list[1]["name"], "team");
    assert!(!out.contains("team-secret"), "only the hash is shown");
    let resp = gw
        .http()
        .post(gw.url("/llm/api/team/v1/chat/completions"))
        .bearer_auth("team-secret")
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);

    // keys list / disable
    let (ok, out, _) = run(vec!["keys", "list"]).await?;
    assert!(
        ok && out.contains("sk-…6789") && !out.contains("sk-test-a-0123456789"),
        "{out}"
    );
    let (ok, out, _) = run(vec!["keys", "disable", "a"]).await?;
    assert!(ok, "{out}");
    let (ok, out, _) = run(vec!["--json", "keys", "list"]).await?;
    assert!(ok);
    let keys: Value = serde_json::from_str(&out)?;
    assert_eq!(keys[0]["name"], "a");
    assert_eq!(keys[0]["enabled"], false);
    let before = up_a.requests();
    for _ in 0..5 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert_eq!(up_a.requests(), before);

    // usage --follow sees requests made while it runs
    let mut follow = Command::new(keypoolctl_bin())
        .args([
            "--server",
            &server,
            "--json",
            "usage",
            "--follow",
            "--gateway",
            "default",
        ])
        .env("KEYPOOL_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(gw.chat(T, hello("followed-model")).await?.status(), 200);
    }
    let mut lines = Vec::new();
    while lines.len() < 3 {
        let line = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(5)))?;
        lines.push(line);
    }
    follow.kill()?;
    let _ = follow.wait();
    for l in &lines {
        let e: Value = serde_json::from_str(l)?;
        assert_eq!(
            (e["gateway"].as_str(), e["model"].as_str()),
            (Some("default"), Some("followed-model"))
        );
        assert_eq!(e["key"], "b");
    }

    // usage totals from the store (written within about a second)
    let mut usage = Value::Null;
    for _ in 0..40 {
        let (ok, out, err) = run(vec!["--json", "usage", "--since", "1h"]).await?;
        assert!(ok, "{err}");
        usage = serde_json::from_str(&out)?;
        let calls: i64 = usage["by_gateway"].as_array().map_or(0, |g| {
            g.iter().map(|x| x["calls"].as_i64().unwrap_or(0)).sum()
        });
        if calls >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_gateway = usage["by_gateway"].as_array().unwrap();
    assert!(by_gateway.iter().any(|g| g["group"] == "team"), "{usage}");
    let (ok, out, _) = run(vec!["usage"]).await?;
    assert!(
        ok && out.contains("GATEWAY") && out.contains("default"),
        "{out}"
    );
    let (ok, out, _) = run(vec!["status"]).await?;
    assert!(ok && out.contains("store           ok"), "{out}");

    // errors: non-zero exit with the gRPC status
    let (ok, _, err) = run(vec!["gateways", "get", "nope"]).await?;
    assert!(!ok && err.contains("NotFound"), "{err}");
    let denied = Command::new(keypoolctl_bin())
        .args(["--server", &server, "--token", "wrong", "keys", "list"])
        .output()?;
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"));
    Ok(())
}

/// `KEYPOOL_ADMIN_URL` and `KEYPOOL_ADMIN_TOKEN` stand for `--server` and `--token` (an
/// unauthenticated call names them); `keys add -f` takes an openai-api-route file's
/// `upstreams:` list and adds every key, their secrets masked in what it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keypoolctl_reads_the_environment_and_adds_an_upstreams_list() -> anyhow::Result<()> {
    let up = mock("a", Behavior::default());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("ctl.sqlite").display().to_string();
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("dbtype", "sqlite")
            .set("dbaddr", &format!("\"{db}\""))
            .key(&up, "a", "")
            .block(&format!(
                "admin: {{token: {ADMIN}, secret_key: ctl-sealing-key-0123456789}}"
            ))
            .yaml(),
    )
    .await?;
    let server = gw.admin_url().await?;
    let file = dir.path().join("oar.yaml");
    std::fs::write(
        &file,
        format!(
            "address: :8888\nauthorization: woshimima\nupstreams:\n\
             - sk: sk-oar-first-secret-00000001\n  endpoint: {u}\n  name: oar-1\n\
             - sk: short-sk-0001\n  endpoint: {u}\n  name: oar-2\n  allow: gpt-4o-mini\n",
            u = up.url()
        ),
    )?;
    let file = file.display().to_string();
    let env_ctl = move |args: Vec<String>, token: Option<&'static str>| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(keypoolctl_bin());
            cmd.args(&args)
                .env("KEYPOOL_ADMIN_URL", server)
                .env_remove("KEYPOOL_ADMIN_TOKEN");
            if let Some(t) = token {
                cmd.env("KEYPOOL_ADMIN_TOKEN", t);
            }
            cmd.output()
        })
    };
    let out = env_ctl(vec!["keys".into(), "list".into()], None).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Unauthenticated") && err.contains("KEYPOOL_ADMIN_TOKEN"),
        "{err}"
    );
    let out = env_ctl(
        vec!["keys".into(), "add".into(), "-f".into(), file],
        Some(ADMIN),
    )
    .await??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("oar-1") && text.contains("oar-2"), "{text}");
    assert!(
        text.contains("sk-…0001") && text.contains("…0001"),
        "{text}"
    );
    assert!(
        !text.contains("short-sk") && !text.contains("first-secret"),
        "{text}"
    );
    let out = env_ctl(vec!["keys".into(), "list".into()], Some(ADMIN)).await??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().count(), 4, "header, a, oar-1, oar-2:\n{text}");
    Ok(())
}
