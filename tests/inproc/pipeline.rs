//! The request pipeline in process (see `app.rs`): `/v1` is the gateway named `default`, with
//! the same phases, in the same order, as every named gateway; how upstream answers drive
//! failover; whose credential may travel upstream.

mod app;

use std::time::Duration;

use app::{App, status_code};
use keypool_e2e::{Behavior, config, hello, mock, served_by};

const CHAT: &str = "/v1/chat/completions";

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_gateways_top_level_rate_limits_hold_on_v1() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let app = App::start(
        &config()
            .token("t")
            .set("rate_limits", "['ingress:2/minute']")
            .key(&up, "up", "")
            .yaml(),
    )
    .await?;
    for remaining in ["1", "0"] {
        let ok = app.chat("t", hello("gpt-4o-mini")).await?;
        assert_eq!(ok.status(), 200);
        assert_eq!(header(&ok, "x-ratelimit-limit-requests"), "2");
        assert_eq!(header(&ok, "x-ratelimit-remaining-requests"), remaining);
    }
    let refused = app.chat("t", hello("gpt-4o-mini")).await?;
    assert!(header(&refused, "retry-after").parse::<u64>()? >= 1);
    assert_eq!(
        status_code(refused).await?,
        (429, "rate_limit_exceeded".into())
    );
    assert_eq!(
        up.requests(),
        2,
        "a refused call never reaches the upstream"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_gateways_whitelist_holds_on_v1() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let app = App::start(
        &config()
            .token("std-1,vip-1")
            .set("whitelist", "['ip:10.0.0.0/8', 'secret:^vip-']")
            .key(&up, "up", "")
            .yaml(),
    )
    .await?;
    // 127.0.0.1 is not in 10.0.0.0/8: only the vip token's rule admits
    let denied = app.chat("std-1", hello("gpt-4o-mini")).await?;
    assert_eq!(status_code(denied).await?, (403, "access_denied".into()));
    assert_eq!(app.chat("vip-1", hello("gpt-4o-mini")).await?.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_gateways_token_quota_holds_on_v1() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let app = App::start(
        &config()
            .token("t")
            .set("token_quota", "15")
            .key(&up, "up", "")
            .yaml(),
    )
    .await?;
    // each call: 5 prompt + 5 completion tokens; the quota is settled just after the answer
    for _ in 0..2 {
        assert_eq!(app.chat("t", hello("gpt-4o-mini")).await?.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = app.chat("t", hello("gpt-4o-mini")).await?;
    assert_eq!(
        status_code(refused).await?,
        (429, "insufficient_quota".into())
    );
    assert_eq!(up.requests(), 2);
    Ok(())
}

/// Each phase refuses before the next one runs: resolve (active, expiry) → authenticate →
/// admit (lists, limits, quota) → read body → model. The body is not read before the caller is
/// known, so an anonymous client cannot make keypool hold a large body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phases_refuse_in_their_order() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let start = |extra: &'static str| {
        let mut c = config()
            .token("t")
            .set("max_body_bytes", "100")
            .set("models", "[gpt-4o-mini]")
            .key(&up, "up", "");
        for line in extra.lines() {
            let (k, v) = line.split_once(": ").unwrap_or_default();
            c = c.set(k, v);
        }
        let yaml = c.yaml();
        async move { App::start(&yaml).await }
    };
    let big = serde_json::json!({"model": "nope", "pad": "x".repeat(500)});

    let off = start("active: false").await?;
    assert_eq!(
        status_code(off.post(CHAT, "wrong", &big).await?).await?,
        (403, "gateway_inactive".into())
    );
    let old = start("expires_at: '2020-01-01T00:00:00Z'").await?;
    assert_eq!(
        status_code(old.post(CHAT, "wrong", &big).await?).await?,
        (403, "gateway_expired".into())
    );

    let app = start("rate_limits: ['ingress:3/minute']").await?;
    // authenticate before the body: a wrong token with a too-large body is 401, not 413
    assert_eq!(
        status_code(app.post(CHAT, "wrong", &big).await?).await?,
        (401, "invalid_api_key".into())
    );
    // the body is read after admission: 413
    assert_eq!(
        status_code(app.post(CHAT, "t", &big).await?).await?,
        (413, "request_too_large".into())
    );
    // the model check comes after the limits (and the call counts against them)
    assert_eq!(
        status_code(app.chat("t", hello("o1")).await?).await?,
        (404, "model_not_found".into())
    );
    assert_eq!(app.chat("t", hello("gpt-4o-mini")).await?.status(), 200);
    // the limit is spent (413, 404, 200): refused before the body or the model is looked at
    assert_eq!(
        status_code(app.post(CHAT, "t", &big).await?).await?,
        (429, "rate_limit_exceeded".into())
    );
    assert_eq!(up.requests(), 1);
    Ok(())
}

/// A named gateway's caller who asks for an unknown model gets 404, whatever `/v1`'s tokens
/// are (it was 401 `invalid_api_key` while gateways ran a pipeline of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_on_a_named_gateway_is_404_not_401() -> anyhow::Result<()> {
    let up = mock(
        "up",
        Behavior {
            models: Some(vec!["gpt-4o-mini".into()]),
            ..Behavior::default()
        },
    );
    let app = App::start(
        &config()
            .token("t")
            .key(&up, "up", "allow: [gpt-4o-mini]")
            .block("gateways:\n  - {name: team, auth: {method: exact, secrets: [s]}}")
            .yaml(),
    )
    .await?;
    let at = "/llm/api/team/v1/chat/completions";
    assert_eq!(
        app.post(at, "s", &hello("gpt-4o-mini")).await?.status(),
        200
    );
    assert_eq!(
        status_code(app.post(at, "s", &hello("o1")).await?).await?,
        (404, "model_not_found".into())
    );
    // `/llm/api/default/v1` is `/v1`
    let default = app
        .post(
            "/llm/api/default/v1/chat/completions",
            "t",
            &hello("gpt-4o-mini"),
        )
        .await?;
    assert_eq!(default.status(), 200);
    Ok(())
}

