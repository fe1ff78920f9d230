//! Bad input gets a clear OpenAI-shaped 4xx, and the server keeps serving.

use keypool_e2e::{Behavior, Gateway, config, hello, json, mock, served_by};

const T: &str = "client-token-abc";

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> anyhow::Result<()> {
    assert_eq!(resp.status().as_u16(), status);
    assert!(resp.headers()["content-type"].to_str()?.contains("json"));
    let body = json(resp).await?;
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(body["error"]["type"].as_str().is_some());
    Ok(())
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_errors_and_the_server_keeps_serving() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            models: Some(vec!["gpt-4o-mini".into()]),
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("max_body_bytes", "2048")
            .key(&a, "a", "")
            .yaml(),
    )
    .await?;
    let url = gw.url("/v1/chat/completions");
    let http = gw.http();

    // no token, wrong token
    expect_error(
        http.post(&url).json(&hello("gpt-4o-mini")).send().await?,
        401,
        "invalid_api_key",
    )
    .await?;
    expect_error(
        gw.chat("wrong", hello("gpt-4o-mini")).await?,
        401,
        "invalid_api_key",
    )
    .await?;
    // truncated JSON, invalid UTF-8, wrong type
    let send = |body: &'static [u8]| {
        http.post(&url)
            .bearer_auth(T)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        send(b"{\"model\": \"gpt-4o-mini\", \"messages\": [").await?,
        400,
        "invalid_request",
    )
    .await?;
    expect_error(
        send(b"{\"model\": \"\xff\xfe\"}").await?,
        400,
        "invalid_request",
    )
    .await?;
    expect_error(send(b"{\"model\": 42}").await?, 400, "invalid_request").await?;
    // oversize, with and without Content-Length
    let big = format!(
        "{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(4096)
    );
    expect_error(
        http.post(&url)
            .bearer_auth(T)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await?,
        413,
        "request_too_large",
    )
    .await?;
    let chunks = futures::stream::iter(
        big.into_bytes()
            .chunks(512)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = http
        .post(&url)
        .bearer_auth(T)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await?;
    expect_error(resp, 413, "request_too_large").await?;
    // unknown model: the upstream's own 404 comes back as it is
    expect_error(gw.chat(T, hello("gpt-9")).await?, 404, "model_not_found").await?;
    // unknown route
    expect_error(http.get(gw.url("/nope")).send().await?, 404, "unknown_url").await?;
    assert_eq!(
        a.requests(),
        1,
        "only the unknown model reached the upstream"
    );

    // still serving
    let ok = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(ok.status(), 200);
    let models = json(http.get(gw.url("/v1/models")).bearer_auth(T).send().await?).await?;
    assert_eq!(models["data"][0]["id"], "gpt-4o-mini");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_routing_by_allow_deny_json_multipart_and_path() -> anyhow::Result<()> {
    let chat = mock("chat", Behavior::default());
    let audio = mock("audio", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .key(&chat, "chat", "allow: [\"gpt-4o*\"], deny: [gpt-4o-audio]")
            .key(&audio, "audio", "allow: [whisper-1, /v1/files]")
            .yaml(),
    )
    .await?;
    assert_eq!(served_by(&gw.chat(T, hello("gpt-4o-mini")).await?), "chat");
    // nobody allows it: keypool's own 404
    let resp = gw.chat(T, hello("gpt-4o-audio")).await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(json(resp).await?["error"]["code"], "model_not_found");
    assert_eq!(chat.requests() + audio.requests(), 1);
    // multipart `model` field
    let form = "--kpB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF0000WAVE\r\n--kpB\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--kpB--\r\n";
    let resp = gw
        .http()
        .post(gw.url("/v1/audio/transcriptions"))
        .bearer_auth(T)
        .header("content-type", "multipart/form-data; boundary=kpB")
        .body(form)
        .send()
        .await?;
    assert_eq!(served_by(&resp), "audio");
    assert_eq!(json(resp).await?["text"], "Hello from audio.");
    // no model in a GET: the path is matched
    let resp = gw
        .http()
        .get(gw.url("/v1/files"))
        .bearer_auth(T)
        .send()
        .await?;
    assert_eq!(served_by(&resp), "audio");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;
    let resp = gw
        .http()
        .request(reqwest::Method::OPTIONS, gw.url("/v1/chat/completions"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        resp.headers()["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(a.requests(), 0);
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    Ok(())
}

/// Requests the HTTP server cannot parse are counted (`keypool_malformed_requests_total`) and
/// summarised, never logged one ERROR line each (a fuzzer produced 30,000 of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_counted_not_logged_one_by_one() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;
    let malformed = async || -> anyhow::Result<u64> {
        Ok(gw
            .metrics()
            .await?
            .lines()
            .find_map(|l| l.strip_prefix("keypool_malformed_requests_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    };
    // well-formed requests, kept alive or not, count nothing
    for _ in 0..20 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert_eq!(malformed().await?, 0);
    let host = gw.url("").trim_start_matches("http://").to_owned();
    for i in 0..40 {
        let mut tcp = tokio::net::TcpStream::connect(&host).await?;
        tcp.write_all(format!("GET /v1/models HTTP/9.{i}\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tcp.read_to_end(&mut sink),
        )
        .await;
    }
    let count = malformed().await?;
    assert!(count >= 40, "{count}");
    let errors = gw
        .logs()
        .lines()
        .filter(|l| {
            (l.contains("ERROR") || l.contains("WARN"))
                && (l.contains("actix_http") || l.contains("malformed request"))
        })
        .count();
    assert_eq!(errors, 0, "{}", gw.logs());
    // still serving
    assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    Ok(())
}
