//! Many concurrent SSE streams (a program for `tests/load/bench.sh`'s `STREAMS=N` run, not a
//! test): opens `N` streamed chat completions against a URL over `RAMP_MS`, each on its own
//! connection, reads every one to its end, and prints one line of JSON: how many ended with
//! `[DONE]`, were refused (non-200) or cut; the most open at once; time to first event; and
//! each paced event's lateness (how far past a whole number of `INTERVAL_MS` after the event
//! before it it arrived: the relay delay, beside the same for the upstream directly).
//!
//!   cargo run --release -p keypool-e2e --example streams -- URL TOKEN N INTERVAL_MS RAMP_MS

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one stream saw.
#[derive(Default)]
struct Seen {
    status: u16,
    done: bool,
    ttfb: Option<Duration>,
    /// Lateness of each paced event, in µs (may be negative: an event early after a late one).
    late_us: Vec<i64>,
}

struct Target {
    addr: String,
    host_path: (String, String),
    token: String,
    interval: Duration,
}

fn parse(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((host.to_owned(), format!("/{path}")))
}

async fn one(t: Arc<Target>, open: Arc<AtomicUsize>, peak: Arc<AtomicUsize>) -> Seen {
    let mut seen = Seen::default();
    let started = Instant::now();
    let Ok(mut conn) = TcpStream::connect(&t.addr).await else {
        return seen;
    };
    let _ = conn.set_nodelay(true);
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me a story"}]}"#;
    let (host, path) = &t.host_path;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        t.token,
        body.len()
    );
    if conn.write_all(head.as_bytes()).await.is_err()
        || conn.write_all(body.as_bytes()).await.is_err()
    {
        return seen;
    }
    let now = open.fetch_add(1, Ordering::Relaxed) + 1;
    peak.fetch_max(now, Ordering::Relaxed);
    let mut buf = vec![0u8; 16 * 1024];
    let mut head_done = false;
    let mut text = Vec::new();
    let mut last_event: Option<Instant> = None;
    let interval = i64::try_from(t.interval.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let at = Instant::now();
        text.extend_from_slice(&buf[..n]);
        if !head_done {
            let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let status_line = String::from_utf8_lossy(&text[..end]);
            seen.status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            text.drain(..end + 4);
            head_done = true;
            if seen.status != 200 {
                break;
            }
        }
        if text.windows(6).any(|w| w == b"data: ") {
            match last_event {
                None => seen.ttfb = Some(at - started),
                Some(before) => {
                    let gap = i64::try_from((at - before).as_micros()).unwrap_or(i64::MAX);
                    let whole = (gap + interval / 2) / interval;
                    seen.late_us.push(gap - whole * interval);
                }
            }
            last_event = Some(at);
            if text.windows(6).any(|w| w == b"[DONE]") {
                seen.done = true;
                break;
            }
            // keep a tail in case a marker is split over two reads
            let keep = text.len().saturating_sub(8);
            text.drain(..keep);
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
    seen
}

fn pct(v: &mut [i64], p: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // an index into v
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, n, interval, ramp] = args.as_slice() else {
        anyhow::bail!("usage: streams URL TOKEN N INTERVAL_MS RAMP_MS");
    };
    let (host, path) = parse(url)?;
    let n: usize = n.parse()?;
    let target = Arc::new(Target {
        addr: host.clone(),
        host_path: (host, path),
        token: token.clone(),
        interval: Duration::from_millis(interval.parse()?),
    });
    let ramp = Duration::from_millis(ramp.parse()?);
    let (open, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let due = ramp.mul_f64(
            f64::from(u32::try_from(i).unwrap_or(u32::MAX))
                / f64::from(u32::try_from(n).unwrap_or(1).max(1)),
        );
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        tasks.push(tokio::spawn(one(
            target.clone(),
            open.clone(),
            peak.clone(),
        )));
    }
    let (mut done, mut refused, mut cut) = (0usize, 0usize, 0usize);
    let (mut ttfb, mut late) = (Vec::new(), Vec::new());
    for t in tasks {
        let s = t.await?;
        match (s.status, s.done) {
            (200, true) => done += 1,
            (200, false) => cut += 1,
            _ => refused += 1,
        }
        if let Some(d) = s.ttfb {
            ttfb.push(i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        }
        late.extend(s.late_us);
    }
    println!(
        "{{\"streams\": {n}, \"done\": {done}, \"refused\": {refused}, \"cut\": {cut}, \"peak_open\": {}, \"ttfb_p50_us\": {}, \"ttfb_p99_us\": {}, \"late_p50_us\": {}, \"late_p99_us\": {}, \"seconds\": {:.1}}}",
        peak.load(Ordering::Relaxed),
        pct(&mut ttfb, 0.5),
        pct(&mut ttfb, 0.99),
        pct(&mut late, 0.5),
        pct(&mut late, 0.99),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
