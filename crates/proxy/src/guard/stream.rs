//! [`StreamGuard`]: the answer's guardrails on a stream, event by event as the relay releases
//! them.
//!
//! The streamed text (OpenAI's `choices[0].delta.content`, Anthropic's `content_block_delta`
//! `delta.text`, the Responses API's `response.output_text.delta`) runs through one buffer:
//! placeholders are restored, prohibited content is found, and only the text that can no longer
//! change is sent. What is held back is at most a partial placeholder (`[PHONE_` waiting for
//! `1]`, up to 48 bytes) or the longest keyword's length less one character, or a match that
//! crosses that line; it goes out with the next text event, or, before the first event that
//! carries no text (the finish chunk, `content_block_stop`, `[DONE]`), in an event of its own
//! shaped like the last text event. A `block` rule ends the stream: the text before the match
//! is sent, then an error event, and nothing after it.
//!
//! Each choice (OpenAI's `choices[0].index`: with `n` > 1 their chunks interleave), content
//! block (Anthropic's `index`) or output item (the Responses API's `output_index`) has its own
//! buffer and its own last event, so one choice's text is never matched against, nor sent in
//! an event of, another.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use keypool_policy::gateway::GatewayRuntime;
use keypool_types::{ApiError, Surface};
use serde_json::Value;

use super::detect::partial_placeholder;
use super::{Restore, blocked, mask_violations, restore, violations};

/// One stream's answer guardrails.
pub struct StreamGuard {
    gw: Arc<GatewayRuntime>,
    restore: Option<Restore>,
    surface: Surface,
    /// One per choice, content block or output item seen, in the order first seen.
    channels: Vec<Channel>,
    /// The channel a `block` rule stopped.
    blocking: usize,
    /// Rules that matched (each counted once), as `response:rule`.
    pub matched: Vec<String>,
}

/// One choice's (content block's, output item's) text.
struct Channel {
    index: u64,
    /// Text not sent yet.
    pending: String,
    /// The last text event: its lines before `data:`, and its data.
    template: Option<(String, Value)>,
}

/// A `block` rule matched: the clean text before the match, and the error.
struct Block(String, ApiError);

/// What the guard lets through.
pub enum Guarded {
    /// These bytes, and the stream goes on.
    Pass(Bytes),
    /// These bytes, then this error: the stream ends.
    Blocked(Bytes, ApiError),
}

impl StreamGuard {
    /// The guard of a stream on `gw`, when its answers are watched.
    pub fn new(
        gw: Arc<GatewayRuntime>,
        restore: Option<Restore>,
        surface: Surface,
    ) -> Option<Self> {
        super::watches_answers(&gw, restore.as_ref()).then(|| Self {
            gw,
            restore,
            surface,
            channels: Vec::new(),
            blocking: 0,
            matched: Vec::new(),
        })
    }

    /// Complete events (as [`crate::sse::SseTap::feed`] releases them), guarded.
    pub fn events(&mut self, events: &[u8]) -> Guarded {
        let mut out = BytesMut::with_capacity(events.len());
        let mut rest = events;
        while !rest.is_empty() {
            let end = event_len(rest);
            let (event, tail) = rest.split_at(end);
            rest = tail;
            if let Err(e) = self.event(event, &mut out) {
                out.extend_from_slice(&self.before_block());
                return Guarded::Blocked(out.freeze(), e);
            }
        }
        Guarded::Pass(out.freeze())
    }

