//! A credential that must never be printed.

/// An upstream key, client token or admin token. `Debug` and `Display` print it masked, so a
/// secret that ends up in a log line or an error by mistake still does not leak.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value, for the one place that needs it (the upstream `Authorization` header or a
    /// constant-time comparison).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `sk-…abcd`, as admin listings and logs show keys: see [`mask`].
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Enough of a secret to tell keys apart, never enough to use one: under 12 characters only
/// `…`; under 20, `…` and the last 4 (at most 4 characters shown); longer, a prefix of up to 3
/// characters ending in a dash or underscore (`sk-`, `r8_`) and the last 4.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 12 {
        return "…".to_owned();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    if chars.len() < 20 {
        return format!("…{tail}");
    }
    let prefix: String = match chars.iter().take(3).position(|c| *c == '-' || *c == '_') {
        Some(i) => chars[..=i].iter().collect(),
        None => String::new(),
    };
    format!("{prefix}…{tail}")
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Compares two byte strings in time that depends only on their lengths, so a client cannot learn
/// a token byte by byte from response times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// `Bearer abc` → `abc`: the scheme matched without regard to case (RFC 9110: `bearer` is
/// `Bearer`), surrounding spaces trimmed; a value without the scheme is returned trimmed.
pub fn strip_bearer(value: &[u8]) -> &[u8] {
    let v = value.trim_ascii();
    if v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        v[7..].trim_ascii()
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(Secret::new("sk-abcdefghijklmnop1234").masked(), "sk-…1234");
        assert_eq!(Secret::new("short").masked(), "…");
        // a short secret shows at most 4 characters
        assert_eq!(Secret::new("sk-abcdefgh12").masked(), "…gh12");
        assert_eq!(Secret::new("sk-test-a-0123456789").masked(), "sk-…6789");
        assert_eq!(
            format!("{:?}", Secret::new("r8_abcdefghijklmnopqrstuvwxyz")),
            "Secret(r8_…wxyz)"
        );
    }

    #[test]
    fn compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t", "bearer t", "BEARER  t ", " t "] {
            assert_eq!(strip_bearer(v.as_bytes()), b"t", "{v:?}");
        }
        assert_eq!(strip_bearer(b"Basic t"), b"Basic t");
    }
}
