//! The upstream client's pool against a raw upstream that closes idle connections.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;

use super::*;

/// Reads one request (head and `Content-Length` body) off `stream`; `None` at EOF.
fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        data.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&data).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>())
        })
        .and_then(Result::ok)
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some(head)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// Sends one POST of `body` to `endpoint`: the answer, its body not read yet.
async fn send(
    client: &UpstreamClient,
    endpoint: &url::Url,
    body: Bytes,
) -> Result<UpstreamResponse, TransportError> {
    let target = Target::new(endpoint, "/chat/completions", None)?;
    client
        .send(reqwest::Method::POST, &target, HeaderMap::new(), body)
        .await
}

/// Sends one POST to `endpoint` and reads the whole answer.
async fn post(client: &UpstreamClient, endpoint: &url::Url) -> Result<String, TransportError> {
    let resp = send(client, endpoint, Bytes::from_static(b"{}")).await?;
    let mut body = Vec::new();
    let mut stream = resp.body;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn client() -> UpstreamClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    UpstreamClient::new(false)
}

fn listener() -> (TcpListener, url::Url) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url::Url::parse(&format!("http://{}/v1", l.local_addr().unwrap())).unwrap();
    (l, url)
}

/// An upstream that answers one request, then closes the connection when told (its
/// keep-alive timeout), then answers every request on a second connection. Answers how
/// many requests reached it.
fn closes_idle_connection(
    l: TcpListener,
    close: mpsc::Receiver<()>,
    closed: mpsc::Sender<()>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut requests = 0;
        let (mut a, _) = l.accept().unwrap();
        read_request(&mut a).unwrap();
        requests += 1;
        a.write_all(OK).unwrap();
        close.recv().unwrap();
        a.shutdown(std::net::Shutdown::Both).unwrap();
        drop(a);
        closed.send(()).unwrap();
        l.set_nonblocking(true).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < until {
            if let Ok((mut b, _)) = l.accept() {
                b.set_nonblocking(false).unwrap();
                // ends when the client's connection closes; the timeout only bounds a hang
                b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                while read_request(&mut b).is_some() {
                    requests += 1;
                    b.write_all(OK).unwrap();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        requests
    })
}

/// One request answered on a pooled connection, which the upstream then closes; returns
/// once it did, without letting this runtime run (so the connection's task has not seen
/// the close yet).
async fn pooled_then_closed() -> (UpstreamClient, url::Url, std::thread::JoinHandle<usize>) {
    let (l, url) = listener();
    let (close_tx, close_rx) = mpsc::channel();
    let (closed_tx, closed_rx) = mpsc::channel();
    let server = closes_idle_connection(l, close_rx, closed_tx);
    let client = client();
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
    close_tx.send(()).unwrap();
    closed_rx.recv().unwrap();
    (client, url, server)
}

/// Drops the client, lets its connections' tasks close them, and answers how many
/// requests reached the upstream.
async fn requests_seen(client: UpstreamClient, server: std::thread::JoinHandle<usize>) -> usize {
    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.join().unwrap()
}

/// An upstream that answers every request on every connection it accepts, the first on each
/// after 100 ms (so concurrent requests each open their own); reports each connection the
/// client closed.
fn answers_all(l: TcpListener, closed: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let closed = closed.clone();
            std::thread::spawn(move || {
                let mut first = true;
                while read_request(&mut conn).is_some() {
                    if std::mem::take(&mut first) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if conn.write_all(OK).is_err() {
                        return;
                    }
                }
                let _ = closed.send(());
            });
        }
    });
}

/// After a burst, the connections beyond the warm ones are closed once idle `spare_idle` (their
/// memory goes back), and the warm ones stay for the next requests.
#[tokio::test(flavor = "current_thread")]
async fn a_bursts_surplus_connections_are_closed_and_the_warm_ones_kept() {
    let (l, url) = listener();
    let (closed_tx, closed_rx) = mpsc::channel();
    answers_all(l, closed_tx);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reaping = Reaping {
        warm: 2,
        spare_idle: Duration::from_secs(1),
        every: Duration::from_millis(50),
    };
    let client = UpstreamClient::with_reaping(false, reaping);
    let burst = futures::future::join_all((0..10).map(|_| post(&client, &url))).await;
    assert!(burst.iter().all(|r| r.as_deref().ok() == Some("ok")));
    let pool = client.direct.clone().unwrap();
    assert_eq!(pool.idle_count(), 10);
    // younger than spare_idle: all kept
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.idle_count(), 10);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(pool.idle_count(), 2);
    for _ in 0..8 {
        closed_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    assert!(
        closed_rx.try_recv().is_err(),
        "a warm connection was closed"
    );
    // the warm ones serve the next requests: no new connection
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
    assert_eq!(pool.idle_count(), 2);
}

