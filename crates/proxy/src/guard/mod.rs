//! Guardrails (`data_masking:`, `content_safety:` on a gateway): a phase after the body is
//! inspected and transformed, and one over the answer (whole, or in the relay for streams).
//!
//! - On the request, the texts a model reads (strings under `content`, `text`, `prompt`,
//!   `input`, `system`, `instructions`, and in arrays beneath them; never `model`, `role`, tool
//!   arguments or image URLs) are masked, then checked for prohibited content: `block` answers
//!   400 `content_policy_violation` naming the rule (never the text), `mask` stars the match.
//! - On the answer, placeholders are put back (`restore: true`: the provider never saw the
//!   values, the client sees them) and the answer's texts are checked: `mask` in place, `block`
//!   turns a whole answer into the error and ends a stream with an error event, nothing after
//!   it ([`stream`]).
//! - Every hit is counted (`keypool_guardrail_hits_total{gateway, rule, on}`), logged and kept
//!   in the request's usage event (`guardrails`: `request:phone,response:keywords`) by rule
//!   name, never the matched text; with `alert: true` it alerts.
//! - A request whose values were masked skips the response cache: its answer holds values (once
//!   restored) that another caller's identical masked request must not get.

mod detect;
pub(crate) mod moderation;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use keypool_policy::gateway::GatewayRuntime;
use keypool_types::{ApiError, ErrorKind};
use serde_json::Value;

pub use detect::{Masker, Violation, mask_violations, restore, violations};

/// Placeholder → original value: what a request's answer restores.
pub type Restore = Arc<HashMap<String, String>>;

/// The keys whose strings (and arrays of them) a model reads.
const TEXT_KEYS: [&str; 7] = [
    "content",
    "text",
    "prompt",
    "input",
    "system",
    "instructions",
    "delta",
];

/// Calls `f` on every string a model reads in `v`; `in_text`: `v` is under such a key.
fn walk(
    v: &mut Value,
    in_text: bool,
    f: &mut dyn FnMut(&mut String) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    match v {
        Value::String(s) if in_text && !s.starts_with("data:") => f(s),
        Value::Array(items) => items.iter_mut().try_for_each(|i| walk(i, in_text, f)),
        Value::Object(m) => m
            .iter_mut()
            .try_for_each(|(k, child)| walk(child, TEXT_KEYS.contains(&k.as_str()), f)),
        _ => Ok(()),
    }
}

fn blocked(rule: &str) -> ApiError {
    ApiError::new(
        ErrorKind::ContentPolicyViolation,
        format!("This content was blocked by the gateway's content safety rule `{rule}`."),
    )
}

/// Checks one text for prohibited content: the rules that matched go in `matched`; with
/// `block` a match is the error, otherwise it is starred in place (`true`: `s` changed).
fn check(
    spec: &keypool_config::guard::ContentSafety,
    s: &mut String,
    block: bool,
    matched: &mut Vec<String>,
) -> Result<bool, ApiError> {
    let found = violations(spec, s);
    let Some(first) = found.first() else {
        return Ok(false);
    };
    for f in &found {
        if !matched.contains(&f.rule) {
            matched.push(f.rule.clone());
        }
    }
    if block {
        return Err(blocked(&first.rule));
    }
    *s = mask_violations(s, &found);
    Ok(true)
}

/// Counts (and logs, and with `alert` alerts) the rules that matched, and notes them for the
/// usage event as `on:rule`.
fn hits(gw: &GatewayRuntime, rules: &[String], alert: bool, on: &str, noted: &mut Vec<String>) {
    for rule in rules {
        crate::observe::guardrail_hit(gw, rule, on, alert);
        noted.push(format!("{on}:{rule}"));
    }
}

/// The request phase: the body as it goes upstream (`None`: unchanged) and what its answer
/// restores, or the refusal of a blocked request. The rules that matched go in `noted`.
pub fn request(
    gw: &GatewayRuntime,
    body: &Bytes,
    noted: &mut Vec<String>,
) -> Result<(Option<Bytes>, Option<Restore>), ApiError> {
    let (masking, safety) = (
        gw.spec.data_masking.as_ref(),
        gw.spec.content_safety.as_ref(),
    );
    if masking.is_none() && safety.is_none() {
        return Ok((None, None));
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return Ok((None, None));
    };
    let mut masker = Masker::default();
    let mut matched: Vec<String> = Vec::new();
    let mut changed = false;
    let outcome = walk(&mut v, false, &mut |s: &mut String| {
        if let Some(spec) = masking
            && let Some(m) = masker.mask(spec, s)
        {
            *s = m;
            changed = true;
        }
        if let Some(spec) = safety {
            changed |= check(spec, s, spec.block_request, &mut matched)?;
        }
        Ok(())
    });
    let alert = masking.is_some_and(|m| m.alert);
    hits(gw, &masker.hits, alert, "request", noted);
    hits(
        gw,
        &matched,
        safety.is_some_and(|s| s.alert),
        "request",
        noted,
    );
    outcome?;
    let restore = masking
        .filter(|m| m.restore)
        .map(|_| masker.restorer())
        .filter(|r| !r.is_empty())
        .map(Arc::new);
    let body = if changed {
        serde_json::to_vec(&v).ok().map(Bytes::from)
    } else {
        None
    };
    Ok((body, restore))
}

/// Whether answers on `gw` go through [`answer`] (or a stream through [`stream::StreamGuard`]).
pub fn watches_answers(gw: &GatewayRuntime, restore: Option<&Restore>) -> bool {
    restore.is_some() || gw.spec.content_safety.is_some()
}

/// A whole answer: its placeholders restored and its texts checked. `Ok(None)`: unchanged;
/// `Err`: blocked, naming the rule. The rules that matched go in `noted`.
pub fn answer(
    gw: &GatewayRuntime,
    restore_map: Option<&Restore>,
    body: &[u8],
    noted: &mut Vec<String>,
) -> Result<Option<Bytes>, ApiError> {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let safety = gw.spec.content_safety.as_ref();
    let mut matched: Vec<String> = Vec::new();
    let mut changed = false;
    // placeholders may sit anywhere (tool arguments too); prohibited content in the texts
    if let Some(r) = restore_map {
        restore_all(&mut v, r, &mut changed);
    }
    let outcome = walk(&mut v, false, &mut |s: &mut String| {
        if let Some(spec) = safety {
            changed |= check(spec, s, spec.block_response, &mut matched)?;
        }
        Ok(())
    });
    hits(
        gw,
        &matched,
        safety.is_some_and(|s| s.alert),
        "response",
        noted,
    );
    outcome?;
    Ok(changed
        .then(|| serde_json::to_vec(&v).ok().map(Bytes::from))
        .flatten())
}

fn restore_all(v: &mut Value, r: &HashMap<String, String>, changed: &mut bool) {
    match v {
        Value::String(s) => {
            if let Some(back) = restore(s, r) {
                *s = back;
                *changed = true;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| restore_all(i, r, changed)),
        Value::Object(m) => m.values_mut().for_each(|i| restore_all(i, r, changed)),
        _ => {}
    }
}
