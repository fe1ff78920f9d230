//! Request heads as the API port reads them (`httparse`, bounded) and response heads as it
//! writes them. No I/O here.

use std::mem::MaybeUninit;

use actix_http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_http::{Method, StatusCode, Uri, Version};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The most a request head may take (actix-http's bound): past it, 431.
pub(super) const MAX_HEAD: usize = 128 * 1024;
/// The most headers a request may have (actix-http's bound): past it, 431.
pub(super) const MAX_HEADERS: usize = 96;

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A request head, parsed.
#[derive(Debug)]
pub(super) struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The client keeps the connection after this request (`Connection:` and the version).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub expects_continue: bool,
}

/// Why a head cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Past [`MAX_HEAD`] or [`MAX_HEADERS`] (431).
    TooLarge,
    /// Not HTTP/1.x as RFC 9112 writes it, or a body framing that could be read two ways (400).
    Malformed(&'static str),
}

/// Takes one request head off the front of `buf`: `None` while it has not all arrived.
pub(super) fn parse(buf: &mut BytesMut) -> Result<Option<Head>, Refused> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(Refused::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooLarge),
        Err(_) => return Err(Refused::Malformed("the request head is not HTTP/1.1")),
    };
    if len > MAX_HEAD {
        return Err(Refused::TooLarge);
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| Refused::Malformed("the method is not a token"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // the head's bytes are copied once, to their size (the URI and every value are slices of
    // them): a value the request keeps for its life (a stream's) keeps these, not the read
    // buffer
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    let uri = Uri::from_maybe_shared(bytes.slice(at(req.path.unwrap_or("").as_bytes())))
        .map_err(|_| Refused::Malformed("the request target is not a URI"))?;
    // a map of the head's size: the one a fresh actix request comes with has room for 16
    // names (~6 KB), held for the request's life (+10 MB at 2,048 requests in flight, measured)
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = match crate::headers::actix_name(h.name) {
            Some(name) => name,
            None => HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Refused::Malformed("a header name is not a token"))?,
        };
        let value = HeaderValue::from_maybe_shared(bytes.slice(at(h.value)))
            .map_err(|_| Refused::Malformed("a header value has a control character"))?;
        headers.append(name, value);
    }
    buf.advance(len);
    let framing = framing(&headers, version)?;
    let keep_alive = keeps_alive(&headers, version);
    let expects_continue = framing != Framing::None
        && version == Version::HTTP_11
        && headers
            .get(actix_http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expects_continue,
    }))
}

/// RFC 9112 §6.3 for a request, refusing what two readers could frame two ways: a
/// `Transfer-Encoding` beside a `Content-Length`, a coding other than `chunked` alone, chunked
/// on HTTP/1.0, lengths that differ or are not digits.
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, Refused> {
    use actix_http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    let mut codings = headers.get_all(TRANSFER_ENCODING).peekable();
    if codings.peek().is_some() {
        if version == Version::HTTP_10 {
            return Err(Refused::Malformed("Transfer-Encoding on HTTP/1.0"));
        }
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(Refused::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        let mut n = 0;
        for v in codings {
            for c in v.as_bytes().split(|b| *b == b',') {
                n += 1;
                if n > 1 || !c.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(Refused::Malformed("a Transfer-Encoding other than chunked"));
                }
            }
        }
        return Ok(Framing::Chunked);
    }
    let length =
        crate::h1::content_length(headers.get_all(CONTENT_LENGTH).map(HeaderValue::as_bytes))
            .map_err(Refused::Malformed)?;
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
/// `Connection: keep-alive`. A request to upgrade is never kept (keypool refuses upgrades).
fn keeps_alive(headers: &HeaderMap, version: Version) -> bool {
    if headers.contains_key(actix_http::header::UPGRADE) {
        return false;
    }
    let (close, keep) = crate::h1::connection_tokens(
        headers
            .get_all(actix_http::header::CONNECTION)
            .map(HeaderValue::as_bytes),
    );
    !close && (version == Version::HTTP_11 || keep)
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    /// No body, no length (1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (a stream to an HTTP/1.0 client).
    Close,
}

impl Wire {
    /// The framing of a body of `size` with `status` to a client speaking `version`.
    pub(super) fn of(
        status: StatusCode,
        size: actix_web::body::BodySize,
        version: Version,
    ) -> Self {
        use actix_web::body::BodySize;
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Self::Empty;
        }
        match size {
            BodySize::None => Self::Length(0),
            BodySize::Sized(n) => Self::Length(n),
            BodySize::Stream if version == Version::HTTP_10 => Self::Close,
            BodySize::Stream => Self::Chunked,
        }
    }
}

/// Writes a response head: the status line, the app's headers (less the framing ones this
/// writes itself), the framing, `Connection` when it differs from the version's default, and
/// `Date` unless the app set one.
pub(super) fn encode(
    dst: &mut BytesMut,
    res: &actix_http::ResponseHead,
    wire: Wire,
    version: Version,
    keep_alive: bool,
    date: &[u8; 29],
) {
    use actix_http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
    let status = res.status;
    dst.put_slice(b"HTTP/1.1 ");
    dst.put_slice(status.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(
        res.reason
            .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
            .as_bytes(),
    );
    dst.put_slice(b"\r\n");
    for (name, value) in &res.headers {
        if matches!(*name, CONTENT_LENGTH | TRANSFER_ENCODING | CONNECTION) {
            continue;
        }
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    match wire {
        Wire::Empty | Wire::Close => {}
        Wire::Length(n) => {
            dst.put_slice(b"content-length: ");
            dst.put_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.put_slice(b"\r\n");
        }
        Wire::Chunked => dst.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    match (keep_alive, version) {
        (false, _) => dst.put_slice(b"connection: close\r\n"),
        (true, Version::HTTP_10) => dst.put_slice(b"connection: keep-alive\r\n"),
        (true, _) => {}
    }
    if !res.headers.contains_key(DATE) {
        dst.put_slice(b"date: ");
        dst.put_slice(date);
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
}

/// A chunk's size line (`{hex}\r\n`) into `dst`: written digit by digit, since there is one
/// a streamed event and the formatter costs ten times as much.
pub(super) fn chunk_size(dst: &mut BytesMut, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut line = [0u8; 2 * size_of::<usize>() + 2];
    let mut at = line.len() - 2;
    line[at..].copy_from_slice(b"\r\n");
    let mut rest = n;
    loop {
        at -= 1;
        line[at] = DIGITS[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    dst.put_slice(&line[at..]);
}