/// A pooled connection the upstream closed while it sat idle is not used again: the next
/// request goes on a new connection, and reaches the upstream once.
#[tokio::test(flavor = "current_thread")]
async fn a_connection_closed_while_idle_is_replaced() {
    let (client, url, server) = pooled_then_closed().await;
    // the connection's task runs meanwhile and sees the close
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
    let requests = requests_seen(client, server).await;
    assert_eq!(requests, 3, "each request reached the upstream once");
}

/// A close that races the reuse (it arrives while this worker is busy, so the connection's
/// task has not seen it when the next request takes the connection): the request is sent
/// at most once. The write may fail (then it goes on a new connection) or pass (then the
/// attempt fails as `Stale`, and the engine's failover decides, since an upstream that read a
/// request and closed looks the same from here; the key is not blamed).
#[tokio::test(flavor = "current_thread")]
async fn a_close_racing_the_reuse_never_sends_a_request_twice() {
    let (client, url, server) = pooled_then_closed().await;
    // still without yielding: the close has arrived, unseen
    std::thread::sleep(Duration::from_millis(20));
    let second = post(&client, &url).await;
    let requests = requests_seen(client, server).await;
    match second {
        Ok(body) => assert_eq!((body.as_str(), requests), ("ok", 2)),
        Err(e) => {
            assert!(matches!(e, TransportError::Stale(_)), "{e:?}");
            assert_eq!(requests, 1, "the request was sent again");
        }
    }
}

/// A request the upstream may have received (it read it, then closed the kept-alive
/// connection without answering) is never sent again: the attempt fails as `Stale` (the
/// connection's fault, not the key's), and the engine decides.
#[tokio::test(flavor = "current_thread")]
async fn a_request_that_left_is_not_sent_again() {
    let (l, url) = listener();
    let server = std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        read_request(&mut a).unwrap();
        a.write_all(OK).unwrap();
        read_request(&mut a).unwrap();
        drop(a);
        // nothing else arrives: no second connection within a second
        l.set_nonblocking(true).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        l.accept().is_err()
    });
    let client = client();
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
    assert!(matches!(
        post(&client, &url).await,
        Err(TransportError::Stale(_))
    ));
    assert!(server.join().unwrap(), "the request was sent again");
}

/// A new connection the upstream closes at once fails the attempt (no loop of reconnects), as
/// `Broken`: on a new connection no idle timeout can explain it.
#[tokio::test(flavor = "current_thread")]
async fn a_new_connection_closed_at_once_fails_the_attempt() {
    let (l, url) = listener();
    let server = std::thread::spawn(move || {
        drop(l.accept().unwrap());
        l.set_nonblocking(true).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        l.accept().is_err()
    });
    let client = client();
    assert!(matches!(
        post(&client, &url).await,
        Err(TransportError::Broken(_))
    ));
    assert!(server.join().unwrap(), "it connected again");
}

#[test]
fn targets_are_the_endpoint_origin_and_its_path_under_it() {
    let url = |s: &str| url::Url::parse(s).unwrap();
    let e = url("https://api.openai.com/v1");
    let t = Target::new(&e, "/chat/completions", Some("x=1")).unwrap();
    assert_eq!(t.origin, "https://api.openai.com");
    assert!(t.tls);
    assert_eq!((t.host, t.port), ("api.openai.com", 443));
    assert_eq!(t.path_and_query, "/v1/chat/completions?x=1");
    assert_eq!(t.url(), "https://api.openai.com/v1/chat/completions?x=1");
    let e = url("http://127.0.0.1:8080/openai/v1/");
    let t = Target::new(&e, "/models", Some("limit=2&after=x")).unwrap();
    assert_eq!(t.origin, "http://127.0.0.1:8080");
    assert_eq!(t.path_and_query, "/openai/v1/models?limit=2&after=x");
    let e = url("http://[::1]:9000");
    let t = Target::new(&e, "/embeddings", None).unwrap();
    assert_eq!(
        (t.origin, t.host, t.port),
        ("http://[::1]:9000", "[::1]", 9000)
    );
    assert_eq!(t.path_and_query, "/embeddings");
    assert_eq!(Target::new(&e, "", None).unwrap().path_and_query, "/");
    assert!(Target::new(&url("ftp://x/y"), "/z", None).is_err());
}

