//! Replicate upstreams through the real binary, driven by the `openai` Python SDK.

use keypool_e2e::{Behavior, Gateway, config, mock, run_python_check};
use keypool_mock::replicate::{Ending, ReplicateBehavior, ReplicateServer};

const KEY: &str = "r8_test_token_0123456789";

fn replicate(behavior: ReplicateBehavior) -> ReplicateServer {
    match ReplicateServer::start(ReplicateBehavior {
        require_key: Some(KEY.into()),
        ..behavior
    }) {
        Ok(s) => s,
        Err(e) => panic!("replicate stand-in: {e}"),
    }
}

fn upstream(name: &str, server: &ReplicateServer, model: &str) -> String {
    format!(
        "  - {{name: {name}, type: replicate, sk: {KEY}, endpoint: \"{}\", allow: [\"{model}\"]}}\n",
        server.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_models_through_the_openai_sdk() -> anyhow::Result<()> {
    let ok = replicate(ReplicateBehavior {
        polls: 2,
        ..ReplicateBehavior::default()
    });
    let fail = replicate(ReplicateBehavior {
        ending: Ending::Failed,
        ..ReplicateBehavior::default()
    });
    let throttled = replicate(ReplicateBehavior {
        status: Some(429),
        retry_after: Some("5".into()),
        ..ReplicateBehavior::default()
    });
    let oai = mock("oai", Behavior::default());
    let mut yaml = config()
        .token("sdk-token")
        .set("lb_policy", "order")
        .key(
            &oai,
            "oai",
            "allow: [meta/meta-llama-3-8b-instruct, mistralai/mistral-7b-instruct-v0.2]",
        )
        .yaml();
    // Replicate keys first, so they are tried before the OpenAI fallback
    let reps = upstream("rep-ok", &ok, "mistralai/mixtral-8x7b-instruct-v0.1")
        + &upstream("rep-fail", &fail, "meta/meta-llama-3-8b-instruct")
        + &upstream("rep-429", &throttled, "mistralai/mistral-7b-instruct-v0.2");
    yaml = yaml.replacen("upstreams:\n", &format!("upstreams:\n{reps}"), 1);
    let gw = Gateway::start(&yaml).await?;

    let (passed, stdout) =
        run_python_check("replicate_check.py", gw.base_url(), "sdk-token").await?;
    assert!(
        passed && stdout.contains("6 passed, 0 failed"),
        "{stdout}\n{}",
        gw.logs()
    );

    // the model's input: the Mistral template and mapped parameters
    let input = ok.last_input().expect("a prediction was created");
    assert!(
        input["prompt"]
            .as_str()
            .unwrap_or("")
            .starts_with("<s>[INST] Hello there friend [/INST]"),
        "{input}"
    );
    assert_eq!(
        throttled.creates(),
        1,
        "the 429 cooled rep-429 for its Retry-After"
    );
    assert_eq!(fail.creates(), 1);
    let logs = gw.logs();
    assert!(
        !logs.contains(KEY),
        "the Replicate token never reaches the logs"
    );
    assert!(
        logs.contains("key=\"rep-ok\" provider=\"replicate\""),
        "usage events record the provider"
    );
    Ok(())
}
