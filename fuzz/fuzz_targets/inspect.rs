//! Request inspection (JSON and multipart bodies): model, stream flag and size, or a clear
//! error, never a panic. The first byte picks the content type.
#![no_main]

use bytes::Bytes;

const TYPES: [&str; 5] = [
    "application/json",
    "multipart/form-data; boundary=kpB",
    "multipart/form-data",
    "",
    "text/plain",
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let ct = TYPES[usize::from(pick) % TYPES.len()];
    let _ = keypool_proxy::inspect::inspect("/v1/chat/completions", ct, Bytes::copy_from_slice(body));
});
