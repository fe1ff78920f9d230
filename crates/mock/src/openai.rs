//! The mock's OpenAI endpoints.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{Behavior, Recorded, State};

pub(crate) fn error(status: u16, kind: &str, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .content_type("application/json")
        .body(
            json!({"error": {"message": message, "type": kind, "code": code, "param": null}})
                .to_string(),
        )
}

pub(crate) async fn pause(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Every request lands here.
pub(crate) async fn dispatch(
    req: HttpRequest,
    body: Bytes,
    state: web::Data<State>,
) -> HttpResponse {
    state.requests.fetch_add(1, Ordering::SeqCst);
    record(&req, &body, &state);
    let b = state.behavior();
    // Azure OpenAI: /openai/deployments/{deployment}/..., `api-version` and `api-key`
    let azure = req
        .path()
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| rest.find('/').map(|at| &rest[at..]));
    let path = match azure {
        Some(rest) => rest,
        None => req.path().strip_prefix("/v1").unwrap_or(req.path()),
    };
    if azure.is_some() && !req.query_string().contains("api-version=") {
        return error(404, "404", "404", "Resource not found");
    }
    if path.starts_with("/messages") {
        return crate::anthropic::dispatch(&req, &b, &body, state.into_inner()).await;
    }
    let responses = path == "/responses" || path.starts_with("/responses/");
    if let Some(key) = &b.require_key {
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
        let presented = if azure.is_some() {
            header("api-key") == Some(key.as_str())
        } else {
            header("authorization").unwrap_or("") == format!("Bearer {key}")
        };
        if !presented {
            return error(
                401,
                "invalid_request_error",
                "invalid_api_key",
                "Incorrect API key provided.",
            );
        }
    }
    pause(b.latency_ms).await;
    if let Some(status) = b.status {
        return forced(&b, status, azure.is_some());
    }
    match (req.method().as_str(), path) {
        ("GET", "/models") => models(&b),
        ("POST", "/chat/completions") => chat(&b, &body, state.into_inner()),
        ("POST", "/embeddings") => embeddings(&b, &body),
        ("POST", "/moderations") => moderations(&b, &body),
        _ if responses => crate::responses::dispatch(&req, &b, path, &body, state.into_inner()),
        ("POST", "/audio/transcriptions") => {
            HttpResponse::Ok().json(json!({"text": format!("Hello from {}.", name(&b))}))
        }
        _ => error(
            404,
            "invalid_request_error",
            "unknown_url",
            &format!("Unknown request URL: {}", req.path()),
        ),
    }
}

/// The answer of a mock told to fail with `status` (with its `Retry-After`, and Azure's
/// `retry-after-ms`).
fn forced(b: &Behavior, status: u16, azure: bool) -> HttpResponse {
    let mut resp = error(
        status,
        "server_error",
        b.error_code.as_deref().unwrap_or("mock_forced"),
        &format!("mock forced status {status}"),
    );
    if let Some(ra) = &b.retry_after
        && let Ok(v) = actix_web::http::header::HeaderValue::from_str(ra)
    {
        resp.headers_mut()
            .insert(actix_web::http::header::RETRY_AFTER, v);
    }
    // Azure says it in milliseconds too
    if azure && let Some(secs) = b.retry_after.as_deref().and_then(|r| r.parse::<u64>().ok()) {
        resp.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("retry-after-ms"),
            actix_web::http::header::HeaderValue::from(secs * 1000),
        );
    }
    resp
}

/// Keeps the request for [`crate::MockServer::last_request`] when asked to.
fn record(req: &HttpRequest, body: &Bytes, state: &State) {
    if state.record {
        let recorded = Recorded {
            method: req.method().to_string(),
            path: req.path().to_owned(),
            query: req.query_string().to_owned(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        };
        *state
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(recorded);
    }
}

pub(crate) fn name(b: &Behavior) -> &str {
    if b.name.is_empty() { "mock" } else { &b.name }
}

fn models(b: &Behavior) -> HttpResponse {
    let ids = b.models.clone().unwrap_or_else(|| {
        [
            "gpt-4o-mini",
            "gpt-4o",
            "text-embedding-3-small",
            "whisper-1",
        ]
        .map(String::from)
        .to_vec()
    });
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": name(b)}))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// Parses a JSON body and checks its model; `Err` is the response to send.
fn request(b: &Behavior, body: &[u8]) -> Result<(Value, String), Box<HttpResponse>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            400,
            "invalid_request_error",
            "invalid_json",
            &format!("We could not parse the JSON body: {e}"),
        )
    })?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if model.is_empty() {
        return Err(Box::new(error(
            400,
            "invalid_request_error",
            "missing_model",
            "you must provide a model parameter",
        )));
    }
    if let Some(known) = &b.models
        && !known.contains(&model)
    {
        return Err(Box::new(error(
            404,
            "invalid_request_error",
            "model_not_found",
            &format!("The model `{model}` does not exist or you do not have access to it."),
        )));
    }
    Ok((v, model))
}

