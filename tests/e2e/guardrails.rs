//! Guardrails (issue 24) through a real `keypool serve`: every detector masks what leaves for
//! the provider and is restored in plain and streamed answers (a placeholder split over two SSE
//! chunks included); keywords, in full-width and mixed case, block a request (400) and a
//! stream (an error event, nothing after it) or are masked; a gateway without guardrails is
//! untouched; a moderation model screens requests; a frontend applies what its control plane
//! pushes.

use keypool_e2e::{Behavior, Gateway, MockServer, config, mock};
use serde_json::{Value, json};

const GATEWAYS: &str = "gateways:
  - name: private
    auth: {secrets: [s]}
    data_masking: {restore: true}
    content_safety: {keywords: [forbidden, 违禁词]}
  - name: strict
    auth: {secrets: [s]}
    content_safety: {keywords: [forbidden], on_response: block}";

/// One of each: identity number, bank card, mobile, e-mail, IPv4, API key.
const PERSONAL: &str = "我是11010519491231002X，卡4111111111111111，电话13812345678，\
                        邮箱a.b@example.com，服务器192.168.1.20，密钥sk-abcdefghijklmnop1234";

fn replying(m: &MockServer, pieces: &[&str]) {
    m.set(Behavior {
        reply: Some(pieces.iter().map(|p| (*p).to_owned()).collect()),
        ..Behavior::default()
    });
}

async fn chat(
    gw: &Gateway,
    gateway: &str,
    text: &str,
    stream: bool,
) -> anyhow::Result<(u16, String)> {
    let path = if gateway == "default" {
        "/v1/chat/completions".to_owned()
    } else {
        format!("/llm/api/{gateway}/v1/chat/completions")
    };
    let resp = gw
        .http()
        .post(gw.url(&path))
        .bearer_auth("s")
        .json(&json!({"model": "gpt-4o-mini", "stream": stream,
                      "messages": [{"role": "user", "content": text}]}))
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

/// The answer's text: a whole answer's message, or a stream's deltas joined.
fn text_of(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn sent_upstream(m: &MockServer) -> String {
    String::from_utf8_lossy(&m.last_request().map(|r| r.body).unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_never_leaves_and_comes_back_in_the_answer() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(
        &config()
            .set("authorization", "s")
            .set("dbtype", "sqlite")
            .set(
                "dbaddr",
                &format!("\"{}/usage.sqlite\"", dir.path().display()),
            )
            .key(&up, "up", "")
            .block(GATEWAYS)
            .yaml(),
    )
    .await?;
    // the answer names every placeholder; the phone's is split over two chunks
    replying(
        &up,
        &[
            "id [ID_CARD_1], card [BANK_CARD_1], phone [PHO",
            "NE_1], mail [EMAIL_1], ip [IPV4_1], key [API_KEY_1]",
        ],
    );
    let restored = "id 11010519491231002X, card 4111111111111111, phone 13812345678, \
                    mail a.b@example.com, ip 192.168.1.20, key sk-abcdefghijklmnop1234";
    for stream in [false, true] {
        let (status, body) = chat(&gw, "private", PERSONAL, stream).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(text_of(&body), restored, "stream: {stream}: {body}");
        let sent = sent_upstream(&up);
        for value in [
            "11010519491231002X",
            "4111111111111111",
            "13812345678",
            "a.b@example.com",
            "192.168.1.20",
            "sk-abcdefghijklmnop",
        ] {
            assert!(!sent.contains(value), "{value} left: {sent}");
        }
        for p in [
            "[ID_CARD_1]",
            "[BANK_CARD_1]",
            "[PHONE_1]",
            "[EMAIL_1]",
            "[IPV4_1]",
            "[API_KEY_1]",
        ] {
            assert!(sent.contains(p), "{p} missing: {sent}");
        }
        if stream {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        }
    }
    // a gateway without guardrails: the values go as they are, the placeholders come back as
    // the upstream wrote them
    let (status, body) = chat(&gw, "default", PERSONAL, false).await?;
    assert_eq!(status, 200);
    assert!(sent_upstream(&up).contains("13812345678"));
    assert!(text_of(&body).contains("[PHONE_1]"));
    // the usage events name the rules that matched, never the values
    let url = format!("sqlite://{}/usage.sqlite?mode=rwc", dir.path().display());
    let events = keypool_e2e::stored_events(&url, 3).await?;
    let rules: Vec<Option<&str>> = events.iter().map(|e| e.guardrails.as_deref()).collect();
    let all = "request:id_card,request:bank_card,request:phone,request:email,request:ipv4,request:api_key";
    assert_eq!(rules, [Some(all), Some(all), None]);
    // and are counted by gateway, rule and side
    let metrics = gw.metrics().await?;
    let phone = metrics
        .lines()
        .find(|l| {
            l.starts_with("keypool_guardrail_hits_total{")
                && l.contains("gateway=\"private\"")
                && l.contains("rule=\"phone\"")
                && l.contains("on=\"request\"")
        })
        .unwrap_or_default();
    assert!(phone.ends_with(" 2"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prohibited_words_are_blocked_or_masked_in_any_case_or_width() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gw = Gateway::start(
        &config()
            .set("authorization", "s")
            .key(&up, "up", "")
            .block(GATEWAYS)
            .yaml(),
    )
    .await?;
    // the request: full-width, mixed case; refused before any upstream
    for text in ["say ＦＯＲＢＩＤＤＥＮ", "say ForBidden", "说违禁词"] {
        let (status, body) = chat(&gw, "private", text, false).await?;
        assert_eq!(status, 400, "{body}");
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["error"]["code"], "content_policy_violation");
        assert!(
            !body.contains("orbid"),
            "the matched text is never echoed: {body}"
        );
    }
    assert_eq!(up.requests(), 0);
    // in an answer: masked in place, across chunks too
    replying(&up, &["this is FORB", "idden text"]);
    for stream in [false, true] {
        let (status, body) = chat(&gw, "private", "hello", stream).await?;
        assert_eq!(status, 200);
        assert_eq!(text_of(&body), "this is ********* text", "{body}");
    }
    // blocking: a whole answer becomes the error; a stream ends with an error event
    replying(&up, &["fine words, then ", "ＦＯＲ", "bidden and more"]);
    let (status, body) = chat(&gw, "strict", "hello", false).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("content_policy_violation"));
    let (status, body) = chat(&gw, "strict", "hello", true).await?;
    assert_eq!(status, 200);
    assert_eq!(text_of(&body), "fine words, then ");
    let last = body.trim_end().lines().last().unwrap_or("");
    assert!(last.contains("content_policy_violation"), "{body}");
    assert!(!body.contains("more") && !body.contains("[DONE]"), "{body}");
    Ok(())
}

/// `moderation:` asks a moderation model through the pool: a flagged request is refused, a
/// clean one goes on; when the call cannot be made, `on_failure` decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moderation_model_screens_requests_and_its_failure_is_a_policy() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let gateways = "gateways:
  - name: moderated
    auth: {secrets: [s]}
    content_safety: {moderation: {model: omni-moderation-latest, timeout_ms: 2000}}
  - name: lenient
    auth: {secrets: [s]}
    content_safety: {moderation: {model: nobody-serves-this}}
  - name: careful
    auth: {secrets: [s]}
    content_safety: {moderation: {model: nobody-serves-this, on_failure: block}}";
    let gw = Gateway::start(
        &config()
            .set("authorization", "s")
            .key(&up, "up", "allow: [gpt-4o-mini, omni-moderation-latest]")
            .block(gateways)
            .yaml(),
    )
    .await?;
    let (status, body) = chat(&gw, "moderated", "please flag-me now", false).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("content_policy_violation") && body.contains("moderation"));
    assert_eq!(up.requests(), 1, "only the moderation call went upstream");
    let (status, _) = chat(&gw, "moderated", "a kind question", false).await?;
    assert_eq!(status, 200);
    assert_eq!(up.requests(), 3, "the moderation call, then the request");
    // no key serves the moderation model: allowed by default, refused with on_failure: block
    let (status, _) = chat(&gw, "lenient", "a kind question", true).await?;
    assert_eq!(status, 200);
    let (status, body) = chat(&gw, "careful", "a kind question", false).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("could not be checked"), "{body}");
    Ok(())
}

