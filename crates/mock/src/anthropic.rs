//! The mock's Anthropic endpoints: `/v1/messages` (plain and SSE) and
//! `/v1/messages/count_tokens`, with Anthropic's key header, error shape and usage (a request
//! with `cache_control` anywhere reads 1,024 tokens from the cache; one with `tools` calls the
//! first tool).

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{Behavior, State};

/// Tokens a request with `cache_control` reports as read from the cache.
pub const CACHE_READ: u64 = 1024;
/// Tokens a request with a one-hour `cache_control` (`"ttl": "1h"`) also reports as written.
pub const CACHE_WRITE_1H: u64 = 256;

fn error(status: u16, message: &str) -> HttpResponse {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .content_type("application/json")
        .body(json!({"type": "error", "error": {"type": kind, "message": message}}).to_string())
}

/// Every `/v1/messages*` request lands here.
pub(crate) async fn dispatch(
    req: &HttpRequest,
    b: &Behavior,
    body: &[u8],
    state: Arc<State>,
) -> HttpResponse {
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    if header("anthropic-version").is_none() {
        return error(400, "anthropic-version: header is required");
    }
    if let Some(key) = &b.require_key
        && header("x-api-key") != Some(key.as_str())
    {
        return error(401, "invalid x-api-key");
    }
    crate::openai::pause(b.latency_ms).await;
    if let Some(status) = b.status {
        return forced(b, status);
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(400, "The request body is not valid JSON.");
    };
    let Some(model) = v.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error(400, "model: Field required");
    };
    if b.models.as_ref().is_some_and(|m| !m.contains(&model)) {
        return error(404, &format!("model: {model}"));
    }
    let input = input_tokens(&v);
    if req.path().ends_with("/count_tokens") {
        return HttpResponse::Ok().json(json!({"input_tokens": input}));
    }
    if v.get("max_tokens").and_then(Value::as_u64).is_none() {
        return error(400, "max_tokens: Field required");
    }
    let has = |text: &[u8]| body.windows(text.len()).any(|w| w == text);
    let cached = if has(b"\"cache_control\"") {
        CACHE_READ
    } else {
        0
    };
    let written = if has(b"\"ttl\":\"1h\"") {
        CACHE_WRITE_1H
    } else {
        0
    };
    let words = crate::openai::reply_words(b);
    let usage = |output: usize| {
        json!({"input_tokens": input, "cache_creation_input_tokens": written,
               "cache_read_input_tokens": cached, "output_tokens": output,
               "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                  "ephemeral_1h_input_tokens": written}})
    };
    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream(b, &model, &words, &usage(1), &usage(words.len()), state);
    }
    // with tools, the first one is called (with empty input)
    let tool = v.pointer("/tools/0/name").and_then(Value::as_str);
    let (content, stop) = match tool {
        Some(name) => (
            json!([{"type": "tool_use", "id": "toolu_mock", "name": name, "input": {}}]),
            "tool_use",
        ),
        None => (
            json!([{"type": "text", "text": words.concat()}]),
            "end_turn",
        ),
    };
    HttpResponse::Ok().json(json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage(words.len()),
    }))
}

/// Words of every text in `system` and `messages`, plus two per message.
fn input_tokens(v: &Value) -> u64 {
    fn words(c: &Value) -> u64 {
        match c {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(blocks) => blocks.iter().map(|b| b.get("text").map_or(0, words)).sum(),
            _ => 0,
        }
    }
    let system = v.get("system").map_or(0, words);
    let messages: u64 = v.get("messages").and_then(Value::as_array).map_or(0, |m| {
        m.iter()
            .map(|m| 2 + m.get("content").map_or(0, words))
            .sum()
    });
    system + messages
}

/// The answer of a mock told to fail with `status`: Anthropic's error, its `retry-after`, and
/// the `anthropic-ratelimit-*-reset` times it implies.
fn forced(b: &Behavior, status: u16) -> HttpResponse {
    let mut resp = error(status, &format!("mock forced status {status}"));
    if let Some(ra) = &b.retry_after
        && let Ok(v) = actix_web::http::header::HeaderValue::from_str(ra)
    {
        resp.headers_mut()
            .insert(actix_web::http::header::RETRY_AFTER, v);
    }
    // Anthropic says when its limits reset, as RFC 3339 times
    if let Some(secs) = b.retry_after.as_deref().and_then(|r| r.parse::<u64>().ok()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&rfc3339(now + secs)) {
            for name in [
                "anthropic-ratelimit-requests-reset",
                "anthropic-ratelimit-tokens-reset",
            ] {
                resp.headers_mut().insert(
                    actix_web::http::header::HeaderName::from_static(name),
                    v.clone(),
                );
            }
        }
    }
    resp
}

/// A Unix time as RFC 3339 in UTC (`2026-12-05T07:44:20Z`).
fn rfc3339(unix: u64) -> String {
    let (days, rest) = (unix / 86_400, unix % 86_400);
    // civil from days (Howard Hinnant's algorithm), for days since 1970-01-01
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn stream(
    b: &Behavior,
    model: &str,
    words: &[String],
    start_usage: &Value,
    end_usage: &Value,
    state: Arc<State>,
) -> HttpResponse {
    let mut events = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": start_usage}}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for w in words {
        let text = w;
        events.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    // Anthropic's message_delta usage counts output only (and is cumulative)
    let output = end_usage.get("output_tokens").cloned().unwrap_or(json!(0));
    events.push(event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    // message_start and content_block_start come first; cut after `n` text deltas
    crate::openai::stream::paced(b, events, b.cut_after.map(|n| n + 2), state)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_457_860), "2026-12-05T08:04:20Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
