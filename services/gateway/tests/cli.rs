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
        err.contains("lb_policy: expected least-used, order, random or latency"),
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
    assert!(help.status.success(), "{text}");
    // every command the README names
    for command in [
        "serve", "admin", "frontend", "demo", "check", "migrate", "mock",
    ] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
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

/// `keypool check`: a good file prints its summary (no secret in it) and exits 0; a file with
/// several mistakes names each of them, with its path, and exits 2.
#[test]
fn check_summarises_a_good_file_and_names_every_mistake_of_a_bad_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "address: 127.0.0.1:9999\nauthorization: client-secret-1\ndbtype: postgres\n\
         dbaddr: postgres://k:db-password-7@db:5432/keypool\n\
         upstreams:\n  - {name: a, sk: sk-upstream-secret-1, endpoint: 'http://a/v1', allow: gpt-4o, rpm: 60}\n\
         gateways:\n  - {name: team, auth: {method: exact, secrets: [team-secret-1]}, models: gpt-4o}\n",
    )?;
    let out = std::process::Command::new(KEYPOOL)
        .args(["check", "--config", &good.display().to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "OK",
        "listen    http://127.0.0.1:9999/v1",
        "store     postgres k@db:5432/keypool",
        "a (openai, http://a/v1, allow gpt-4o, rpm 60)",
        "default (1 client token(s)) at /v1",
        "team (exact, 1 secret(s); models gpt-4o) at /llm/api/team/v1",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    for secret in [
        "client-secret-1",
        "db-password-7",
        "sk-upstream-secret-1",
        "team-secret-1",
    ] {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
    }
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "adress: ':8888'\nretries: lots\nupstreams:\n  - {sk: k, endpoint: 'http://a/v1', rmp: 3}\n",
    )?;
    let out = std::process::Command::new(KEYPOOL)
        .args(["check", "--config", &bad.display().to_string()])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in [
        "adress: unknown field",
        "retries: invalid type",
        "upstreams[0].rmp: unknown field",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
    Ok(())
}

#[test]
fn keypool_workers_that_is_not_a_number_exits_2() -> anyhow::Result<()> {
    let out = std::process::Command::new(KEYPOOL)
        .args(["serve", "--config", "/nonexistent.yaml"])
        .env("KEYPOOL_WORKERS", "abc")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYPOOL_WORKERS"));
    Ok(())
}

#[test]
fn migrate_down_without_yes_refuses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    let db = dir.path().join("usage.db");
    std::fs::write(&path, format!("dbtype: sqlite\ndbaddr: {}\n", db.display()))?;
    let config = path.display().to_string();
    let up = std::process::Command::new(KEYPOOL)
        .args(["migrate", "--config", &config])
        .output()?;
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let refused = std::process::Command::new(KEYPOOL)
        .args(["migrate", "--down", "--config", &config])
        .output()?;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let down = std::process::Command::new(KEYPOOL)
        .args(["migrate", "--down", "--yes", "--config", &config])
        .output()?;
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    Ok(())
}

/// A store that cannot be opened: its root cause once (the role, the refused connection), the
/// store named without its password, and nothing said to be listening.
#[test]
fn a_store_error_is_shown_once_with_its_root_cause() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    for (dsn, cause) in [
        (
            "postgres://no_such_role_kp:pw-secret-1@127.0.0.1:5432/x",
            "role \"no_such_role_kp\" does not exist",
        ),
        (
            "postgres://k:pw-secret-1@127.0.0.1:1/x",
            "Connection refused",
        ),
    ] {
        std::fs::write(
            &path,
            format!(
                "address: 127.0.0.1:0\nadmin: {{enabled: false}}\ndbtype: postgres\ndbaddr: {dsn}\n"
            ),
        )?;
        let out = std::process::Command::new(KEYPOOL)
            .args(["serve", "--config", &path.display().to_string()])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
        assert_eq!(err.matches(cause).count(), 1, "{err}");
        assert!(err.contains("cannot open the store (postgres "), "{err}");
        assert!(!err.contains("pw-secret-1"), "{err}");
    }
    Ok(())
}

/// The environment of a running `keypool mock` (started with `env`), read from /proc once it
/// listens, so after it ran itself again with mimalloc's settings.
#[cfg(feature = "mimalloc")]
fn running_environment(env: &[(&str, &str)]) -> anyhow::Result<String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(KEYPOOL)
        .args(["mock", "--address", "127.0.0.1:0"])
        .env_remove("MIMALLOC_PURGE_DELAY")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut line = String::new();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let environ = std::fs::read(format!("/proc/{}/environ", child.id()));
    child.kill()?;
    child.wait()?;
    anyhow::ensure!(line.contains("listening on"), "{line}");
    Ok(String::from_utf8_lossy(&environ?).replace('\0', "\n"))
}

#[cfg(feature = "mimalloc")]
#[test]
fn the_allocator_purges_freed_memory_after_100_ms_unless_told_otherwise() -> anyhow::Result<()> {
    let env = running_environment(&[])?;
    assert!(
        env.lines().any(|l| l == "MIMALLOC_PURGE_DELAY=100"),
        "{env}"
    );
    let env = running_environment(&[("MIMALLOC_PURGE_DELAY", "1000")])?;
    assert!(
        env.lines().any(|l| l == "MIMALLOC_PURGE_DELAY=1000"),
        "{env}"
    );
    assert!(
        !env.lines().any(|l| l == "MIMALLOC_PURGE_DELAY=100"),
        "{env}"
    );
    Ok(())
}