/// A control plane pushes routing and guardrails to its frontends with the rest of a gateway's
/// spec (as protobuf): a frontend masks, restores and falls back as the file says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_applies_what_its_control_plane_pushes() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let failing = mock(
        "failing",
        Behavior {
            status: Some(503),
            ..Behavior::default()
        },
    );
    let dir = tempfile::tempdir()?;
    let yaml = config()
        .set("dbtype", "sqlite")
        .set("dbaddr", &format!("\"{}/cp.sqlite\"", dir.path().display()))
        .key(&failing, "failing", "allow: [gpt-4o]")
        .key(&up, "up", "allow: [gpt-4o-mini]")
        .block(
            "gateways:
  - name: private
    auth: {secrets: [s]}
    fallbacks: {gpt-4o: [gpt-4o-mini]}
    data_masking: {restore: true}
admin: {token: cp-admin, secret_key: cp-seal}",
        )
        .yaml();
    let cp = Gateway::start_control_plane(&yaml, "127.0.0.1:0").await?;
    let fe = Gateway::start_frontend(&cp.admin_url().await?, "cp-admin", &[]).await?;
    replying(&up, &["your phone is [PHONE_1]"]);
    let resp = fe
        .http()
        .post(fe.url("/llm/api/private/v1/chat/completions"))
        .bearer_auth("s")
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "call 13812345678"}]}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keypool-model"], "gpt-4o-mini");
    let body = resp.text().await?;
    assert_eq!(text_of(&body), "your phone is 13812345678");
    assert!(
        sent_upstream(&up).contains("[PHONE_1]") && !sent_upstream(&up).contains("13812345678")
    );
    Ok(())
}
