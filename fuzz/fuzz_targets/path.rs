//! Path normalisation: what comes out is normal (no empty, `.` or `..` segment, no `;`), and
//! normalising it again changes nothing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = keypool_proxy::pipeline::normalise_path(raw) {
        assert!(p.starts_with('/'), "{p:?}");
        assert!(!p.contains(';'), "{p:?}");
        let segments: Vec<&str> = p.split('/').skip(1).collect();
        assert!(
            p == "/" || segments.iter().all(|s| !s.is_empty() && *s != "." && *s != ".."),
            "{raw:?} -> {p:?}"
        );
        let again = keypool_proxy::pipeline::normalise_path(&p).expect("a normal path stays accepted");
        assert_eq!(again, p, "normalising is idempotent");
    }
});
