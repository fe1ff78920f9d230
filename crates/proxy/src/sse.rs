//! [`SseTap`]: watches an OpenAI or Anthropic event stream as it passes, event by event.
//!
//! OpenAI's: it learns the exact usage from the `include_usage` chunk, notices `data: [DONE]`,
//! and strips the usage chunk when keypool (not the client) asked for it. Anthropic's: the usage
//! is `message_start`'s (input and cache tokens) updated by each `message_delta`'s (output
//! tokens, and whatever else it repeats), and the end is `message_stop`. The Responses API's:
//! the id from `response.created`, the usage and the end from `response.completed` (or
//! `.failed` / `.incomplete`). Complete events are released as soon as
//! their terminating blank line arrives; a partial event waits only for the rest of itself.
//! Each byte is scanned for an event's end once (a stream without blank lines costs linear
//! time, not quadratic), and a partial event may grow to `max_event` bytes at most.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use keypool_types::{AnthropicCounts, Surface, Usage};
use memchr::memmem;
use serde::Deserialize;

/// State of one stream's tap.
#[derive(Debug, Default)]
pub struct SseTap {
    pending: BytesMut,
    /// Where in `pending` the search for an event's end resumes.
    scanned: usize,
    /// Largest event (`max_stream_event_bytes`); 0: no limit.
    max_event: usize,
    /// An event grew past `max_event`: the stream must end (`pending` was dropped).
    pub oversized: bool,
    strip_usage_chunk: bool,
    /// Usage reported by the stream (its last chunk).
    pub usage: Option<Usage>,
    /// `data: [DONE]` was seen: the stream ended properly.
    pub done: bool,
    /// Events released so far.
    pub events: u64,
    /// Collect the concatenated `choices[].delta.content` up to this many bytes (for request
    /// logs); `None`: don't look.
    collect_text: Option<usize>,
    /// The collected text.
    pub text: String,
    /// Whose events these are.
    surface: Surface,
    /// Anthropic's counts so far.
    anthropic: AnthropicCounts,
    /// The Responses API's response id (from `response.created`).
    pub response_id: Option<String>,
}

/// A Responses API stream event, as far as keypool reads it.
#[derive(Deserialize)]
struct ResponsesEvent {
    #[serde(default)]
    r#type: String,
    #[serde(default)]
    response: Option<ResponseObject>,
}

#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct AnthropicEvent {
    #[serde(default)]
    r#type: String,
    #[serde(default)]
    usage: Option<AnthropicCounts>,
    #[serde(default)]
    message: Option<AnthropicMessage>,
}

#[derive(Deserialize)]
struct AnthropicMessage {
    #[serde(default)]
    usage: Option<AnthropicCounts>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

impl SseTap {
    pub fn new(strip_usage_chunk: bool) -> Self {
        Self {
            strip_usage_chunk,
            ..Self::default()
        }
    }

    /// Bounds one event to `max` bytes.
    #[must_use]
    pub fn max_event(mut self, max: usize) -> Self {
        self.max_event = max;
        self
    }

    /// Reads the stream as `surface`'s events (OpenAI's by default).
    #[must_use]
    pub fn speaking(mut self, surface: Surface) -> Self {
        self.surface = surface;
        self
    }

    /// Also collects the streamed text, up to `cap` bytes.
    #[must_use]
    pub fn collecting_text(mut self, cap: Option<usize>) -> Self {
        self.collect_text = cap;
        self
    }

    fn collect(&mut self, data: &[u8]) {
        let Some(cap) = self.collect_text else { return };
        if self.text.len() >= cap {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        if let Some(t) = v.pointer("/delta/text").and_then(serde_json::Value::as_str) {
            self.text.push_str(t); // Anthropic's content_block_delta
        }
        if v.get("type").and_then(serde_json::Value::as_str) == Some("response.output_text.delta")
            && let Some(t) = v.get("delta").and_then(serde_json::Value::as_str)
        {
            self.text.push_str(t);
        }
        if let Some(choices) = v.get("choices").and_then(serde_json::Value::as_array) {
            for c in choices {
                if let Some(t) = c
                    .pointer("/delta/content")
                    .and_then(serde_json::Value::as_str)
                {
                    self.text.push_str(t);
                }
            }
        }
    }

    /// Feeds a chunk from upstream; returns the bytes to send to the client now (possibly
    /// empty). A chunk of whole events with nothing waiting before it (the usual case: an
    /// upstream writes an event at a time) goes out as it came, without a copy.
    pub fn feed(&mut self, chunk: &Bytes) -> Bytes {
        if self.oversized {
            return Bytes::new();
        }
        if !self.pending.is_empty() {
            return self.feed_pending(chunk);
        }
        // `out` only once an event is dropped; until then what goes out is `chunk[..at]`
        let (mut at, mut out) = (0, None::<BytesMut>);
        while let Some((end, next)) = event_end(chunk, at) {
            let keep = self.inspect(&chunk[at..end]);
            match (keep, out.as_mut()) {
                (true, Some(o)) => o.extend_from_slice(&chunk[at..next]),
                (false, None) => out = Some(BytesMut::from(&chunk[..at])),
                _ => {}
            }
            at = next;
        }
        if at < chunk.len() {
            self.pending.extend_from_slice(&chunk[at..]);
            self.waiting();
        }
        out.map_or_else(|| chunk.slice(..at), BytesMut::freeze)
    }

    /// [`SseTap::feed`] behind a partial event: the chunk joins it.
    fn feed_pending(&mut self, chunk: &[u8]) -> Bytes {
        // complete events go out at once; a partial one waits in `pending` for its end
        let mut out = BytesMut::new();
        self.pending.extend_from_slice(chunk);
        while let Some((end, next)) = event_end(&self.pending, self.scanned) {
            let event = self.pending.split_to(next);
            self.scanned = 0;
            if self.inspect(&event[..end]) {
                out.extend_from_slice(&event);
            }
        }
        self.waiting();
        out.freeze()
    }

    /// After a chunk: where the search for the partial event's end resumes, and its bound.
    fn waiting(&mut self) {
        // a terminator may straddle this chunk and the next: resume two bytes back
        self.scanned = self.pending.len().saturating_sub(2);
        if self.max_event > 0 && self.pending.len() > self.max_event {
            self.oversized = true;
            self.pending = BytesMut::new();
            self.scanned = 0;
        }
    }

    /// What is left when the upstream ends (a partial event), to pass on as it is.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            self.inspect(&rest);
        }
        rest.freeze()
    }

