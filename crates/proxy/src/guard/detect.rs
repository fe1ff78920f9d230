//! Finding what the guardrails act on in a text: personal data ([`Masker`]: the built-in
//! detectors and custom rules, each match replaced by a typed placeholder the same value keeps
//! within a request) and prohibited content ([`violations`]: keywords on the folded text, and
//! regex rules).

use std::collections::HashMap;
use std::sync::LazyLock;

use keypool_config::guard::{ContentSafety, DataMasking, Detector, fold, needs_fold};
use regex::Regex;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("built-in pattern {pattern}: {e}"))
}

static ID_CARD: LazyLock<Regex> = LazyLock::new(|| re("[0-9]{17}[0-9Xx]"));
static BANK_CARD: LazyLock<Regex> =
    LazyLock::new(|| re("[0-9]{4}(?:[ -][0-9]{4}){3}(?:[ -]?[0-9]{1,3})?|[0-9]{16,19}"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| re(r"(?:\+86[- ]?)?1[3-9][0-9]{9}"));
static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"));
static IPV4: LazyLock<Regex> = LazyLock::new(|| re(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"));
static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
    re(r"sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|gh[pousr]_[A-Za-z0-9]{36}")
});

fn before(text: &str, at: usize) -> Option<u8> {
    at.checked_sub(1).map(|i| text.as_bytes()[i])
}

fn after(text: &str, at: usize) -> Option<u8> {
    text.as_bytes().get(at).copied()
}

/// A match of `d` at `text[s..e]` that is really one: not part of a longer run of digits (or
/// word), and its checksum right.
fn valid(d: Detector, text: &str, s: usize, e: usize) -> bool {
    let digit = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit());
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    let m = &text[s..e];
    match d {
        Detector::IdCard => !alnum(before(text, s)) && !alnum(after(text, e)) && id_checksum(m),
        Detector::BankCard => {
            let digits: Vec<u8> = m.bytes().filter(u8::is_ascii_digit).collect();
            !digit(before(text, s))
                && !digit(after(text, e))
                && (16..=19).contains(&digits.len())
                && luhn(&digits)
        }
        Detector::Phone => !digit(before(text, s)) && !digit(after(text, e)),
        Detector::Email => true,
        Detector::Ipv4 => {
            let dot_or_digit = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit() || b == b'.');
            !dot_or_digit(before(text, s))
                && !dot_or_digit(after(text, e))
                && m.split('.')
                    .all(|o| o.parse::<u16>().is_ok_and(|n| n <= 255))
        }
        Detector::ApiKey => !alnum(before(text, s)),
    }
}

/// GB 11643: the 18th character is the checksum of the first 17 digits.
fn id_checksum(id: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = id.as_bytes();
    let sum: u32 = WEIGHTS
        .iter()
        .zip(b)
        .map(|(w, d)| w * u32::from(d - b'0'))
        .sum();
    b[17].to_ascii_uppercase() == CHECK[(sum % 11) as usize]
}

/// The Luhn check of a card number's digits (ASCII).
fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn pattern(d: Detector) -> &'static Regex {
    match d {
        Detector::Phone => &PHONE,
        Detector::IdCard => &ID_CARD,
        Detector::BankCard => &BANK_CARD,
        Detector::Email => &EMAIL,
        Detector::Ipv4 => &IPV4,
        Detector::ApiKey => &API_KEY,
    }
}

/// Masks one request's texts: the same value gets the same placeholder in every text of it.
#[derive(Default)]
pub struct Masker {
    /// Original value → placeholder.
    by_value: HashMap<String, String>,
    /// Placeholders given per type.
    counts: HashMap<String, u32>,
    /// Rule names that matched (once each).
    pub hits: Vec<String>,
}

impl Masker {
    /// `text` with every match of `spec`'s rules replaced; `None` when nothing matched.
    pub fn mask(&mut self, spec: &DataMasking, text: &str) -> Option<String> {
        let mut current: Option<String> = None;
        for d in &spec.detectors {
            let kind = d.as_str().to_ascii_uppercase();
            let t = current.as_deref().unwrap_or(text);
            let found: Vec<(usize, usize)> = pattern(*d)
                .find_iter(t)
                .map(|m| (m.start(), m.end()))
                .filter(|&(s, e)| valid(*d, t, s, e))
                .collect();
            if let Some(next) = self.replace(spec, t, &found, &kind, d.as_str()) {
                current = Some(next);
            }
        }
        for (name, kind, re) in &spec.custom {
            let t = current.as_deref().unwrap_or(text);
            let found: Vec<(usize, usize)> = re
                .find_iter(t)
                .filter(|m| !m.is_empty())
                .map(|m| (m.start(), m.end()))
                .collect();
            if let Some(next) = self.replace(spec, t, &found, kind, name) {
                current = Some(next);
            }
        }
        current
    }

