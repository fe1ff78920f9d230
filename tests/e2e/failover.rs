//! Failover, budgets and key health through the real binary.

use std::time::{Duration, Instant};

use keypool_e2e::{Behavior, Gateway, config, hello, json, mock, served_by};
use serde_json::json;

const T: &str = "client-token-abc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_failover_past_a_500_and_a_slow_upstream() -> anyhow::Result<()> {
    let broken = mock(
        "broken",
        Behavior {
            status: Some(500),
            ..Behavior::default()
        },
    );
    let slow = mock(
        "slow",
        Behavior {
            latency_ms: 3000,
            ..Behavior::default()
        },
    );
    let good = mock("good", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&broken, "broken", "")
            .key(&slow, "slow", "timeout: 0.5")
            .key(&good, "good", "")
            .yaml(),
    )
    .await?;
    let started = Instant::now();
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(served_by(&resp), "good");
    let body = json(resp).await?;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from good the mock"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (broken.requests(), slow.requests(), good.requests()),
        (1, 1, 1)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_returned_as_is_and_not_retried() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let b = mock("b", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&a, "a", "")
            .key(&b, "b", "")
            .yaml(),
    )
    .await?;
    let mut req = hello("gpt-4o-mini");
    req["temperature"] = json!(5);
    let resp = gw.chat(T, req).await?;
    assert_eq!(resp.status(), 400);
    assert_eq!(served_by(&resp), "a");
    let body = json(resp).await?;
    assert_eq!(body["error"]["code"], "decimal_above_max_value");
    assert_eq!((a.requests(), b.requests()), (1, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_fail_the_last_real_status_and_body_come_back() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            status: Some(500),
            ..Behavior::default()
        },
    );
    let b = mock(
        "b",
        Behavior {
            status: Some(503),
            ..Behavior::default()
        },
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&a, "a", "")
            .key(&b, "b", "")
            .yaml(),
    )
    .await?;
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(served_by(&resp), "b");
    let body = json(resp).await?;
    assert_eq!(body["error"]["message"], "mock forced status 503");
    assert_eq!((a.requests(), b.requests()), (1, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_everywhere_is_a_502() -> anyhow::Result<()> {
    // a port that refuses connections: bind, note the port, close
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let yaml = format!(
        "authorization: {T}\ndbtype: none\nupstreams:\n  - {{name: dead, sk: sk-x, endpoint: \"http://127.0.0.1:{port}/v1\"}}\n"
    );
    let gw = Gateway::start(&yaml).await?;
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 502);
    let body = json(resp).await?;
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    Ok(())
}

/// A key whose upstream takes no connection (its SYNs dropped: here a listener whose accept
/// queue is full) fails over within the 5 s a new connection may take, not after the key's
/// 120 s `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_upstream_takes_no_connection_fails_over_in_seconds() -> anyhow::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let silent = socket.listen(1)?;
    let addr = silent.local_addr()?;
    let mut queued = Vec::new();
    while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        queued.push(c);
        anyhow::ensure!(queued.len() < 16, "the accept queue never filled");
    }
    let good = mock("good", Behavior::default());
    let gw = Gateway::start(&format!(
        "authorization: {T}\ndbtype: none\nlb_policy: order\ntimeout: 120\nupstreams:\n  - {{name: silent, sk: sk-x, endpoint: \"http://{addr}/v1\"}}\n  - {{name: good, sk: sk-y, endpoint: \"{}\"}}\n",
        good.url()
    ))
    .await?;
    let started = Instant::now();
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    let waited = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(served_by(&resp), "good");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(9),
        "{waited:?}"
    );
    Ok(())
}

