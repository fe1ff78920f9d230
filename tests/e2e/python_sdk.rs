//! The official `openai` Python SDK pointed at keypool by `base_url`.

use std::process::Command;

use keypool_e2e::{Behavior, Gateway, config, mock, python_venv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_against_keypool() -> anyhow::Result<()> {
    let venv = tokio::task::spawn_blocking(python_venv).await??;
    let known = Some(
        ["gpt-4o-mini", "text-embedding-3-small", "whisper-1"]
            .map(String::from)
            .to_vec(),
    );
    let a = mock(
        "mock-a",
        Behavior {
            models: known.clone(),
            ..Behavior::default()
        },
    );
    let b = mock(
        "mock-b",
        Behavior {
            models: known,
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(
        &config()
            .token("sdk-token")
            .key(&a, "mock-a", "")
            .key(&b, "mock-b", "")
            .yaml(),
    )
    .await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sdk_check.py");
    let base = gw.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv.join("bin/python"))
            .arg(script)
            .env("KEYPOOL_BASE_URL", base)
            .env("KEYPOOL_TOKEN", "sdk-token")
            .env_remove("OPENAI_BASE_URL")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK checks failed:\n{stdout}");
    assert!(stdout.contains("9 passed, 0 failed"), "{stdout}");
    Ok(())
}