/// How each upstream answer drives failover (keys in config order): 5xx, 429 and 401/403 move
/// on to the next key (429 cools the key, 401 disables it); 400 and 404 come back as they are;
/// when every attempt failed the client gets the last upstream's own status and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_are_classified_for_failover() -> anyhow::Result<()> {
    let failing = |status: u16| {
        mock(
            "a",
            Behavior {
                status: Some(status),
                retry_after: (status == 429).then(|| "30".into()),
                ..Behavior::default()
            },
        )
    };
    for (status, fails_over, key_stays_out) in [
        (500, true, false),
        (503, true, false),
        (429, true, true),
        (401, true, true),
        (403, true, true),
        (400, false, false),
        (404, false, false),
    ] {
        let a = failing(status);
        let b = mock("b", Behavior::default());
        let app = App::start(
            &config()
                .token("t")
                .set("lb_policy", "order")
                .key(&a, "a", "")
                .key(&b, "b", "")
                .yaml(),
        )
        .await?;
        let resp = app.chat("t", hello("gpt-4o-mini")).await?;
        if fails_over {
            assert_eq!((status, resp.status().as_u16()), (status, 200));
            assert_eq!(served_by(&resp), "b");
        } else {
            assert_eq!(resp.status().as_u16(), status, "returned as it is");
            assert_eq!((status, b.requests()), (status, 0));
        }
        // a second call: a cooled or disabled key is not tried again
        app.chat("t", hello("gpt-4o-mini")).await?;
        let expected_a = if key_stays_out { 1 } else { 2 };
        assert_eq!((status, a.requests()), (status, expected_a));
    }
    // every key fails: the last upstream's real answer, not a blanket 502
    let a = failing(500);
    let b = failing(503);
    let app = App::start(
        &config()
            .token("t")
            .set("lb_policy", "order")
            .key(&a, "a", "")
            .key(&b, "b", "")
            .yaml(),
    )
    .await?;
    let resp = app.chat("t", hello("gpt-4o-mini")).await?;
    assert_eq!(served_by(&resp), "b");
    assert_eq!(resp.status(), 503);
    // no HTTP answer at all (nothing listens): 502 from keypool itself
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let app = App::start(&format!(
        "dbtype: none\nauthorization: t\nupstreams:\n  - {{name: gone, sk: sk-gone-0123456789, endpoint: 'http://{closed}/v1'}}\n"
    ))
    .await?;
    assert_eq!(
        status_code(app.chat("t", hello("gpt-4o-mini")).await?)
            .await?
            .0,
        502
    );
    Ok(())
}

