//! OpenAI's Responses API, as far as keypool's tests need it: `POST /v1/responses` (plain and
//! streamed with its typed events, `previous_response_id` checked), `GET /v1/responses/{id}`,
//! `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`. A mock keeps the
//! responses it created and knows no other's, as one OpenAI organisation does not know
//! another's: a follow-up that reaches the wrong key gets a 404.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::{error, reply_words};
use crate::{Behavior, State};

/// A stored response and the input that created it.
pub(crate) type Stored = (Value, Value);

fn not_found(what: &str, id: &str, param: Option<&str>) -> HttpResponse {
    let mut resp = error(
        404,
        "invalid_request_error",
        "not_found",
        &format!("{what} with id '{id}' not found."),
    );
    if let Some(p) = param {
        let body = json!({"error": {"message": format!("Previous response with id '{id}' not found."),
            "type": "invalid_request_error", "param": p, "code": "previous_response_not_found"}});
        resp = HttpResponse::NotFound().json(body);
    }
    resp
}

/// `/responses...` (the `/v1` already stripped).
pub(crate) fn dispatch(
    req: &HttpRequest,
    b: &Behavior,
    path: &str,
    body: &[u8],
    state: Arc<State>,
) -> HttpResponse {
    let rest = path.strip_prefix("/responses").unwrap_or_default();
    let mut parts = rest.trim_start_matches('/').splitn(2, '/');
    let (id, sub) = (parts.next().unwrap_or(""), parts.next());
    let method = req.method().as_str();
    if id.is_empty() {
        return match method {
            "POST" => create(b, body, state),
            _ => error(
                405,
                "invalid_request_error",
                "method_not_allowed",
                "Method not allowed.",
            ),
        };
    }
    let mut stored = state.responses();
    match (method, sub) {
        ("GET", None) => match stored.get(id) {
            Some((r, _)) => HttpResponse::Ok().json(r),
            None => not_found("Response", id, None),
        },
        ("DELETE", None) => match stored.remove(id) {
            Some(_) => HttpResponse::Ok()
                .json(json!({"id": id, "object": "response.deleted", "deleted": true})),
            None => not_found("Response", id, None),
        },
        ("GET", Some("input_items")) => match stored.get(id) {
            Some((_, input)) => HttpResponse::Ok().json(json!({"object": "list",
                "data": input, "first_id": "msg_in_0", "last_id": "msg_in_0", "has_more": false})),
            None => not_found("Response", id, None),
        },
        _ => error(
            404,
            "invalid_request_error",
            "unknown_url",
            "Unknown request URL.",
        ),
    }
}

/// Words of the input (a string, or messages with string or `input_text` content).
fn input_words(input: &Value) -> u64 {
    let count = |s: &str| s.split_whitespace().count() as u64;
    match input {
        Value::String(s) => count(s),
        Value::Array(items) => items
            .iter()
            .map(|m| match m.get("content") {
                Some(Value::String(s)) => 2 + count(s),
                Some(Value::Array(parts)) => {
                    2 + parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .map(count)
                        .sum::<u64>()
                }
                _ => 2,
            })
            .sum(),
        _ => 0,
    }
}

/// The input as input items.
fn input_items(input: &Value) -> Value {
    match input {
        Value::String(s) => json!([{"type": "message", "id": "msg_in_0", "role": "user",
            "content": [{"type": "input_text", "text": s}]}]),
        other => other.clone(),
    }
}

fn create(b: &Behavior, body: &[u8], state: Arc<State>) -> HttpResponse {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(
            400,
            "invalid_request_error",
            "invalid_json",
            "We could not parse the JSON body of your request.",
        );
    };
    let Some(model) = v.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error(
            400,
            "invalid_request_error",
            "missing_required_parameter",
            "Missing required parameter: 'model'.",
        );
    };
    if let Some(prev) = v.get("previous_response_id").and_then(Value::as_str)
        && !state.responses().contains_key(prev)
    {
        return not_found("Previous response", prev, Some("previous_response_id"));
    }
    let input = v.get("input").cloned().unwrap_or(Value::Null);
    let n = state.next_response();
    let id = format!("resp_{}_{n}", crate::openai::name(b));
    let words = reply_words(b);
    let text = words.concat();
    let input_tokens = input_words(&input);
    let usage = json!({"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": words.len(), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + words.len() as u64});
    let message = json!({"type": "message", "id": format!("msg_{n}"), "status": "completed",
        "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": 0, "status": status,
            "error": null, "incomplete_details": null, "instructions": v.get("instructions"),
            "model": model, "output": output, "parallel_tool_calls": true,
            "previous_response_id": v.get("previous_response_id"), "temperature": 1.0,
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "usage": usage, "metadata": {}})
    };
    let done = response("completed", json!([message]), usage);
    state
        .responses()
        .insert(id.clone(), (done.clone(), input_items(&input)));
    if v.get("stream").and_then(Value::as_bool) != Some(true) {
        return HttpResponse::Ok().json(done);
    }
    let started = response("in_progress", json!([]), Value::Null);
    stream(b, &started, &message, &words, &done, state)
}

fn event(seq: &mut u64, name: &str, data: Value) -> Bytes {
    let mut data = data;
    data["type"] = json!(name);
    data["sequence_number"] = json!(*seq);
    *seq += 1;
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn stream(
    b: &Behavior,
    started: &Value,
    message: &Value,
    words: &[String],
    done: &Value,
    state: Arc<State>,
) -> HttpResponse {
    let mut seq = 0;
    let item = message["id"].clone();
    let mut in_progress = message.clone();
    in_progress["status"] = json!("in_progress");
    in_progress["content"] = json!([]);
    let mut events = vec![
        event(&mut seq, "response.created", json!({"response": started})),
        event(
            &mut seq,
            "response.in_progress",
            json!({"response": started}),
        ),
        event(
            &mut seq,
            "response.output_item.added",
            json!({"output_index": 0, "item": in_progress}),
        ),
        event(
            &mut seq,
            "response.content_part.added",
            json!({"item_id": item, "output_index": 0,
            "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for w in words {
        let delta = w;
        events.push(event(
            &mut seq,
            "response.output_text.delta",
            json!({"item_id": item,
            "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
    }
    let text = words.concat();
    events.push(event(
        &mut seq,
        "response.output_text.done",
        json!({"item_id": item,
        "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    ));
    events.push(event(
        &mut seq,
        "response.content_part.done",
        json!({"item_id": item,
        "output_index": 0, "content_index": 0,
        "part": {"type": "output_text", "text": text, "annotations": []}}),
    ));
    events.push(event(
        &mut seq,
        "response.output_item.done",
        json!({"output_index": 0, "item": message}),
    ));
    events.push(event(
        &mut seq,
        "response.completed",
        json!({"response": done}),
    ));
    // the first four events come first; cut after `n` text deltas
    crate::openai::stream::paced(b, events, b.cut_after.map(|n| n + 4), state)
}
