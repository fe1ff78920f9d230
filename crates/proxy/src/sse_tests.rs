//! Tests of `sse.rs`.

use super::*;

impl SseTap {
    fn feed_slice(&mut self, chunk: &[u8]) -> Bytes {
        self.feed(&Bytes::copy_from_slice(chunk))
    }
}

/// The usual chunk (whole events, nothing waiting) goes out as the same buffer; a dropped
/// usage chunk among whole events, or a partial event after them, costs a copy but the
/// same bytes as feeding them one at a time.
#[test]
fn whole_events_go_out_uncopied_and_every_split_gives_the_same_bytes() {
    let chunk = Bytes::from(format!("{CHUNK}{CHUNK}"));
    let mut tap = SseTap::new(true);
    let out = tap.feed(&chunk);
    assert_eq!(out.as_ptr(), chunk.as_ptr(), "no copy");
    assert_eq!(out, chunk);

    let all = format!("{CHUNK}{USAGE}{CHUNK}{DONE}data: {{\"partial");
    let relayed = |sizes: &[usize]| {
        let mut tap = SseTap::new(true);
        let (mut out, mut rest) = (Vec::new(), all.as_bytes());
        for &n in sizes.iter().chain(std::iter::repeat(&usize::MAX)) {
            if rest.is_empty() {
                break;
            }
            let (piece, r) = rest.split_at(n.min(rest.len()));
            out.extend_from_slice(&tap.feed_slice(piece));
            rest = r;
        }
        (out, tap.usage.map(|u| u.total()), tap.done, tap.finish())
    };
    let whole = relayed(&[usize::MAX]);
    assert_eq!(
        whole.0,
        format!("{CHUNK}{CHUNK}{DONE}").as_bytes(),
        "usage chunk dropped"
    );
    assert_eq!((whole.1, whole.2), (Some(7), true));
    assert_eq!(whole.3.as_ref(), b"data: {\"partial");
    for sizes in [
        &[1][..],
        &[5, 70],
        &[CHUNK.len(), 3],
        &[CHUNK.len() + USAGE.len()],
    ] {
        assert_eq!(relayed(sizes), whole, "{sizes:?}");
    }
}

#[test]
fn a_responses_stream_gives_its_id_usage_and_end() {
    let stream = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":1200,\"input_tokens_details\":{\"cached_tokens\":1024},\"output_tokens\":3,\"total_tokens\":1203}}}\n\n",
    );
    let mut tap = SseTap::new(false)
        .speaking(Surface::Responses)
        .collecting_text(Some(100));
    let mut out = Vec::new();
    // cut anywhere: the same result
    for chunk in stream.as_bytes().chunks(7) {
        out.extend_from_slice(&tap.feed_slice(chunk));
        if out.len() < 40 {
            assert!(!tap.done);
        }
    }
    out.extend_from_slice(&tap.finish());
    assert_eq!(out, stream.as_bytes(), "relayed as it came");
    assert!(tap.done);
    assert_eq!(tap.response_id.as_deref(), Some("resp_1"));
    assert_eq!(tap.text, "Hi");
    let u = tap.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cache_read_tokens),
        (1200, 3, 1024)
    );
}