    fn event(&mut self, event: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        let Some((head, mut data, tail)) = split_event(event) else {
            self.flush_all(out)?;
            out.extend_from_slice(event);
            return Ok(());
        };
        let index = channel_index(&data, self.surface);
        let Some(text) = text_mut(&mut data, self.surface) else {
            // this choice's text is over (its finish chunk), or, with no index, all of it
            match index.and_then(|i| self.channels.iter().position(|c| c.index == i)) {
                Some(c) => self.flush(c, out)?,
                None if index.is_none() => self.flush_all(out)?,
                None => {}
            }
            // an event that repeats the answer whole (the Responses API's
            // `response.output_text.done` and `response.completed`) is guarded as a whole answer
            if self.scrub(&mut data)? {
                write_event(out, head, &data, tail);
            } else {
                out.extend_from_slice(event);
            }
            return Ok(());
        };
        let c = self.channel(index.unwrap_or(0));
        let mut buf = std::mem::take(&mut self.channels[c].pending);
        buf.push_str(text);
        match self.settle(c, buf, false) {
            Ok(send) => *text = send,
            Err(e) => {
                // the clean text before the match goes out in this event's shape
                self.channels[c].template = Some((head.to_owned(), data));
                return Err(e);
            }
        }
        write_event(out, head, &data, tail);
        self.channels[c].template = Some((head.to_owned(), data));
        Ok(())
    }

    /// The channel of `index`, made when first seen.
    fn channel(&mut self, index: u64) -> usize {
        if let Some(c) = self.channels.iter().position(|c| c.index == index) {
            return c;
        }
        self.channels.push(Channel {
            index,
            pending: String::new(),
            template: None,
        });
        self.channels.len() - 1
    }

    /// What of channel `c`'s `buf` can be sent now (restored, checked); the rest waits in the
    /// channel (all of it is sent when `last`). On a `block` the clean text before the match
    /// waits instead, for [`StreamGuard::before_block`].
    fn settle(&mut self, c: usize, buf: String, last: bool) -> Result<String, ApiError> {
        match self.check(buf, last) {
            Ok((send, keep)) => {
                self.channels[c].pending = keep;
                Ok(send)
            }
            Err(Block(before, e)) => {
                self.channels[c].pending = before;
                self.blocking = c;
                Err(e)
            }
        }
    }

    /// What of `buf` can be sent now (restored, checked) and what waits; all of it when `last`.
    fn check(&mut self, buf: String, last: bool) -> Result<(String, String), Block> {
        let mut buf = match self.restore.as_ref().and_then(|r| restore(&buf, r)) {
            Some(b) => b,
            None => buf,
        };
        let safety = self.gw.spec.content_safety.as_ref();
        let found = safety.map(|s| violations(s, &buf)).unwrap_or_default();
        let mut cut = buf.len();
        if !last {
            if self.restore.is_some()
                && let Some(p) = partial_placeholder(&buf)
            {
                cut = p;
            }
            if let Some(s) = safety
                && s.longest_keyword > 1
            {
                let hold = s.longest_keyword - 1;
                let n = buf.chars().count();
                let at = buf
                    .char_indices()
                    .nth(n.saturating_sub(hold))
                    .map_or(buf.len(), |(i, _)| i);
                cut = cut.min(at);
            }
            // a match that crosses the line waits whole
            if let Some(v) = found.iter().find(|v| v.start < cut && v.end > cut) {
                cut = v.start;
            }
        }
        let sent: Vec<_> = found.into_iter().filter(|v| v.end <= cut).collect();
        let keep = buf.split_off(cut);
        if let Some(first) = sent.first() {
            for v in &sent {
                let noted = format!("response:{}", v.rule);
                if !self.matched.contains(&noted) {
                    self.matched.push(noted);
                    crate::observe::guardrail_hit(
                        &self.gw,
                        &v.rule,
                        "response",
                        safety.is_some_and(|s| s.alert),
                    );
                }
            }
            if safety.is_some_and(|s| s.block_response) {
                // the text before the match goes out; the match and everything after it never
                buf.truncate(first.start);
                return Err(Block(buf, blocked(&first.rule)));
            }
            buf = mask_violations(&buf, &sent);
        }
        Ok((buf, keep))
    }

