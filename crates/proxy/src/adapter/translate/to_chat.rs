//! A Messages request answered by an OpenAI-compatible key: the request as a chat
//! completions request, the answer (whole or streamed) as a Messages answer.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

use super::sse::Translation;
use super::{Shape, Unsupported, text_of};
use crate::adapter::{TransportError, UpstreamResponse};

/// Messages request fields with no effect on the answer, passed over.
const IGNORED: [&str; 2] = ["service_tier", "cache_control"];

/// What the Messages request became.
#[derive(Debug)]
pub struct Translated {
    pub body: Bytes,
    pub stream: bool,
}

/// Translates a Messages request body.
pub fn request(m: &Map<String, Value>) -> Result<Translated, Unsupported> {
    let mut out = Map::new();
    let mut messages = Vec::new();
    if let Some(system) = m.get("system") {
        messages.push(json!({"role": "system", "content": text_of(system)}));
    }
    for (field, v) in m {
        match field.as_str() {
            "model" | "temperature" | "top_p" | "max_tokens" | "stream" => {
                out.insert(field.clone(), v.clone());
            }
            "system" => {}
            "messages" => {
                for (i, turn) in v.as_array().into_iter().flatten().enumerate() {
                    turn_messages(turn, i, &mut messages)?;
                }
            }
            "stop_sequences" => {
                out.insert("stop".into(), v.clone());
            }
            "tools" => {
                out.insert("tools".into(), tools(v)?);
            }
            "tool_choice" => {
                let (choice, parallel) = tool_choice(v)?;
                out.insert("tool_choice".into(), choice);
                if !parallel {
                    out.insert("parallel_tool_calls".into(), Value::Bool(false));
                }
            }
            "metadata" => {
                if let Some(user) = v.get("user_id") {
                    out.insert("user".into(), user.clone());
                }
            }
            f if IGNORED.contains(&f) => {}
            other => {
                return Err(Unsupported::new(
                    other,
                    "OpenAI's chat completions have no such field",
                ));
            }
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    let stream = m.get("stream").and_then(Value::as_bool) == Some(true);
    if stream {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Translated {
        body: Bytes::from(serde_json::to_vec(&out).unwrap_or_default()),
        stream,
    })
}

/// One Messages turn as chat messages (a user turn's tool results become `tool` messages).
fn turn_messages(turn: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), Unsupported> {
    let role = turn.get("role").and_then(Value::as_str).unwrap_or("");
    let at = format!("messages[{i}].content");
    let content = turn.get("content").unwrap_or(&Value::Null);
    let Some(blocks) = content.as_array() else {
        out.push(json!({"role": role, "content": text_of(content)}));
        return Ok(());
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(json!({"type": "text", "text": b.get("text")})),
            Some("image") => {
                let s = b.get("source").unwrap_or(&Value::Null);
                let url = match s.get("type").and_then(Value::as_str) {
                    Some("base64") => format!(
                        "data:{};base64,{}",
                        s.get("media_type").and_then(Value::as_str).unwrap_or("image/png"),
                        s.get("data").and_then(Value::as_str).unwrap_or("")
                    ),
                    _ => s.get("url").and_then(Value::as_str).unwrap_or("").to_owned(),
                };
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Some("tool_use") => calls.push(json!({"id": b.get("id"), "type": "function",
                "function": {"name": b.get("name"),
                    "arguments": b.get("input").map_or_else(|| "{}".to_owned(), Value::to_string)}})),
            Some("tool_result") => out.push(json!({"role": "tool",
                "tool_call_id": b.get("tool_use_id"),
                "content": text_of(b.get("content").unwrap_or(&Value::Null))})),
            // the model's own reasoning, echoed back: OpenAI's chat has no place for it
            Some("thinking" | "redacted_thinking") => {}
            other => {
                return Err(Unsupported::new(
                    at,
                    format!("content blocks of type {:?}", other.unwrap_or("?")),
                ));
            }
        }
    }
    if role == "assistant" {
        let text = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<String>();
        let mut m = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::String(text) }});
        if !calls.is_empty() {
            m["tool_calls"] = Value::Array(calls);
        }
        out.push(m);
    } else if !parts.is_empty() {
        out.push(json!({"role": role, "content": parts}));
    }
    Ok(())
}

