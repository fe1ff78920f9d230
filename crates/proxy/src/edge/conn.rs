//! One client connection: heads read, the app called, responses written, kept alive while
//! the client and the server both want it.

use std::cell::RefCell;
use std::future::Future as _;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::Poll;

use actix_http::{Method, Request, StatusCode, Version};
use actix_web::HttpResponse;
use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use bytes::{BufMut as _, Bytes, BytesMut};
use keypool_types::{ApiError, ErrorKind};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Open;
use super::body::{Body, BodyState, Conn, Inbound};
use super::head::{self, Head, Refused, Wire};

/// What a response body's pieces are gathered to before a write (more ready at once go in
/// the next write).
const GATHER: usize = 64 * 1024;
/// How long a closing connection's late bytes are read and dropped (actix-http's
/// `client_disconnect_timeout`).
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// The most of them read.
const LINGER_BYTES: usize = 1024 * 1024;
/// What a read for a head makes room for.
const HEAD_ROOM: usize = 4 * 1024;

/// Serves `tcp` until the client or the server is done with it.
pub(super) async fn serve<S, B>(tcp: TcpStream, peer: SocketAddr, service: Rc<S>, open: Open)
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let conn = Rc::new(Conn {
        tcp,
        inbound: RefCell::new(Inbound {
            buf: BytesMut::new(),
            body: BodyState::Done,
        }),
    });
    let worker = &*open.worker;
    let mut wait = worker.settings.head_timeout;
    // one timer for the connection's life, moved as `crate::timer` says: most requests leave it
    // as it is
    let mut timer = pin!(tokio::time::sleep(wait));
    loop {
        let head = match next_head(&conn, wait, &open, timer.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(refused) => {
                tracing::warn!(target: keypool_telemetry::trace::MALFORMED, %peer, "{refused}");
                let res = refusal(&refused);
                let written = write_response(&conn, res, false, Version::HTTP_11, false, worker);
                if Box::pin(written).await.is_ok() {
                    Box::pin(linger(conn)).await;
                }
                return;
            }
        };
        wait = worker.settings.keep_alive;
        let (version, is_head, mut keep_alive) =
            (head.version, head.method == Method::HEAD, head.keep_alive);
        let expects_continue = head.expects_continue;
        let req = request(head, peer, &conn);
        if expects_continue
            && Box::pin(write_all(&conn.tcp, b"HTTP/1.1 100 Continue\r\n\r\n"))
                .await
                .is_err()
        {
            return;
        }
        let answer = match poll_fn(|cx| service.poll_ready(cx)).await {
            Ok(()) => service.call(req).await,
            Err(e) => Err(e),
        };
        {
            let mut inbound = conn.inbound.borrow_mut();
            // a body the app left unread would be taken for the next head: the connection
            // closes
            keep_alive &= inbound.body == BodyState::Done && !worker.stopping.get();
            // nothing of the next request here: no read buffer held while the answer goes out
            if inbound.buf.is_empty() {
                inbound.buf = BytesMut::new();
            }
        }
        let written = match answer {
            Ok(res) => {
                let (req, res) = res.into_parts();
                drop(req);
                // boxed, as every answer's writing: the connection's task keeps its own size
                // small for the life of the connection, and a stream's answer has its own
                Box::pin(write_response(
                    &conn, res, is_head, version, keep_alive, worker,
                ))
                .await
            }
            Err(e) => {
                let res = HttpResponse::from_error(e);
                Box::pin(write_response(
                    &conn, res, is_head, version, keep_alive, worker,
                ))
                .await
            }
        };
        match written {
            Ok(true) => {}
            Ok(false) => return Box::pin(linger(conn)).await,
            Err(_) => return,
        }
    }
}

/// Closes a connection the server ends after an answer: its write side first, then what the
/// client still sends is read and dropped (for at most [`LINGER`] and [`LINGER_BYTES`]), so
/// that unread bytes do not turn the close into a reset that could discard the answer before
/// the client reads it.
async fn linger(conn: Rc<Conn>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(conn) = Rc::try_unwrap(conn) else {
        return;
    };
    let mut tcp = conn.tcp;
    if tcp.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = vec![0u8; 4096];
    let mut left = LINGER_BYTES;
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout_at(deadline, tcp.read(&mut sink)).await {
        left = left.saturating_sub(n);
        if left == 0 {
            return;
        }
    }
}

