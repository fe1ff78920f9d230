//! The cooldown an upstream 429 asks for (`Retry-After`, `retry-after-ms`,
//! `x-ratelimit-reset-*`): any header values give a cooldown of at most an hour, or none.
#![no_main]

const NAMES: [&str; 4] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let values: Vec<&str> = text.splitn(4, '\n').collect();
    let get = |name: &str| {
        NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i).copied())
    };
    let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    if let Some(d) = keypool_proxy::cooldown::cooldown(get, now) {
        assert!(d <= std::time::Duration::from_secs(3600), "{d:?}");
    }
    for (name, v) in NAMES.iter().zip(&values) {
        let _ = keypool_proxy::cooldown::relayable(name, v);
    }
});
