use super::*;

fn head_of(raw: &str, method: &Method) -> Result<Option<Head>, TransportError> {
    parse_head(&mut BytesMut::from(raw), method)
}

fn head(raw: &str) -> Head {
    head_of(raw, &Method::POST).unwrap().unwrap()
}

fn is_broken<T: std::fmt::Debug>(r: Result<T, TransportError>, why: &str) {
    match r {
        Err(TransportError::Broken(text)) => assert!(text.contains(why), "{text}"),
        other => panic!("expected Broken({why}), got {other:?}"),
    }
}

#[test]
fn a_request_head_states_the_body_length_and_drops_framing_headers() {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example"));
    headers.insert("content-length", HeaderValue::from_static("999"));
    headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    headers.insert("connection", HeaderValue::from_static("close"));
    headers.insert("authorization", HeaderValue::from_static("Bearer k"));
    let body = Bytes::from_static(b"{\"a\":1}");
    let out = encode_request(&Method::POST, "/v1/chat?x=1", &headers, &body, 1024);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "POST /v1/chat?x=1 HTTP/1.1\r\nhost: api.example\r\nauthorization: Bearer k\r\n\
         content-length: 7\r\n\r\n{\"a\":1}"
    );
    // a body past the inline size is not in the head's buffer
    let out = encode_request(&Method::POST, "/", &HeaderMap::new(), &body, 4);
    assert_eq!(out, b"POST / HTTP/1.1\r\ncontent-length: 7\r\n\r\n");
    // a GET without a body states no length; an empty POST states 0
    let none = Bytes::new();
    let out = encode_request(&Method::GET, "/models", &HeaderMap::new(), &none, 1024);
    assert_eq!(out, b"GET /models HTTP/1.1\r\n\r\n");
    let out = encode_request(&Method::POST, "/x", &HeaderMap::new(), &none, 1024);
    assert_eq!(out, b"POST /x HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
}

#[test]
fn a_response_head_is_parsed_once_whole_and_the_rest_stays() {
    let raw = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: r1\r\n\
               content-length: 2\r\n\r\nok";
    for cut in 0..raw.len() - 2 {
        assert!(
            head_of(&raw[..cut], &Method::POST).unwrap().is_none(),
            "{cut}"
        );
    }
    let mut buf = BytesMut::from(raw);
    let h = parse_head(&mut buf, &Method::POST).unwrap().unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.headers["content-type"], "application/json");
    assert_eq!(h.headers["x-request-id"], "r1");
    assert_eq!((h.framing, h.keep_alive), (Framing::Length(2), true));
    assert_eq!(&buf[..], b"ok");
}

#[test]
fn interim_answers_are_skipped_and_a_switch_is_handed_up_with_the_connection_closed() {
    let h = head(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                  HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 0\r\n\r\n",
    );
    assert_eq!(h.status, 429);
    assert_eq!(h.headers["retry-after"], "3");
    assert!(h.headers.get("link").is_none());
    let h = head("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n");
    assert_eq!(
        (h.status, h.framing, h.keep_alive),
        (101, Framing::Empty, false)
    );
}

#[test]
fn an_oversized_or_malformed_head_ends_the_attempt() {
    let many: String = (0..=MAX_HEADERS)
        .map(|i| format!("x-h{i}: v\r\n"))
        .collect::<Vec<_>>()
        .concat();
    is_broken(
        head_of(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), &Method::POST),
        "too many headers",
    );
    let long = format!("HTTP/1.1 200 OK\r\nx-long: {}", "a".repeat(MAX_HEAD));
    is_broken(head_of(&long, &Method::POST), "too long");
    is_broken(head_of("SMTP ready\r\n\r\n", &Method::POST), "invalid");
    is_broken(
        head_of("HTTP/1.1 200 OK\r\nbad header\r\n\r\n", &Method::POST),
        "invalid",
    );
}