/// An upstream named by its host (`localhost`, from /etc/hosts, where it may name `::1`
/// before `127.0.0.1`: every address is tried) is looked up and reached, and so is it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_named_by_its_host_is_reached() -> anyhow::Result<()> {
    let up = mock("named", Behavior::default());
    let port = up.addr().port();
    let yaml = format!(
        "authorization: {T}\ndbtype: none\nupstreams:\n  - {{name: named, sk: sk-x, endpoint: \"http://localhost:{port}/v1\"}}\n"
    );
    let gw = Gateway::start(&yaml).await?;
    let (first, second) = tokio::join!(
        gw.chat(T, hello("gpt-4o-mini")),
        gw.chat(T, hello("gpt-4o-mini"))
    );
    for resp in [first?, second?, gw.chat(T, hello("gpt-4o-mini")).await?] {
        assert_eq!(resp.status(), 200);
        assert_eq!(served_by(&resp), "named");
    }
    assert_eq!(up.requests(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_keys_at_rpm_4_serve_4_each_then_429_with_retry_after() -> anyhow::Result<()> {
    let (a, b, c) = (
        mock("a", Behavior::default()),
        mock("b", Behavior::default()),
        mock("c", Behavior::default()),
    );
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("queue_timeout", "2")
            .key(&a, "a", "rpm: 4")
            .key(&b, "b", "rpm: 4")
            .key(&c, "c", "rpm: 4")
            .yaml(),
    )
    .await?;
    for _ in 0..12 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert_eq!((a.requests(), b.requests(), c.requests()), (4, 4, 4));
    let started = Instant::now();
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str()?.parse()?;
    assert!(
        (55..=61).contains(&retry_after),
        "retry-after {retry_after}"
    );
    let body = json(resp).await?;
    assert_eq!(body["error"]["code"], "pool_budget_exhausted");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    // the earliest budget is a minute away, beyond queue_timeout: answered at once
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(a.requests() + b.requests() + c.requests(), 12);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queue_for_budget_that_frees_within_queue_timeout() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("queue_timeout", "5")
            .set("lb_policy", "order")
            .key(&a, "a", "rpm: 2")
            .yaml(),
    )
    .await?;
    // nothing frees within 5 s when the window is a minute: the third is refused at once...
    for _ in 0..2 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 429);
    // ...while an upstream cooldown of 1 s is waited out within the queue timeout
    let b = mock(
        "b",
        Behavior {
            status: Some(429),
            retry_after: Some("1".into()),
            ..Behavior::default()
        },
    );
    let gw2 = Gateway::start(
        &config()
            .token(T)
            .set("queue_timeout", "5")
            .key(&b, "b", "")
            .yaml(),
    )
    .await?;
    let first = gw2.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(
        first.status(),
        429,
        "a lone key that answers 429 gives its own 429 back"
    );
    assert_eq!(
        json(first).await?["error"]["message"],
        "mock forced status 429"
    );
    b.set(Behavior {
        name: "b".into(),
        ..Behavior::default()
    });
    let started = Instant::now();
    let second = gw2.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(second.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(b.requests(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_cools_the_key_down_for_its_retry_after() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            status: Some(429),
            retry_after: Some("2".into()),
            ..Behavior::default()
        },
    );
    let b = mock("b", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&a, "a", "")
            .key(&b, "b", "")
            .yaml(),
    )
    .await?;
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(
        (resp.status().as_u16(), served_by(&resp).as_str()),
        (200, "b")
    );
    a.set(Behavior {
        name: "a".into(),
        ..Behavior::default()
    });
    for _ in 0..5 {
        let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
        assert_eq!(served_by(&resp), "b", "a is cooling down");
    }
    assert_eq!(a.requests(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(served_by(&resp), "a", "a is back after its Retry-After");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401_disables_the_key() -> anyhow::Result<()> {
    let bad = mock(
        "bad",
        Behavior {
            require_key: Some("a-different-key".into()),
            ..Behavior::default()
        },
    );
    let good = mock("good", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token(T)
            .set("lb_policy", "order")
            .key(&bad, "bad", "")
            .key(&good, "good", "")
            .yaml(),
    )
    .await?;
    for _ in 0..6 {
        let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
        assert_eq!(
            (resp.status().as_u16(), served_by(&resp).as_str()),
            (200, "good")
        );
    }
    assert_eq!(bad.requests(), 1, "a disabled key gets no more traffic");
    assert!(
        gw.logs().contains("disabling"),
        "the log says the key was disabled"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_the_key_never_the_client_token() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&config().token(T).key(&a, "a", "").yaml()).await?;
    let resp = gw
        .http()
        .post(gw.url("/v1/chat/completions?trace=1"))
        .bearer_auth(T)
        .header("cookie", "session=secret-cookie")
        .header("x-custom", "dropped-by-default")
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let seen = a.last_request().expect("recorded");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.query, "trace=1");
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-test-a-0123456789")
    );
    assert_eq!(seen.header("cookie"), None);
    assert_eq!(seen.header("x-custom"), None);
    assert!(!String::from_utf8_lossy(&seen.body).contains(T));
    let logs = gw.logs();
    assert!(!logs.contains(T), "client token in logs");
    assert!(!logs.contains("sk-test-a"), "upstream key in logs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_header_forwards_client_headers_but_not_credentials() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let gw = Gateway::start(&config().token(T).key(&a, "a", "keep_header: true").yaml()).await?;
    gw.http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(T)
        .header("x-custom", "kept")
        .header("x-api-key", "client-secret")
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    let seen = a.last_request().expect("recorded");
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-test-a-0123456789")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_used_spreads_and_per_key_authorization_restricts() -> anyhow::Result<()> {
    let a = mock("a", Behavior::default());
    let vip = mock("vip", Behavior::default());
    let gw = Gateway::start(
        &config()
            .token("t1,t2")
            .key(&a, "a", "")
            .key(&vip, "vip", "authorization: t2")
            .yaml(),
    )
    .await?;
    for _ in 0..4 {
        assert_eq!(served_by(&gw.chat("t1", hello("gpt-4o-mini")).await?), "a");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(served_by(&gw.chat("t2", hello("gpt-4o-mini")).await?));
    }
    assert!(seen.contains("vip"), "t2 may use vip: {seen:?}");
    assert_eq!(vip.requests() + a.requests(), 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sk_asis_passes_the_clients_own_key_and_its_401_disables_nothing() -> anyhow::Result<()> {
    let a = mock(
        "a",
        Behavior {
            require_key: Some("client-own-key".into()),
            ..Behavior::default()
        },
    );
    // no keypool token: the client's Authorization is the upstream key itself
    let yaml = format!(
        "dbtype: none\nupstreams:\n  - {{name: a, sk: asis, endpoint: \"{}\"}}\n",
        a.url()
    );
    let gw = Gateway::start(&yaml).await?;
    let ok = gw.chat("client-own-key", hello("gpt-4o-mini")).await?;
    assert_eq!(ok.status(), 200);
    assert_eq!(
        a.last_request().expect("recorded").header("authorization"),
        Some("Bearer client-own-key")
    );
    // a wrong client key: the upstream's 401 goes back as it is, and the key stays usable
    let bad = gw.chat("someone-elses-key", hello("gpt-4o-mini")).await?;
    assert_eq!(bad.status(), 401);
    assert_eq!(json(bad).await?["error"]["code"], "invalid_api_key");
    assert_eq!(
        gw.chat("client-own-key", hello("gpt-4o-mini"))
            .await?
            .status(),
        200
    );
    assert_eq!(a.requests(), 3);
    Ok(())
}

/// An https:// upstream: keypool's own upstream client verifies it against the platform's roots
/// (here a test CA through `SSL_CERT_FILE`), and refuses a certificate it cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_verified_against_the_platform_roots() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = keypool_e2e::test_pki(dir.path())?;
    let up = mock("tls", Behavior::default());
    let tls = keypool_e2e::TlsTerminator::start(&up.hostport(), &cert, &key).await?;
    let yaml = format!(
        "dbtype: none\nauthorization: {T}\nupstreams:\n  - {{name: tls, sk: sk-tls-0123456789, endpoint: \"https://127.0.0.1:{}/v1\"}}\n",
        tls.addr.port()
    );
    let trusted = Gateway::start_env(&yaml, &[("SSL_CERT_FILE", ca.as_str())]).await?;
    let resp = trusted.chat(T, hello("gpt-4o-mini")).await;
    let resp = resp.map_err(|e| anyhow::anyhow!("{e}: {}", trusted.logs()))?;
    assert_eq!(resp.status(), 200, "{}", trusted.logs());
    assert_eq!(served_by(&resp), "tls");
    let body = json(resp).await?;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from tls the mock"
    );
    // a streamed answer over TLS, too
    let resp = trusted
        .chat(T, json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await?.contains("data: [DONE]"));
    assert_eq!(up.requests(), 2);
    // sequential requests go on kept-alive TLS connections: one per worker at most
    for _ in 0..6 {
        assert_eq!(trusted.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    assert!(
        (1..=2).contains(&tls.accepted()),
        "{} TLS connections for 8 requests",
        tls.accepted()
    );
    assert_eq!(up.requests(), 8);

    // without the test CA the certificate is not trusted: no request reaches the upstream
    let untrusted = Gateway::start_env(&yaml, &[("SSL_CERT_FILE", "/dev/null")]).await?;
    let resp = untrusted.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 502);
    let body = json(resp).await?;
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
    assert_eq!(up.requests(), 8);
    Ok(())
}

/// keypool's own upstream pool: sequential requests reuse one keep-alive connection, and when
/// the upstream closes its idle connections the next request opens a new one and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_replaced_when_closed() -> anyhow::Result<()> {
    let up = mock("pooled", Behavior::default());
    let proxy = keypool_e2e::FaultProxy::start(&up.hostport()).await?;
    let yaml = format!(
        "dbtype: none\nauthorization: {T}\nupstreams:\n  - {{name: pooled, sk: sk-pooled-0123456789, endpoint: \"http://{}/v1\"}}\n",
        proxy.hostport()
    );
    let gw = Gateway::start(&yaml).await?;
    for _ in 0..10 {
        assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);
    }
    // one connection per worker at most: sequential requests never need two at once
    let first = proxy.accepted();
    assert!(
        (1..=2).contains(&first),
        "{first} connections for 10 requests"
    );
    // the upstream side closes every connection while they are idle
    proxy.set_up(false);
    proxy.set_up(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..4 {
        let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
        assert_eq!(resp.status(), 200, "{}", gw.logs());
    }
    assert!(proxy.accepted() > first, "new connections after the close");
    assert_eq!(up.requests(), 14);
    Ok(())
}

/// A stream over TLS whose events arrive apart: between events the connection waits on its
/// socket with nothing decrypted in rustls and no read buffer, and every event is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_tls_relays_events_that_arrive_apart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = keypool_e2e::test_pki(dir.path())?;
    let up = mock(
        "tls",
        Behavior {
            chunk_interval_ms: 40,
            reply_words: 6,
            ..Behavior::default()
        },
    );
    let tls = keypool_e2e::TlsTerminator::start(&up.hostport(), &cert, &key).await?;
    let yaml = format!(
        "dbtype: none\nauthorization: {T}\nupstreams:\n  - {{name: tls, sk: sk-tls-0123456789, endpoint: \"https://127.0.0.1:{}/v1\"}}\n",
        tls.addr.port()
    );
    let gw = Gateway::start_env(&yaml, &[("SSL_CERT_FILE", ca.as_str())]).await?;
    for _ in 0..2 {
        let started = Instant::now();
        let resp = gw
            .chat(T, json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .await?;
        assert_eq!(resp.status(), 200, "{}", gw.logs());
        let text = resp.text().await?;
        let words: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(words.split_whitespace().count(), 6, "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(up.requests(), 2);
    Ok(())
}

/// An upstream that answers the first request on each connection (after `delay`) and closes a
/// connection when a second request arrives on it, without answering: what an upstream's idle
/// timeout does when its close crosses keypool's reuse. Its `http://…/v1` URL.
async fn closes_kept_connections(delay: Duration) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: &str = r#"{"id":"c","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                // one whole request: its head, then its content-length's bytes
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n @ 1..) = tcp.read(&mut buf).await else {
                        return;
                    };
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
                    BODY.len()
                );
                if tcp.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // the next request on this connection is read, then the connection closes
                let _ = tcp.read(&mut buf).await;
            });
        }
    });
    Ok(url)
}

