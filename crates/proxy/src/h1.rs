//! HTTP/1.1 as keypool's upstream connections speak it: a request head written in one buffer,
//! a response head parsed with `httparse`, and a response body's framing (a length, chunks, or
//! the connection's end). No I/O here: [`crate::conn`] reads and writes.
//!
//! An upstream is trusted with its answers, not with their size: a response head past
//! [`MAX_HEAD`] or [`MAX_HEADERS`], a chunk-size line or the trailers past their bounds, and a
//! malformed length end the attempt as [`TransportError::Broken`].

use bytes::{Buf, Bytes, BytesMut};
use reqwest::Method;
use reqwest::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING,
};

use crate::adapter::TransportError;

/// The longest response head read (status line and headers).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response head may have.
pub(crate) const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (the size and its extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// The most bytes of trailers after a chunked body (read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

fn broken(why: &str) -> TransportError {
    TransportError::Broken(format!(
        "invalid HTTP/1.1 response from the upstream: {why}"
    ))
}

/// The request head (`method target HTTP/1.1`, the headers, the body's `content-length`),
/// followed by the body itself when it is small enough that one write of both is cheaper than
/// two. `content-length`, `transfer-encoding` and `connection` in `headers` are not sent: the
/// body's length is keypool's to state, and the connection is kept alive.
pub(crate) fn encode_request(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body: &Bytes,
    inline_body: usize,
) -> Vec<u8> {
    let headers_len: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let inline = body.len() <= inline_body;
    let mut out = Vec::with_capacity(
        method.as_str().len()
            + target.len()
            + headers_len
            + 48
            + if inline { body.len() } else { 0 },
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || !matches!(*method, Method::GET | Method::HEAD) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if inline {
        out.extend_from_slice(body);
    }
    out
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (`HEAD`, 204, 304).
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// A final response's head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request once the body is read.
    pub(crate) keep_alive: bool,
}

/// Parses a response head at the start of `buf`, taking it (and any interim 1xx responses
/// before it: 100 Continue, 103 Early Hints) out of `buf`. `Ok(None)`: the head is not all
/// here yet.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Head>, TransportError> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(broken("the head is too long")),
            Err(httparse::Error::TooManyHeaders) => return Err(broken("too many headers")),
            Err(e) => return Err(broken(&e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 {
            // an interim answer (100 Continue, 103 Early Hints): the final one follows
            buf.advance(len);
            continue;
        }
        let http10 = resp.version == Some(0);
        // the head's bytes once, its values slices of them
        let bytes = Bytes::copy_from_slice(&buf[..len]);
        let start = buf.as_ptr() as usize;
        // room for the headers keypool adds to an answer (`x-keypool-cost`, `-model`,
        // `-cache`): a map at its capacity grows (rehashes) on the next insert
        let mut headers = HeaderMap::with_capacity(resp.headers.len() + 3);
        for h in resp.headers.iter() {
            let name = match crate::headers::reqwest_name(h.name) {
                Some(name) => name,
                None => HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| broken("a header name is not valid"))?,
            };
            let at = h.value.as_ptr() as usize - start;
            let value = HeaderValue::from_maybe_shared(bytes.slice(at..at + h.value.len()))
                .map_err(|_| broken("a header value is not valid"))?;
            headers.append(name, value);
        }
        buf.advance(len);
        let (framing, keep_alive) = framing(&headers, status, method, http10)?;
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// A response's framing and whether its connection stays open after it (RFC 9112, 6.3).
fn framing(
    headers: &HeaderMap,
    status: u16,
    method: &Method,
    http10: bool,
) -> Result<(Framing, bool), TransportError> {
    let (close, keep) = connection_tokens(
        headers
            .get_all(CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let keep_alive = !close && (!http10 || keep);
    if status == 101 {
        // a switch nobody asked for: handed up as it is (the engine fails it over as no
        // answer), and the connection, no longer HTTP, closed
        return Ok((Framing::Empty, false));
    }
    if *method == Method::HEAD || status == 204 || status == 304 {
        return Ok((Framing::Empty, keep_alive));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        // a length beside the codings is ignored, and the connection not trusted again
        let trusted = keep_alive && !headers.contains_key(CONTENT_LENGTH);
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") && !http10 => (Framing::Chunked, trusted),
            _ => (Framing::Close, false),
        });
    }
    let length = content_length(
        headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes),
    )
    .map_err(broken)?;
    Ok(match length {
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::Close, false),
    })
}

/// `Connection`'s tokens, as (`close`, `keep-alive`) were named (either side of a
/// connection reads them alike).
pub(crate) fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> (bool, bool) {
    let (mut close, mut keep) = (false, false);
    for token in values.flat_map(|v| v.split(|&b| b == b',')) {
        let token = token.trim_ascii();
        close |= token.eq_ignore_ascii_case(b"close");
        keep |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    (close, keep)
}

/// The body length `Content-Length` says (every value and list item the same digits), `None`
/// when there is none; an error for anything else.
pub(crate) fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for part in values.flat_map(|v| v.split(|&b| b == b',')) {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err("content-length is not a number");
        }
        let n: u64 = std::str::from_utf8(part)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("content-length is not a number")?;
        if length.is_some_and(|l| l != n) {
            return Err("two different content-lengths");
        }
        length = Some(n);
    }
    Ok(length)
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, this many bytes of trailers read.
    Trailers(usize),
    /// The body ended.
    Done,
}