/// Words in the prompt plus two per message: a deterministic stand-in for a tokenizer.
fn prompt_tokens(v: &Value) -> u64 {
    let count = |s: &str| s.split_whitespace().count() as u64;
    match v.get("messages").and_then(Value::as_array) {
        Some(msgs) => msgs
            .iter()
            .map(|m| 2 + m.get("content").and_then(Value::as_str).map_or(0, count))
            .sum(),
        None => match v.get("input") {
            Some(Value::String(s)) => count(s),
            Some(Value::Array(items)) => items.iter().map(|i| i.as_str().map_or(1, count)).sum(),
            _ => 0,
        },
    }
}

/// The reply's stream chunks (each word after the first with its leading space); the whole
/// answer is them joined.
pub(crate) fn reply_words(b: &Behavior) -> Vec<String> {
    if let Some(pieces) = &b.reply {
        return pieces.clone();
    }
    let n = if b.reply_words == 0 { 5 } else { b.reply_words };
    let base = ["Hello", "from", name(b), "the", "mock"];
    (0..n)
        .map(|i| {
            let w = base[i % base.len()];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn chat(b: &Behavior, body: &[u8], state: Arc<State>) -> HttpResponse {
    let (v, model) = match request(b, body) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    if v.get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| !(0.0..=2.0).contains(&t))
    {
        return error(
            400,
            "invalid_request_error",
            "decimal_above_max_value",
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2.",
        );
    }
    let words = reply_words(b);
    let prompt = prompt_tokens(&v);
    let mut usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": words.len(),
        "total_tokens": prompt + words.len() as u64,
    });
    // with a `prompt_cache_key`, every prompt token but the last message's was cached
    if v.get("prompt_cache_key").is_some() {
        let last = v
            .pointer("/messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last());
        let cached = prompt - last.map_or(0, |m| prompt_tokens(&json!({"messages": [m]})));
        usage["prompt_tokens_details"] = json!({"cached_tokens": cached, "audio_tokens": 0});
    }
    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        return crate::openai::stream::respond(
            b,
            &model,
            &words,
            include_usage.then_some(usage),
            state,
        );
    }
    // with tools, the first one is called (with empty arguments)
    let (message, finish) = match v.pointer("/tools/0/function/name") {
        Some(name) => (
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_mock",
                "type": "function", "function": {"name": name, "arguments": "{}"}}]}),
            "tool_calls",
        ),
        None => (
            json!({"role": "assistant", "content": words.concat()}),
            "stop",
        ),
    };
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }))
}

/// OpenAI's moderation endpoint: an input containing `flag-me` is flagged (category
/// `harassment`), anything else is not.
fn moderations(b: &Behavior, body: &[u8]) -> HttpResponse {
    let (v, model) = match request(b, body) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let inputs: Vec<String> = match v.get("input") {
        Some(Value::Array(items)) => items.iter().map(Value::to_string).collect(),
        Some(other) => vec![other.to_string()],
        None => Vec::new(),
    };
    let results: Vec<Value> = inputs
        .iter()
        .map(|i| {
            let flagged = i.contains("flag-me");
            json!({"flagged": flagged, "categories": {"harassment": flagged},
                   "category_scores": {"harassment": if flagged { 0.97 } else { 0.01 }}})
        })
        .collect();
    HttpResponse::Ok().json(json!({"id": "modr-mock", "model": model, "results": results}))
}

fn embeddings(b: &Behavior, body: &[u8]) -> HttpResponse {
    let (v, model) = match request(b, body) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let inputs = match v.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    let vector: Vec<f32> = (0..8).map(|i| i as f32 / 8.0).collect();
    let base64 = v.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let embedding = if base64 {
                let raw: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64_encode(&raw))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens = prompt_tokens(&v);
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

fn base64_encode(raw: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(raw.len().div_ceil(3) * 4);
    for chunk in raw.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) mod stream;

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64_encode(b"Man"), "TWFu");
        assert_eq!(super::base64_encode(b"Ma"), "TWE=");
        assert_eq!(super::base64_encode(b"M"), "TQ==");
    }
}
