//! YAML text → [`RawConfig`]: `${VAR}` expansion, then every parse mistake of the file (unknown
//! field, wrong type) reported at once with its path, as validation reports semantic ones.
//!
//! serde stops at the first mistake. When the whole file does not parse, each top-level field
//! (and each `upstreams:`/`gateways:` entry, field by field) is parsed on its own, so one run
//! names them all.

use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};

use crate::raw::{RawConfig, RawUpstream};
use crate::{ConfigError, FieldError, RawGateway};

/// Parses `text` (empty text is the all-defaults config).
pub(crate) fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    let mut value: Value =
        serde_norway::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    if value.is_null() {
        return Ok(RawConfig::default());
    }
    let mut errs = Vec::new();
    expand_env(&mut value, &mut String::new(), &mut errs);
    let Value::Mapping(top) = &value else {
        return Err(ConfigError::Parse(
            "the config must be a mapping of fields (`address: ...`, `upstreams: ...`)".to_owned(),
        ));
    };
    if errs.is_empty() {
        match serde_path_to_error::deserialize::<_, RawConfig>(value.clone()) {
            Ok(raw) => return Ok(raw),
            Err(whole) => {
                for (k, v) in top {
                    field_errors(k, v, &mut errs);
                }
                if errs.is_empty() {
                    errs.push(error_at("", &whole));
                }
            }
        }
    }
    Err(ConfigError::Invalid(errs))
}

/// The mistakes of one top-level field.
fn field_errors(key: &Value, value: &Value, errs: &mut Vec<FieldError>) {
    match (key.as_str(), value) {
        (Some(name @ ("upstreams" | "gateways")), Value::Sequence(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{name}[{i}]");
                if name == "upstreams" {
                    entry_errors::<RawUpstream>(item, &path, errs);
                } else {
                    entry_errors::<RawGateway>(item, &path, errs);
                }
            }
        }
        _ => {
            if let Err(e) = alone::<RawConfig>(key, value) {
                errs.push(error_at("", &e));
            }
        }
    }
}

/// The mistakes of one list entry: each of its fields on its own, so two wrong fields are both
/// named (a missing required field is reported only when nothing else is wrong).
fn entry_errors<T: DeserializeOwned>(item: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let Err(whole) = serde_path_to_error::deserialize::<_, T>(item.clone()) else {
        return;
    };
    let before = errs.len();
    if let Value::Mapping(fields) = item {
        for (k, v) in fields {
            match alone::<T>(k, v) {
                Err(e) if !e.inner().to_string().starts_with("missing field") => {
                    errs.push(error_at(path, &e));
                }
                _ => {}
            }
        }
    }
    if errs.len() == before {
        errs.push(error_at(path, &whole));
    }
}

/// Parses a mapping holding only `key: value` as `T`.
fn alone<T: DeserializeOwned>(
    key: &Value,
    value: &Value,
) -> Result<T, serde_path_to_error::Error<serde_norway::Error>> {
    let mut one = Mapping::new();
    one.insert(key.clone(), value.clone());
    serde_path_to_error::deserialize::<_, T>(Value::Mapping(one))
}

fn error_at(prefix: &str, e: &serde_path_to_error::Error<serde_norway::Error>) -> FieldError {
    let inner = e.path().to_string();
    let path = match (prefix.is_empty(), inner.as_str()) {
        (true, ".") => "(top level)".to_owned(),
        (true, _) => inner,
        (false, ".") => prefix.to_owned(),
        (false, _) => format!("{prefix}.{inner}"),
    };
    FieldError {
        path,
        reason: e.inner().to_string(),
    }
}

/// Expands `${VAR}` and `${VAR:-default}` in every string value (not in keys); `$${` is a
/// literal `${`. An unset variable without a default is a mistake at that value's path.
fn expand_env(value: &mut Value, path: &mut String, errs: &mut Vec<FieldError>) {
    match value {
        Value::String(s) if s.contains("${") => match expand(s, |name| std::env::var(name).ok()) {
            Ok(expanded) => *s = expanded,
            Err(reason) => errs.push(FieldError {
                path: path.clone(),
                reason,
            }),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                expand_env(item, path, errs);
                path.truncate(len);
            }
        }
        Value::Mapping(fields) => {
            for (k, v) in fields.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.as_str().unwrap_or("?"));
                expand_env(v, path, errs);
                path.truncate(len);
            }
        }
        Value::Tagged(t) => expand_env(&mut t.value, path, errs),
        _ => {}
    }
}

/// `${VAR}`, `${VAR:-default}` and `$${` in `text`, looking variables up with `lookup`.
pub(crate) fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err("unterminated `${` (write `$${` for a literal one)".to_owned());
            };
            let (name, default) = match after[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&after[..end], None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{name}}}` is not an environment variable name"));
            }
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write `${{{name}:-default}}` for a default)"
                    ));
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand;

    fn env(name: &str) -> Option<String> {
        match name {
            "DB_PASSWORD" => Some("s3cret".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        assert_eq!(
            expand("postgres://k:${DB_PASSWORD}@db/k", env).unwrap(),
            "postgres://k:s3cret@db/k"
        );
        assert_eq!(
            expand("${HOST:-localhost}:5432", env).unwrap(),
            "localhost:5432"
        );
        assert_eq!(expand("${EMPTY:-fallback}", env).unwrap(), "fallback");
        assert_eq!(
            expand("cost $5 and $${literal}", env).unwrap(),
            "cost $5 and ${literal}"
        );
    }

    #[test]
    fn an_unset_variable_or_a_bad_reference_is_an_error() {
        assert!(
            expand("${NOPE}", env)
                .unwrap_err()
                .contains("NOPE is not set")
        );
        assert!(expand("${OPEN", env).unwrap_err().contains("unterminated"));
        assert!(expand("${a-b}", env).is_err());
    }
}