/// The next request head: `Ok(None)` when the client closed, stayed idle past `idle`, or the
/// server is stopping while nothing of a head has arrived.
async fn next_head(
    conn: &Conn,
    idle: std::time::Duration,
    open: &Open,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Result<Option<Head>, Unserved> {
    let worker = &*open.worker;
    let mut started: Option<Instant> = None;
    // the wait ends at `due`: idle from now, then the head's bound from its first byte
    let mut due = Instant::now() + idle;
    crate::timer::bring_forward(timer.as_mut(), due);
    loop {
        {
            let mut inbound = conn.inbound.borrow_mut();
            if inbound.buf.is_empty() {
                // nothing held while waiting
                inbound.buf = BytesMut::new();
            } else {
                if started.is_none() {
                    let now = Instant::now();
                    started = Some(now);
                    due = now + worker.settings.head_timeout;
                    crate::timer::bring_forward(timer.as_mut(), due);
                }
                if let Some(head) = head::parse(&mut inbound.buf).map_err(Unserved::Head)? {
                    return Ok(Some(head));
                }
            }
        }
        let waited = poll_fn(|cx| {
            if started.is_none() {
                if worker.stopping.get() {
                    return Poll::Ready(Wait::Stop);
                }
                worker.park(open.slot, cx.waker());
            }
            if let Poll::Ready(r) = conn.tcp.poll_read_ready(cx) {
                return Poll::Ready(if r.is_ok() {
                    Wait::Readable
                } else {
                    Wait::Stop
                });
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Wait::Timeout),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if matches!(waited, Wait::Timeout) && !crate::timer::over(timer.as_mut(), due) {
            continue;
        }
        match waited {
            Wait::Readable => {}
            Wait::Timeout if started.is_some() => return Err(Unserved::Timeout),
            // the client or the server is done with an idle connection
            Wait::Stop | Wait::Timeout => return Ok(None),
        }
        let mut inbound = conn.inbound.borrow_mut();
        if inbound.buf.capacity() - inbound.buf.len() < HEAD_ROOM / 4 {
            inbound.buf.reserve(HEAD_ROOM);
        }
        match conn.tcp.try_read_buf(&mut inbound.buf) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(None),
        }
    }
}

/// What a wait for a head's bytes ended with.
enum Wait {
    Readable,
    Timeout,
    Stop,
}

/// A head refused, or one that did not arrive in time.
#[derive(Debug)]
pub(super) enum Unserved {
    Head(Refused),
    Timeout,
}

impl std::fmt::Display for Unserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Head(Refused::TooLarge) => f.write_str("request head too large"),
            Self::Head(Refused::Malformed(what)) => write!(f, "malformed request: {what}"),
            Self::Timeout => f.write_str("request head not received in time"),
        }
    }
}

/// The answer to a head that is not served, in OpenAI's error shape.
fn refusal(why: &Unserved) -> HttpResponse {
    let (kind, status, message) = match why {
        Unserved::Head(Refused::TooLarge) => (
            ErrorKind::InvalidRequest,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "The request head is larger than {} KiB or has more than {} headers.",
                head::MAX_HEAD / 1024,
                head::MAX_HEADERS
            ),
        ),
        Unserved::Head(Refused::Malformed(what)) => (
            ErrorKind::InvalidRequest,
            StatusCode::BAD_REQUEST,
            format!("Malformed request: {what}."),
        ),
        Unserved::Timeout => (
            ErrorKind::RequestTimeout,
            StatusCode::REQUEST_TIMEOUT,
            "The request head did not arrive in time.".to_owned(),
        ),
    };
    let mut res = crate::http::error_response(&ApiError::new(kind, message), None);
    *res.status_mut() = status;
    res
}