fn tools(v: &Value) -> Result<Value, Unsupported> {
    let mut out = Vec::new();
    for t in v.as_array().into_iter().flatten() {
        // server tools (web search, code execution) carry a type; custom tools need none
        if t.get("type")
            .and_then(Value::as_str)
            .is_some_and(|k| k != "custom")
        {
            return Err(Unsupported::new(
                "tools",
                "only custom (client) tools translate",
            ));
        }
        let mut f = json!({"name": t.get("name"),
            "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))});
        if let Some(d) = t.get("description") {
            f["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

/// Anthropic's tool choice as OpenAI's, and whether parallel calls stay allowed.
fn tool_choice(v: &Value) -> Result<(Value, bool), Unsupported> {
    let parallel = v.get("disable_parallel_tool_use") != Some(&Value::Bool(true));
    let choice = match v.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => json!({"type": "function", "function": {"name": v.get("name")}}),
        _ => return Err(Unsupported::new("tool_choice", "an unknown choice")),
    };
    Ok((choice, parallel))
}

fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// OpenAI usage in Anthropic's terms (`input_tokens` leaves the cache reads out).
fn usage(u: &Value) -> Value {
    let prompt = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let cached = u
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(prompt);
    json!({"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0)})
}

/// A whole chat completion as a Messages answer.
pub fn whole_answer(c: &Value) -> Value {
    let choice = c.pointer("/choices/0").unwrap_or(&Value::Null);
    let msg = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    let text = text_of(msg.get("content").unwrap_or(&Value::Null));
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call.get("id"),
            "name": call.pointer("/function/name"), "input": input}));
    }
    json!({"id": format!("msg_{}", c.get("id").and_then(Value::as_str).unwrap_or("")),
        "type": "message", "role": "assistant", "model": c.get("model"), "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason").and_then(Value::as_str)),
        "stop_sequence": null, "usage": usage(c.get("usage").unwrap_or(&Value::Null))})
}

/// The upstream's answer in Messages' terms.
pub(crate) async fn response(
    resp: UpstreamResponse,
    t: &Translated,
) -> Result<UpstreamResponse, TransportError> {
    let stream = t.stream.then(MessageEvents::default);
    super::answer(resp, Shape::Anthropic, stream, whole_answer).await
}

/// The block being streamed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// A tool call by its OpenAI index.
    Tool(u64),
}

/// Chat completion chunks as Anthropic's stream events.
#[derive(Default)]
pub(crate) struct MessageEvents {
    started: bool,
    /// The open block and its Anthropic index.
    open: Option<(Open, u64)>,
    next_index: u64,
    finish: Option<String>,
    usage: Option<Value>,
}

fn event(out: &mut BytesMut, name: &str, data: &Value) {
    out.extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
}

impl MessageEvents {
    fn close(&mut self, out: &mut BytesMut) {
        if let Some((_, index)) = self.open.take() {
            event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Opens a block of `kind` unless it is the one open; answers its index.
    fn open(&mut self, kind: Open, block: &Value, out: &mut BytesMut) -> u64 {
        if let Some((k, i)) = self.open
            && k == kind
        {
            return i;
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((kind, index));
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start",
            "index": index, "content_block": block}),
        );
        index
    }

    fn start(&mut self, c: &Value, out: &mut BytesMut) {
        self.started = true;
        event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
            "id": format!("msg_{}", c.get("id").and_then(Value::as_str).unwrap_or("")),
            "type": "message", "role": "assistant", "model": c.get("model"), "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        );
    }

    fn delta(&mut self, d: &Value, out: &mut BytesMut) {
        if let Some(text) = d.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            let index = self.open(Open::Text, &json!({"type": "text", "text": ""}), out);
            event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta",
                "index": index, "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in d
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let block = json!({"type": "tool_use", "id": call.get("id"),
                "name": call.pointer("/function/name"), "input": {}});
            let index = self.open(Open::Tool(n), &block, out);
            if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str)
                && !args.is_empty()
            {
                event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta",
                    "index": index, "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
    }
}

impl Translation for MessageEvents {
    fn event(&mut self, _: &str, data: &str, out: &mut BytesMut) {
        if data == "[DONE]" {
            if !self.started {
                return;
            }
            self.close(out);
            let usage = self
                .usage
                .as_ref()
                .map_or_else(|| json!({"output_tokens": 0}), usage);
            event(
                out,
                "message_delta",
                &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
                "usage": usage}),
            );
            event(out, "message_stop", &json!({"type": "message_stop"}));
            return;
        }
        let Ok(c) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(e) = c.get("error") {
            event(
                out,
                "error",
                &json!({"type": "error", "error": {"type": "api_error",
                "message": e.get("message")}}),
            );
            return;
        }
        if !self.started {
            self.start(&c, out);
        }
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        for choice in c
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(d) = choice.get("delta") {
                self.delta(d, out);
            }
            if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish = Some(f.to_owned());
            }
        }
    }

    fn finish(&mut self, _: &mut BytesMut) {}
}
