//! The `keypoolctl` binary's command line, without a server: `--help` lists the subcommands, and
//! an unreachable admin API is a clear error and a non-zero exit. (The end-to-end test in the
//! tests/ crate drives a running keypool with this same binary.)

const KEYPOOLCTL: &str = env!("CARGO_BIN_EXE_keypoolctl");

#[test]
fn help_lists_the_subcommands_and_an_unreachable_server_is_an_error() -> anyhow::Result<()> {
    let help = std::process::Command::new(KEYPOOLCTL)
        .arg("--help")
        .output()?;
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for sub in ["gateways", "keys", "usage", "status"] {
        assert!(text.contains(sub), "{sub} missing from:\n{text}");
    }
    // nothing listens on port 9 of loopback
    let out = std::process::Command::new(KEYPOOLCTL)
        .args(["--server", "http://127.0.0.1:9", "status"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.is_empty() && !err.contains("panicked"), "{err}");
    Ok(())
}
