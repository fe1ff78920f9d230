//! `deploy/` stays consistent: its keypool configs load (the binary's own validation), the
//! compose file matches the compose spec, the manifests match the Kubernetes schemas.

use std::process::Command;

use keypool_e2e::{REPO_ROOT, keypool_bin, python_venv};

/// The variables the Kubernetes Secret sets (`${...}` in the ConfigMap's config).
const SECRET_ENV: [(&str, &str); 5] = [
    ("KEYPOOL_ADMIN_TOKEN", "from-the-k8s-secret"),
    ("KEYPOOL_SECRET_KEY", "from-the-k8s-secret"),
    ("KEYPOOL_CLIENT_TOKENS", "client-token-from-the-secret"),
    ("KEYPOOL_DB_PASSWORD", "db-password-from-the-secret"),
    ("OPENAI_API_KEY_1", "sk-from-the-secret-0123456789"),
];

/// Runs `keypool admin` (the control plane) on a config: it must get past validation (exit
/// code 2 and "invalid config" mean it did not); it then fails to reach the database this
/// machine does not have. `keypool check` must find its `/v1` closed (client tokens set).
fn loads(path: &str) -> anyhow::Result<()> {
    let out = Command::new(keypool_bin())
        .args(["admin", "--config", path, "--address", "127.0.0.1:0"])
        .args(["--admin-address", "127.0.0.1:0"])
        .envs(SECRET_ENV)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.code() != Some(2) && !err.contains("invalid config"),
        "{path} does not load: {err}"
    );
    let check = Command::new(keypool_bin())
        .args(["check", "--config", path])
        .envs(SECRET_ENV)
        .output()?;
    let summary = String::from_utf8_lossy(&check.stdout);
    anyhow::ensure!(
        check.status.success() && summary.contains("client token(s)) at /v1"),
        "{path}: /v1 is not closed by client tokens:\n{summary}"
    );
    for (_, secret) in SECRET_ENV {
        anyhow::ensure!(
            !summary.contains(secret),
            "{path}: a secret is shown:\n{summary}"
        );
    }
    Ok(())
}

#[test]
fn deploy_configs_load_and_manifests_validate() -> anyhow::Result<()> {
    let deploy = format!("{REPO_ROOT}/deploy");
    // the compose config, as the control plane reads it
    loads(&format!("{deploy}/config.yaml"))?;
    // the ConfigMap's embedded config.yaml
    let k8s = std::fs::read_to_string(format!("{deploy}/k8s/keypool.yaml"))?;
    let configmap: serde_norway::Value = k8s
        .split("\n---\n")
        .map(serde_norway::from_str::<serde_norway::Value>)
        .find_map(|d| d.ok().filter(|d| d["kind"] == "ConfigMap"))
        .ok_or_else(|| anyhow::anyhow!("no ConfigMap"))?;
    let embedded = configmap["data"]["config.yaml"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no data.config.yaml"))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, embedded)?;
    loads(&path.display().to_string())?;

    let venv = python_venv()?;
    let compose = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
        ])
        .arg(format!("{deploy}/docker-compose.yml"))
        .output()?;
    assert!(
        compose.status.success(),
        "{}{}",
        String::from_utf8_lossy(&compose.stdout),
        String::from_utf8_lossy(&compose.stderr)
    );
    let manifests = Command::new(venv.join("bin/python"))
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(format!("{deploy}/k8s/keypool.yaml"))
        .output()?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&manifests.stdout),
        String::from_utf8_lossy(&manifests.stderr)
    );
    assert!(manifests.status.success(), "{out}");
    assert_eq!(out.matches("passed for resource").count(), 7, "{out}");

    // the frontends' arguments (compose and Kubernetes) parse: `--help` after them makes
    // keypool check every argument before it, then print help and exit 0
    let compose: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(format!(
        "{deploy}/docker-compose.yml"
    ))?)?;
    let compose_args = compose["x-frontend"]["command"]
        .as_sequence()
        .ok_or_else(|| anyhow::anyhow!("no x-frontend.command"))?
        .clone();
    let k8s_args = k8s
        .split("\n---\n")
        .filter_map(|d| serde_norway::from_str::<serde_norway::Value>(d).ok())
        .find(|d| d["metadata"]["name"] == "keypool-frontend" && d["kind"] == "Deployment")
        .and_then(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_sequence()
                .cloned()
        })
        .ok_or_else(|| anyhow::anyhow!("no frontend Deployment args"))?;
    for args in [compose_args, k8s_args] {
        let args: Vec<&str> = args.iter().filter_map(|a| a.as_str()).collect();
        assert_eq!(args.first(), Some(&"frontend"));
        let out = Command::new(keypool_bin())
            .args(&args)
            .arg("--help")
            .output()?;
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The Kubernetes config holds no secret and is refused without the Secret's variables (naming
/// them: nothing is silently empty); the image is built from the sources only.
#[test]
fn the_kubernetes_config_needs_its_secret_and_the_image_context_skips_target() -> anyhow::Result<()>
{
    let k8s = std::fs::read_to_string(format!("{REPO_ROOT}/deploy/k8s/keypool.yaml"))?;
    assert!(!k8s.contains("sk-replace-me"), "no key in the ConfigMap");
    let configmap: serde_norway::Value = k8s
        .split("\n---\n")
        .map(serde_norway::from_str::<serde_norway::Value>)
        .find_map(|d| d.ok().filter(|d| d["kind"] == "ConfigMap"))
        .ok_or_else(|| anyhow::anyhow!("no ConfigMap"))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        configmap["data"]["config.yaml"].as_str().unwrap_or(""),
    )?;
    let bare = Command::new(keypool_bin())
        .args(["check", "--config", &path.display().to_string()])
        .env_remove("KEYPOOL_CLIENT_TOKENS")
        .output()?;
    let err = String::from_utf8_lossy(&bare.stderr);
    assert_eq!(bare.status.code(), Some(2), "{err}");
    assert!(err.contains("KEYPOOL_CLIENT_TOKENS is not set"), "{err}");
    let ignore = std::fs::read_to_string(format!("{REPO_ROOT}/.dockerignore"))?;
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "{ignore}");
    Ok(())
}
