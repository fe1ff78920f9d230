//! The mock's SSE chat stream, paced and optionally cut.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::HttpResponse;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{Behavior, State};

/// Counts the stream as completed or cancelled when it is dropped.
struct Guard {
    state: Arc<State>,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.state.streams_completed
        } else {
            &self.state.streams_cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

struct Plan {
    events: Vec<Bytes>,
    next: usize,
    ttfb_ms: u64,
    interval_ms: u64,
    /// Index of the event before which the connection breaks.
    cut_at: Option<usize>,
    guard: Guard,
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

pub(super) fn respond(
    b: &Behavior,
    model: &str,
    words: &[String],
    usage: Option<Value>,
    state: Arc<State>,
) -> HttpResponse {
    // as OpenAI's: once the usage chunk is asked for, every other chunk says `"usage": null`
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if usage.is_some() {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = vec![event(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ))];
    for w in words {
        events.push(event(&chunk(json!({"content": w}), Value::Null)));
    }
    events.push(event(&chunk(json!({}), json!("stop"))));
    if let Some(usage) = usage {
        events.push(event(
            &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                                  "created": 0, "model": model, "choices": [], "usage": usage}),
        ));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    // the role chunk is event 0; cut after `n` content chunks
    paced(b, events, b.cut_after.map(|n| n + 1), state)
}

/// Sends `events` paced by the behaviour, breaking the connection before event `cut_at`.
pub(crate) fn paced(
    b: &Behavior,
    events: Vec<Bytes>,
    cut_at: Option<usize>,
    state: Arc<State>,
) -> HttpResponse {
    let plan = Plan {
        events,
        next: 0,
        ttfb_ms: b.ttfb_ms,
        interval_ms: b.chunk_interval_ms,
        cut_at,
        guard: Guard { state, done: false },
    };
    let body = futures::stream::unfold(plan, |mut p| async move {
        if p.next >= p.events.len() {
            p.guard.done = true;
            drop(p);
            return None;
        }
        let wait = if p.next == 0 {
            p.ttfb_ms
        } else {
            p.interval_ms
        };
        super::pause(wait).await;
        if p.cut_at == Some(p.next) {
            p.guard.done = true;
            p.next = p.events.len();
            return Some((
                Err(std::io::Error::other("mock: connection cut mid-stream")),
                p,
            ));
        }
        let ev = p.events[p.next].clone();
        p.next += 1;
        Some((Ok::<_, std::io::Error>(ev), p))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(Box::pin(body))
}
