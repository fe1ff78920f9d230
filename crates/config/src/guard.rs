//! Guardrails a gateway asks for (`data_masking:`, `content_safety:`), as written and
//! validated: the detectors to run, the keyword lists folded for matching (case and
//! full-width forms ignored) into one Aho–Corasick automaton, and the regex rules, compiled once
//! when the gateway is loaded. What is done with a match is `keypool_proxy::guard`'s.

use std::sync::Arc;

use aho_corasick::AhoCorasick;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// `data_masking:` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataMasking {
    /// Built-in detectors (default: all): `phone`, `id_card`, `bank_card`, `email`, `ipv4`,
    /// `api_key`.
    #[serde(
        default,
        deserialize_with = "crate::raw::one_or_many::option::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub detectors: Option<Vec<String>>,
    /// Custom rules: `{name, pattern}` (a regex).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom: Vec<RawRule>,
    /// `mask` (default: a typed placeholder, `[PHONE_1]`) or `redact` (`[PHONE]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Put the original values back into the answer (`mask` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<bool>,
    /// Alert when a rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<bool>,
}

/// `content_safety:` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawContentSafety {
    /// Prohibited words and phrases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// Files of more, one a line (`#` starts a comment), read when the gateway is loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyword_files: Vec<String>,
    /// Regex rules: `{name, pattern}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<RawRule>,
    /// On a request: `block` (default: 400 `content_policy_violation`) or `mask`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_request: Option<String>,
    /// On an answer: `mask` (default: in place) or `block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_response: Option<String>,
    /// Alert when a rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<bool>,
    /// Also ask an OpenAI-compatible `/v1/moderations` model, through the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<RawModeration>,
}

/// `moderation:` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawModeration {
    /// The moderation model (`omni-moderation-latest`); a key that serves it answers.
    pub model: String,
    /// What is checked: `request` (the only one so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
    /// Milliseconds the call may take (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// When the call fails or times out: `allow` (default: the request goes on, counted) or
    /// `block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
}

/// `moderation`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moderation {
    pub model: String,
    pub timeout: std::time::Duration,
    pub block_on_failure: bool,
}

/// A named regex rule.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub pattern: String,
}

/// The built-in detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    /// Mainland China mobile numbers (`1[3-9]` and nine digits, `+86` optional).
    Phone,
    /// Resident identity numbers (18 characters, checksum verified).
    IdCard,
    /// Bank card numbers (16–19 digits, Luhn verified).
    BankCard,
    Email,
    Ipv4,
    /// API keys: `sk-…` (OpenAI, Anthropic), `AKIA…`, `AIza…`, `ghp_…`.
    ApiKey,
}

impl Detector {
    pub const ALL: [Self; 6] = [
        Self::IdCard,
        Self::BankCard,
        Self::Phone,
        Self::Email,
        Self::Ipv4,
        Self::ApiKey,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Phone => "phone",
            Self::IdCard => "id_card",
            Self::BankCard => "bank_card",
            Self::Email => "email",
            Self::Ipv4 => "ipv4",
            Self::ApiKey => "api_key",
        }
    }
}

/// `data_masking`, validated.
#[derive(Debug, Clone)]
pub struct DataMasking {
    /// In the order they run (identity numbers before bank cards, which they could pass for).
    pub detectors: Vec<Detector>,
    /// (name, placeholder type, regex)
    pub custom: Vec<(String, String, Regex)>,
    pub redact: bool,
    pub restore: bool,
    pub alert: bool,
}

/// `content_safety`, validated.
#[derive(Debug, Clone)]
pub struct ContentSafety {
    /// The keywords, folded ([`fold`]), in one automaton; `None` without keywords.
    pub keywords: Option<Arc<AhoCorasick>>,
    /// The longest keyword, in characters: what a stream holds back.
    pub longest_keyword: usize,
    pub patterns: Vec<(String, Regex)>,
    pub block_request: bool,
    pub block_response: bool,
    pub alert: bool,
    pub moderation: Option<Moderation>,
}

