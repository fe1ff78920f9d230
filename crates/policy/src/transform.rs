//! Request transforms (`param_map`, `param_fixed`, `prompt_template`) and the helpers that read
//! a credential out of a query string or a JSON body.

use keypool_config::Gateway;
use serde_json::{Map, Value};

/// Reads a top-level string field of a JSON body, for `body:` positions.
pub fn body_credential(body: &Map<String, Value>, field: &str) -> Option<String> {
    match body.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The decoded value of query parameter `name`.
pub fn query_arg(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The query without parameter `name` (other parameters kept exactly as sent).
pub fn remove_query_arg(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            url::form_urlencoded::parse(key.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Applies `param_map`, `param_fixed` and `prompt_template`, in that order.
pub fn transform(g: &Gateway, body: &mut Map<String, Value>) {
    for (path, old, new) in &g.param_map {
        if let Some(v) = get_mut(body, path)
            && v == old
        {
            *v = new.clone();
        }
    }
    for (path, value) in &g.param_fixed {
        set(body, path, value.clone());
    }
    if let Some(t) = &g.prompt_template {
        apply_template(body, t);
    }
}

fn get_mut<'a>(body: &'a mut Map<String, Value>, path: &[String]) -> Option<&'a mut Value> {
    let (first, rest) = path.split_first()?;
    let mut v = body.get_mut(first)?;
    for p in rest {
        v = v.as_object_mut()?.get_mut(p)?;
    }
    Some(v)
}

fn set(body: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut obj = body;
    for p in parents {
        let slot = obj
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else {
            return;
        };
        obj = next;
    }
    obj.insert(last.clone(), value);
}

/// The last user message's text (a string, or its text parts joined by newlines into the first
/// text part) becomes the template with `{{query}}` replaced; a completions `prompt` string too.
fn apply_template(body: &mut Map<String, Value>, template: &str) {
    if let Some(Value::String(p)) = body.get_mut("prompt") {
        *p = template.replace("{{query}}", p);
    }
    let Some(Value::Array(messages)) = body.get_mut("messages") else {
        return;
    };
    let Some(last_user) = messages
        .iter_mut()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return;
    };
    let Some(content) = last_user.get_mut("content") else {
        return;
    };
    match content {
        Value::String(s) => *s = template.replace("{{query}}", s),
        Value::Array(parts) => {
            let is_text = |p: &Value| p.get("type").and_then(Value::as_str) == Some("text");
            let query = parts
                .iter()
                .filter(|p| is_text(p))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n");
            let mut first = true;
            parts.retain_mut(|p| {
                if !is_text(p) {
                    return true;
                }
                if std::mem::take(&mut first) {
                    if let Some(obj) = p.as_object_mut() {
                        obj.insert(
                            "text".into(),
                            Value::String(template.replace("{{query}}", &query)),
                        );
                    }
                    true
                } else {
                    false
                }
            });
        }
        _ => {}
    }
}
