//! The SSE tap: any byte stream, cut anywhere, read as OpenAI's or Anthropic's events, passes
//! through event by event; no byte is invented; an event over the cap stops the stream; never a
//! panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let surface = if cut % 4 < 2 {
        keypool_types::Surface::OpenAi
    } else {
        keypool_types::Surface::Anthropic
    };
    let mut tap = keypool_proxy::sse::SseTap::new(cut % 2 == 0)
        .max_event(4096)
        .speaking(surface);
    let mut out = 0usize;
    for chunk in rest.chunks(step) {
        out += tap.feed(chunk).len();
    }
    out += tap.finish().len();
    assert!(out <= rest.len(), "the tap sent more than it was given");
});