/// A character as keywords are matched: full-width ASCII forms as their half-width ones, the
/// ideographic space as a space, then lower case.
pub fn fold(c: char) -> impl Iterator<Item = char> {
    let half = match u32::from(c) {
        0xFF01..=0xFF5E => char::from_u32(u32::from(c) - 0xFEE0).unwrap_or(c),
        0x3000 => ' ',
        _ => c,
    };
    half.to_lowercase()
}

/// Whether `c` folds to something else than itself or its ASCII case.
pub fn needs_fold(c: char) -> bool {
    !c.is_ascii() && (matches!(u32::from(c), 0xFF01..=0xFF5E | 0x3000) || c.is_uppercase())
}

/// `s` folded ([`fold`]).
pub fn folded(s: &str) -> String {
    s.chars().flat_map(fold).collect()
}

/// Validates `data_masking`; mistakes as (field under the gateway, reason).
pub fn validate_masking(raw: &RawDataMasking, errs: &mut Vec<(String, String)>) -> DataMasking {
    let mut detectors = Vec::new();
    match &raw.detectors {
        None => detectors.extend(Detector::ALL),
        Some(names) => {
            for (i, n) in names.iter().enumerate() {
                match Detector::parse(n.trim()) {
                    Some(d) => detectors.push(d),
                    None => errs.push((
                        format!("data_masking.detectors[{i}]"),
                        format!(
                            "unknown detector {n:?}: expected phone, id_card, bank_card, email, ipv4 or api_key"
                        ),
                    )),
                }
            }
            // the built-in order, whatever the list's
            detectors.sort_by_key(|d| Detector::ALL.iter().position(|x| x == d));
            detectors.dedup();
        }
    }
    let custom = rules(&raw.custom, "data_masking.custom", errs)
        .into_iter()
        .map(|(name, re)| {
            let kind: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            (name, kind, re)
        })
        .collect();
    let redact = match raw.action.as_deref().unwrap_or("mask") {
        "mask" => false,
        "redact" => true,
        other => {
            errs.push((
                "data_masking.action".into(),
                format!("expected mask or redact, got {other:?}"),
            ));
            false
        }
    };
    let restore = raw.restore.unwrap_or(false);
    if restore && redact {
        errs.push((
            "data_masking.restore".into(),
            "restore needs action: mask (a redacted value cannot be put back)".into(),
        ));
    }
    DataMasking {
        detectors,
        custom,
        redact,
        restore,
        alert: raw.alert.unwrap_or(false),
    }
}

/// Validates `content_safety` (reading its keyword files); mistakes as (field, reason).
pub fn validate_safety(raw: &RawContentSafety, errs: &mut Vec<(String, String)>) -> ContentSafety {
    let mut words: Vec<String> = raw.keywords.iter().map(|k| folded(k.trim())).collect();
    for (i, path) in raw.keyword_files.iter().enumerate() {
        match std::fs::read_to_string(path) {
            Ok(text) => words.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(folded),
            ),
            Err(e) => errs.push((
                format!("content_safety.keyword_files[{i}]"),
                format!("cannot read {path:?}: {e}"),
            )),
        }
    }
    words.retain(|w| !w.is_empty());
    words.sort();
    words.dedup();
    let longest_keyword = words.iter().map(|w| w.chars().count()).max().unwrap_or(0);
    let keywords = if words.is_empty() {
        None
    } else {
        // ASCII case is ignored by the automaton itself: most texts then need no folding
        match AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .ascii_case_insensitive(true)
            .build(&words)
        {
            Ok(ac) => Some(Arc::new(ac)),
            Err(e) => {
                errs.push(("content_safety.keywords".into(), e.to_string()));
                None
            }
        }
    };
    let mut action = |field: &str, v: Option<&str>, default: &str| match v.unwrap_or(default) {
        "block" => true,
        "mask" => false,
        other => {
            errs.push((
                format!("content_safety.{field}"),
                format!("expected block or mask, got {other:?}"),
            ));
            false
        }
    };
    let block_request = action("on_request", raw.on_request.as_deref(), "block");
    let block_response = action("on_response", raw.on_response.as_deref(), "mask");
    let moderation = raw
        .moderation
        .as_ref()
        .map(|m| validate_moderation(m, errs));
    ContentSafety {
        keywords,
        longest_keyword,
        patterns: rules(&raw.patterns, "content_safety.patterns", errs),
        block_request,
        block_response,
        alert: raw.alert.unwrap_or(false),
        moderation,
    }
}