/// `sk: asis` keys forward the caller's own credential, never a keypool token: a caller who
/// authenticated with a token is not served by them; an anonymous caller (a `noauth` key makes
/// that possible) has its own `Authorization` passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asis_keys_never_forward_a_keypool_token() -> anyhow::Result<()> {
    let up = mock(
        "own",
        Behavior {
            require_key: Some("client-own-key".into()),
            ..Behavior::default()
        },
    );
    let app = App::start(&format!(
        "dbtype: none\nauthorization: t\nupstreams:\n  - {{name: own, sk: asis, noauth: true, endpoint: '{}'}}\n",
        up.url()
    ))
    .await?;
    let with_token = app.chat("t", hello("gpt-4o-mini")).await?;
    assert_eq!(
        status_code(with_token).await?,
        (404, "model_not_found".into())
    );
    assert_eq!(up.requests(), 0, "the keypool token never left");
    let own = app.chat("client-own-key", hello("gpt-4o-mini")).await?;
    assert_eq!(own.status(), 200);
    assert_eq!(
        up.last_request().expect("recorded").header("authorization"),
        Some("Bearer client-own-key")
    );
    Ok(())
}

/// A request asking to upgrade the connection is refused at once (its "body" would be the rest
/// of the connection: read, it holds the connection for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_refused_at_once() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock("up", Behavior::default());
    let app = App::start(&config().token("t").key(&up, "up", "").yaml()).await?;
    let addr = app.origin.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    conn.write_all(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await?;
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut head)).await??;
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(up.requests(), 0);
    Ok(())
}

/// Path rules see one spelling of the path, the one forwarded: repeated slashes, `.` segments,
/// a trailing slash and encoded unreserved characters cannot pass a `deny`; `..` and `;` are
/// refused with 400 before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_path_meets_the_same_rules() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let app = App::start(
        &config()
            .token("t")
            .key(
                &up,
                "up",
                "allow: ['/v1/sandbox/*'], deny: ['/v1/sandbox/secret']",
            )
            .yaml(),
    )
    .await?;
    for spelling in [
        "/v1/sandbox/secret",
        "/v1/sandbox//secret",
        "/v1/sandbox/./secret",
        "/v1/sandbox/secret/",
        "/v1/sandbox/%73ecret",
    ] {
        let (code, body) = app.raw_get(spelling, "t").await?;
        assert_eq!(code, 404, "{spelling}: {body}");
        assert!(body.contains("model_not_found"), "{spelling}: {body}");
    }
    for refused in [
        "/v1/sandbox/../../admin/keys",
        "/v1/sandbox/%2e%2e/x",
        "/v1/sandbox/secret;x",
    ] {
        let (code, body) = app.raw_get(refused, "t").await?;
        assert_eq!(code, 400, "{refused}: {body}");
        assert!(body.contains("invalid_request_error"), "{refused}: {body}");
    }
    assert_eq!(up.requests(), 0, "nothing reached the upstream");
    // an allowed path is forwarded in its plain form
    let (code, _) = app.raw_get("/v1/sandbox//%6Fpen/", "t").await?;
    assert_eq!(
        code, 404,
        "the mock has no such route; what matters is what it was asked"
    );
    assert_eq!(
        up.last_request().map(|r| r.path),
        Some("/v1/sandbox/open".to_owned())
    );
    Ok(())
}

/// An upstream that answers `status_line` to every request on a raw socket (keeping the
/// connection open, as an upgraded one would be); its `http://…/v1` URL.
async fn raw_upstream(status_line: &'static str) -> anyhow::Result<String> {
    raw_answer(status_line.as_bytes().to_vec()).await
}

/// An upstream that writes `answer` (head and body, as bytes) to every request on a raw
/// socket, then keeps the connection open; its `http://…/v1` URL.
async fn raw_answer(answer: Vec<u8>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(&answer).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    Ok(url)
}

