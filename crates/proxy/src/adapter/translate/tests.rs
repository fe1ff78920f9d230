//! Translation on real-shaped bodies and streams, tools included.

use bytes::BytesMut;
use serde_json::{Map, Value, json};

use super::sse::{Events, Translation};
use super::{to_chat, to_messages};

fn obj(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn run(t: &mut impl Translation, stream: &str) -> String {
    let mut events = Events::default();
    let mut out = BytesMut::new();
    for (name, data) in events.feed(stream.as_bytes()).unwrap() {
        t.event(&name, &data, &mut out);
    }
    t.finish(&mut out);
    String::from_utf8(out.to_vec()).unwrap()
}

#[test]
fn a_tool_conversation_becomes_messages() {
    let chat = json!({"model": "claude-x", "max_completion_tokens": 100, "parallel_tool_calls": false,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"}]});
    let t = to_messages::request(&obj(&chat)).unwrap();
    let m: Value = serde_json::from_slice(&t.body).unwrap();
    assert_eq!(m["max_tokens"], 100);
    assert_eq!(
        m["tools"][0],
        json!({"name": "f", "input_schema": {"type": "object"}})
    );
    assert_eq!(
        m["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        m["messages"][1]["content"][0],
        json!({"type": "tool_use", "id": "c1", "name": "f", "input": {"city": "Paris"}})
    );
    // both results in one user turn
    assert_eq!(m["messages"].as_array().unwrap().len(), 3);
    assert_eq!(m["messages"][2]["content"][1]["tool_use_id"], "c2");
    // and back: the Messages request of that conversation as chat again
    let back = to_chat::request(&obj(&m)).unwrap();
    let c: Value = serde_json::from_slice(&back.body).unwrap();
    assert_eq!(c["tool_choice"], "required");
    assert_eq!(c["parallel_tool_calls"], false);
    assert_eq!(
        c["messages"][1]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    assert_eq!(
        c["messages"][2],
        json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
    );
    assert_eq!(c["messages"][3]["tool_call_id"], "c2");
}

#[test]
fn what_does_not_translate_is_named() {
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut chat = json!({"model": "m", "messages": []});
        chat[field] = value;
        let err = to_messages::request(&obj(&chat)).unwrap_err();
        assert_eq!(err.param, field);
    }
    // defaults are no change
    let chat =
        json!({"model": "m", "messages": [], "n": 1, "logprobs": false, "frequency_penalty": 0});
    assert!(to_messages::request(&obj(&chat)).is_ok());
    let m = json!({"model": "m", "max_tokens": 5, "messages": [], "top_k": 5});
    assert_eq!(to_chat::request(&obj(&m)).unwrap_err().param, "top_k");
    let doc = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]});
    assert!(
        to_chat::request(&obj(&doc))
            .unwrap_err()
            .why
            .contains("document")
    );
}

#[test]
fn an_anthropic_tool_stream_becomes_chat_chunks() {
    let stream = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me\"}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"f\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":20}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let mut t = to_messages::ChatChunks::default();
    t.include_usage = true;
    let out = run(&mut t, stream);
    let chunks: Vec<Value> = out
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(out.ends_with("data: [DONE]\n\n"));
    let args: String = chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/tool_calls/0/function/arguments")?
                .as_str()
        })
        .collect();
    assert_eq!(args, "{\"a\":1}");
    assert_eq!(
        chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
        "toolu_1"
    );
    let finish = chunks
        .iter()
        .find_map(|c| c.pointer("/choices/0/finish_reason")?.as_str());
    assert_eq!(finish, Some("tool_calls"));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage,
        &json!({"prompt_tokens": 110, "completion_tokens": 20, "total_tokens": 130,
            "prompt_tokens_details": {"cached_tokens": 100}})
    );
}

#[test]
fn an_openai_tool_stream_becomes_anthropic_events() {
    let stream = concat!(
        "data: {\"id\":\"c\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-x\",\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":7,\"total_tokens\":57,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\n",
        "data: [DONE]\n\n",
    );
    let out = run(&mut to_chat::MessageEvents::default(), stream);
    let names: Vec<&str> = out
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("event: "))
        .map(|e| e.split('\n').next().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(out.contains("\"stop_reason\":\"tool_use\""), "{out}");
    assert!(out.contains("\"partial_json\":\"{}\""), "{out}");
    // Anthropic's input_tokens leaves the cache reads out: 50 = 18 + 32
    let delta: Value = out
        .split("\n\n")
        .find_map(|e| e.strip_prefix("event: message_delta\ndata: "))
        .and_then(|d| serde_json::from_str(d).ok())
        .expect("a message_delta");
    assert_eq!(
        delta["usage"],
        json!({"input_tokens": 18, "cache_read_input_tokens": 32,
            "cache_creation_input_tokens": 0, "output_tokens": 7})
    );
    // a stream cut before [DONE] ends without message_stop (the relay reports it broken)
    let cut = run(&mut to_chat::MessageEvents::default(), &stream[..200]);
    assert!(!cut.contains("message_stop"));
}