#[test]
fn the_framing_follows_rfc_9112() {
    let f = |raw: &str| {
        let h = head(raw);
        (h.framing, h.keep_alive)
    };
    assert_eq!(
        f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n"),
        (Framing::Length(5), true)
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        (Framing::Chunked, true)
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n"),
        (Framing::Chunked, true)
    );
    // chunked not last: the body runs to the close
    assert_eq!(
        f("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n"),
        (Framing::Close, false)
    );
    // a length beside the codings: the codings win, the connection is not reused
    assert_eq!(
        f("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"),
        (Framing::Chunked, false)
    );
    assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n"), (Framing::Close, false));
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"),
        (Framing::Length(0), false)
    );
    assert_eq!(
        f("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
        (Framing::Length(1), false)
    );
    assert_eq!(
        f("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n"),
        (Framing::Length(1), true)
    );
    assert_eq!(
        f("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
        (Framing::Empty, true)
    );
    assert_eq!(
        f("HTTP/1.1 304 Not Modified\r\n\r\n"),
        (Framing::Empty, true)
    );
    let h = head_of(
        "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        &Method::HEAD,
    );
    assert_eq!(h.unwrap().unwrap().framing, Framing::Empty);
    for bad in ["-1", "1x", "", "99999999999999999999", "+4"] {
        let raw = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
        is_broken(head_of(&raw, &Method::POST), "content-length");
    }
    is_broken(
        head_of(
            "HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            &Method::POST,
        ),
        "two different",
    );
}

/// Decodes all of `input` fed in pieces of `step` bytes; the data, and whether it ended.
fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), TransportError> {
    let mut state = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        while let Some(data) = state.decode(&mut buf)? {
            out.extend_from_slice(&data);
        }
    }
    Ok((out, state == Chunked::Done))
}

#[test]
fn chunks_decode_whatever_pieces_they_arrive_in() {
    let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\nA \r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";
    for step in 1..body.len() {
        let (data, done) = decode_in_steps(body, step).unwrap();
        assert_eq!(data, b"hello, world0123456789", "step {step}");
        assert!(done);
    }
    // bare LFs are taken as line ends, like the peers do
    let (data, done) = decode_in_steps(b"3\nabc\n0\n\n", 2).unwrap();
    assert_eq!((data.as_slice(), done), (&b"abc"[..], true));
    // a chunk's CRLF goes with its data: nothing of the chunk is left behind in the buffer
    let mut state = Chunked::Size;
    let mut buf = BytesMut::from(&b"3\r\nabc\r\n"[..]);
    assert_eq!(&state.decode(&mut buf).unwrap().unwrap()[..], b"abc");
    assert!(buf.is_empty());
    assert_eq!(state, Chunked::Size);
    // not ended until the empty line after the last chunk
    let (_, done) = decode_in_steps(b"3\r\nabc\r\n0\r\n", 4).unwrap();
    assert!(!done);
}

#[test]
fn malformed_or_unbounded_chunks_end_the_attempt() {
    is_broken(decode_in_steps(b"zz\r\n", 4), "hex");
    is_broken(decode_in_steps(b"\r\n", 4), "hex");
    is_broken(decode_in_steps(b"3 x\r\nabc\r\n", 4), "hex");
    is_broken(decode_in_steps(b"10000000000000000\r\n", 64), "hex");
    is_broken(decode_in_steps(b"3\r\nabcd\r\n", 4), "longer than its size");
    is_broken(decode_in_steps(b"3\r\nabc\rx", 4), "CRLF");
    let long = vec![b'1'; MAX_CHUNK_LINE + 2];
    is_broken(decode_in_steps(&long, 512), "too long");
    let mut trailers = b"0\r\n".to_vec();
    for _ in 0..=(MAX_TRAILERS / 10) {
        trailers.extend_from_slice(b"x-t: 12345\r\n");
    }
    is_broken(decode_in_steps(&trailers, 256), "trailers are too long");
    // the largest size that fits is a size, not an overflow
    let mut state = Chunked::Size;
    let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
    assert_eq!(&state.decode(&mut buf).unwrap().unwrap()[..], b"ab");
    assert_eq!(state, Chunked::Data(u64::MAX - 2));
}
