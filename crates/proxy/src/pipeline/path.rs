//! `normalise`: the request path as every rule sees it and as it is forwarded, made once,
//! before routing. Repeated slashes, `.` segments and a trailing slash go; percent-encoded
//! unreserved characters (`%73` is `s`) are decoded; `..` segments and `;` (path parameters,
//! which some upstream servers strip) are refused, so no spelling of a path can pass an
//! `allow`/`deny` rule that its plain form would not, or leave `/v1/` upstream.

use std::borrow::Cow;
use std::fmt::Write as _;

use keypool_types::{ApiError, ErrorKind};

fn refused(why: &str) -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!("The request path is not accepted: {why}."),
    )
}

/// Whether `b` is an RFC 3986 unreserved character (decoded when percent-encoded).
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One segment with its unreserved characters decoded; other escapes kept, in upper case; a
/// bare `%` escaped.
fn decode_segment(seg: &str) -> String {
    let bytes = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            let b = h * 16 + l;
            if unreserved(b) {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
            i += 3;
        } else if bytes[i] == b'%' {
            // a `%` that starts no escape is itself escaped: left bare, with a decoded digit
            // after it, it would spell a new escape (`%%373` → `%73`) that the upstream
            // decodes but no rule saw
            out.push_str("%25");
            i += 1;
        } else {
            // the path is ASCII (actix refuses anything else); push the char as it is
            let ch = seg[i..].chars().next().unwrap_or('\u{FFFD}');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// What one pass over a path found.
#[derive(Debug, PartialEq)]
enum Scan {
    /// A `;` somewhere: refused.
    Parameter,
    /// Already normal: in origin form, no `//`, no `/.`, no `%`, no trailing slash (but `/`).
    Plain,
    /// To be rebuilt from its segments.
    Rebuild,
}

/// One pass over `path`'s bytes (a request's path is short: a byte loop beats building
/// substring searchers, ~500 instructions a request).
fn scan(path: &[u8]) -> Scan {
    // a request target not in origin form (`*`, or empty) is rebuilt from its segments too
    let mut plain = path.first() == Some(&b'/') && (path.len() == 1 || path.last() != Some(&b'/'));
    let mut prev = 0u8;
    for &b in path {
        match b {
            b';' => return Scan::Parameter,
            b'%' => plain = false,
            b'/' | b'.' if prev == b'/' => plain = false,
            _ => {}
        }
        prev = b;
    }
    if plain { Scan::Plain } else { Scan::Rebuild }
}

/// The path to route and forward: borrowed when it is already normal (the common case costs
/// one scan and no allocation).
pub fn normalise(path: &str) -> Result<Cow<'_, str>, ApiError> {
    match scan(path.as_bytes()) {
        Scan::Parameter => return Err(refused("`;` path parameters are refused")),
        Scan::Plain => return Ok(Cow::Borrowed(path)),
        Scan::Rebuild => {}
    }
    let mut out = String::with_capacity(path.len());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let seg = if seg.contains('%') {
            Cow::Owned(decode_segment(seg))
        } else {
            Cow::Borrowed(seg)
        };
        match &*seg {
            "." => {}
            ".." => return Err(refused("`..` segments are refused")),
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn decoding_never_spells_a_new_escape() {
        // found by the `path` fuzz target: `%%373` came out as `%73`, which a second
        // decoding (the upstream's) reads as `s`, past a rule that saw `%73`
        let once = normalise("/v1/sandbox/%%373ecret").unwrap();
        assert_eq!(once, "/v1/sandbox/%2573ecret");
        assert_eq!(normalise(&once).unwrap(), once);
        assert_eq!(normalise("/v1/a%").unwrap(), "/v1/a%25");
        assert_eq!(normalise("/v1/a%zz").unwrap(), "/v1/a%25zz");
    }

    #[test]
    fn a_path_always_starts_with_a_slash() {
        // found by the `path` fuzz target: the empty path came back empty
        assert_eq!(normalise("").unwrap(), "/");
        assert_eq!(normalise("*").unwrap(), "/*");
        assert_eq!(normalise("v1/models").unwrap(), "/v1/models");
    }

    #[test]
    fn one_pass_finds_what_the_substring_checks_found() {
        use super::{Scan, scan};
        for (path, want) in [
            ("/v1/chat/completions", Scan::Plain),
            ("/", Scan::Plain),
            ("/v1/files/a.b", Scan::Plain),
            ("", Scan::Rebuild),
            ("*", Scan::Rebuild),
            ("v1/models", Scan::Rebuild),
            ("/v1/models/", Scan::Rebuild),
            ("//v1", Scan::Rebuild),
            ("/v1/.", Scan::Rebuild),
            ("/v1/a%73", Scan::Rebuild),
            ("/v1/a;b", Scan::Parameter),
            ("/v1/a%;", Scan::Parameter),
        ] {
            assert_eq!(scan(path.as_bytes()), want, "{path:?}");
        }
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        assert!(matches!(
            normalise("/v1/chat/completions").unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn every_spelling_of_a_path_becomes_its_plain_form() {
        for raw in [
            "/v1/sandbox//secret",
            "/v1/sandbox/./secret",
            "/v1/sandbox/secret/",
            "/v1/sandbox/%73ecret",
            "/v1/sandbox/%73%65%63%72%65%74",
            "//v1///sandbox/secret",
            "/v1/sandbox/%2e/secret",
        ] {
            assert_eq!(normalise(raw).unwrap(), "/v1/sandbox/secret", "{raw}");
        }
        // a reserved character stays encoded (upper-case hex)
        assert_eq!(normalise("/v1/files/a%2fb").unwrap(), "/v1/files/a%2Fb");
    }

    #[test]
    fn dot_dot_and_path_parameters_are_refused() {
        for raw in [
            "/v1/sandbox/../../admin/keys",
            "/v1/sandbox/%2e%2e/admin",
            "/v1/sandbox/%2E%2E",
            "/v1/sandbox/secret;x",
        ] {
            assert!(normalise(raw).is_err(), "{raw}");
        }
    }
}
