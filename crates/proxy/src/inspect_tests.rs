//! Tests of `inspect.rs`.

use super::*;

#[test]
fn json_model_stream_and_estimate() {
    let body = Bytes::from_static(br#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[]}"#);
    let i = inspect("/v1/chat/completions", "application/json", body.clone()).unwrap();
    assert_eq!(i.model, "gpt-4o-mini");
    assert!(!i.stream);
    assert_eq!(i.est_tokens, body.len() as u64 / 4 + 100);
    assert_eq!(i.body, body, "non-stream bodies pass unchanged");
}

#[test]
fn stream_without_usage_is_rewritten_once() {
    let body = Bytes::from_static(
        br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    let i = inspect("/v1/chat/completions", "application/json", body).unwrap();
    assert!(i.stream && i.strip_usage_chunk);
    let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["messages"][0]["content"], "hi");
    let asked = Bytes::from_static(
        br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    let j = inspect("/v1/chat/completions", "application/json", asked.clone()).unwrap();
    assert!(!j.strip_usage_chunk);
    assert_eq!(j.body, asked);
}

/// The field is spliced in: the body's own bytes (order, spacing, numbers) stay as sent;
/// a body with `stream_options` already is merged instead.
#[test]
fn the_usage_field_is_spliced_into_the_body_as_sent() {
    let rewritten = |body: &'static str| {
        let i = inspect(
            "/v1/chat/completions",
            "application/json",
            Bytes::from(body),
        )
        .unwrap();
        assert!(i.strip_usage_chunk, "{body}");
        String::from_utf8(i.body.to_vec()).unwrap()
    };
    assert_eq!(
        rewritten(r#"{"stream":true, "model":"m","temperature":1.0E0,"n":12345678901234567890}"#),
        r#"{"stream":true, "model":"m","temperature":1.0E0,"n":12345678901234567890,"stream_options":{"include_usage":true}}"#
    );
    assert_eq!(
        rewritten(" {\n \"stream\": true\n}\n"),
        " {\n \"stream\": true\n,\"stream_options\":{\"include_usage\":true}}\n"
    );
    for merged in [
        r#"{"stream":true,"stream_options":null}"#,
        r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
    ] {
        let v: serde_json::Value = serde_json::from_str(&rewritten(merged)).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true, "{merged}");
        assert!(v.as_object().unwrap().len() == 2, "one stream_options: {v}");
    }
    let v: serde_json::Value = serde_json::from_str(&rewritten(
        r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
    ))
    .unwrap();
    assert_eq!(v["stream_options"]["x"], 1);
}

#[test]
fn multipart_model_field() {
    let body = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
    let i = inspect(
        "/v1/audio/transcriptions",
        "multipart/form-data; boundary=XyZ",
        Bytes::from(body),
    )
    .unwrap();
    assert_eq!(i.model, "whisper-1");
    let no_model = "--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b--\r\n";
    let j = inspect(
        "/v1/audio/transcriptions",
        "multipart/form-data; boundary=\"b\"",
        Bytes::from(no_model),
    )
    .unwrap();
    assert_eq!(j.model, "/v1/audio/transcriptions");
    assert!(inspect("/v1/x", "multipart/form-data", Bytes::new()).is_err());
}

#[test]
fn json_sniffed_when_mislabelled() {
    let e = inspect(
        "/v1/chat/completions",
        "application/x-www-form-urlencoded",
        Bytes::from_static(b"{\"model\":"),
    )
    .unwrap_err();
    assert_eq!(e.status(), 400);
}

#[test]
fn path_when_no_body() {
    let i = inspect("/v1/models", "", Bytes::new()).unwrap();
    assert_eq!(i.model, "/v1/models");
}

#[test]
fn bad_json_and_bad_utf8_are_400() {
    let e = inspect(
        "/v1/chat/completions",
        "application/json",
        Bytes::from_static(b"{\"model\":"),
    )
    .unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.message.contains("JSON"));
    let e = inspect(
        "/v1/chat/completions",
        "application/json",
        Bytes::from_static(b"{\"model\":\"\xff\xfe\"}"),
    )
    .unwrap_err();
    assert!(e.message.contains("UTF-8"), "{}", e.message);
    let e = inspect(
        "/v1/chat/completions",
        "application/json",
        Bytes::from_static(b"{\"model\":5}"),
    )
    .unwrap_err();
    assert_eq!(e.status(), 400);
}

#[test]
fn usage_of_a_response() {
    let u = response_usage(
        br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
    )
    .unwrap();
    assert_eq!(u.total(), 7);
    assert!(response_usage(b"[]").is_none());
}

#[test]
fn usage_is_the_top_level_key_whatever_the_text_says() {
    let usage = |p, c| keypool_types::Usage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: p + c,
        ..keypool_types::Usage::default()
    };
    let cases: [(&[u8], Option<keypool_types::Usage>); 8] = [
        // the usual shape, keys after usage, pretty-printed
        (
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"system_fingerprint":"fp"}"#,
            Some(usage(1, 2)),
        ),
        (
            b"{\n  \"usage\" : {\"prompt_tokens\": 4, \"completion_tokens\": 5, \"total_tokens\": 9}\n}\n",
            Some(usage(4, 5)),
        ),
        // usage before the text, and text that mentions usage in every way
        (
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},"c":"\"usage\": {\"prompt_tokens\": 99}"}"#,
            Some(usage(1, 1)),
        ),
        (
            br#"{"usage":{"prompt_tokens":6,"completion_tokens":1,"total_tokens":7},"c":"x\\","d":{"usage":{"prompt_tokens":50}}}"#,
            Some(usage(6, 1)),
        ),
        // a nested usage only: not the response's
        (br#"{"data":{"usage":{"prompt_tokens":5}}}"#, None),
        (br#"{"data":[{"usage":{"prompt_tokens":5}}],"n":1}"#, None),
        // usage: null, and no usage at all
        (br#"{"id":"x","usage":null}"#, None),
        (br#"{"id":"x","text":"usage"}"#, None),
    ];
    for (body, want) in cases {
        assert_eq!(
            response_usage(body),
            want,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn a_content_type_names_json_in_any_case() {
    for ct in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/vnd.api+json",
    ] {
        assert!(says_json(ct), "{ct}");
    }
    for ct in [
        "",
        "text/plain",
        "application/jso",
        "multipart/form-data; boundary=json",
    ] {
        assert_eq!(says_json(ct), ct.contains("json"), "{ct}");
    }
    // a multipart body is not taken for JSON by its first byte, whatever the type's case
    let body = Bytes::from_static(b"{not json");
    let i = inspect("/v1/files", "MULTIPART/mixed", body).unwrap();
    assert_eq!(i.model, "/v1/files");
}