/// An upstream that answers the requests on each connection it accepts from `script`, in
/// order, each answer written in pieces (`|` marks where it pauses 20 ms); after an answer
/// marked `close` it closes the connection. Answers how many connections it accepted.
fn scripted(l: TcpListener, script: Vec<(&'static str, bool)>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut script = script.into_iter();
        let mut connections = 0;
        'accept: for conn in l.incoming() {
            let Ok(mut conn) = conn else { break };
            connections += 1;
            while read_request(&mut conn).is_some() {
                let Some((answer, close)) = script.next() else {
                    break 'accept;
                };
                for piece in answer.split('|') {
                    conn.write_all(piece.as_bytes()).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
                if close {
                    break;
                }
            }
            if script.len() == 0 {
                break;
            }
        }
        connections
    })
}

/// Every framing an upstream may use is read whole, and the connection is used again only
/// when the answer's framing and `connection` header allow it.
#[tokio::test(flavor = "current_thread")]
async fn every_framing_is_read_whole_and_the_connection_kept_when_it_may_be() {
    let (l, url) = listener();
    let server = scripted(
        l,
        vec![
            // chunked, in pieces that split sizes, data and CRLFs: kept
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r|\nabc\r\n1|0\r\n0123456789ABCDEF\r\n0\r\n\r\n",
                false,
            ),
            // a length, the head and body apart: kept
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n|\r\nhe|llo", false),
            // the upstream says it closes: a new connection after
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                true,
            ),
            // no length: the body runs to the close
            ("HTTP/1.1 200 OK\r\n\r\nuntil| the end", true),
            ("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast", false),
        ],
    );
    let client = client();
    assert_eq!(post(&client, &url).await.unwrap(), "abc0123456789ABCDEF");
    assert_eq!(post(&client, &url).await.unwrap(), "hello");
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
    assert_eq!(post(&client, &url).await.unwrap(), "until the end");
    assert_eq!(post(&client, &url).await.unwrap(), "last");
    drop(client);
    assert_eq!(server.join().unwrap(), 3, "connections opened");
}

