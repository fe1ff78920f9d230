//! The official `openai` Python SDK pointed at keypool by `base_url`.

use keypool_e2e::{Behavior, Gateway, config, mock, run_python_check, run_python_check_with};

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

/// `client.models.list()` answered by keypool: each key's exact `allow` names, the upstream's
/// own list for a key without them (minus `deny`), only keys the caller's token may use, and
/// the gateway's `models:` on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_is_what_the_caller_may_reach() -> anyhow::Result<()> {
    let listed = Behavior {
        models: Some(
            ["gpt-4o-mini", "text-embedding-3-small", "whisper-1"]
                .map(String::from)
                .to_vec(),
        ),
        ..Behavior::default()
    };
    let (a, b, c) = (
        mock("a", Behavior::default()),
        mock("b", listed),
        mock("c", Behavior::default()),
    );
    let gw = Gateway::start(
        &config()
            .token("[sdk-token, other-token]")
            .key(&a, "a", "allow: [gpt-4o-mini, gpt-4o, \"o3*\"]")
            .key(&b, "b", "deny: whisper-1")
            .key(&c, "c", "allow: o1-preview, authorization: other-token")
            .block(
                "gateways:\n- {name: team, auth: {method: exact, secrets: [team-secret]}, \
                 models: [gpt-4o-mini, text-embedding-3-small, o1-preview]}",
            )
            .yaml(),
    )
    .await?;
    let run = |base: String, token: &'static str, retrieve: &'static str| async move {
        let (ok, out) = run_python_check_with(
            "models_check.py",
            base,
            token,
            &[("KEYPOOL_RETRIEVE", retrieve)],
        )
        .await?;
        anyhow::ensure!(ok, "models_check.py failed:\n{out}");
        Ok::<_, anyhow::Error>(out)
    };
    let out = run(gw.base_url(), "sdk-token", "gpt-4o").await?;
    assert!(
        out.contains(r#"models ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]"#),
        "{out}"
    );
    assert!(out.contains("retrieved gpt-4o"), "{out}");
    let out = run(gw.base_url(), "other-token", "o1-preview").await?;
    assert!(
        out.contains(r#"models ["gpt-4o", "gpt-4o-mini", "o1-preview", "text-embedding-3-small"]"#),
        "{out}"
    );
    assert!(out.contains("retrieved o1-preview"), "{out}");
    let team = gw.url("/llm/api/team/v1");
    let out = run(team.clone(), "team-secret", "gpt-4o").await?;
    assert!(
        out.contains(r#"models ["gpt-4o-mini", "o1-preview", "text-embedding-3-small"]"#),
        "{out}"
    );
    assert!(out.contains("not found gpt-4o"), "{out}");
    // no key was asked to serve a listing; b's own list was fetched once and cached
    assert_eq!(a.requests() + c.requests(), 0);
    assert_eq!(b.requests(), 1);
    // a path-model request on a gateway limited to some models is refused, not forwarded
    let resp = gw
        .http()
        .get(format!("{team}/files"))
        .bearer_auth("team-secret")
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(b.requests(), 1);
    Ok(())
}