/// Kept-alive connections the upstream closes as they are reused (its idle timeout crossing
/// the reuse, in a burst) do not count against their key: three in a row would cool it down.
/// A request that meets one is sent once more to the same key (on the next connection), and
/// fails over to the next key only when that one is closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_as_they_are_reused_do_not_cool_their_key() -> anyhow::Result<()> {
    let flaky = closes_kept_connections(Duration::from_millis(300)).await?;
    let good = mock("good", Behavior::default());
    let yaml = format!(
        "authorization: {T}\ndbtype: none\nlb_policy: order\nupstreams:\n  - {{name: flaky, sk: sk-flaky-0123456789, endpoint: \"{flaky}\"}}\n  - {{name: good, sk: sk-good-0123456789, endpoint: \"{}\"}}\n",
        good.url()
    );
    // one worker: one pool of upstream connections
    let gw = Gateway::start_env(&yaml, &[("KEYPOOL_WORKERS", "1")]).await?;
    // three requests at once: three connections to `flaky`, kept once answered
    let (a, b, c) = tokio::join!(
        gw.chat(T, hello("gpt-4o-mini")),
        gw.chat(T, hello("gpt-4o-mini")),
        gw.chat(T, hello("gpt-4o-mini"))
    );
    for resp in [a?, b?, c?] {
        assert_eq!(resp.status(), 200);
        assert_eq!(served_by(&resp), "flaky");
    }
    // two kept connections close under the next request: it goes to `good`
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 200, "{}", gw.logs());
    assert_eq!(served_by(&resp), "good");
    // the third closes too; `flaky`, not cooling down, takes the request on a new connection
    let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(served_by(&resp), "flaky", "{}", gw.logs());
    let metrics = gw.metrics().await?;
    assert_eq!(stale_attempts(&metrics, "flaky"), 3, "{metrics}");
    assert!(!gw.logs().contains("cooling down"), "{}", gw.logs());
    Ok(())
}

