use std::collections::HashMap;

use super::*;

fn gateway(yaml: &str) -> Arc<GatewayRuntime> {
    let raw: keypool_config::RawGateway =
        serde_norway::from_str(&format!("name: g\n{yaml}")).unwrap();
    Arc::new(GatewayRuntime::new(Arc::new(
        keypool_config::validate_gateway(&raw, "g").unwrap(),
    )))
}

/// `[PHONE_1]` restores to a phone number.
fn phone_restore() -> Restore {
    Arc::new(HashMap::from([(
        "[PHONE_1]".to_owned(),
        "13812345678".to_owned(),
    )]))
}

fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": text}}]})
    )
}

const FINISH: &str =
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";

/// The text the client reads from guarded OpenAI events.
fn text_of(out: &[u8]) -> String {
    let mut t = String::new();
    for line in std::str::from_utf8(out).unwrap().lines() {
        if let Some(d) = line.strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<Value>(d)
            && let Some(s) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        {
            t.push_str(s);
        }
    }
    t
}

fn run(guard: &mut StreamGuard, chunks: &[String]) -> (String, Option<ApiError>) {
    let mut all = Vec::new();
    for c in chunks {
        match guard.events(c.as_bytes()) {
            Guarded::Pass(b) => all.extend_from_slice(&b),
            Guarded::Blocked(b, e) => {
                all.extend_from_slice(&b);
                return (String::from_utf8(all).unwrap(), Some(e));
            }
        }
    }
    (String::from_utf8(all).unwrap(), None)
}

#[test]
fn a_placeholder_split_over_two_events_is_restored() {
    let gw = gateway("data_masking: {restore: true}");
    let restore = phone_restore();
    let mut g = StreamGuard::new(gw, Some(restore), Surface::OpenAi).unwrap();
    let (out, blocked) = run(
        &mut g,
        &[
            chunk("Call [PHO"),
            chunk("NE_1] now, or [PHONE"),
            chunk("_1]"),
            FINISH.to_owned(),
        ],
    );
    assert!(blocked.is_none());
    assert_eq!(
        text_of(out.as_bytes()),
        "Call 13812345678 now, or 13812345678"
    );
    assert!(out.ends_with(FINISH), "{out}");
}

#[test]
fn a_keyword_split_over_events_is_masked_and_a_blocked_one_ends_the_stream() {
    let mask = gateway("content_safety: {keywords: [forbidden]}");
    let mut g = StreamGuard::new(mask, None, Surface::OpenAi).unwrap();
    let (out, _) = run(
        &mut g,
        &[
            chunk("this is FORB"),
            chunk("idden text"),
            FINISH.to_owned(),
        ],
    );
    assert_eq!(text_of(out.as_bytes()), "this is ********* text");
    let block = gateway("content_safety: {keywords: [forbidden], on_response: block}");
    let mut g = StreamGuard::new(block, None, Surface::OpenAi).unwrap();
    let (out, blocked) = run(
        &mut g,
        &[
            chunk("clean words, then ＦＯＲ"),
            chunk("ＢＩＤＤＥＮ and more"),
            FINISH.to_owned(),
        ],
    );
    assert_eq!(
        blocked.unwrap().kind.wire().code,
        "content_policy_violation"
    );
    assert_eq!(text_of(out.as_bytes()), "clean words, then ");
    assert!(
        !out.contains("more") && !out.contains("finish_reason"),
        "{out}"
    );
}

#[test]
fn anthropic_text_deltas_are_guarded_too() {
    let gw = gateway("content_safety: {keywords: [secret]}");
    let mut g = StreamGuard::new(gw, None, Surface::Anthropic).unwrap();
    let delta = |t: &str| {
        format!(
            "event: content_block_delta\ndata: {}\n\n",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})
        )
    };
    let stop = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
    let (out, _) = run(&mut g, &[delta("a sec"), delta("ret"), stop.to_owned()]);
    assert!(out.contains("\"text\":\"a \""), "{out}");
    assert!(out.contains("\"text\":\"******\""), "{out}");
    assert!(out.ends_with(stop));
    // the first event held all of its text back: it went out empty, its text with the next
    assert_eq!(out.matches("event: content_block_delta\n").count(), 3);
    assert!(out.contains("\"text\":\"\""), "{out}");
}

