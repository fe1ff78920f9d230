use actix_http::{StatusCode, Version};
use actix_web::body::BodySize;
use bytes::BytesMut;

use super::head::{self, Framing, Refused, Wire};

fn parse(s: &str) -> Result<Option<head::Head>, Refused> {
    head::parse(&mut BytesMut::from(s.as_bytes()))
}

#[test]
fn a_head_is_taken_off_the_buffer_and_what_follows_stays() {
    let mut buf = BytesMut::from(
        &b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nX-Y: z\r\n\r\n{}GET"[..],
    );
    let h = head::parse(&mut buf).unwrap().unwrap();
    assert_eq!(h.method, actix_http::Method::POST);
    assert_eq!(h.uri.path(), "/v1/chat/completions");
    assert_eq!(h.uri.query(), Some("x=1"));
    assert_eq!(h.headers.get("x-y").unwrap(), "z");
    assert_eq!(h.framing, Framing::Length(2));
    assert!(h.keep_alive && !h.expects_continue);
    assert_eq!(&buf[..], b"{}GET");
}

#[test]
fn a_heads_header_map_is_sized_to_it() {
    // a fresh actix request's own map has room for 16 names (~6 KB), held for the request's
    // life: a small head's map must not be that one
    let h = parse("GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.headers.len(), 2);
    assert!(h.headers.capacity() < 16, "{}", h.headers.capacity());
}

#[test]
fn a_head_not_all_here_is_waited_for_up_to_its_bound() {
    assert!(parse("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(head::MAX_HEAD));
    assert_eq!(parse(&long).unwrap_err(), Refused::TooLarge);
    let many = "X-A: a\r\n".repeat(head::MAX_HEADERS + 1);
    assert_eq!(
        parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
        Refused::TooLarge
    );
}

#[test]
fn framings_two_readers_could_read_two_ways_are_refused() {
    for bad in [
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n",
    ] {
        assert!(matches!(parse(bad), Err(Refused::Malformed(_))), "{bad}");
    }
    let h = parse("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Length(3));
    let h = parse("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Chunked);
    assert!(h.expects_continue);
}

#[test]
fn keep_alive_follows_the_version_and_connection() {
    let k = |s: &str| parse(s).unwrap().unwrap().keep_alive;
    assert!(k("GET / HTTP/1.1\r\n\r\n"));
    assert!(!k("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
    assert!(!k("GET / HTTP/1.0\r\n\r\n"));
    assert!(k("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    assert!(!k(
        "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    ));
}

#[test]
fn a_response_head_says_its_framing_once() {
    let mut res = actix_web::HttpResponse::Ok();
    res.insert_header(("content-length", "99"))
        .insert_header(("x-a", "b"));
    let res = res.finish();
    let mut out = BytesMut::new();
    let date = *b"Mon, 07 Dec 2026 14:00:00 GMT";
    head::encode(
        &mut out,
        res.head(),
        Wire::Length(12),
        Version::HTTP_11,
        true,
        &date,
    );
    let text = std::str::from_utf8(&out).unwrap();
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-length: 12\r\ndate: Mon, 07 Dec 2026 14:00:00 GMT\r\n\r\n"
    );
    out.clear();
    head::encode(
        &mut out,
        res.head(),
        Wire::Chunked,
        Version::HTTP_10,
        true,
        &date,
    );
    let text = std::str::from_utf8(&out).unwrap();
    assert!(
        text.contains("transfer-encoding: chunked\r\nconnection: keep-alive\r\n"),
        "{text}"
    );
    assert_eq!(
        Wire::of(StatusCode::NO_CONTENT, BodySize::Sized(3), Version::HTTP_11),
        Wire::Empty
    );
    assert_eq!(
        Wire::of(StatusCode::OK, BodySize::None, Version::HTTP_11),
        Wire::Length(0)
    );
    assert_eq!(
        Wire::of(StatusCode::OK, BodySize::Stream, Version::HTTP_10),
        Wire::Close
    );
    for n in [0, 1, 9, 0xa, 0xf, 0x10, 0x1a2f, 0xffff_ffff, usize::MAX] {
        let mut line = BytesMut::new();
        head::chunk_size(&mut line, n);
        assert_eq!(line, format!("{n:x}\r\n").as_bytes(), "{n}");
    }
}

/// A streamed body's pieces go out framed the same whether they come with the head, alone
/// or several at once (gathered into one write).
#[tokio::test]
async fn a_streamed_body_is_framed_the_same_however_its_pieces_come() {
    use std::cell::RefCell;
    use tokio::io::AsyncReadExt as _;

    use super::body::{BodyState, Conn, Inbound};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let conn = Conn {
        tcp,
        inbound: RefCell::new(Inbound {
            buf: BytesMut::new(),
            body: BodyState::Done,
        }),
    };
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<bytes::Bytes, std::io::Error>>();
    let send = |piece: &'static [u8]| tx.unbounded_send(Ok(bytes::Bytes::from_static(piece)));
    let pieces = async {
        send(b"with the head").unwrap();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        send(b"alone").unwrap();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        send(b"two").unwrap();
        send(b"").unwrap();
        send(b"at once").unwrap();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        send(b"last").unwrap();
        tx.close_channel();
    };
    let head = BytesMut::from(&b"HEAD\r\n\r\n"[..]);
    let body = actix_web::body::BodyStream::new(rx);
    let (written, ()) = tokio::join!(
        super::conn::stream(&conn, head, body, Wire::Chunked),
        pieces
    );
    written.unwrap();
    drop(conn);
    let mut wire = Vec::new();
    client.read_to_end(&mut wire).await.unwrap();
    assert_eq!(
        String::from_utf8(wire).unwrap(),
        "HEAD\r\n\r\nd\r\nwith the head\r\n5\r\nalone\r\n3\r\ntwo\r\n7\r\nat once\r\n\
         4\r\nlast\r\n0\r\n\r\n"
    );
}

#[tokio::test]
async fn a_connection_goes_to_the_worker_serving_the_fewest_past_an_eighth() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let assigned: Arc<[AtomicUsize]> = (0..3).map(|_| AtomicUsize::new(0)).collect();
    let (inboxes, mut handed): (Vec<_>, Vec<_>) = (0..3)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let inboxes: Arc<[_]> = inboxes.into();
    let worker = |me| super::balance::Balance {
        assigned: assigned.clone(),
        inboxes: inboxes.clone(),
        me,
    };
    let (a, c) = (worker(0), worker(2));
    for (i, n) in [2, 2, 1].into_iter().enumerate() {
        assigned[i].store(n, Ordering::Relaxed);
    }
    assert_eq!(a.pick(), 2, "the least loaded");
    assert_eq!(assigned[2].load(Ordering::Relaxed), 2, "counted at once");
    assert_eq!(a.pick(), 0, "2, 2 and 2: a tie stays here");
    assert_eq!(c.pick(), 2, "2, 2 and 2 given out: a tie stays here too");
    // past 8 connections a worker keeps what is within an eighth of its own above the least
    for (i, n) in [40, 36, 50].into_iter().enumerate() {
        assigned[i].store(n, Ordering::Relaxed);
    }
    assert_eq!(a.pick(), 0, "40 is within 36 + 40 / 8: kept");
    assigned[0].store(48, Ordering::Relaxed);
    assert_eq!(a.pick(), 1, "48 is past 36 + 48 / 8: handed over");
    // handed over: the socket reaches the other worker's inbox
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    a.hand(tcp, peer, 1);
    let (_, got) = handed[1].recv().await.unwrap();
    assert_eq!(got, peer);
    // a worker gone: the count given to it is taken back
    drop(handed.remove(2));
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    let before = assigned[2].load(Ordering::Relaxed);
    assigned[2].fetch_add(1, Ordering::Relaxed);
    a.hand(tcp, peer, 2);
    assert_eq!(assigned[2].load(Ordering::Relaxed), before);
    c.release();
    assert_eq!(assigned[2].load(Ordering::Relaxed), before - 1);
}

/// The listening sockets on `port` (IPv4, from `/proc/net/tcp`: state 0A is LISTEN).
fn listening_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            // sl, local address, remote address, state
            let f: Vec<&str> = l.split_whitespace().take(4).collect();
            f.len() == 4 && f[1].ends_with(&local) && f[3] == "0A"
        })
        .count()
}

#[test]
fn a_port_keypool_listens_on_is_refused_to_a_second_bind() {
    let first = super::bind("127.0.0.1:0").unwrap();
    let at = first.local_addr().unwrap();
    let again = super::bind(at).unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse, "{again}");
    assert!(std::net::TcpListener::bind(at).is_err(), "a plain bind too");
    drop(first);
    let free = super::bind(at).expect("the port is free once the listener closes");
    assert_eq!(free.local_addr().unwrap(), at);
}

#[tokio::test]
async fn each_worker_listens_on_its_own_socket_when_bound_by_bind() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = || {
        actix_web::App::new().route(
            "/",
            actix_web::web::get()
                .to(|| async { std::thread::current().name().unwrap_or("").to_owned() }),
        )
    };
    let settings = super::Settings::new(2, 64, std::time::Duration::from_secs(1));
    for (listener, sockets) in [
        (super::bind("127.0.0.1:0").unwrap(), 2),
        (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), 1),
    ] {
        let at = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = super::serve(listener, settings, &stop, app).unwrap();
        assert_eq!(
            listening_on(at.port()),
            sockets,
            "{sockets} listening on {at}"
        );
        // connections are served, by both workers between them
        let mut names = std::collections::BTreeSet::new();
        let mut open = Vec::new();
        for _ in 0..16 {
            let mut tcp = tokio::net::TcpStream::connect(at).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"keypool-worker-0") && !got.ends_with(b"keypool-worker-1") {
                let mut buf = [0u8; 512];
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            names.insert(got.last().copied());
            open.push(tcp);
        }
        assert_eq!(names.len(), 2, "both workers serve");
        stop.cancel();
        drop(open);
        server.wait().await.unwrap();
        assert_eq!(
            listening_on(at.port()),
            0,
            "every listener closed at the stop"
        );
    }
}
