//! The API port's own HTTP/1.1 server (`keypool_proxy::edge`), over raw sockets: what a
//! client may send (keep-alive, pipelining, chunked bodies, `Expect: 100-continue`, HTTP/1.0,
//! HEAD) is served; what it must not (heads past their bounds, framings two readers could read
//! two ways, heads that never finish) gets an OpenAI-shaped error and the connection closes.

#[allow(dead_code)] // the harness's helpers this file does not call
mod app;

use std::time::{Duration, Instant};

use app::App;
use keypool_e2e::{Behavior, config, mock};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn connect(app: &App) -> anyhow::Result<TcpStream> {
    Ok(TcpStream::connect(app.origin.trim_start_matches("http://")).await?)
}

/// Reads until the peer closes, or `wait` has passed with nothing more: what arrived, and
/// whether the connection was closed.
async fn read_for(tcp: &mut TcpStream, wait: Duration) -> anyhow::Result<(String, bool)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
            Err(_) => return Ok((String::from_utf8_lossy(&got).into_owned(), false)),
            Ok(Ok(0) | Err(_)) => return Ok((String::from_utf8_lossy(&got).into_owned(), true)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn chat_body() -> String {
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_owned()
}

async fn start() -> anyhow::Result<(keypool_e2e::MockServer, App)> {
    let up = mock("up", Behavior::default());
    let app = App::start(&config().token("t").key(&up, "up", "").yaml()).await?;
    Ok((up, app))
}

/// Requests written at once on one connection are answered in order on it, and it stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() -> anyhow::Result<()> {
    let (up, app) = start().await?;
    let mut tcp = connect(&app).await?;
    let body = chat_body();
    let post = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let all = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n{post}GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    tcp.write_all(all.as_bytes()).await?;
    let (text, closed) = read_for(&mut tcp, Duration::from_millis(1500)).await?;
    assert!(!closed, "kept alive: {text}");
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "404"], "{text}");
    assert!(text.contains("\r\n\r\nok"), "{text}");
    assert!(text.contains("Hello from up"), "{text}");
    assert!(text.contains("unknown_url"), "{text}");
    assert_eq!(up.requests(), 1);
    Ok(())
}

/// A chunked request body, with `Expect: 100-continue`: the client is told to go on, the body
/// is read through its chunks and reaches the upstream whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_after_100_continue_reaches_the_upstream_whole() -> anyhow::Result<()> {
    let (up, app) = start().await?;
    let mut tcp = connect(&app).await?;
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\
          Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await?;
    let (text, _) = read_for(&mut tcp, Duration::from_millis(500)).await?;
    assert_eq!(text, "HTTP/1.1 100 Continue\r\n\r\n");
    let body = chat_body();
    let (a, b) = body.split_at(10);
    let chunked = format!(
        "{:x}\r\n{a}\r\n{:X};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    for piece in chunked.as_bytes().chunks(7) {
        tcp.write_all(piece).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (text, closed) = read_for(&mut tcp, Duration::from_millis(1000)).await?;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!closed);
    assert_eq!(up.requests(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&up.last_request().unwrap().body)?;
    assert_eq!(sent["messages"][0]["content"], "hi");
    Ok(())
}

/// Heads past their bounds get 431, malformed ones and ambiguous framings 400, each in
/// OpenAI's error shape, and the connection closes; nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_past_their_bounds_or_malformed_are_refused_in_openais_shape() -> anyhow::Result<()> {
    let (up, app) = start().await?;
    let cases = [
        (
            format!(
                "GET /v1/models HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(130 * 1024)
            ),
            "431",
        ),
        (
            format!("GET /v1/models HTTP/1.1\r\n{}\r\n", "X-A: a\r\n".repeat(97)),
            "431",
        ),
        (
            "GET /v1/models HTTP/1.1\r\nBad Header: x\r\n\r\n".to_owned(),
            "400",
        ),
        ("NOT HTTP AT ALL\r\n\r\n".to_owned(), "400"),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer t\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
                .to_owned(),
            "400",
        ),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer t\r\n\
             Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
                .to_owned(),
            "400",
        ),
    ];
    for (head, status) in cases {
        let mut tcp = connect(&app).await?;
        tcp.write_all(head.as_bytes()).await?;
        let (text, closed) = read_for(&mut tcp, Duration::from_secs(5)).await?;
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(text.contains("\"invalid_request\""), "{text}");
        assert!(text.contains("connection: close"), "{text}");
        assert!(closed, "{text}");
    }
    assert_eq!(up.requests(), 0);
    // a chunk that lies about its size is a bad body: 400, not forwarded
    let mut tcp = connect(&app).await?;
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer t\r\n\
          Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}}}\r\n0\r\n\r\n",
    )
    .await?;
    let (text, closed) = read_for(&mut tcp, Duration::from_secs(5)).await?;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(closed);
    assert_eq!(up.requests(), 0);
    Ok(())
}