/// With a single key (no failover), a request whose kept-alive connection the upstream closes
/// as it is reused is answered: sent once more to the key, on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_key_answers_past_a_connection_closed_as_it_is_reused() -> anyhow::Result<()> {
    let flaky = closes_kept_connections(Duration::ZERO).await?;
    let yaml = format!(
        "authorization: {T}\ndbtype: none\nupstreams:\n  - {{name: flaky, sk: sk-flaky-0123456789, endpoint: \"{flaky}\"}}\n"
    );
    let gw = Gateway::start_env(&yaml, &[("KEYPOOL_WORKERS", "1")]).await?;
    for _ in 0..4 {
        let resp = gw.chat(T, hello("gpt-4o-mini")).await?;
        assert_eq!(resp.status(), 200, "{}", gw.logs());
    }
    let metrics = gw.metrics().await?;
    assert_eq!(stale_attempts(&metrics, "flaky"), 3, "{metrics}");
    Ok(())
}

/// The attempts on `key` that met a connection closed as it was reused, from `/metrics`.
fn stale_attempts(metrics: &str, key: &str) -> u64 {
    let key = format!(r#"key="{key}""#);
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("keypool_upstream_attempts_total")
                && l.contains(&key)
                && l.contains(r#"outcome="stale_connection""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
