use keypool_config::guard::{RawContentSafety, RawDataMasking, validate_masking, validate_safety};

use super::*;

fn masking(yaml: &str) -> DataMasking {
    let raw: RawDataMasking = serde_norway::from_str(yaml).unwrap();
    let mut errs = Vec::new();
    let spec = validate_masking(&raw, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    spec
}

fn safety(yaml: &str) -> ContentSafety {
    let raw: RawContentSafety = serde_norway::from_str(yaml).unwrap();
    let mut errs = Vec::new();
    let spec = validate_safety(&raw, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    spec
}

#[test]
fn each_detector_masks_what_it_should_and_keeps_the_rest() {
    let spec = masking("{}");
    let mut m = Masker::default();
    let text = "电话13812345678，身份证11010519491231002X，卡号4111111111111111，\
                邮箱a.b@example.com，IP 192.168.1.20，密钥sk-abcdefghijklmnop1234。\
                再打13812345678";
    let masked = m.mask(&spec, text).unwrap();
    assert_eq!(
        masked,
        "电话[PHONE_1]，身份证[ID_CARD_1]，卡号[BANK_CARD_1]，邮箱[EMAIL_1]，IP [IPV4_1]，\
         密钥[API_KEY_1]。再打[PHONE_1]"
    );
    assert_eq!(
        m.hits,
        ["id_card", "bank_card", "phone", "email", "ipv4", "api_key"]
    );
    let back = restore(&masked, &m.restorer()).unwrap();
    assert_eq!(back, text);
}

#[test]
fn checksums_and_boundaries_keep_look_alikes() {
    let spec = masking("{}");
    let mut m = Masker::default();
    // a wrong identity checksum, a card failing Luhn, a longer digit run, a bad octet
    let text = "110105194912310021 4111111111111112 138123456789 300.1.1.1 order 12345";
    assert_eq!(m.mask(&spec, text), None);
    assert!(m.hits.is_empty());
}

#[test]
fn redact_and_custom_rules() {
    let spec = masking(
        "{detectors: [email], custom: [{name: employee id, pattern: 'EMP-[0-9]{4}'}], action: redact}",
    );
    let mut m = Masker::default();
    assert_eq!(
        m.mask(&spec, "EMP-1234 x@y.io 13812345678").unwrap(),
        "[EMPLOYEE_ID] [EMAIL] 13812345678"
    );
}

#[test]
fn a_partial_placeholder_is_found_at_the_end() {
    assert_eq!(partial_placeholder("call [PHO"), Some(5));
    assert_eq!(partial_placeholder("call ["), Some(5));
    assert_eq!(partial_placeholder("call [PHONE_1] now"), None);
    assert_eq!(partial_placeholder("a [note] b"), None);
}

#[test]
fn keywords_ignore_case_and_full_width_forms() {
    let spec = safety(
        "{keywords: [Forbidden, 坏词], patterns: [{name: ssn, pattern: '[0-9]{3}-[0-9]{2}-[0-9]{4}'}]}",
    );
    let text = "a ＦＯＲＢＩＤＤＥＮ and forBidden, 坏词, 123-45-6789";
    let found = violations(&spec, text);
    let rules: Vec<&str> = found.iter().map(|v| v.rule.as_str()).collect();
    assert_eq!(rules, ["keywords", "keywords", "keywords", "ssn"]);
    assert_eq!(
        mask_violations(text, &found),
        "a ********* and *********, **, ***********"
    );
    assert!(violations(&spec, "all fine here").is_empty());
}
