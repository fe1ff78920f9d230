//! The `keypool` binary's command line: a config mistake exits 2 naming the field, before any
//! port is bound; `--help` lists the commands. (The end-to-end tests of the tests/ crate start
//! this same binary.)

const KEYPOOL: &str = env!("CARGO_BIN_EXE_keypool");

/// `keypool serve` on a config file holding `yaml`: it must exit 2 without listening; answers
/// what it printed on stderr.
fn refused(yaml: &str) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml)?;
    let out = std::process::Command::new(KEYPOOL)
        .args(["serve", "--config", &path.display().to_string()])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_config_mistake_names_the_field_and_exits_before_binding() -> anyhow::Result<()> {
    let err = refused(
        "address: 127.0.0.1:0\nlb_policy: fastest\nupstreams:\n  - sk: k\n    endpoint: ftp://x\n",
    )?;
    assert!(
        err.contains("lb_policy: expected least-used, order or random"),
        "{err}"
    );
    assert!(
        err.contains("upstreams[0].endpoint: must start with http"),
        "{err}"
    );
    let missing = std::process::Command::new(KEYPOOL)
        .args(["serve", "--config", "/nonexistent.yaml"])
        .output()?;
    assert_eq!(missing.status.code(), Some(2));
    let help = std::process::Command::new(KEYPOOL).arg("--help").output()?;
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.contains("serve") && text.contains("demo"),
        "{text}"
    );
    Ok(())
}

/// A value that panicked or exhausted memory after start-up is refused before any port is
/// bound: exit 2, the field and its range named.
#[test]
fn an_out_of_range_number_exits_2_before_binding() -> anyhow::Result<()> {
    let err = refused(
        "address: 127.0.0.1:0\ndbtype: none\nadmin: {stream_buffer: 18446744073709551615}\nlog: {queue_capacity: 2305843009213693952}\n",
    )?;
    assert!(
        err.contains("admin.stream_buffer: must be between 1 and 1048576"),
        "{err}"
    );
    assert!(
        err.contains("log.queue_capacity: must be between 1 and 10000000"),
        "{err}"
    );
    Ok(())
}
