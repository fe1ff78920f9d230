//! Request inspection: what the body says about model, streaming and size, read once.
//!
//! JSON bodies are peeked with a borrowed partial parse (unknown fields skipped, nothing copied);
//! multipart bodies are scanned for their `model` field; other bodies fall back to the URL path.
//! Only a stream that did not ask for usage is rewritten, to add `stream_options.include_usage`.

use bytes::Bytes;
use keypool_types::{ApiError, ErrorKind};
use serde::Deserialize;

/// What the forwarding engine needs to know about a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// JSON `model`, the multipart `model` field, or the URL path.
    pub model: String,
    pub stream: bool,
    /// Tokens to reserve against tpm: a size-based prompt estimate plus `max_tokens`.
    pub est_tokens: u64,
    /// The prompt's part of it (a quarter of the body's bytes).
    pub est_prompt: u64,
    /// The answer length the request asks for at most (`max_tokens` and its kin), if any.
    pub max_output: Option<u64>,
    /// The body to send upstream (rewritten when usage had to be requested).
    pub body: Bytes,
    /// The client did not ask for the stream's usage chunk; keypool did, and strips it.
    pub strip_usage_chunk: bool,
    /// The Responses API's `previous_response_id`: the key that created it must serve this.
    pub previous_response: Option<String>,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// The Responses API's.
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default)]
    previous_response_id: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Completion length assumed for tpm when the request names no `max_tokens`.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, message)
}

/// Inspects a request body. `content_type` is the request's header (may be empty).
pub fn inspect(path: &str, content_type: &str, body: Bytes) -> Result<Inspected, ApiError> {
    // JSON by its content type, or by its first byte unless it says multipart (`curl -d` sends
    // JSON labelled as a form).
    let looks_json = says_json(content_type)
        || (!starts_with_ignore_case(content_type, "multipart/")
            && matches!(body.first(), Some(b'{' | b'[')));
    if looks_json && !body.is_empty() {
        return inspect_json(path, body);
    }
    let model = if starts_with_ignore_case(content_type, "multipart/form-data") {
        let ct = content_type.to_ascii_lowercase();
        let boundary = multipart_boundary(&ct, content_type)
            .ok_or_else(|| bad("malformed multipart body: no boundary"))?;
        multipart_field(boundary, &body, "model").unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Inspected {
        model: if model.is_empty() {
            path.to_owned()
        } else {
            model
        },
        stream: false,
        est_tokens: body.len() as u64 / 4,
        est_prompt: body.len() as u64 / 4,
        max_output: None,
        body,
        strip_usage_chunk: false,
        previous_response: None,
    })
}

/// Whether a content type names JSON (`application/json`, `application/vnd.api+json`, in any
/// case): a byte loop, with no lower-cased copy and no substring searcher built (a content type
/// is a few dozen bytes, and this runs for every request and every answer).
pub(crate) fn says_json(content_type: &str) -> bool {
    content_type
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"json"))
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.as_bytes()
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
}

fn inspect_json(path: &str, body: Bytes) -> Result<Inspected, ApiError> {
    let peek: Peek<'_> = serde_json::from_slice(&body).map_err(|e| {
        if std::str::from_utf8(&body).is_err() {
            bad("The request body is not valid UTF-8.")
        } else {
            bad(format!(
                "We could not parse the JSON body of your request: {e}"
            ))
        }
    })?;
    let model = peek
        .model
        .as_deref()
        .filter(|m| !m.is_empty())
        .unwrap_or(path)
        .to_owned();
    let stream = peek.stream.unwrap_or(false);
    let max_output = peek
        .max_completion_tokens
        .or(peek.max_tokens)
        .or(peek.max_output_tokens);
    let est_prompt = body.len() as u64 / 4;
    let est_tokens = est_prompt + max_output.unwrap_or(DEFAULT_COMPLETION_ESTIMATE);
    let asked = peek
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let previous_response = peek
        .previous_response_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    drop(peek);
    let wants_usage_rewrite =
        stream && !asked && (path.ends_with("/chat/completions") || path.ends_with("/completions"));
    let body = if wants_usage_rewrite {
        request_usage(&body)?
    } else {
        body
    };
    Ok(Inspected {
        model,
        stream,
        est_tokens,
        est_prompt,
        max_output,
        body,
        strip_usage_chunk: wants_usage_rewrite,
        previous_response,
    })
}

/// Sets `stream_options.include_usage: true`, keeping every other field as sent. A body
/// without `stream_options` (the usual case) gets the field spliced in before its closing
/// brace: every byte it had stays as it was, in its order, and nothing is parsed again.
fn request_usage(body: &[u8]) -> Result<Bytes, ApiError> {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let text = body.trim_ascii();
    if let (Some(b'{'), Some(b'}')) = (text.first(), text.last())
        && !crate::sse::contains(body, b"\"stream_options\"")
    {
        // the object has a field at least (`stream`): the new one follows a comma
        let close = body.trim_ascii_end().len() - 1;
        let mut out = Vec::with_capacity(body.len() + FIELD.len() + 1);
        out.extend_from_slice(&body[..close]);
        out.push(b',');
        out.extend_from_slice(FIELD);
        out.extend_from_slice(&body[close..]);
        return Ok(Bytes::from(out));
    }
    request_usage_merged(body)
}

