//! Config loading: any text is a config or a list of mistakes, never a panic, never a hang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keypool_config::from_yaml(text);
    }
});