/// The app's request for `head`, its body read from `conn` as the app asks.
fn request(head: Head, peer: SocketAddr, conn: &Rc<Conn>) -> Request {
    let body = match head.framing {
        head::Framing::None => BodyState::Done,
        head::Framing::Length(n) => BodyState::Length(n),
        head::Framing::Chunked => BodyState::Chunked(crate::h1::Chunked::Size),
    };
    conn.inbound.borrow_mut().body = body;
    let mut req = if body == BodyState::Done {
        Request::new()
    } else {
        let stream: actix_http::BoxedPayloadStream = Box::pin(Body(conn.clone()));
        Request::with_payload(actix_http::Payload::from(stream))
    };
    let h = req.head_mut();
    h.method = head.method;
    h.uri = head.uri;
    h.version = head.version;
    h.headers = head.headers;
    h.peer_addr = Some(peer);
    req
}

/// Writes `res`: `Ok(true)` when the connection may take another request.
async fn write_response<B: MessageBody>(
    conn: &Conn,
    res: HttpResponse<B>,
    is_head: bool,
    version: Version,
    keep_alive: bool,
    worker: &super::Worker,
) -> io::Result<bool> {
    let body = res.body();
    let wire = Wire::of(res.status(), body.size(), version);
    let keep_alive = keep_alive
        && wire != Wire::Close
        && res.head().connection_type() != actix_http::ConnectionType::Close;
    // a body written with its head (see `write_whole`) is room counted now, not a regrowth
    let inline = match wire {
        Wire::Length(n) if n <= GATHER as u64 && !is_head => n as usize,
        _ => 0,
    };
    let mut out = BytesMut::with_capacity(256 + res.headers().len() * 48 + inline);
    head::encode(
        &mut out,
        res.head(),
        wire,
        version,
        keep_alive,
        &worker.date.borrow(),
    );
    let body = res.into_body();
    if is_head || wire == Wire::Empty {
        write_all(&conn.tcp, &out).await?;
        return Ok(keep_alive);
    }
    match body.try_into_bytes() {
        Ok(bytes) => {
            write_whole(&conn.tcp, out, &bytes, wire).await?;
        }
        Err(body) => stream(conn, out, body, wire).await?,
    }
    Ok(keep_alive)
}

/// A whole body after its head: small ones in the head's buffer, one write.
async fn write_whole(
    tcp: &TcpStream,
    mut out: BytesMut,
    bytes: &Bytes,
    wire: Wire,
) -> io::Result<()> {
    if wire == Wire::Chunked {
        if !bytes.is_empty() {
            head::chunk_size(&mut out, bytes.len());
            out.put_slice(bytes);
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"0\r\n\r\n");
        return write_all(tcp, &out).await;
    }
    if bytes.len() <= GATHER {
        out.put_slice(bytes);
        return write_all(tcp, &out).await;
    }
    write_all(tcp, &out).await?;
    write_all(tcp, bytes).await
}

/// A body as it comes: what is ready at once goes in one write; nothing is held while the
/// body waits.
pub(super) async fn stream<B: MessageBody>(
    conn: &Conn,
    mut out: BytesMut,
    body: B,
    wire: Wire,
) -> io::Result<()> {
    let mut body = pin!(body);
    loop {
        // gather what is ready
        let next = poll_fn(|cx| match body.as_mut().poll_next(cx) {
            Poll::Pending if !out.is_empty() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
            Poll::Ready(item) => Poll::Ready(Some(item)),
        })
        .await;
        match next {
            None => {
                // nothing more ready now: write what was gathered, then wait without it
                write_all(&conn.tcp, &out).await?;
                out = BytesMut::new();
            }
            Some(Some(Ok(data))) => {
                if data.is_empty() {
                    continue;
                }
                if out.capacity() == 0 {
                    out.reserve(data.len() + 16);
                }
                if wire == Wire::Chunked {
                    head::chunk_size(&mut out, data.len());
                    out.put_slice(&data);
                    out.put_slice(b"\r\n");
                } else {
                    out.put_slice(&data);
                }
                if out.len() >= GATHER {
                    write_all(&conn.tcp, &out).await?;
                    out.clear();
                }
            }
            Some(Some(Err(e))) => {
                let e: Box<dyn std::error::Error> = e.into();
                return Err(io::Error::other(e.to_string()));
            }
            Some(None) => {
                if wire == Wire::Chunked {
                    out.put_slice(b"0\r\n\r\n");
                }
                return write_all(&conn.tcp, &out).await;
            }
        }
    }
}

/// Writes all of `bytes`, waiting for the socket as it needs.
async fn write_all(tcp: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match tcp.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