fn validate_moderation(m: &RawModeration, errs: &mut Vec<(String, String)>) -> Moderation {
    if m.model.trim().is_empty() {
        errs.push((
            "content_safety.moderation.model".into(),
            "must name a model".into(),
        ));
    }
    if m.on.as_deref().is_some_and(|on| on != "request") {
        errs.push((
            "content_safety.moderation.on".into(),
            "only request is supported".into(),
        ));
    }
    let ms = m.timeout_ms.unwrap_or(2000);
    if !(1..=60_000).contains(&ms) {
        errs.push((
            "content_safety.moderation.timeout_ms".into(),
            "must be between 1 and 60000".into(),
        ));
    }
    let block_on_failure = match m.on_failure.as_deref().unwrap_or("allow") {
        "allow" => false,
        "block" => true,
        other => {
            errs.push((
                "content_safety.moderation.on_failure".into(),
                format!("expected allow or block, got {other:?}"),
            ));
            false
        }
    };
    Moderation {
        model: m.model.trim().to_owned(),
        timeout: std::time::Duration::from_millis(ms),
        block_on_failure,
    }
}

fn rules(raw: &[RawRule], at: &str, errs: &mut Vec<(String, String)>) -> Vec<(String, Regex)> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        if r.name.trim().is_empty() {
            errs.push((format!("{at}[{i}].name"), "must not be empty".into()));
        }
        match regex::RegexBuilder::new(&r.pattern)
            .size_limit(1 << 20)
            .build()
        {
            Ok(re) => out.push((r.name.trim().to_owned(), re)),
            Err(e) => errs.push((
                format!("{at}[{i}].pattern"),
                format!("not a valid regex: {e}"),
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_width_and_case_fold_away() {
        assert_eq!(folded("ＢａＤ　Ｗｏｒｄ"), "bad word");
        assert_eq!(folded("BAD"), "bad");
    }

    #[test]
    fn keyword_files_add_to_the_inline_list() {
        let path = std::env::temp_dir().join(format!("kp-keywords-{}.txt", std::process::id()));
        std::fs::write(&path, "# banned\nＳｐａｍ\n\n  egg  \n").unwrap();
        let raw = RawContentSafety {
            keywords: vec!["Ham".into()],
            keyword_files: vec![path.display().to_string()],
            ..RawContentSafety::default()
        };
        let mut errs = Vec::new();
        let spec = validate_safety(&raw, &mut errs);
        std::fs::remove_file(&path).unwrap();
        assert!(errs.is_empty(), "{errs:?}");
        let ac = spec.keywords.unwrap();
        let found: Vec<usize> = ac
            .find_iter("spam, EGG and ham")
            .map(|m| m.start())
            .collect();
        assert_eq!(found, [0, 6, 14]);
        assert_eq!(spec.longest_keyword, 4);
    }

    #[test]
    fn mistakes_name_their_field() {
        let mut errs = Vec::new();
        let raw: RawDataMasking = serde_norway::from_str(
            "{detectors: [phone, iris], action: redact, restore: true, custom: [{name: x, pattern: '('}]}",
        )
        .unwrap();
        validate_masking(&raw, &mut errs);
        let raw: RawContentSafety =
            serde_norway::from_str("{on_request: warn, keyword_files: [/nonexistent/kw.txt]}")
                .unwrap();
        validate_safety(&raw, &mut errs);
        let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "data_masking.detectors[1]",
                "data_masking.custom[0].pattern",
                "data_masking.restore",
                "content_safety.keyword_files[0]",
                "content_safety.on_request"
            ]
        );
    }
}
