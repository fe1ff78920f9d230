//! `keypool demo`: three mock OpenAI keys, one mock Anthropic key and the gateway in one
//! process, offline, with a temporary SQLite store (so `keypoolctl usage` has something to
//! show).
//!
//! The banner is printed only once every port is bound, and every command in it runs as
//! printed from the repository (a test runs them all).

use keypool_mock::{Behavior, MockServer};
use tokio_util::sync::CancellationToken;

/// The client token the demo accepts.
pub const DEMO_TOKEN: &str = "demo-token";

/// How the banner runs `keypoolctl`: built from the repository, as the README's run command
/// builds `keypool`.
pub const KEYPOOLCTL: &str = "cargo run -q --release -p keypoolctl --";

/// The demo's keys: three OpenAI-style and one Anthropic one.
const KEYS: [(&str, &str); 4] = [
    ("mock-a", "openai"),
    ("mock-b", "openai"),
    ("mock-c", "openai"),
    ("mock-claude", "anthropic"),
];

/// Starts four mocks and serves the gateway on `address` (its admin API and console on the
/// other two) until `shutdown`.
pub async fn run(
    [address, admin_address, console_address]: [&str; 3],
    shutdown: CancellationToken,
    options: crate::Options,
) -> anyhow::Result<()> {
    let listener = keypool_proxy::edge::bind(address).map_err(|e| {
        anyhow::anyhow!("cannot listen on {address}: {e} (choose another with --address)")
    })?;
    let mut mocks = Vec::new();
    for (name, _) in KEYS {
        mocks.push(MockServer::start(Behavior {
            name: name.to_owned(),
            chunk_interval_ms: 40,
            ..Behavior::default()
        })?);
    }
    let store = tempfile::tempdir()?;
    let mut upstreams = String::new();
    for (m, (name, kind)) in mocks.iter().zip(KEYS) {
        use std::fmt::Write;
        let _ = writeln!(
            upstreams,
            "  - {{name: {name}, type: {kind}, sk: sk-demo-{name}, endpoint: \"{}\", rpm: 600}}",
            m.url()
        );
    }
    let yaml = format!(
        "authorization: {DEMO_TOKEN}\ndbtype: sqlite\ndbaddr: \"{}\"\nlb_policy: least-used\nupstreams:\n{upstreams}",
        store.path().join("demo.sqlite").display()
    );
    let mut config = keypool_config::from_yaml(&yaml)?;
    admin_address.clone_into(&mut config.admin.address);
    config.admin.requested = true;
    config.admin.http_address = Some(console_address.to_owned());
    config.admin.http_requested = true;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(crate::run_until(
        config,
        listener,
        shutdown,
        crate::Role::AllInOne,
        crate::Options {
            ready: Some(ready_tx),
            ..options
        },
    ));
    // a port that cannot be bound ends the demo here, before any banner
    let result = match ready_rx.await {
        Ok(ready) => {
            print_banner(ready);
            serving.await?
        }
        Err(_) => match serving.await? {
            Err(e) => Err(e.context("the demo did not start")),
            Ok(()) => Ok(()),
        },
    };
    for m in &mocks {
        m.stop().await;
    }
    drop(store);
    result
}

fn print_banner(ready: crate::Ready) {
    let root = format!("http://{}", ready.api);
    let base = format!("{root}/v1");
    let admin = ready
        .admin
        .map_or_else(|| "(admin API off)".to_owned(), |a| format!("http://{a}"));
    let console = ready
        .console
        .map_or_else(|| "(console off)".to_owned(), |a| format!("http://{a}/"));
    println!(
        "keypool demo: 3 mock OpenAI keys (mock-a, mock-b, mock-c) and a mock Anthropic key
(mock-claude) behind {base}

Try it (each command runs as printed, from the repository):

  curl -s {base}/chat/completions \\
    -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \\
    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}' -i

  curl -sN {base}/chat/completions \\
    -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \\
    -d '{{\"model\":\"gpt-4o-mini\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'

  curl -s {base}/models -H 'Authorization: Bearer {DEMO_TOKEN}'

With the official SDK (pip install openai):

  python3 -c '
from openai import OpenAI
client = OpenAI(base_url=\"{base}\", api_key=\"{DEMO_TOKEN}\")
r = client.chat.completions.create(model=\"gpt-4o-mini\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])
print(r.choices[0].message.content, r.usage)
'

Anthropic's Messages API, on the same token (pip install anthropic):

  curl -s {base}/messages \\
    -H 'x-api-key: {DEMO_TOKEN}' -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' \\
    -d '{{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":64,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'

  python3 -c '
from anthropic import Anthropic
client = Anthropic(base_url=\"{root}\", api_key=\"{DEMO_TOKEN}\")
m = client.messages.create(model=\"claude-sonnet-4-5\", max_tokens=64, messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])
print(m.content[0].text, m.usage)
'

Claude Code uses it with ANTHROPIC_BASE_URL={root} ANTHROPIC_AUTH_TOKEN={DEMO_TOKEN}.

The x-keypool-upstream response header names the key that served each call. The admin API
(no token: loopback only) is on {admin}; usage goes to a temporary SQLite store:

  {KEYPOOLCTL} --server {admin} keys list

  {KEYPOOLCTL} --server {admin} usage

The console (keys, gateways, usage charts, the live request tail) is at {console} (no admin
token: open on loopback).

Ctrl-C stops.
keypool listening on {base}"
    );
}
