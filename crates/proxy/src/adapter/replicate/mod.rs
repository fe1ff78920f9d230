//! The Replicate adapter: OpenAI chat completions served by a Replicate model.
//!
//! `POST /v1/chat/completions` becomes a prediction at `{endpoint}/models/{owner}/{name}/predictions`
//! (the request's `model` is `owner/name`), with the messages rendered by a chat template
//! ([`template`]) and OpenAI's sampling parameters mapped to the model's inputs. Non-stream:
//! created with `Prefer: wait`, then `urls.get` is polled with backoff until the prediction ends;
//! the answer is an OpenAI `chat.completion` with `usage` from the prediction's metrics. Stream:
//! `urls.stream` is read and translated event by event ([`stream`]). Replicate's own HTTP errors
//! keep their status (and `Retry-After`), so cooldown, failover and key health work as for
//! OpenAI; a `failed` prediction is a 500 and a `canceled` one a 503, both failed over.

mod stream;
pub mod template;

use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use keypool_config::UpstreamKey;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::translate::whole;
use super::{AttemptRequest, TransportError, UpstreamAdapter, UpstreamResponse};
use template::Turn;

/// Serves chat completions from Replicate predictions.
pub struct ReplicateAdapter;

/// A prediction as Replicate returns it (the fields keypool reads).
#[derive(Debug, Deserialize)]
pub(crate) struct Prediction {
    #[serde(default)]
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    metrics: Option<Metrics>,
    #[serde(default)]
    urls: Urls,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Metrics {
    #[serde(default)]
    input_token_count: Option<u64>,
    #[serde(default)]
    output_token_count: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct Urls {
    #[serde(default)]
    get: Option<String>,
    #[serde(default)]
    stream: Option<String>,
}

/// What a chat request becomes.
struct Translated {
    owner_name: String,
    model: String,
    input: Map<String, Value>,
    stream: bool,
    include_usage: bool,
}

fn openai_error(status: u16, kind: &str, code: &str, message: &str) -> UpstreamResponse {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    whole(status, HeaderMap::new(), Bytes::from(body.to_string()))
}

fn bad_request(param: &str, message: &str) -> UpstreamResponse {
    openai_error(
        400,
        "invalid_request_error",
        &format!("unsupported_parameter:{param}"),
        message,
    )
}

/// Message content Replicate's text models cannot take.
#[derive(Debug, thiserror::Error)]
enum Unsupported {
    #[error("content parts of type {0:?}")]
    Part(String),
    #[error("non-text content")]
    NotText,
}

/// Message content as text; `Err` names an unsupported part.
fn content_text(content: &Value) -> Result<String, Unsupported> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    other => {
                        return Err(Unsupported::Part(other.unwrap_or("?").to_owned()));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(Unsupported::NotText),
    }
}

/// Translates an OpenAI chat request, or answers why it cannot be (a 400 / 404 to return as is).
#[allow(clippy::too_many_lines)] // the request's fields one after another, each refused with its own 400
fn translate(key: &UpstreamKey, path: &str, body: &[u8]) -> Result<Translated, UpstreamResponse> {
    if path != "/chat/completions" {
        return Err(openai_error(
            404,
            "invalid_request_error",
            "unsupported_endpoint",
            &format!("This upstream (Replicate) serves only /v1/chat/completions, not /v1{path}."),
        ));
    }
    let req: Map<String, Value> = serde_json::from_slice(body).map_err(|_| {
        openai_error(
            400,
            "invalid_request_error",
            "invalid_request",
            "The body must be a JSON object.",
        )
    })?;
    for param in [
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "audio",
        "prediction",
    ] {
        if req.get(param).is_some_and(|v| !v.is_null()) {
            return Err(bad_request(
                param,
                &format!("`{param}` is not supported by this model (served by Replicate)."),
            ));
        }
    }
    if req.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(bad_request(
            "n",
            "`n` greater than 1 is not supported by this model (served by Replicate).",
        ));
    }
    if req.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(bad_request(
            "logprobs",
            "`logprobs` is not supported by this model (served by Replicate).",
        ));
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if model.split('/').count() != 2 || model.starts_with('/') || model.ends_with('/') {
        return Err(openai_error(
            404,
            "invalid_request_error",
            "model_not_found",
            &format!("Replicate models are named owner/name; got `{model}`."),
        ));
    }
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            openai_error(
                400,
                "invalid_request_error",
                "invalid_request",
                "`messages` must be an array.",
            )
        })?;
    let mut turns = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let text = content_text(m.get("content").unwrap_or(&Value::Null)).map_err(|what| {
            bad_request(
                "messages",
                &format!("{what} are not supported by this model (served by Replicate)."),
            )
        })?;
        turns.push(Turn { role, text });
    }
    let template = template::choose(key.chat_template.as_ref(), &model);
    let mut input = Map::new();
    input.insert(
        "prompt".into(),
        Value::String(template::render(&template, &turns)),
    );
    if let Some(n) = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .filter(|v| v.is_number())
    {
        input.insert("max_new_tokens".into(), n.clone());
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ] {
        if let Some(v) = req.get(from).filter(|v| v.is_number()) {
            input.insert(to.into(), v.clone());
        }
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            input.insert("stop_sequences".into(), Value::String(s.clone()));
        }
        Some(Value::Array(items)) => {
            let joined: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            input.insert("stop_sequences".into(), Value::String(joined.join(",")));
        }
        _ => {}
    }
    Ok(Translated {
        owner_name: model.clone(),
        model,
        input,
        stream: req.get("stream").and_then(Value::as_bool) == Some(true),
        include_usage: req
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true),
    })
}