    /// Looks at one event; returns whether it goes to the client.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let mut keep = true;
        let mut start = 0;
        while start < event.len() {
            let end = memchr::memchr(b'\n', &event[start..]).map_or(event.len(), |n| start + n);
            let line = &event[start..end];
            start = end + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if self.surface == Surface::Anthropic {
                self.collect(data);
                self.anthropic_event(data);
                continue;
            }
            if self.surface == Surface::Responses {
                self.collect(data);
                self.responses_event(data);
                continue;
            }
            if data == b"[DONE]" {
                self.done = true;
                continue;
            }
            self.collect(data);
            if USAGE.find(data).is_none() {
                continue;
            }
            if let Ok(c) = serde_json::from_slice::<Chunk>(data)
                && let Some(u) = c.usage
            {
                self.usage = Some(u);
                if self.strip_usage_chunk && c.choices.is_none_or(|ch| ch.is_empty()) {
                    keep = false;
                }
            }
        }
        if keep {
            self.events += 1;
        }
        keep
    }
}

impl SseTap {
    /// Reads one Responses API event's data: the id from `response.created`, the usage and the
    /// end from `response.completed` (or `.failed` / `.incomplete`, which end it too).
    fn responses_event(&mut self, data: &[u8]) {
        const READ: [&[u8]; 4] = [
            b"\"response.created\"",
            b"\"response.completed\"",
            b"\"response.failed\"",
            b"\"response.incomplete\"",
        ];
        if !READ.iter().any(|t| contains(data, t)) {
            return;
        }
        let Ok(e) = serde_json::from_slice::<ResponsesEvent>(data) else {
            return;
        };
        let Some(r) = e.response else { return };
        match e.r#type.as_str() {
            "response.created" => self.response_id = r.id,
            "response.completed" | "response.failed" | "response.incomplete" => {
                self.done = true;
                if r.usage.is_some() {
                    self.usage = r.usage;
                }
                if self.response_id.is_none() {
                    self.response_id = r.id;
                }
            }
            _ => {}
        }
    }

    /// Reads one Anthropic event's data: its usage, and whether it is `message_stop`.
    fn anthropic_event(&mut self, data: &[u8]) {
        let stop = contains(data, b"\"message_stop\"");
        if !stop && USAGE.find(data).is_none() {
            return;
        }
        let Ok(e) = serde_json::from_slice::<AnthropicEvent>(data) else {
            return;
        };
        if e.r#type == "message_stop" {
            self.done = true;
            return;
        }
        let counts = match e.r#type.as_str() {
            "message_start" => e.message.and_then(|m| m.usage),
            "message_delta" => e.usage,
            _ => None,
        };
        let Some(c) = counts else { return };
        self.anthropic.update(c);
        self.usage = Some(self.anthropic.usage());
    }
}

/// End of the first complete event in `buf`, searching from `from`: (end of its content, start
/// of the next event).
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        // jump to the next newline
        match memchr::memchr(b'\n', &buf[i..]) {
            Some(at) => i += at,
            None => return None,
        }
        if i + 1 >= buf.len() {
            return None;
        }
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// Whether `needle` occurs in `hay` (a vectorised substring search: bodies can be large).
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// `"usage"`, searched for in every event: a searcher built once, not per event.
static USAGE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// The SSE event keypool sends when a stream breaks after it started: the `openai` SDKs raise an
/// `APIError` on a `data:` event carrying an `error` object.
/// On Anthropic's surface it is Anthropic's `event: error`, on the Responses API its `error`
/// event.
pub fn error_event(err: &keypool_types::ApiError, surface: Surface) -> Bytes {
    match surface {
        Surface::OpenAi => Bytes::from(format!("data: {}\n\n", err.to_json())),
        Surface::Anthropic => Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            err.to_json_for(surface)
        )),
        // the Responses API's `error` event: its fields at the top level
        Surface::Responses => Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            serde_json::json!({"type": "error", "code": err.kind.wire().code,
                               "message": err.message, "param": null})
        )),
    }
}

#[cfg(test)]
mod tests {
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
}
