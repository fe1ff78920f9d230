//! `keypool mock`: the mock upstream as its own process (for the benchmark and manual tests).

use std::net::TcpListener;

use clap::Args;
use keypool_mock::{Behavior, MockServer};
use tokio_util::sync::CancellationToken;

/// Flags of `keypool mock`.
#[derive(Debug, Args)]
pub struct MockArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub address: String,
    /// Name used in replies.
    #[arg(long, default_value = "mock")]
    pub name: String,
    /// Delay before the response head, in ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Streams: delay before the first chunk, in ms.
    #[arg(long, default_value_t = 0)]
    pub ttfb_ms: u64,
    /// Streams: delay between chunks, in ms.
    #[arg(long, default_value_t = 0)]
    pub chunk_interval_ms: u64,
    /// Answer every request with this status.
    #[arg(long)]
    pub status: Option<u16>,
    /// `Retry-After` to send with --status.
    #[arg(long)]
    pub retry_after: Option<String>,
    /// Streams: cut the connection after this many content chunks.
    #[arg(long)]
    pub cut_after: Option<usize>,
    /// Answer 401 unless this key is presented.
    #[arg(long)]
    pub require_key: Option<String>,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

pub async fn run(args: MockArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.address)?;
    let behavior = Behavior {
        name: args.name,
        latency_ms: args.latency_ms,
        ttfb_ms: args.ttfb_ms,
        chunk_interval_ms: args.chunk_interval_ms,
        status: args.status,
        retry_after: args.retry_after,
        cut_after: args.cut_after,
        require_key: args.require_key,
        ..Behavior::default()
    };
    let mock = MockServer::start_on(listener, behavior, args.workers, false)?;
    println!("mock listening on {}", mock.url());
    shutdown.cancelled().await;
    mock.stop().await;
    Ok(())
}