    fn replace(
        &mut self,
        spec: &DataMasking,
        text: &str,
        found: &[(usize, usize)],
        kind: &str,
        rule: &str,
    ) -> Option<String> {
        if found.is_empty() {
            return None;
        }
        if !self.hits.iter().any(|h| h == rule) {
            self.hits.push(rule.to_owned());
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for &(s, e) in found {
            out.push_str(&text[at..s]);
            if spec.redact {
                out.push('[');
                out.push_str(kind);
                out.push(']');
            } else {
                let value = &text[s..e];
                let placeholder = if let Some(p) = self.by_value.get(value) {
                    p.clone()
                } else {
                    let n = self.counts.entry(kind.to_owned()).or_default();
                    *n += 1;
                    let p = format!("[{kind}_{n}]");
                    self.by_value.insert(value.to_owned(), p.clone());
                    p
                };
                out.push_str(&placeholder);
            }
            at = e;
        }
        out.push_str(&text[at..]);
        Some(out)
    }

    /// Placeholder → original value, for restoring answers.
    pub fn restorer(self) -> HashMap<String, String> {
        self.by_value.into_iter().map(|(v, p)| (p, v)).collect()
    }
}

/// The longest placeholder keypool makes: what a stream holds back for restoring.
pub const MAX_PLACEHOLDER: usize = 48;

/// `text` with each placeholder of `restore` replaced by its value (`None`: none in it).
#[allow(clippy::implicit_hasher)] // the one map type a request's placeholders are kept in
pub fn restore(text: &str, restore: &HashMap<String, String>) -> Option<String> {
    if restore.is_empty() || !text.contains('[') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut changed = false;
    while let Some(open) = text[at..].find('[').map(|i| at + i) {
        let Some(close) = text[open..].find(']').map(|i| open + i) else {
            break;
        };
        if let Some(v) = restore.get(&text[open..=close]) {
            out.push_str(&text[at..open]);
            out.push_str(v);
            at = close + 1;
            changed = true;
        } else {
            out.push_str(&text[at..=open]);
            at = open + 1;
        }
    }
    out.push_str(&text[at..]);
    changed.then_some(out)
}

/// Where a text ends in what may be the start of a placeholder (`[` and up to
/// [`MAX_PLACEHOLDER`] characters of `A-Z0-9_`): the byte it starts at.
pub fn partial_placeholder(text: &str) -> Option<usize> {
    let open = text.rfind('[')?;
    let tail = &text[open + 1..];
    (tail.len() < MAX_PLACEHOLDER
        && tail
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))
    .then_some(open)
}

/// A prohibited span of a text: `[start, end)` in bytes, and the rule that found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub start: usize,
    pub end: usize,
    pub rule: String,
}

/// Every match of `spec`'s keywords (case and full-width forms ignored) and patterns in `text`.
pub fn violations(spec: &ContentSafety, text: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    if let Some(ac) = &spec.keywords
        && !text.chars().any(needs_fold)
    {
        // ASCII case is the automaton's to ignore: the text as it is
        out.extend(ac.find_iter(text).map(|m| Violation {
            start: m.start(),
            end: m.end(),
            rule: "keywords".to_owned(),
        }));
    } else if let Some(ac) = &spec.keywords {
        // the folded text, and where each of its bytes came from
        let mut folded = String::with_capacity(text.len());
        let mut origin = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            for f in fold(c) {
                let n = folded.len();
                folded.push(f);
                origin.extend(std::iter::repeat_n(i, folded.len() - n));
            }
        }
        origin.push(text.len());
        for m in ac.find_iter(&folded) {
            // the end maps to the start of the next original character
            let end = origin[m.end()];
            out.push(Violation {
                start: origin[m.start()],
                end,
                rule: "keywords".to_owned(),
            });
        }
    }
    for (name, re) in &spec.patterns {
        for m in re.find_iter(text).filter(|m| !m.is_empty()) {
            out.push(Violation {
                start: m.start(),
                end: m.end(),
                rule: name.clone(),
            });
        }
    }
    out.sort_by_key(|v| v.start);
    out
}

/// `text` with each violation's characters replaced by `*` (overlaps merged).
pub fn mask_violations(text: &str, found: &[Violation]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for v in found {
        if v.end <= at {
            continue;
        }
        let start = v.start.max(at);
        out.push_str(&text[at..start]);
        out.extend(std::iter::repeat_n('*', text[start..v.end].chars().count()));
        at = v.end;
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
#[path = "detect_tests.rs"]
mod tests;