#[test]
fn gateways_without_guardrails_are_not_watched() {
    assert!(StreamGuard::new(gateway(""), None, Surface::OpenAi).is_none());
}

#[test]
fn a_responses_stream_is_guarded_in_its_deltas_and_in_the_whole_answer_it_repeats() {
    let gw = gateway("data_masking: {restore: true}\ncontent_safety: {keywords: [secret]}");
    let restore: Restore = Arc::new(HashMap::from([(
        "[EMAIL_1]".to_owned(),
        "a@b.io".to_owned(),
    )]));
    let mut g = StreamGuard::new(gw, Some(restore), Surface::Responses).unwrap();
    let delta = |t: &str| {
        format!(
            "event: response.output_text.delta\ndata: {}\n\n",
            serde_json::json!({"type": "response.output_text.delta", "delta": t})
        )
    };
    let done = format!(
        "event: response.completed\ndata: {}\n\n",
        serde_json::json!({"type": "response.completed", "response": {"output": [{"content": [
            {"type": "output_text", "text": "mail [EMAIL_1], a secret"}]}]}})
    );
    let (out, blocked) = run(
        &mut g,
        &[delta("mail [EMA"), delta("IL_1], a secret"), done],
    );
    assert!(blocked.is_none());
    assert!(!out.contains("[EMAIL") && !out.contains("secret"), "{out}");
    assert!(out.contains("\"text\":\"mail a@b.io, a ******\""), "{out}");
    assert_eq!(out.matches("a@b.io").count(), 2, "{out}");
}

fn choice_chunk(index: u64, text: &str) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"id": "c1", "choices": [{"index": index, "delta": {"content": text}}]})
    )
}

fn finish(index: u64) -> String {
    format!(
        "data: {{\"choices\":[{{\"index\":{index},\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    )
}

/// The text each choice's events carry, by choice index.
fn texts_by_choice(out: &str) -> [String; 2] {
    let mut t = [String::new(), String::new()];
    for line in out.lines() {
        if let Some(d) = line.strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<Value>(d)
            && let Some(s) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        {
            let i = v
                .pointer("/choices/0/index")
                .and_then(Value::as_u64)
                .unwrap();
            t[usize::try_from(i).unwrap()].push_str(s);
        }
    }
    t
}

/// With `n: 2` the choices' chunks interleave: each is restored and checked as its own text,
/// and what one holds back goes out in an event of its own choice.
#[test]
fn interleaved_choices_are_guarded_apart() {
    let gw = gateway("data_masking: {restore: true}\ncontent_safety: {keywords: [forbidden]}");
    let restore = phone_restore();
    let mut g = StreamGuard::new(gw, Some(restore), Surface::OpenAi).unwrap();
    let (out, blocked) = run(
        &mut g,
        &[
            choice_chunk(0, "call [PHO"),
            choice_chunk(1, "a FORB"),
            choice_chunk(0, "NE_1] now"),
            choice_chunk(1, "idden word"),
            finish(0),
            choice_chunk(1, " and [PHONE_1"),
            finish(1),
        ],
    );
    assert!(blocked.is_none());
    let [zero, one] = texts_by_choice(&out);
    assert_eq!(zero, "call 13812345678 now");
    assert_eq!(one, "a ********* word and [PHONE_1");
    assert!(out.ends_with(&finish(1)), "{out}");
    // a keyword split over one choice's chunks, with the other's between, is still found
    let block = gateway("content_safety: {keywords: [forbidden], on_response: block}");
    let mut g = StreamGuard::new(block, None, Surface::OpenAi).unwrap();
    let (out, blocked) = run(
        &mut g,
        &[
            choice_chunk(0, "fine FOR"),
            choice_chunk(1, "bidden? no"),
            choice_chunk(0, "BIDDEN tail"),
            finish(0),
        ],
    );
    assert!(blocked.is_some(), "{out}");
    let [zero, one] = texts_by_choice(&out);
    assert_eq!(zero, "fine ");
    assert!(!one.contains("orbidden") && !out.contains("tail"), "{out}");
}