/// A stream's events are handed out as they arrive, not when the body ends.
#[tokio::test(flavor = "current_thread")]
async fn a_streamed_body_hands_out_each_event_as_it_arrives() {
    let (l, url) = listener();
    let (next_tx, next_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        read_request(&mut a).unwrap();
        a.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\ndata: {\"n\": 1}\n\n\r\n",
        )
        .unwrap();
        next_rx.recv().unwrap();
        a.write_all(b"10\r\ndata: {\"n\": 2}\n\n\r\n0\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let client = client();
    let resp = send(&client, &url, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let mut body = resp.body;
    assert_eq!(
        &body.next().await.unwrap().unwrap()[..],
        b"data: {\"n\": 1}\n\n"
    );
    next_tx.send(()).unwrap();
    assert_eq!(
        &body.next().await.unwrap().unwrap()[..],
        b"data: {\"n\": 2}\n\n"
    );
    assert!(body.next().await.is_none());
    assert_eq!(
        client.direct.as_ref().unwrap().idle_count(),
        1,
        "kept for the next"
    );
}

/// A malformed answer, or a body cut short, fails the attempt as `Broken`, and its connection
/// is not kept.
#[tokio::test(flavor = "current_thread")]
async fn a_malformed_or_cut_answer_fails_as_broken() {
    for answer in [
        "HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        "NOT HTTP\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-le",
    ] {
        let (l, url) = listener();
        let server = scripted(l, vec![(answer, true)]);
        let client = client();
        match post(&client, &url).await {
            Err(TransportError::Broken(_)) => {}
            other => panic!("{answer:?}: {other:?}"),
        }
        assert_eq!(client.direct.as_ref().unwrap().idle_count(), 0);
        server.join().unwrap();
    }
}

/// A body given up before its end closes its connection (its unread rest cannot be skipped
/// safely); the next request opens another.
#[tokio::test(flavor = "current_thread")]
async fn a_body_given_up_early_closes_its_connection() {
    let (l, url) = listener();
    let (closed_tx, closed_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        read_request(&mut a).unwrap();
        a.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
            .unwrap();
        let mut rest = [0u8; 16];
        let eof = matches!(a.read(&mut rest), Ok(0));
        closed_tx.send(eof).unwrap();
        let (mut b, _) = l.accept().unwrap();
        read_request(&mut b).unwrap();
        b.write_all(OK).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    let client = client();
    let resp = send(&client, &url, Bytes::new()).await.unwrap();
    let mut body = resp.body;
    assert_eq!(&body.next().await.unwrap().unwrap()[..], b"part");
    drop(body);
    assert!(
        closed_rx.recv_timeout(Duration::from_secs(2)).unwrap(),
        "not closed"
    );
    assert_eq!(post(&client, &url).await.unwrap(), "ok");
}

/// A large request body (past the size written with its head) arrives whole.
#[tokio::test(flavor = "current_thread")]
async fn a_large_request_body_arrives_whole() {
    let (l, url) = listener();
    let server = std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut data = Vec::new();
        let mut byte = [0u8; 1];
        while !data.ends_with(b"\r\n\r\n") {
            a.read_exact(&mut byte).unwrap();
            data.push(byte[0]);
        }
        let mut body = vec![0u8; 100_000];
        a.read_exact(&mut body).unwrap();
        a.write_all(OK).unwrap();
        (String::from_utf8(data).unwrap(), body)
    });
    let client = client();
    let target = Target::new(&url, "/x", None).unwrap();
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let resp = client
        .send(
            reqwest::Method::PUT,
            &target,
            HeaderMap::new(),
            Bytes::from(sent.clone()),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("PUT /v1/x HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("content-length: 100000\r\n"), "{head}");
    assert!(body == sent);
}

/// An upstream that closes each connection right after its answer without saying so
/// (no `connection: close`): the close is seen while the connection is idle, and the next
/// request goes on a new one instead of failing.
#[tokio::test(flavor = "current_thread")]
async fn an_upstream_closing_after_each_answer_unannounced_never_fails_a_request() {
    let (l, url) = listener();
    let server = std::thread::spawn(move || {
        let mut connections = 0;
        for conn in l.incoming().take(5) {
            let mut conn = conn.unwrap();
            connections += 1;
            read_request(&mut conn).unwrap();
            conn.write_all(OK).unwrap();
        }
        connections
    });
    let client = client();
    for _ in 0..5 {
        assert_eq!(post(&client, &url).await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.join().unwrap(), 5);
}

/// A named upstream's address is looked up once for every connection a burst opens to it.
#[tokio::test(flavor = "current_thread")]
async fn a_named_upstream_is_looked_up_once_for_a_bursts_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (l, url) = listener();
    let port = url.port().unwrap();
    let (closed_tx, _closed_rx) = mpsc::channel();
    answers_all(l, closed_tx);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&lookups);
    let addresses = Addresses::with_lookup(Box::new(move |name, port| {
        counted.fetch_add(1, Ordering::SeqCst);
        // the system resolver, as an upstream named in /etc/hosts
        let name = if name == "upstream.test" {
            "localhost".to_owned()
        } else {
            name
        };
        Box::pin(async move {
            tokio::net::lookup_host((name.as_str(), port))
                .await
                .map(Iterator::collect)
        })
    }));
    let client = UpstreamClient::with_pool(false, Reaping::default(), addresses, CONNECT_WITHIN);
    let named = url::Url::parse(&format!("http://upstream.test:{port}/v1")).unwrap();
    let burst = futures::future::join_all((0..8).map(|_| post(&client, &named))).await;
    assert!(
        burst.iter().all(|r| r.as_deref().ok() == Some("ok")),
        "{burst:?}"
    );
    assert_eq!(client.direct.as_ref().unwrap().idle_count(), 8);
    assert_eq!(lookups.load(Ordering::SeqCst), 1);
}

/// A host whose first address refuses: the request goes to the next, which is tried first
/// from then on.
#[tokio::test(flavor = "current_thread")]
async fn the_upstream_address_that_answered_is_tried_first() {
    let (l, url) = listener();
    let good: std::net::SocketAddr = l.local_addr().unwrap();
    let (closed_tx, _closed_rx) = mpsc::channel();
    answers_all(l, closed_tx);
    let refusing = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let addresses = Addresses::with_lookup(Box::new(move |_, _| {
        Box::pin(async move { Ok(vec![refusing, good]) })
    }));
    let client = UpstreamClient::with_pool(false, Reaping::default(), addresses, CONNECT_WITHIN);
    let named =
        url::Url::parse(&format!("http://upstream.test:{}/v1", url.port().unwrap())).unwrap();
    assert_eq!(post(&client, &named).await.unwrap(), "ok");
    let pool = client.direct.as_ref().unwrap();
    let now = pool
        .addresses
        .of("upstream.test", good.port())
        .await
        .unwrap();
    assert_eq!(now[..], [good, refusing]);
}

/// A new connection that does not open within `connect_within` fails the attempt as a
/// connect error then, however long the attempt may take.
#[tokio::test(flavor = "current_thread")]
async fn a_connection_that_does_not_open_in_time_is_a_connect_error() {
    let (held, _queued) = crate::resolve::tests::silent();
    let silent = held.local_addr().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = UpstreamClient::with_pool(
        false,
        Reaping::default(),
        Addresses::system(),
        Duration::from_millis(300),
    );
    let url = url::Url::parse(&format!("http://{silent}/v1")).unwrap();
    let started = std::time::Instant::now();
    let e = post(&client, &url).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&e, TransportError::Connect(why) if why.contains("no connection within 300 ms")),
        "{e:?}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}
