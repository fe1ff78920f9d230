//! The in-process harness: keypool's own `run(config, listener, shutdown)` on a listener inside
//! the test process, against the mock upstream, over real HTTP on 127.0.0.1. No process to
//! spawn and no binary to build: pipeline behaviour is tested in milliseconds. What crosses
//! processes (SDKs, replicas, signals, the CLI) stays with the process-level harness
//! (`keypool_e2e::Gateway`).
//!
//! ```text
//! let up = mock("up", Behavior::default());
//! let app = App::start(&config().token("t").key(&up, "up", "").yaml()).await?;
//! let resp = app.chat("t", hello("gpt-4o-mini")).await?;
//! ```

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// keypool running inside this process; stopped (gracefully) when dropped.
pub struct App {
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    shutdown: CancellationToken,
    http: reqwest::Client,
}

impl App {
    /// Validates `yaml` as `keypool serve` would (its admin API, if enabled, on any free port)
    /// and serves it on `127.0.0.1:0`.
    pub async fn start(yaml: &str) -> anyhow::Result<Self> {
        keypool_gateway::install_tls_provider();
        let mut config = keypool_config::from_yaml(yaml).context("config")?;
        "127.0.0.1:0".clone_into(&mut config.admin.address);
        // bound as `keypool serve` binds it: a listener for each worker
        let listener = keypool_proxy::edge::bind("127.0.0.1:0")?;
        let origin = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = keypool_gateway::run(config, listener, stop).await {
                eprintln!("keypool stopped: {e:#}");
            }
        });
        let app = Self {
            origin,
            shutdown,
            http: keypool_e2e::client(),
        };
        // the listener is bound already; wait until the server answers
        for _ in 0..100 {
            if app.http.get(app.url("/healthz")).send().await.is_ok() {
                return Ok(app);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("keypool did not answer /healthz")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    /// POSTs JSON to `path` with `Authorization: Bearer <token>` (none when `token` is empty).
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> anyhow::Result<reqwest::Response> {
        let mut req = self.http.post(self.url(path)).json(body);
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        Ok(req.send().await?)
    }

    /// `GET path` written on the socket as it is (an HTTP client would normalise the path
    /// first): the status line's code and the body.
    pub async fn raw_get(&self, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let host = self.origin.trim_start_matches("http://");
        let mut tcp = tokio::net::TcpStream::connect(host).await?;
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await??;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((code, body))
    }

    /// POSTs JSON to `/v1/chat/completions`.
    pub async fn chat(&self, token: &str, body: Value) -> anyhow::Result<reqwest::Response> {
        self.post("/v1/chat/completions", token, &body).await
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An answer's status and OpenAI error code (empty for a success).
pub async fn status_code(resp: reqwest::Response) -> anyhow::Result<(u16, String)> {
    let status = resp.status().as_u16();
    let body = keypool_e2e::json(resp).await?;
    Ok((
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    ))
}
