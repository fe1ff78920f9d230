//! What the guardrails cost a request: `data_masking` (every built-in detector) and
//! `content_safety` (200 keywords) over a 4 KB chat request with a little personal data in it,
//! and over its answer, timed in process. A program to run, not a timed test:
//! `cargo run --release -p keypool-proxy --example guard_cost`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keypool_policy::gateway::GatewayRuntime;

fn gateway(yaml: &str) -> anyhow::Result<GatewayRuntime> {
    let raw: keypool_config::RawGateway = serde_norway::from_str(yaml)?;
    let spec = keypool_config::validate_gateway(&raw, "g")
        .map_err(|e| anyhow::anyhow!("invalid gateway: {e:?}"))?;
    Ok(GatewayRuntime::new(Arc::new(spec)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn time(label: &str, runs: usize, mut f: impl FnMut()) {
    for _ in 0..runs / 10 {
        f();
    }
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort_unstable();
    println!(
        "{label:<46} p50 {:>7.1} µs   p99 {:>7.1} µs",
        percentile(&t, 0.5).as_secs_f64() * 1e6,
        percentile(&t, 0.99).as_secs_f64() * 1e6
    );
}

fn main() -> anyhow::Result<()> {
    let keywords: Vec<String> = (0..200).map(|i| format!("\"banned-phrase-{i}\"")).collect();
    let guarded = gateway(&format!(
        "name: g\ndata_masking: {{restore: true}}\ncontent_safety: {{keywords: [{}]}}\n",
        keywords.join(", ")
    ))?;
    let masking_only = gateway("name: g\ndata_masking: {restore: true}\n")?;
    let plain = gateway("name: g\n")?;
    // ~4 KB of ordinary prose with a phone number and an e-mail address in it
    let mut text = String::new();
    while text.len() < 3900 {
        text.push_str("The quarterly report covers revenue, costs and the plans for next year. ");
    }
    text.push_str("Call me on 13812345678 or write to a.b@example.com.");
    let body = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are helpful."},
                     {"role": "user", "content": text}]
    }))?);
    println!("request body: {} bytes", body.len());
    let runs = 20_000;
    time("no guardrails (the phase's own check)", runs, || {
        let _ = keypool_proxy::guard::request(&plain, &body, &mut Vec::new());
    });
    time("data_masking (6 detectors), 4 KB", runs, || {
        let _ = keypool_proxy::guard::request(&masking_only, &body, &mut Vec::new());
    });
    time("data_masking + 200 keywords, 4 KB", runs, || {
        let _ = keypool_proxy::guard::request(&guarded, &body, &mut Vec::new());
    });
    // Chinese prose with a full-width word in it: the text has to be folded first
    let mut zh = String::new();
    while zh.len() < 3900 {
        zh.push_str("季度报告涵盖收入、成本和明年的计划。");
    }
    zh.push_str("ＡＢＣ公司，电话13812345678。");
    let zh_body = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": zh}]
    }))?);
    time(
        "data_masking + 200 keywords, 4 KB, full-width",
        runs,
        || {
            let _ = keypool_proxy::guard::request(&guarded, &zh_body, &mut Vec::new());
        },
    );
    let (_, restore) = keypool_proxy::guard::request(&guarded, &body, &mut Vec::new())
        .map_err(|e| anyhow::anyhow!("blocked: {}", e.message))?;
    let answer = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "choices": [{"index": 0, "message": {"role": "assistant",
            "content": format!("{} I will call [PHONE_1].", &text[..1000])}}]
    }))?);
    time("answer: restore + 200 keywords, 1 KB", runs, || {
        let _ = keypool_proxy::guard::answer(&guarded, restore.as_ref(), &answer, &mut Vec::new());
    });
    Ok(())
}
