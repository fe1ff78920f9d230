//! A chat completions request answered by an Anthropic key: the request as a Messages
//! request, the answer (whole or streamed) as a chat completion.

use bytes::{Bytes, BytesMut};
use keypool_types::AnthropicCounts;
use serde_json::{Map, Value, json};

use super::sse::Translation;
use super::{Shape, Unsupported, text_of};
use crate::adapter::{TransportError, UpstreamResponse};

/// `max_tokens` when the chat request names none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Chat request fields with no effect on the answer, passed over.
const IGNORED: [&str; 7] = [
    "store",
    "metadata",
    "service_tier",
    "stream_options",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
];

/// What the chat request became.
#[derive(Debug)]
pub struct Translated {
    pub body: Bytes,
    pub stream: bool,
    /// The client's stream asked for (or keypool added) the usage chunk.
    pub include_usage: bool,
}

/// Whether a value is its field's default (absent in effect): `n: 1`, `logprobs: false`,
/// `frequency_penalty: 0`, `response_format: {type: text}`, ...
fn is_default(field: &str, v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) if field == "n" => n.as_u64() == Some(1),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "text",
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("text"),
        Value::Array(a) => a.is_empty(),
        Value::Bool(true) => false,
    }
}

/// Translates a chat completions request body.
pub fn request(chat: &Map<String, Value>) -> Result<Translated, Unsupported> {
    let mut out = Map::new();
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut max_tokens = None;
    for (field, v) in chat {
        match field.as_str() {
            "model" | "temperature" | "top_p" => {
                let v = match (field.as_str(), v.as_f64()) {
                    // OpenAI's temperature goes to 2, Anthropic's to 1
                    ("temperature", Some(t)) if t > 1.0 => json!(1.0),
                    _ => v.clone(),
                };
                out.insert(field.clone(), v);
            }
            "messages" => {
                for (i, m) in v.as_array().into_iter().flatten().enumerate() {
                    message(m, i, &mut system, &mut messages)?;
                }
            }
            "max_tokens" | "max_completion_tokens" => max_tokens = v.as_u64().or(max_tokens),
            "stream" => {
                out.insert("stream".into(), v.clone());
            }
            "stop" => {
                let stops = match v {
                    Value::String(s) => vec![Value::String(s.clone())],
                    Value::Array(a) => a.clone(),
                    _ => Vec::new(),
                };
                if !stops.is_empty() {
                    out.insert("stop_sequences".into(), Value::Array(stops));
                }
            }
            "tools" => {
                out.insert("tools".into(), tools(v)?);
            }
            "tool_choice" => {
                out.insert("tool_choice".into(), tool_choice(v)?);
            }
            "user" => {
                out.insert("metadata".into(), json!({"user_id": v}));
            }
            f if IGNORED.contains(&f) => {}
            f if is_default(f, v) => {}
            other => {
                return Err(Unsupported::new(
                    other,
                    "Anthropic's Messages API has no such field",
                ));
            }
        }
    }
    if chat.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let choice = out
            .entry("tool_choice")
            .or_insert_with(|| json!({"type": "auto"}));
        if let Some(c) = choice.as_object_mut() {
            c.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert(
        "max_tokens".into(),
        json!(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    let stream = chat.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = chat
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let body = serde_json::to_vec(&out).unwrap_or_default();
    Ok(Translated {
        body: Bytes::from(body),
        stream,
        include_usage,
    })
}

/// One chat message into the system prompt or the Messages turns.
fn message(
    m: &Value,
    i: usize,
    system: &mut Vec<String>,
    out: &mut Vec<Value>,
) -> Result<(), Unsupported> {
    let at = |f: &str| format!("messages[{i}].{f}");
    let content = m.get("content").unwrap_or(&Value::Null);
    match m.get("role").and_then(Value::as_str).unwrap_or("") {
        "system" | "developer" => system.push(text_of(content)),
        "user" => {
            let content = user_content(content, &at("content"))?;
            out.push(json!({"role": "user", "content": content}));
        }
        "assistant" => {
            let mut blocks = Vec::new();
            let text = text_of(content);
            if !text.is_empty() {
                blocks.push(json!({"type": "text", "text": text}));
            }
            for call in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let args = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}");
                let input: Value = serde_json::from_str(if args.is_empty() { "{}" } else { args })
                    .map_err(|_| Unsupported::new(at("tool_calls"), "arguments are not JSON"))?;
                blocks.push(json!({"type": "tool_use", "id": call.get("id"),
                    "name": call.pointer("/function/name"), "input": input}));
            }
            if !blocks.is_empty() {
                out.push(json!({"role": "assistant", "content": blocks}));
            }
        }
        "tool" => {
            let result = json!({"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                "content": text_of(content)});
            // consecutive tool results are one user turn
            match out.last_mut() {
                Some(last)
                    if last["role"] == "user"
                        && last["content"]
                            .as_array()
                            .is_some_and(|b| b.iter().all(|b| b["type"] == "tool_result")) =>
                {
                    if let Some(blocks) = last["content"].as_array_mut() {
                        blocks.push(result);
                    }
                }
                _ => out.push(json!({"role": "user", "content": [result]})),
            }
        }
        other => return Err(Unsupported::new(at("role"), format!("role {other:?}"))),
    }
    Ok(())
}

/// User content: a string as it is, parts as blocks (text and images).
fn user_content(content: &Value, at: &str) -> Result<Value, Unsupported> {
    let Some(parts) = content.as_array() else {
        return Ok(Value::String(text_of(content)));
    };
    let mut blocks = Vec::new();
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => blocks.push(json!({"type": "text", "text": p.get("text")})),
            Some("image_url") => {
                let url = p
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let source = match url
                    .strip_prefix("data:")
                    .and_then(|rest| rest.split_once(";base64,"))
                {
                    Some((media_type, data)) => {
                        json!({"type": "base64", "media_type": media_type, "data": data})
                    }
                    None => json!({"type": "url", "url": url}),
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            other => {
                return Err(Unsupported::new(
                    at,
                    format!("content parts of type {:?}", other.unwrap_or("?")),
                ));
            }
        }
    }
    Ok(Value::Array(blocks))
}

fn tools(v: &Value) -> Result<Value, Unsupported> {
    let mut out = Vec::new();
    for t in v.as_array().into_iter().flatten() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(Unsupported::new("tools", "only function tools translate"));
        }
        let f = t.get("function").unwrap_or(&Value::Null);
        let mut tool = json!({"name": f.get("name"),
            "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
        if let Some(d) = f.get("description") {
            tool["description"] = d.clone();
        }
        out.push(tool);
    }
    Ok(Value::Array(out))
}

fn tool_choice(v: &Value) -> Result<Value, Unsupported> {
    Ok(match v {
        Value::String(s) if s == "auto" => json!({"type": "auto"}),
        Value::String(s) if s == "none" => json!({"type": "none"}),
        Value::String(s) if s == "required" => json!({"type": "any"}),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            json!({"type": "tool", "name": o.get("function").and_then(|f| f.get("name"))})
        }
        _ => return Err(Unsupported::new("tool_choice", "an unknown choice")),
    })
}

/// Anthropic's stop reason as a chat finish reason.
fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic usage as OpenAI's (prompt tokens include the cache's).
fn usage(counts: &AnthropicCounts) -> Value {
    let u = counts.usage();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.total(),
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens}})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A whole Messages answer as a chat completion.
pub fn whole_answer(message: &Value) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({"id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"),
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string)}})),
            _ => {}
        }
    }
    let counts: AnthropicCounts = message
        .get("usage")
        .and_then(|u| serde_json::from_value(u.clone()).ok())
        .unwrap_or_default();
    let mut msg = json!({"role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    json!({"id": format!("chatcmpl-{}", message.get("id").and_then(Value::as_str).unwrap_or("")),
        "object": "chat.completion", "created": now(), "model": message.get("model"),
        "choices": [{"index": 0, "message": msg, "logprobs": null,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str))}],
        "usage": usage(&counts)})
}

