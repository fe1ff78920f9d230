//! `keypool demo`: three mock upstream keys and the gateway in one process, offline.

use std::net::TcpListener;

use keypool_mock::{Behavior, MockServer};
use tokio_util::sync::CancellationToken;

/// The client token the demo accepts.
pub const DEMO_TOKEN: &str = "demo-token";

/// Starts three mocks and serves the gateway on `address` until `shutdown`.
pub async fn run(
    address: &str,
    admin_address: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut mocks = Vec::new();
    for name in ["mock-a", "mock-b", "mock-c"] {
        mocks.push(MockServer::start(Behavior {
            name: name.to_owned(),
            chunk_interval_ms: 40,
            ..Behavior::default()
        })?);
    }
    let mut upstreams = String::new();
    for (m, name) in mocks.iter().zip(["mock-a", "mock-b", "mock-c"]) {
        use std::fmt::Write;
        let _ = writeln!(
            upstreams,
            "  - {{name: {name}, sk: sk-demo-{name}, endpoint: \"{}\", rpm: 600}}",
            m.url()
        );
    }
    let yaml = format!(
        "authorization: {DEMO_TOKEN}\ndbtype: none\nlb_policy: least-used\nupstreams:\n{upstreams}"
    );
    let mut config = keypool_config::from_yaml(&yaml)?;
    admin_address.clone_into(&mut config.admin.address);
    let listener = TcpListener::bind(address)?;
    let base = format!("http://{}/v1", listener.local_addr()?);
    println!(
        "keypool demo: 3 mock upstream keys (mock-a, mock-b, mock-c) behind {base}

Try it:

  curl -s {base}/chat/completions \\
    -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \\
    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}' -i

  curl -sN {base}/chat/completions \\
    -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \\
    -d '{{\"model\":\"gpt-4o-mini\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'

  python3 -c '
from openai import OpenAI
client = OpenAI(base_url=\"{base}\", api_key=\"{DEMO_TOKEN}\")
r = client.chat.completions.create(model=\"gpt-4o-mini\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])
print(r.choices[0].message.content, r.usage)
'

The x-keypool-upstream response header names the key that served each call. The admin API
(no token: loopback only) is on {admin_address}:

  keypoolctl --server http://{admin_address} keys list

Ctrl-C stops.
keypool listening on {base}"
    );
    let result = crate::run(config, listener, shutdown).await;
    for m in &mocks {
        m.stop().await;
    }
    result
}