/// A head that stops arriving gets 408 after 5 s; an idle keep-alive connection is closed
/// after 5 s with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_get_408_and_idle_connections_close() -> anyhow::Result<()> {
    let (_up, app) = start().await?;
    let started = Instant::now();
    let mut slow = connect(&app).await?;
    slow.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let mut idle = connect(&app).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let (slow_text, idle_text) = tokio::join!(
        read_for(&mut slow, Duration::from_secs(8)),
        read_for(&mut idle, Duration::from_secs(8))
    );
    let ((slow_text, slow_closed), (idle_text, idle_closed)) = (slow_text?, idle_text?);
    assert!(slow_text.starts_with("HTTP/1.1 408 "), "{slow_text}");
    assert!(slow_text.contains("request_timeout"), "{slow_text}");
    assert!(slow_closed && idle_closed);
    assert!(idle_text.starts_with("HTTP/1.1 200 OK\r\n"), "{idle_text}");
    assert_eq!(idle_text.matches("HTTP/1.1").count(), 1, "{idle_text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    Ok(())
}

/// The idle bound is from the last answer, not from the connection's start: a keep-alive
/// connection asking every 1.5 s stays open past 5 s (its timer, set for an earlier wait, is
/// moved on when it fires before the current one ends), then closes 5 s after its last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keep_alive_connection_outlives_the_idle_bound() -> anyhow::Result<()> {
    let (_up, app) = start().await?;
    let mut tcp = connect(&app).await?;
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let (text, closed) = read_for(&mut tcp, Duration::from_millis(300)).await?;
        assert!(!closed, "request {i}: closed");
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n"),
            "request {i}: {text}"
        );
    }
    let last = Instant::now();
    let (text, closed) = read_for(&mut tcp, Duration::from_secs(8)).await?;
    assert!(closed && text.is_empty(), "{text}");
    let idle = last.elapsed();
    assert!(
        idle >= Duration::from_millis(4400) && idle < Duration::from_secs(7),
        "{idle:?}"
    );
    Ok(())
}

/// HTTP/1.0 gets a length and the connection closed (unless it asked to keep it); HEAD gets
/// the length and no body; a body the app did not read closes the connection after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_head_and_unread_bodies_are_framed_as_the_client_expects() -> anyhow::Result<()> {
    let (up, app) = start().await?;
    let mut tcp = connect(&app).await?;
    tcp.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await?;
    let (text, closed) = read_for(&mut tcp, Duration::from_secs(2)).await?;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 2\r\n") && text.contains("connection: close\r\n"));
    assert!(text.ends_with("\r\n\r\nok") && closed, "{text}");

    let mut tcp = connect(&app).await?;
    tcp.write_all(
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nHEAD /nope HTTP/1.1\r\n\r\n",
    )
    .await?;
    let (text, closed) = read_for(&mut tcp, Duration::from_millis(800)).await?;
    assert!(!closed, "{text}");
    assert!(text.contains("connection: keep-alive\r\n"), "{text}");
    // HEAD is not a route of the app (404 in OpenAI's shape): its length, without the body
    let (_, head) = text.split_once("\r\n\r\nok").unwrap();
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    assert!(!head.contains("content-length: 0\r\n") && head.contains("content-length: "));
    assert!(head.ends_with("\r\n\r\n"), "no body after HEAD: {head}");

    // refused before its body was read (no token): answered, then closed
    let mut tcp = connect(&app).await?;
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"model\":",
    )
    .await?;
    let (text, closed) = read_for(&mut tcp, Duration::from_secs(2)).await?;
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(closed);
    assert_eq!(up.requests(), 0);
    Ok(())
}