/// The upstream's answer in chat completions' terms.
pub(crate) async fn response(
    resp: UpstreamResponse,
    t: &Translated,
) -> Result<UpstreamResponse, TransportError> {
    let stream = t.stream.then(|| ChatChunks {
        include_usage: t.include_usage,
        ..ChatChunks::default()
    });
    super::answer(resp, Shape::OpenAi, stream, whole_answer).await
}

/// Anthropic's stream events as chat completion chunks.
#[derive(Default)]
pub(crate) struct ChatChunks {
    id: String,
    model: Value,
    created: u64,
    counts: AnthropicCounts,
    /// Content block index → tool call index.
    tools: Vec<(u64, usize)>,
    finish: Option<&'static str>,
    pub(crate) include_usage: bool,
}

impl ChatChunks {
    fn chunk(&self, delta: &Value, finish: Option<&str>, out: &mut BytesMut) {
        let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]});
        out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
    }
}

impl Translation for ChatChunks {
    fn event(&mut self, name: &str, data: &str, out: &mut BytesMut) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(name);
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            "message_start" => {
                let m = v.get("message").unwrap_or(&Value::Null);
                self.id = format!(
                    "chatcmpl-{}",
                    m.get("id").and_then(Value::as_str).unwrap_or("")
                );
                self.model = m.get("model").cloned().unwrap_or(Value::Null);
                self.created = now();
                if let Some(u) = m
                    .get("usage")
                    .and_then(|u| serde_json::from_value(u.clone()).ok())
                {
                    self.counts.update(u);
                }
                self.chunk(&json!({"role": "assistant", "content": ""}), None, out);
            }
            "content_block_start" => {
                let block = v.get("content_block").unwrap_or(&Value::Null);
                if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    let n = self.tools.len();
                    self.tools.push((index, n));
                    self.chunk(&json!({"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": ""}}]}), None, out);
                }
            }
            "content_block_delta" => {
                let d = v.get("delta").unwrap_or(&Value::Null);
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        self.chunk(&json!({"content": d.get("text")}), None, out);
                    }
                    Some("input_json_delta") => {
                        if let Some(&(_, n)) = self.tools.iter().find(|(b, _)| *b == index) {
                            self.chunk(
                                &json!({"tool_calls": [{"index": n,
                                "function": {"arguments": d.get("partial_json")}}]}),
                                None,
                                out,
                            );
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = v
                    .get("usage")
                    .and_then(|u| serde_json::from_value(u.clone()).ok())
                {
                    self.counts.update(u);
                }
                let stop = v.pointer("/delta/stop_reason").and_then(Value::as_str);
                self.finish = Some(finish_reason(stop));
                self.chunk(&json!({}), self.finish, out);
            }
            "message_stop" => {
                if self.include_usage {
                    let c = json!({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model, "choices": [],
                        "usage": usage(&self.counts)});
                    out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            "error" => {
                let message = v.pointer("/error/message").cloned().unwrap_or(Value::Null);
                let e = json!({"error": {"message": message, "type": "server_error",
                    "code": v.pointer("/error/type"), "param": null}});
                out.extend_from_slice(format!("data: {e}\n\n").as_bytes());
            }
            _ => {}
        }
    }

    fn finish(&mut self, _: &mut BytesMut) {}
}