/// Replicate's error answer → the same status (and headers, for `Retry-After`), OpenAI-shaped.
async fn upstream_error(resp: reqwest::Response) -> UpstreamResponse {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("detail")
                .or_else(|| v.get("title"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or(text);
    let kind = if status == 429 {
        "rate_limit_error"
    } else if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": format!("Replicate: {detail}"), "type": kind, "code": format!("replicate_{status}"), "param": null}});
    whole(status, headers, Bytes::from(body.to_string()))
}

fn transport(e: &reqwest::Error) -> TransportError {
    TransportError::from_reqwest(e)
}

pub(crate) fn output_text(output: Option<&Value>) -> String {
    match output {
        Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

pub(crate) fn usage_json(metrics: Option<&Metrics>) -> Value {
    let prompt = metrics.and_then(|m| m.input_token_count).unwrap_or(0);
    let completion = metrics.and_then(|m| m.output_token_count).unwrap_or(0);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn get_prediction(
    client: &reqwest::Client,
    key: &UpstreamKey,
    url: &str,
) -> Result<Result<Prediction, UpstreamResponse>, TransportError> {
    let resp = client
        .get(url)
        .bearer_auth(key.sk.expose())
        .send()
        .await
        .map_err(|e| transport(&e))?;
    if !resp.status().is_success() {
        return Ok(Err(upstream_error(resp).await));
    }
    resp.json::<Prediction>()
        .await
        .map(Ok)
        .map_err(|e| transport(&e))
}

/// A finished prediction as the client's answer.
fn finished(p: &Prediction, model: &str) -> UpstreamResponse {
    match p.status.as_str() {
        "succeeded" => {
            let body = json!({
                "id": format!("chatcmpl-{}", p.id),
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": output_text(p.output.as_ref())}, "finish_reason": "stop"}],
                "usage": usage_json(p.metrics.as_ref()),
            });
            whole(200, HeaderMap::new(), Bytes::from(body.to_string()))
        }
        "canceled" => openai_error(
            503,
            "server_error",
            "prediction_canceled",
            "The Replicate prediction was canceled.",
        ),
        _ => {
            let why = p.error.as_ref().map_or_else(
                || "unknown error".to_owned(),
                |e| e.as_str().map_or_else(|| e.to_string(), str::to_owned),
            );
            openai_error(
                500,
                "server_error",
                "prediction_failed",
                &format!("The Replicate prediction failed: {why}"),
            )
        }
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "canceled")
}

impl UpstreamAdapter for ReplicateAdapter {
    fn send<'a>(
        &'a self,
        client: &'a crate::client::UpstreamClient,
        key: &'a UpstreamKey,
        req: AttemptRequest<'a>,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        let client = client.reqwest();
        async move {
            let t = match translate(key, req.path, &req.body) {
                Ok(t) => t,
                Err(answer) => return Ok(answer),
            };
            let url = format!("{}/models/{}/predictions", key.endpoint, t.owner_name);
            let mut create = client.post(url).bearer_auth(key.sk.expose());
            let body = if t.stream {
                json!({"input": t.input, "stream": true})
            } else {
                create = create.header("Prefer", "wait");
                json!({"input": t.input})
            };
            let resp = create.json(&body).send().await.map_err(|e| transport(&e))?;
            if !resp.status().is_success() {
                return Ok(upstream_error(resp).await);
            }
            let mut p: Prediction = resp.json().await.map_err(|e| transport(&e))?;
            if t.stream {
                return stream::open(client, key, &p, t.model, t.include_usage).await;
            }
            // poll until the prediction ends; the engine bounds this with the key's timeout
            let mut wait = Duration::from_millis(100);
            while !is_terminal(&p.status) {
                let Some(get) = p.urls.get.clone() else {
                    return Ok(openai_error(
                        502,
                        "server_error",
                        "replicate_no_get_url",
                        "Replicate returned no urls.get.",
                    ));
                };
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                p = match get_prediction(client, key, &get).await? {
                    Ok(p) => p,
                    Err(answer) => return Ok(answer),
                };
            }
            Ok(finished(&p, &t.model))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> UpstreamKey {
        keypool_config::from_yaml("upstreams:\n  - {sk: r8_x, type: replicate}\n")
            .unwrap()
            .upstreams[0]
            .as_ref()
            .clone()
    }

    #[test]
    fn maps_parameters() {
        let body = br#"{"model":"mistralai/mixtral-8x7b-instruct-v0.1","messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],
                        "max_tokens":64,"temperature":0.5,"top_p":0.9,"stop":["\n\n","END"],"presence_penalty":0.1,"frequency_penalty":0.2,"stream":true,
                        "stream_options":{"include_usage":true}}"#;
        let Ok(t) = translate(&key(), "/chat/completions", body) else {
            panic!("translated")
        };
        assert_eq!(t.input["prompt"], "<s>[INST] Hi [/INST]");
        assert_eq!(t.input["max_new_tokens"], 64);
        assert_eq!(t.input["temperature"], 0.5);
        assert_eq!(t.input["top_p"], 0.9);
        assert_eq!(t.input["stop_sequences"], "\n\n,END");
        assert_eq!(t.input["presence_penalty"], 0.1);
        assert_eq!(t.input["frequency_penalty"], 0.2);
        assert!(t.stream && t.include_usage);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let refuse = |body: &[u8]| {
            translate(&key(), "/chat/completions", body)
                .err()
                .map(|r| r.status)
        };
        assert_eq!(
            refuse(br#"{"model":"a/b","messages":[],"tools":[{"type":"function"}]}"#),
            Some(400)
        );
        assert_eq!(refuse(br#"{"model":"a/b","messages":[],"n":2}"#), Some(400));
        assert_eq!(
            refuse(br#"{"model":"a/b","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#),
            Some(400)
        );
        assert_eq!(refuse(br#"{"model":"gpt-4o","messages":[]}"#), Some(404));
        assert!(translate(&key(), "/embeddings", b"{}").is_err());
    }
}
