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
    /// Text not sent yet.
    pending: String,
    /// The last text event: its lines before `data:`, and its data.
    template: Option<(String, Value)>,
    /// Rules that matched (each counted once), as `response:rule`.
    pub matched: Vec<String>,
}

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
            pending: String::new(),
            template: None,
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
            self.flush(out)?;
            out.extend_from_slice(event);
            return Ok(());
        };
        let Some(text) = text_mut(&mut data, self.surface) else {
            self.flush(out)?;
            // an event that repeats the answer whole (the Responses API's
            // `response.output_text.done` and `response.completed`) is guarded as a whole answer
            if self.scrub(&mut data)? {
                write_event(out, head, &data, tail);
            } else {
                out.extend_from_slice(event);
            }
            return Ok(());
        };
        let mut buf = std::mem::take(&mut self.pending);
        buf.push_str(text);
        match self.settle(buf, false) {
            Ok((send, keep)) => {
                *text = send;
                self.pending = keep;
            }
            Err(e) => {
                // the clean text before the match goes out in this event's shape
                self.template = Some((head.to_owned(), data));
                return Err(e);
            }
        }
        write_event(out, head, &data, tail);
        self.template = Some((head.to_owned(), data));
        Ok(())
    }

    /// What of `buf` can be sent now (restored, checked) and what waits; all of it when `last`.
    fn settle(&mut self, buf: String, last: bool) -> Result<(String, String), ApiError> {
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
                return Err(self.carry_then_block(buf, &first.rule));
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

    /// Keeps `before` for the blocked answer's last text event, and makes the error.
    fn carry_then_block(&mut self, before: String, rule: &str) -> ApiError {
        self.pending = before;
        blocked(rule)
    }

    /// Sends what waits, in an event shaped like the last text event.
    fn flush(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.pending);
        let (send, _) = self.settle(buf, true)?;
        self.emit(out, send);
        Ok(())
    }

    fn emit(&mut self, out: &mut BytesMut, text: String) {
        if text.is_empty() {
            return;
        }
        if let Some((head, mut data)) = self.template.take() {
            if let Some(t) = text_mut(&mut data, self.surface) {
                *t = text;
            }
            write_event(out, &head, &data, b"\n\n");
            self.template = Some((head, data));
        }
    }

    /// The bytes a blocked stream sends before its error event: the text that was clean.
    fn before_block(&mut self) -> Bytes {
        let text = std::mem::take(&mut self.pending);
        let mut out = BytesMut::new();
        self.emit(&mut out, text);
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
