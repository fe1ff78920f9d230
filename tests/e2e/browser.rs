//! The console in a real browser: Debian's Chromium driven by Playwright
//! (`tests/browser/console.cjs`) against the real binary: a wrong token refused, login, the keys
//! and a chart with data after traffic, a gateway created in the console and called with the
//! `openai` SDK, a key disabled in the console and avoided at once, the audit log, Chinese and
//! dark, no secret in any page or answer, logout.

use keypool_e2e::{Behavior, Gateway, config, mock};

const ADMIN: &str = "browser-admin-token";
const T: &str = "browser-client-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium() -> anyhow::Result<()> {
    let tools = tokio::task::spawn_blocking(keypool_e2e::browser_tools).await??;
    let venv = tokio::task::spawn_blocking(keypool_e2e::python_venv).await??;
    let (a, b) = (
        mock("a", Behavior::default()),
        mock("b", Behavior::default()),
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("browser.sqlite").display().to_string();
    let yaml = config()
        .token(T)
        .set("dbtype", "sqlite")
        .set("dbaddr", &format!("\"{db}\""))
        .block(&format!(
            "admin: {{token: {ADMIN}, secret_key: seal-key-for-browser}}"
        ))
        .key(&a, "a", "")
        .key(&b, "b", "")
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let console = gw.console_url().await?;
    // what the harness gives keys a and b, the tokens: never on a page or in an answer
    let secrets = serde_json::json!([
        "sk-test-a-0123456789",
        "sk-test-b-0123456789",
        ADMIN,
        T,
        "seal-key-for-browser"
    ]);
    let out = tokio::process::Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/browser/console.cjs"))
        .env("NODE_PATH", &tools.node_modules)
        .env("KP_CHROMIUM", &tools.chromium)
        .env("KP_CONSOLE", &console)
        .env("KP_API", &gw.origin)
        .env("KP_ADMIN", ADMIN)
        .env("KP_CLIENT", T)
        .env("KP_PYTHON", venv.join("bin/python"))
        .env("KP_SECRETS", secrets.to_string())
        // KP_SCREENSHOTS=/some/dir keeps screenshots of the overview and the audit page
        .env(
            "KP_SCREENSHOTS",
            std::env::var("KP_SCREENSHOTS").unwrap_or_default(),
        )
        .output()
        .await?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(report.contains("ok: logs out"), "{report}");
    Ok(())
}
