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
    /// empty): its complete events at once, a partial one kept in `pending` for its end. A
    /// chunk of whole events with nothing waiting before it (the usual case: an upstream writes
    /// an event at a time) goes out as it came, without a copy, unless an event in it is
    /// dropped or cut ([`Verdict`]).
    pub fn feed(&mut self, chunk: &Bytes) -> Bytes {
        if self.oversized {
            return Bytes::new();
        }
        let out = if self.pending.is_empty() {
            let (at, dropped) = self.release(chunk, 0);
            self.pending.extend_from_slice(&chunk[at..]);
            dropped.unwrap_or_else(|| chunk.slice(..at))
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(chunk);
            let (at, dropped) = self.release(&buf, self.scanned);
            let whole = buf.split_to(at).freeze();
            self.pending = buf;
            dropped.unwrap_or(whole)
        };
        self.waiting();
        out
    }

    /// Inspects the complete events at the start of `buf` (the search for the first one's end
    /// resuming at `from`): the bytes they take, and what goes out instead of those bytes when
    /// one of them is dropped or cut (`None`: all of them, as they are).
    fn release(&mut self, buf: &[u8], from: usize) -> (usize, Option<Bytes>) {
        let (mut at, mut search, mut kept) = (0, from, None::<BytesMut>);
        while let Some((end, next)) = event_end(buf, search) {
            let verdict = self.inspect(&buf[at..end]);
            let before = || {
                let mut k = BytesMut::with_capacity(buf.len());
                k.extend_from_slice(&buf[..at]);
                k
            };
            match verdict {
                Verdict::Pass => {
                    if let Some(k) = kept.as_mut() {
                        k.extend_from_slice(&buf[at..next]);
                    }
                }
                Verdict::Drop => {
                    kept.get_or_insert_with(before);
                }
                Verdict::Cut(cut) => {
                    let k = kept.get_or_insert_with(before);
                    k.extend_from_slice(&buf[at..at + cut.start]);
                    k.extend_from_slice(&buf[at + cut.end..next]);
                }
            }
            (at, search) = (next, next);
        }
        (at, kept.map(BytesMut::freeze))
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

    /// Looks at one event; returns what goes to the client.
    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let mut verdict = Verdict::Pass;
        let mut start = 0;
        while start < event.len() {
            let end = memchr::memchr(b'\n', &event[start..]).map_or(event.len(), |n| start + n);
            let line = &event[start..end];
            let line_start = start;
            start = end + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            // where `data` starts in `event`
            let data_start = line_start + 5 + (data.len() - data.trim_ascii_start().len());
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
            let Some(at) = USAGE.find(data) else {
                continue;
            };
            if let Some(end) = null_usage_end(data, at) {
                // the `null` usage keypool's own request for it brought: the client, who did
                // not ask, gets the chunk without it (one cut an event: its data is one line
                // from every provider; a dropped event stays dropped)
                if self.strip_usage_chunk
                    && verdict == Verdict::Pass
                    && let Some(cut) = last_member(data, at, end)
                {
                    verdict = Verdict::Cut(data_start + cut.start..data_start + cut.end);
                }
                continue;
            }
            if let Ok(c) = serde_json::from_slice::<Chunk>(data)
                && let Some(u) = c.usage
            {
                self.usage = Some(u);
                if self.strip_usage_chunk && c.choices.is_none_or(|ch| ch.is_empty()) {
                    verdict = Verdict::Drop;
                }
            }
        }
        if verdict != Verdict::Drop {
            self.events += 1;
        }
        verdict
    }
}

impl SseTap {
    /// Reads one Responses API event's data: the id from `response.created`, the usage and the
    /// end from `response.completed` (or `.failed` / `.incomplete`, which end it too).
    fn responses_event(&mut self, data: &[u8]) {
        // one search for the types' common start, then their ends compared (a Responses
        // stream is mostly deltas: four searches an event cost ~600 instructions)
        const ENDS: [&[u8]; 4] = [b"created\"", b"completed\"", b"failed\"", b"incomplete\""];
        static START: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"\"response."));
        let read = START.find_iter(data).any(|at| {
            let rest = &data[at + b"\"response.".len()..];
            ENDS.iter().any(|end| rest.starts_with(end))
        });
        if !read {
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
        static STOP: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"\"message_stop\""));
        let stop = STOP.find(data).is_some();
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

/// Where the `"usage"` found at `at` ends, when it is a `"usage": null` member and `data`
/// names no other `"usage"`: then the event carries no usage and needs no parse. OpenAI sends
/// exactly this in every chunk but the last once the usage chunk was asked for (and keypool
/// asks for it), so a stream's events are not parsed one by one. Exact: inside a JSON string a
/// quote is escaped, so the only unescaped `"usage"` is a member name or a string that is just
/// `usage` (not followed by `:`), and any other member named `usage` would be found by the
/// second search.
fn null_usage_end(data: &[u8], at: usize) -> Option<usize> {
    let rest = data[at + b"\"usage\"".len()..].trim_ascii_start();
    let after = rest
        .strip_prefix(b":")?
        .trim_ascii_start()
        .strip_prefix(b"null")?;
    USAGE
        .find(after)
        .is_none()
        .then(|| data.len() - after.len())
}

/// The bytes of the member at `at..end` (`"usage": null`) and the comma before it, when it is
/// the last member of the top-level object: followed by nothing but the object's closing
/// brace (OpenAI writes `usage` last). A member anywhere else is left as it is.
fn last_member(data: &[u8], at: usize, end: usize) -> Option<std::ops::Range<usize>> {
    if data[end..].trim_ascii_start() != b"}" {
        return None;
    }
    let before = data[..at].trim_ascii_end();
    let comma = before.len().checked_sub(1)?;
    (before[comma] == b',').then_some(comma..end)
}

/// What goes to the client of one event.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The event as it came.
    Pass,
    /// Nothing (the usage chunk keypool asked for and the client did not).
    Drop,
    /// The event less these bytes (the `"usage": null` member that keypool's request for the
    /// usage chunk added).
    Cut(std::ops::Range<usize>),
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
#[path = "sse_tests.rs"]
mod tests;