/// A 101 (or a status outside HTTP's) is not an answer: the attempt fails over to the next
/// key, and with no other key the client gets 502, never the 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_101_or_600_fails_over_and_is_never_relayed() -> anyhow::Result<()> {
    let good = mock("good", Behavior::default());
    for line in [
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        "HTTP/1.1 600 Weird\r\nContent-Length: 0\r\n\r\n",
    ] {
        let bad = raw_upstream(line).await?;
        let yaml = format!(
            "authorization: t\ndbtype: none\nlb_policy: order\nupstreams:\n  \
             - {{name: bad, sk: sk-bad-0123456789, endpoint: \"{bad}\"}}\n  \
             - {{name: good, sk: sk-good-0123456789, endpoint: \"{}\"}}\n",
            good.url()
        );
        let app = App::start(&yaml).await?;
        let resp = app.chat("t", hello("gpt-4o-mini")).await?;
        assert_eq!(resp.status(), 200, "{line}");
        assert_eq!(served_by(&resp), "good");
        let alone = App::start(&format!(
            "authorization: t\ndbtype: none\nupstreams:\n  - {{name: bad, sk: sk-bad-0123456789, endpoint: \"{bad}\"}}\n"
        ))
        .await?;
        let resp = alone.chat("t", hello("gpt-4o-mini")).await?;
        assert_eq!(
            status_code(resp).await?,
            (502, "upstream_unreachable".into()),
            "{line}"
        );
    }
    Ok(())
}

/// Upstream answers are bounded: a whole answer past `max_response_bytes` is a 502
/// `response_too_large` (never buffered past the limit); an error body past 1 MiB on the
/// failover path fails over, and alone is that 502; one stream event past
/// `max_stream_event_bytes` ends the stream with an error event; a stream past
/// `stream_deadline` ends with one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_are_bounded() -> anyhow::Result<()> {
    let long = mock(
        "long",
        Behavior {
            reply_words: 3000,
            ..Behavior::default()
        },
    );
    let app = App::start(
        &config()
            .token("t")
            .set("max_response_bytes", "4096")
            .key(&long, "long", "")
            .yaml(),
    )
    .await?;
    let resp = app.chat("t", hello("gpt-4o-mini")).await?;
    assert_eq!(status_code(resp).await?, (502, "response_too_large".into()));

    let mut huge_error = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 3145728\r\n\r\n".to_vec();
    huge_error.resize(huge_error.len() + (3 << 20), b' ');
    let bad = raw_answer(huge_error).await?;
    let good = mock("good", Behavior::default());
    let yaml = |keys: &str| {
        format!("authorization: t\ndbtype: none\nlb_policy: order\nupstreams:\n{keys}")
    };
    let bad_key = format!("  - {{name: bad, sk: sk-bad-0123456789, endpoint: \"{bad}\"}}\n");
    let good_key = format!(
        "  - {{name: good, sk: sk-good-0123456789, endpoint: \"{}\"}}\n",
        good.url()
    );
    let app = App::start(&yaml(&format!("{bad_key}{good_key}"))).await?;
    let resp = app.chat("t", hello("gpt-4o-mini")).await?;
    assert_eq!(served_by(&resp), "good");
    let app = App::start(&yaml(&bad_key)).await?;
    let resp = app.chat("t", hello("gpt-4o-mini")).await?;
    assert_eq!(status_code(resp).await?, (502, "response_too_large".into()));

    let mut endless = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: ".to_vec();
    endless.resize(endless.len() + 8192, b'x');
    let sse = raw_answer(endless).await?;
    let app = App::start(&format!(
        "authorization: t\ndbtype: none\nmax_stream_event_bytes: 2048\nupstreams:\n  - {{name: sse, sk: sk-sse-0123456789, endpoint: \"{sse}\"}}\n"
    ))
    .await?;
    let mut req = hello("gpt-4o-mini");
    req["stream"] = serde_json::json!(true);
    let text = tokio::time::timeout(
        Duration::from_secs(10),
        app.chat("t", req.clone()).await?.text(),
    )
    .await??;
    assert!(
        text.contains("max_stream_event_bytes") && !text.contains("xxxx"),
        "{text}"
    );

    let slow = mock(
        "slow",
        Behavior {
            chunk_interval_ms: 100,
            reply_words: 40,
            ..Behavior::default()
        },
    );
    let app = App::start(
        &config()
            .token("t")
            .set("stream_deadline", "0.5")
            .key(&slow, "slow", "")
            .yaml(),
    )
    .await?;
    let started = std::time::Instant::now();
    let text = app.chat("t", req).await?.text().await?;
    assert!(text.contains("stream_deadline"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// `idle_timeout` bounds the gap between two chunks, not the stream: a stream three times as
/// long as the gap, with chunks closer than it, ends whole (its timer, set for an earlier gap,
/// is moved on when it fires before the gap's end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_idle_gap_ends_whole() -> anyhow::Result<()> {
    let steady = mock(
        "steady",
        Behavior {
            chunk_interval_ms: 200,
            reply_words: 8,
            ..Behavior::default()
        },
    );
    let app = App::start(
        &config()
            .token("t")
            .set("idle_timeout", "0.5")
            .key(&steady, "steady", "")
            .yaml(),
    )
    .await?;
    let mut req = hello("gpt-4o-mini");
    req["stream"] = serde_json::json!(true);
    let started = std::time::Instant::now();
    let text = app.chat("t", req).await?.text().await?;
    assert!(started.elapsed() > Duration::from_millis(1500), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("error"), "{text}");
    Ok(())
}

/// Writes `head` then `body` on a new connection to `app` and answers what came back within
/// `wait` (the status code; 0 when nothing came), keeping the connection for the caller.
async fn send_raw(
    app: &App,
    head: &str,
    body: &[u8],
    wait: Duration,
) -> anyhow::Result<(u16, String, tokio::net::TcpStream)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(app.origin.trim_start_matches("http://")).await?;
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body).await?;
    let mut buf = vec![0u8; 8192];
    let n = match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
        Ok(r) => r?,
        Err(_) => 0,
    };
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text, tcp))
}

