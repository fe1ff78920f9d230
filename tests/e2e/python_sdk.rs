//! The official `openai` Python SDK pointed at keypool by `base_url`.

use keypool_e2e::{Behavior, Gateway, config, mock, run_python_check};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_against_keypool() -> anyhow::Result<()> {
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
    let (ok, stdout) = run_python_check("sdk_check.py", gw.base_url(), "sdk-token").await?;
    assert!(ok, "SDK checks failed:\n{stdout}");
    assert!(stdout.contains("9 passed, 0 failed"), "{stdout}");
    Ok(())
}