/// [`request_usage`] for a body that has `stream_options` (or names it anywhere): parsed,
/// merged and encoded again.
fn request_usage_merged(body: &[u8]) -> Result<Bytes, ApiError> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|_| bad("The request body must be a JSON object."))?;
    let opts = v
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    if !opts.is_object() {
        *opts = serde_json::Value::Object(serde_json::Map::new());
    }
    if let Some(o) = opts.as_object_mut() {
        o.insert("include_usage".into(), serde_json::Value::Bool(true));
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| bad("The request body could not be re-encoded."))
}

/// The boundary of a `multipart/form-data` content type (`ct_lower` is `ct` lower-cased).
fn multipart_boundary<'a>(ct_lower: &str, ct: &'a str) -> Option<&'a str> {
    let at = ct_lower.find("boundary=")? + "boundary=".len();
    let boundary = ct[at..].split(';').next()?.trim().trim_matches('"');
    (!boundary.is_empty()).then_some(boundary)
}

/// The value of the multipart field `name`, if present.
fn multipart_field(boundary: &str, body: &[u8], name: &str) -> Option<String> {
    let delimiter = format!("--{boundary}");
    let needle = format!("name=\"{name}\"");
    let text = String::from_utf8_lossy(body);
    text.split(delimiter.as_str()).find_map(|part| {
        let (head, value) = part.split_once("\r\n\r\n")?;
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?;
        disposition
            .contains(&needle)
            .then(|| value.trim_end_matches("\r\n").trim().to_owned())
    })
}

/// `usage` of a non-stream JSON response, if any.
/// The top-level `id` of a JSON response (a Responses API response's, to pin it to its key).
pub fn response_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct I<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<I<'_>>(body)
        .ok()
        .and_then(|m| m.id.map(std::borrow::Cow::into_owned))
}

/// The response id a Responses API request refers to: `/v1/responses/{id}[/...]`, or the
/// body's `previous_response_id`.
pub fn referenced_response<'a>(path: &'a str, inspected: &'a Inspected) -> Option<&'a str> {
    if let Some(rest) = path.strip_prefix("/v1/responses/") {
        let id = rest.split('/').next().unwrap_or(rest);
        return (!id.is_empty()).then_some(id);
    }
    inspected.previous_response.as_deref()
}

/// The `model` a JSON response names (for traces).
pub fn response_model(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct M<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<M<'_>>(body)
        .ok()
        .and_then(|m| m.model.map(std::borrow::Cow::into_owned))
}

/// The `model` of the first `data:` event of a stream chunk (for traces).
pub fn stream_model(chunk: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(chunk).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .find(|d| d.starts_with('{'))
        .and_then(|d| response_model(d.as_bytes()))
}

/// The top-level `usage` of a JSON response body.
///
/// OpenAI puts `usage` at the end of the object, so the last `"usage":` key is tried first,
/// parsed on its own and accepted only when what follows it closes the outermost object
/// (`, "key": value ... }`): then it was a top-level key, not a word in the text or a nested
/// field. Otherwise the whole body is parsed. On a short chat completion that is 4x fewer
/// instructions; on long answers, far more.
pub fn response_usage(body: &[u8]) -> Option<keypool_types::Usage> {
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<keypool_types::Usage>,
    }
    if body.first() != Some(&b'{') {
        return None;
    }
    if let Found::TopLevel(usage) = usage_near_the_end(body) {
        return usage;
    }
    serde_json::from_slice::<WithUsage>(body).ok()?.usage
}

/// What the look at the end of a body found.
enum Found {
    /// The last `"usage"` key is provably the top-level one, with this value.
    TopLevel(Option<keypool_types::Usage>),
    /// Not provably: parse everything.
    Unsure,
}

fn usage_near_the_end(body: &[u8]) -> Found {
    tail_usage(body).map_or(Found::Unsure, Found::TopLevel)
}

/// `Some(usage)` when the last `"usage"` key of `body` is provably top-level.
#[allow(clippy::option_option)]
fn tail_usage(body: &[u8]) -> Option<Option<keypool_types::Usage>> {
    const KEY: &[u8] = b"\"usage\"";
    static LAST: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(KEY));
    let at = LAST.rfind(body)?;
    // an escaped quote (an odd run of backslashes before it) is inside a string
    let backslashes = body[..at].iter().rev().take_while(|&&b| b == b'\\').count();
    if backslashes % 2 == 1 {
        return None;
    }
    let rest = skip_ws(&body[at + KEY.len()..]);
    let value = skip_ws(rest.strip_prefix(b":")?);
    let (usage, len) = if let Some(after) = value.strip_prefix(b"null") {
        (None, value.len() - after.len())
    } else {
        let mut objects =
            serde_json::Deserializer::from_slice(value).into_iter::<keypool_types::Usage>();
        let usage = objects.next()?.ok()?;
        (Some(usage), objects.byte_offset())
    };
    let tail = skip_ws(&value[len..]);
    let closes_outermost = match tail.first()? {
        b'}' => skip_ws(&tail[1..]).is_empty(),
        // more top-level keys: `, "k": v, ... }` must parse as the rest of one object
        b',' => {
            let mut object = Vec::with_capacity(tail.len());
            object.push(b'{');
            object.extend_from_slice(&tail[1..]);
            serde_json::from_slice::<serde::de::IgnoredAny>(&object).is_ok()
        }
        _ => false,
    };
    closes_outermost.then_some(usage)
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &b[n..]
}

#[cfg(test)]
#[path = "inspect_tests.rs"]
mod tests;