/// `response.failed` and `.incomplete` end a Responses stream too; a delta that merely
/// mentions an end (inside its text, escaped) or a longer type does not.
#[test]
fn a_responses_stream_ends_at_any_of_its_ends_and_only_there() {
    let ends = |data: &str| {
        let mut tap = SseTap::new(false).speaking(Surface::Responses);
        tap.feed_slice(format!("data: {data}\n\n").as_bytes());
        tap.done
    };
    for end in [
        "response.completed",
        "response.failed",
        "response.incomplete",
    ] {
        assert!(
            ends(&format!(r#"{{"type":"{end}","response":{{"id":"r"}}}}"#)),
            "{end}"
        );
    }
    for not in [
        r#"{"type":"response.output_text.delta","delta":"\"response.completed\""}"#,
        r#"{"type":"response.completed_soon","response":{"id":"r"}}"#,
        r#"{"type":"response.in_progress","response":{"id":"r"}}"#,
    ] {
        assert!(!ends(not), "{not}");
    }
}

const CHUNK: &str =
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// A real-shaped Messages stream: usage from `message_start` (input and cache) and the
/// last `message_delta` (output), the end from `message_stop`, split anywhere.
#[test]
fn reads_anthropic_usage_and_end() {
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":10,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    for size in [1, 7, 64, stream.len()] {
        let mut tap = SseTap::new(false)
            .speaking(Surface::Anthropic)
            .collecting_text(Some(100));
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(size) {
            out.extend_from_slice(&tap.feed_slice(piece));
        }
        out.extend_from_slice(&tap.finish());
        assert_eq!(out, stream.as_bytes(), "passed through unchanged");
        let u = tap.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (25 + 10 + 2000, 15));
        assert!(tap.done);
        assert_eq!(tap.text, "Hello");
    }
    // without message_stop the stream is not done
    let mut tap = SseTap::new(false).speaking(Surface::Anthropic);
    tap.feed_slice(&stream.as_bytes()[..stream.find("event: message_stop").unwrap()]);
    assert!(!tap.done);
    let e = error_event(
        &keypool_types::ApiError::new(keypool_types::ErrorKind::UpstreamStreamBroken, "cut"),
        Surface::Anthropic,
    );
    assert!(
        e.starts_with(b"event: error\ndata: {\"error\":")
            || e.starts_with(b"event: error\ndata: {\"type\":\"error\"")
    );
}

#[test]
fn passes_events_and_reads_usage() {
    let mut tap = SseTap::new(false);
    let out = tap.feed_slice(format!("{CHUNK}{USAGE}{DONE}").as_bytes());
    assert_eq!(out, format!("{CHUNK}{USAGE}{DONE}").as_bytes());
    assert_eq!(tap.usage.unwrap().total(), 7);
    assert!(tap.done);
}

