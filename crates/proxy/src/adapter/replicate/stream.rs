//! A Replicate prediction stream (`urls.stream`) as an OpenAI chat completion stream.
//!
//! Replicate sends `event: output` (text, possibly over several `data:` lines, joined with
//! newlines), `event: error` and `event: done`. keypool emits one `chat.completion.chunk` per
//! output event (the role in the first), then on `done` a chunk with `finish_reason: "stop"`, a
//! usage chunk from the prediction's metrics when `stream_options.include_usage` is set (keypool
//! always sets it; the relay strips it when the client did not ask), and `data: [DONE]`. An
//! `error` event, a `done` with a failure reason, or a stream that ends without `done` is a broken
//! stream: the relay ends the client's stream with an error event.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::StreamExt;
use keypool_config::UpstreamKey;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{Prediction, get_prediction, is_terminal, openai_error, upstream_error, usage_json};
use crate::adapter::{BodyStream, TransportError, UpstreamResponse, body_of};

/// One parsed server-sent event.
#[derive(Debug, PartialEq, Eq)]
struct Event {
    name: String,
    data: String,
}

/// Takes the first complete event off `buf`.
fn take_event(buf: &mut Vec<u8>) -> Option<Event> {
    let (end, next) = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2))
        .or_else(|| {
            buf.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| (i, i + 4))
        })?;
    let raw = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..next);
    let mut name = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    for line in raw.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => value.clone_into(&mut name),
            "data" => data.push(value),
            _ => {}
        }
    }
    Some(Event {
        name,
        data: data.join("\n"),
    })
}

struct Translate {
    upstream: BodyStream,
    buf: Vec<u8>,
    out: VecDeque<Bytes>,
    sent_role: bool,
    finished: bool,
    get_url: Option<String>,
    client: reqwest::Client,
    key: UpstreamKey,
    include_usage: bool,
    model: String,
    id: String,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl Translate {
    fn chunk(&self, delta: &Value, finish: &Value) -> Bytes {
        sse(
            &json!({"id": self.id, "object": "chat.completion.chunk", "created": 0, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    }

    async fn next(&mut self) -> Option<Result<Bytes, TransportError>> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(Ok(b));
            }
            if self.finished {
                return None;
            }
            if let Some(ev) = take_event(&mut self.buf) {
                if let Err(e) = self.handle(ev).await {
                    self.finished = true;
                    return Some(Err(e));
                }
                continue;
            }
            match self.upstream.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    self.finished = true;
                    return Some(Err(e));
                }
                None => {
                    self.finished = true;
                    return Some(Err(TransportError::Broken(
                        "the Replicate stream ended without a done event".into(),
                    )));
                }
            }
        }
    }

    async fn handle(&mut self, ev: Event) -> Result<(), TransportError> {
        match ev.name.as_str() {
            "output" => {
                let delta = if self.sent_role {
                    json!({"content": ev.data})
                } else {
                    self.sent_role = true;
                    json!({"role": "assistant", "content": ev.data})
                };
                let c = self.chunk(&delta, &Value::Null);
                self.out.push_back(c);
                Ok(())
            }
            "error" => {
                let detail = serde_json::from_str::<Value>(&ev.data)
                    .ok()
                    .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or(ev.data);
                Err(TransportError::Broken(format!("Replicate: {detail}")))
            }
            "done" => {
                let reason = serde_json::from_str::<Value>(&ev.data)
                    .ok()
                    .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                if !reason.is_empty() {
                    return Err(TransportError::Broken(format!(
                        "the Replicate prediction ended: {reason}"
                    )));
                }
                if !self.sent_role {
                    let c = self.chunk(&json!({"role": "assistant", "content": ""}), &Value::Null);
                    self.out.push_back(c);
                }
                let c = self.chunk(&json!({}), &json!("stop"));
                self.out.push_back(c);
                if self.include_usage {
                    let usage = self.usage().await;
                    let u = sse(
                        &json!({"id": self.id, "object": "chat.completion.chunk", "created": 0,
                                        "model": self.model, "choices": [], "usage": usage}),
                    );
                    self.out.push_back(u);
                }
                self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.finished = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The prediction's token counts (it may take a moment to show them as succeeded).
    async fn usage(&mut self) -> Value {
        let Some(url) = &self.get_url else {
            return usage_json(None);
        };
        for _ in 0..10 {
            if let Ok(Ok(p)) = get_prediction(&self.client, &self.key, url).await
                && (is_terminal(&p.status) || p.metrics.is_some())
            {
                return usage_json(p.metrics.as_ref());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        usage_json(None)
    }
}

/// Opens `urls.stream` of a created prediction.
pub(super) async fn open(
    client: &reqwest::Client,
    key: &UpstreamKey,
    p: &Prediction,
    model: String,
    include_usage: bool,
) -> Result<UpstreamResponse, TransportError> {
    let Some(url) = p.urls.stream.clone() else {
        return Ok(openai_error(
            502,
            "server_error",
            "replicate_no_stream_url",
            "Replicate returned no urls.stream.",
        ));
    };
    let resp = client
        .get(url)
        .bearer_auth(key.sk.expose())
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|e| TransportError::from_reqwest(&e))?;
    if !resp.status().is_success() {
        return Ok(upstream_error(resp).await);
    }
    let state = Translate {
        upstream: body_of(resp),
        buf: Vec::new(),
        out: VecDeque::new(),
        sent_role: false,
        finished: false,
        get_url: p.urls.get.clone(),
        client: client.clone(),
        key: key.clone(),
        include_usage,
        model,
        id: format!("chatcmpl-{}", p.id),
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        s.next().await.map(|item| (item, s))
    });
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    Ok(UpstreamResponse {
        status: 200,
        headers,
        body: Box::pin(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_data_and_crlf() {
        let mut buf = b"event: output\ndata: line one\ndata: line two\n\nevent: done\r\ndata: {}\r\n\r\npartial".to_vec();
        assert_eq!(
            take_event(&mut buf),
            Some(Event {
                name: "output".into(),
                data: "line one\nline two".into()
            })
        );
        assert_eq!(
            take_event(&mut buf),
            Some(Event {
                name: "done".into(),
                data: "{}".into()
            })
        );
        assert_eq!(take_event(&mut buf), None);
        assert_eq!(buf, b"partial");
    }
}