impl Chunked {
    /// Decodes from the start of `buf`: the next piece of data (a slice of `buf`'s own
    /// memory, no copy), or `None` when `buf` holds no more of it (more input is needed, or
    /// the body is [`Chunked::Done`]).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, TransportError> {
        loop {
            match *self {
                Self::Done => return Ok(None),
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    let data = buf.split_to(take).freeze();
                    if left > 0 {
                        *self = Self::Data(left);
                    } else {
                        // the chunk's CRLF too, when it is here: a buffer left empty is let go
                        *self = Self::DataEnd;
                        self.end_data(buf)?;
                    }
                    return Ok(Some(data));
                }
                Self::DataEnd => {
                    if !self.end_data(buf)? {
                        return Ok(None);
                    }
                }
                Self::Size => {
                    let Some((len, whole)) =
                        next_line(buf, MAX_CHUNK_LINE, "a chunk-size line is too long")?
                    else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..len])?;
                    buf.advance(whole);
                    *self = if size == 0 {
                        Self::Trailers(0)
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Trailers(seen) => {
                    let Some((len, whole)) =
                        next_line(buf, MAX_CHUNK_LINE, "a trailer is too long")?
                    else {
                        return Ok(None);
                    };
                    buf.advance(whole);
                    let seen = seen + len;
                    if len == 0 {
                        *self = Self::Done;
                    } else if seen > MAX_TRAILERS {
                        return Err(broken("the trailers are too long"));
                    } else {
                        *self = Self::Trailers(seen);
                    }
                }
            }
        }
    }
}

impl Chunked {
    /// In [`Chunked::DataEnd`], takes the chunk's CRLF (or LF) off `buf`, then expects a size;
    /// `false` while it has not all arrived.
    fn end_data(&mut self, buf: &mut BytesMut) -> Result<bool, TransportError> {
        let n = match (buf.first(), buf.get(1)) {
            (None, _) | (Some(b'\r'), None) => return Ok(false),
            (Some(b'\n'), _) => 1,
            (Some(b'\r'), Some(b'\n')) => 2,
            (Some(b'\r'), Some(_)) => return Err(broken("a chunk does not end with CRLF")),
            (Some(_), _) => return Err(broken("a chunk is longer than its size")),
        };
        buf.advance(n);
        *self = Self::Size;
        Ok(true)
    }
}

/// The line at the start of `buf`: the length of its content (without its LF or CRLF) and of
/// the whole line, for the caller to read in place and then advance past (a line split off
/// would make the buffer shared, an allocation a streamed event); `None` until its LF has
/// arrived.
fn next_line(
    buf: &[u8],
    max: usize,
    too_long: &str,
) -> Result<Option<(usize, usize)>, TransportError> {
    let Some(at) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > max {
            Err(broken(too_long))
        } else {
            Ok(None)
        };
    };
    if at > max {
        return Err(broken(too_long));
    }
    let len = if at > 0 && buf[at - 1] == b'\r' {
        at - 1
    } else {
        at
    };
    Ok(Some((len, at + 1)))
}

/// A chunk-size line's size: hex digits, then optional whitespace and `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, TransportError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return Err(broken("a chunk size is not a hex number"));
    }
    line[..digits].iter().try_fold(0u64, |n, &b| {
        let d = u64::from((b as char).to_digit(16).unwrap_or(0));
        n.checked_mul(16)
            .and_then(|n| n.checked_add(d))
            .ok_or_else(|| broken("a chunk size is too large"))
    })
}

#[cfg(test)]
#[path = "h1_tests.rs"]
mod tests;