    /// Restores and checks every text of an event that carries no streamed text (`true`:
    /// changed).
    fn scrub(&mut self, data: &mut Value) -> Result<bool, ApiError> {
        let mut changed = false;
        if let Some(r) = &self.restore {
            super::restore_all(data, r, &mut changed);
        }
        let Some(spec) = self.gw.spec.content_safety.as_ref() else {
            return Ok(changed);
        };
        let mut matched = Vec::new();
        let outcome = super::walk(data, false, &mut |s: &mut String| {
            changed |= super::check(spec, s, spec.block_response, &mut matched)?;
            Ok(())
        });
        for rule in matched {
            let noted = format!("response:{rule}");
            if !self.matched.contains(&noted) {
                self.matched.push(noted);
                crate::observe::guardrail_hit(&self.gw, &rule, "response", spec.alert);
            }
        }
        outcome.map(|()| changed)
    }

    /// Sends what waits in channel `c`, in an event shaped like its last text event.
    fn flush(&mut self, c: usize, out: &mut BytesMut) -> Result<(), ApiError> {
        if self.channels[c].pending.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.channels[c].pending);
        let send = self.settle(c, buf, true)?;
        self.emit(c, out, send);
        Ok(())
    }

    /// Sends what waits in every channel.
    fn flush_all(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        for c in 0..self.channels.len() {
            self.flush(c, out)?;
        }
        Ok(())
    }

    fn emit(&mut self, c: usize, out: &mut BytesMut, text: String) {
        if text.is_empty() {
            return;
        }
        if let Some((head, mut data)) = self.channels[c].template.take() {
            if let Some(t) = text_mut(&mut data, self.surface) {
                *t = text;
            }
            write_event(out, &head, &data, b"\n\n");
            self.channels[c].template = Some((head, data));
        }
    }

    /// The bytes a blocked stream sends before its error event: the blocked channel's text
    /// that was clean (another channel's held-back text is not sent: it was not checked whole).
    fn before_block(&mut self) -> Bytes {
        let c = self.blocking;
        let mut out = BytesMut::new();
        if let Some(channel) = self.channels.get_mut(c) {
            let text = std::mem::take(&mut channel.pending);
            self.emit(c, &mut out, text);
        }
        out.freeze()
    }
}

/// The length of the first event of `buf` (through its blank line; all of `buf` if none).
fn event_len(buf: &[u8]) -> usize {
    let mut i = 0;
    while let Some(at) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + at;
        match buf.get(nl + 1) {
            Some(b'\n') => return nl + 2,
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return nl + 3,
            _ => i = nl + 1,
        }
    }
    buf.len()
}

/// An event as (lines before its `data:` line, the data as JSON, what follows the data line).
fn split_event(event: &[u8]) -> Option<(&str, Value, &[u8])> {
    let text = std::str::from_utf8(event).ok()?;
    let start = if text.starts_with("data:") {
        0
    } else {
        text.find("\ndata:")? + 1
    };
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let payload = text[start + 5..line_end].trim();
    let data: Value = serde_json::from_str(payload).ok()?;
    Some((&text[..start], data, &event[line_end..]))
}

fn write_event(out: &mut BytesMut, head: &str, data: &Value, tail: &[u8]) {
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&serde_json::to_vec(data).unwrap_or_default());
    out.extend_from_slice(tail);
}

/// Which choice, content block or output item an event's text belongs to.
fn channel_index(data: &Value, surface: Surface) -> Option<u64> {
    match surface {
        Surface::OpenAi => data.pointer("/choices/0/index"),
        Surface::Anthropic => data.get("index"),
        Surface::Responses => data.get("output_index"),
    }
    .and_then(Value::as_u64)
}

/// The streamed text of one event's data, by surface.
fn text_mut(data: &mut Value, surface: Surface) -> Option<&mut String> {
    let v = match surface {
        Surface::OpenAi => data.pointer_mut("/choices/0/delta/content")?,
        Surface::Anthropic => {
            if data.get("type")?.as_str()? != "content_block_delta" {
                return None;
            }
            data.pointer_mut("/delta/text")?
        }
        Surface::Responses => {
            if data.get("type")?.as_str()? != "response.output_text.delta" {
                return None;
            }
            data.get_mut("delta")?
        }
    };
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
