//! Routing among keys (issue 23), over a real `keypool` process: `lb_policy: latency` sends
//! calls to the faster of two upstreams, and keys of the same speed still spread least-used.

use keypool_e2e::{Behavior, Gateway, config, hello, mock, served_by};

async fn served(gw: &Gateway, n: usize) -> anyhow::Result<Vec<String>> {
    let mut by = Vec::with_capacity(n);
    for _ in 0..n {
        let resp = gw.chat("t", hello("gpt-4o-mini")).await?;
        assert_eq!(resp.status(), 200);
        by.push(served_by(&resp));
    }
    Ok(by)
}

/// The slow key (80 ms to its answer) is listed first: it serves only while it is not yet
/// measured, then the fast one (5 ms) serves the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_prefers_the_faster_upstream() -> anyhow::Result<()> {
    let slow = mock(
        "slow",
        Behavior {
            latency_ms: 80,
            ..Behavior::default()
        },
    );
    let fast = mock(
        "fast",
        Behavior {
            latency_ms: 5,
            ..Behavior::default()
        },
    );
    let yaml = config()
        .token("t")
        .set("lb_policy", "latency")
        .key(&slow, "slow", "")
        .key(&fast, "fast", "")
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let by = served(&gw, 20).await?;
    let on_slow = by.iter().filter(|k| *k == "slow").count();
    assert!(on_slow <= 1, "{by:?}");
    assert!(by[2..].iter().all(|k| k == "fast"), "{by:?}");
    Ok(())
}

/// Two keys of the same speed tie on latency: least-used spreads the calls evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equally_fast_keys_spread_least_used() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let b = mock("b", Behavior::default());
    let yaml = config()
        .token("t")
        .set("lb_policy", "latency")
        .key(&a, "a", "")
        .key(&b, "b", "")
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let by = served(&gw, 20).await?;
    let on_a = by.iter().filter(|k| *k == "a").count();
    assert!((8..=12).contains(&on_a), "{by:?}");
    Ok(())
}