/// A body that stops arriving gets 408 after `body_timeout`; the bytes being received at once
/// across connections are capped (503 with Retry-After past `max_buffered_request_bytes`),
/// and given back when a body is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_bounded_in_time_and_in_bytes_at_once() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let app = App::start(
        &config()
            .token("t")
            .set("body_timeout", "0.5")
            .set("max_buffered_request_bytes", "1048576")
            .key(&up, "up", "")
            .yaml(),
    )
    .await?;
    let head = |len: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // 40 of 100 declared bytes, then nothing: 408, not held for good
    let (code, text, _held) =
        send_raw(&app, &head(100), &[b' '; 40], Duration::from_secs(5)).await?;
    assert_eq!(code, 408, "{text}");
    assert!(text.contains("request_timeout"), "{text}");

    // one upload holds 1 MiB minus a little of the budget; a second one past it is refused
    let (code, _, slow) = send_raw(
        &app,
        &head(2 << 20),
        &vec![b' '; (1 << 20) - 1000],
        Duration::from_millis(200),
    )
    .await?;
    assert_eq!(code, 0, "still receiving");
    let (code, text, _) = send_raw(
        &app,
        &head(100_000),
        &vec![b' '; 100_000],
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(code, 503, "{text}");
    assert!(
        text.contains("server_busy") && text.to_ascii_lowercase().contains("retry-after"),
        "{text}"
    );
    // the slow upload times out and gives its bytes back: requests are served again
    drop(slow);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(app.chat("t", hello("gpt-4o-mini")).await?.status(), 200);
    assert_eq!(up.requests(), 1);
    Ok(())
}

/// Each keypool records into the telemetry handle it was started with: two in one process
/// count apart (no process-wide registry), and a key's attempts, the gateway's requests and its
/// refusals all land in the one `/metrics` of the server that saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keypools_in_one_process_record_apart() -> anyhow::Result<()> {
    let up = mock("up", Behavior::default());
    let yaml = config().token("t").key(&up, "telemetry-key", "").yaml();
    let (busy, idle) = (App::start(&yaml).await?, App::start(&yaml).await?);
    for _ in 0..3 {
        assert_eq!(busy.chat("t", hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert_eq!(
        busy.chat("wrong", hello("gpt-4o-mini")).await?.status(),
        401
    );
    // counters: whole numbers in the text format
    let count = |text: &str, series: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let (_, seen) = busy.raw_get("/metrics", "").await?;
    let (_, quiet) = idle.raw_get("/metrics", "").await?;
    let requests = "keypool_requests_total{";
    let attempts = "keypool_upstream_attempts_total{key=\"telemetry-key\"";
    let refusals = "keypool_refusals_total{";
    assert_eq!(count(&seen, requests), 3, "{seen}");
    assert_eq!(count(&seen, attempts), 3, "{seen}");
    assert_eq!(count(&seen, refusals), 1, "{seen}");
    for series in [requests, attempts, refusals] {
        assert_eq!(
            count(&quiet, series),
            0,
            "{series} in the idle one's: {quiet}"
        );
    }
    Ok(())
}