/// A chunk whose only `"usage"` is `null` is passed over without a parse; every other shape
/// is still read, whatever comes before or after it in the event.
#[test]
fn a_null_usage_is_passed_over_and_any_other_usage_is_read() {
    let read = |data: &str| {
        let mut tap = SseTap::new(false);
        tap.feed_slice(format!("data: {data}\n\n").as_bytes());
        tap.usage.map(|u| u.total())
    };
    let usage = r#"{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}"#;
    for none in [
        r#"{"choices":[{"delta":{"content":"usage"}}],"usage":null}"#,
        r#"{"choices":[],"usage" : null }"#,
        r#"{"choices":[{"delta":{"content":"\"usage\": 3"}}],"usage":null}"#,
        r#"{"usage":"usage"}"#,
    ] {
        assert_eq!(read(none), None, "{none}");
    }
    for some in [
        format!(r#"{{"choices":[],"usage":{usage}}}"#),
        format!(r#"{{"choices":[],"usage" : {usage}}}"#),
        format!(r#"{{"x":{{"usage":null}},"usage":{usage}}}"#),
        format!(r#"{{"choices":[{{"delta":{{"content":"usage"}}}}],"usage":{usage}}}"#),
        format!(r#"{{"usage":{usage},"x":{{"usage":null}}}}"#),
    ] {
        assert_eq!(read(&some), Some(7), "{some}");
    }
}

/// OpenAI, asked for the usage chunk, says `"usage": null` in every other chunk: a client that
/// did not ask gets those chunks without it (however the stream is split), one that did
/// gets them as they came, without a copy.
#[test]
fn the_null_usage_keypool_brought_is_cut_from_the_chunks_of_a_client_that_did_not_ask() {
    let null = r#"data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}"#;
    let bare = r#"data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}"#;
    let spaced = "data: {\"choices\":[] , \"usage\" :  null }";
    let all = format!("{null}\n\n{spaced}\n\n{USAGE}{DONE}");
    for sizes in [&[usize::MAX][..], &[1], &[7], &[null.len(), 2]] {
        let mut tap = SseTap::new(true);
        let (mut out, mut rest) = (Vec::new(), all.as_bytes());
        for &n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, r) = rest.split_at(n.min(rest.len()));
            out.extend_from_slice(&tap.feed_slice(piece));
            rest = r;
        }
        out.extend_from_slice(&tap.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{bare}\n\ndata: {{\"choices\":[]  }}\n\n{DONE}"),
            "{sizes:?}"
        );
        assert_eq!(tap.usage.unwrap().total(), 7);
        assert_eq!(tap.events, 3);
    }
    // an event of two data lines, the usage chunk's and a null one's: still dropped
    let mut tap = SseTap::new(true);
    let usage_line = USAGE.trim_end();
    let both = format!("{usage_line}\n{null}\n\n{DONE}");
    assert_eq!(tap.feed_slice(both.as_bytes()), DONE.as_bytes());
    // the client asked: as it came
    let chunk = Bytes::from(format!("{null}\n\n"));
    let mut tap = SseTap::new(false);
    let out = tap.feed(&chunk);
    assert_eq!(out.as_ptr(), chunk.as_ptr(), "no copy");
    // not the last member, or the only one: left as it is
    for kept in [
        r#"data: {"usage":null,"id":"c"}"#,
        r#"data: {"usage":null}"#,
        r#"data: {"x":{"usage":null},"id":"c"}"#,
    ] {
        let mut tap = SseTap::new(true);
        let chunk = format!("{kept}\n\n");
        assert_eq!(tap.feed_slice(chunk.as_bytes()), chunk.as_bytes(), "{kept}");
    }
}

#[test]
fn strips_the_usage_chunk_keypool_asked_for() {
    let mut tap = SseTap::new(true);
    let mut out = Vec::new();
    // split at awkward places: inside an event and inside its terminator
    let all = format!("{CHUNK}{USAGE}{DONE}");
    for piece in all.as_bytes().chunks(7) {
        out.extend_from_slice(&tap.feed_slice(piece));
    }
    out.extend_from_slice(&tap.finish());
    assert_eq!(String::from_utf8(out).unwrap(), format!("{CHUNK}{DONE}"));
    assert_eq!(tap.usage.unwrap().prompt_tokens, 5);
    assert!(tap.done);
}

#[test]
fn partial_event_waits_only_for_itself() {
    let mut tap = SseTap::new(true);
    assert!(tap.feed_slice(b"data: {\"id\":").is_empty());
    assert_eq!(
        tap.feed_slice(b"1}\n\ndata: x").as_ref(),
        b"data: {\"id\":1}\n\n"
    );
    assert_eq!(tap.finish().as_ref(), b"data: x");
    assert!(!tap.done);
}

#[test]
fn crlf_events() {
    let mut tap = SseTap::new(false);
    let out = tap.feed_slice(b"data: a\r\n\r\ndata: [DONE]\r\n\r\n");
    assert_eq!(out.as_ref(), b"data: a\r\n\r\ndata: [DONE]\r\n\r\n");
    assert!(tap.done);
}

#[test]
fn a_stream_without_blank_lines_costs_linear_time_and_is_cut_at_its_cap() {
    let mut tap = SseTap::new(false).max_event(8 << 20);
    let piece = vec![b'x'; 1024];
    let started = std::time::Instant::now();
    // 6 MiB in 1 KiB chunks: quadratic rescanning would be ~18 G byte comparisons
    for _ in 0..6 * 1024 {
        assert!(tap.feed_slice(&piece).is_empty());
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!tap.oversized);
    for _ in 0..3 * 1024 {
        tap.feed_slice(&piece);
    }
    assert!(tap.oversized, "past 8 MiB the event is refused");
    assert!(
        tap.feed_slice(b"\n\ndata: late\n\n").is_empty(),
        "nothing after the cut"
    );
}

#[test]
fn a_terminator_split_across_chunks_is_found() {
    let mut tap = SseTap::new(false);
    assert!(tap.feed_slice(b"data: a\r\n\r").is_empty());
    assert_eq!(tap.feed_slice(b"\ndata: b\n").as_ref(), b"data: a\r\n\r\n");
    assert_eq!(tap.feed_slice(b"\n").as_ref(), b"data: b\n\n");
}
