//! Splits an upstream event stream into events for a translation, and turns a translation
//! (events in, bytes out) into a [`BodyStream`].

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::super::{BodyStream, TransportError};

/// The largest event a translation holds while waiting for its end.
const MAX_EVENT: usize = 4 * 1024 * 1024;

/// Complete events as they arrive: each its `event:` name (may be empty) and its `data:`
/// lines joined.
#[derive(Default)]
pub(crate) struct Events {
    pending: BytesMut,
    /// Where the search for an event's end resumes (each byte is looked at once).
    scanned: usize,
}

impl Events {
    /// Adds bytes; returns the events they complete. `Err` when one event outgrows the cap.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<Vec<(String, String)>, TransportError> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some((end, next)) = boundary(&self.pending, self.scanned) {
            let event = self.pending.split_to(next);
            self.scanned = 0;
            if let Some(e) = parse(&event[..end]) {
                out.push(e);
            }
        }
        // a terminator may straddle this chunk and the next
        self.scanned = self.pending.len().saturating_sub(2);
        if self.pending.len() > MAX_EVENT {
            return Err(TransportError::Broken(
                "an upstream event is too large to translate".into(),
            ));
        }
        Ok(out)
    }
}

/// End of the first event (its content, the start of the next).
fn boundary(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
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

fn parse(event: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(event).ok()?;
    let (mut name, mut data) = (String::new(), String::new());
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(v) = line.strip_prefix("event:") {
            v.trim().clone_into(&mut name);
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (!data.is_empty() || !name.is_empty()).then_some((name, data))
}

/// A translation of one stream: each upstream event becomes zero or more bytes for the client;
/// `finish` says what to send when the upstream ends (nothing if it ended too early: the relay
/// then reports the stream broken).
pub(crate) trait Translation: Send + 'static {
    fn event(&mut self, name: &str, data: &str, out: &mut BytesMut);
    fn finish(&mut self, out: &mut BytesMut);
}

/// The upstream body, translated event by event.
pub(crate) fn translated(upstream: BodyStream, t: impl Translation) -> BodyStream {
    struct State<T> {
        upstream: BodyStream,
        events: Events,
        t: T,
        ended: bool,
    }
    let state = State {
        upstream,
        events: Events::default(),
        t,
        ended: false,
    };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.ended {
                return None;
            }
            let mut out = BytesMut::new();
            match s.upstream.next().await {
                Some(Ok(chunk)) => match s.events.feed(&chunk) {
                    Ok(events) => {
                        for (name, data) in events {
                            s.t.event(&name, &data, &mut out);
                        }
                    }
                    Err(e) => {
                        s.ended = true;
                        return Some((Err(e), s));
                    }
                },
                Some(Err(e)) => {
                    s.ended = true;
                    return Some((Err(e), s));
                }
                None => {
                    s.ended = true;
                    s.t.finish(&mut out);
                }
            }
            if !out.is_empty() {
                return Some((Ok::<Bytes, TransportError>(out.freeze()), s));
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::Events;

    #[test]
    fn events_are_split_wherever_the_chunks_end() {
        let stream = b"event: a\ndata: {\"x\":1}\n\ndata: [DONE]\r\n\r\n";
        for step in 1..stream.len() {
            let mut e = Events::default();
            let mut all = Vec::new();
            for chunk in stream.chunks(step) {
                all.extend(e.feed(chunk).unwrap());
            }
            assert_eq!(
                all,
                vec![
                    ("a".to_owned(), "{\"x\":1}".to_owned()),
                    (String::new(), "[DONE]".to_owned())
                ],
                "{step}"
            );
        }
    }
}
