//! A gateway's `ingress:` limits leased from the shared state (`redis.lease`), over the real
//! Redis on 127.0.0.1:6379 (a unique key prefix per test, removed afterwards): two replicas
//! (two gateway sets, two connections) hold the limit exactly, what a lapsed lease left goes
//! back to the others, and a burst asks for one lease at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;
use std::time::Duration;

use keypool_config::gateway::{RawGateway, validate_gateway};
use keypool_policy::Caller;
use keypool_policy::gateway::Gateways;
use keypool_shared::{Admit, LeaseReq, RedisState, SharedState, WindowReq};
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379/0";

/// One replica's gateways: `yaml`'s gateway, its limits in Redis under `prefix`, leased
/// `calls` at a time for `within_ms`.
async fn replica(prefix: &str, yaml: &str, calls: u32, within_ms: u64) -> Gateways {
    let raw: RawGateway = serde_norway::from_str(yaml).unwrap();
    let spec = Arc::new(validate_gateway(&raw, "g").unwrap());
    let shared: Arc<dyn SharedState> = Arc::new(
        RedisState::connect(REDIS, prefix, Duration::from_secs(2))
            .await
            .expect("the Redis on 127.0.0.1:6379"),
    );
    let lease = LeaseReq {
        calls,
        within: Duration::from_millis(within_ms),
    };
    Gateways::with_shared(
        &[spec],
        Some(shared),
        Some(lease),
        keypool_telemetry::Telemetry::default(),
    )
}

/// Admits on `g`'s gateway `gw` until one is refused; answers how many were admitted.
async fn admit_all(g: &Gateways, gw: &str) -> u64 {
    let rt = g.get(gw).unwrap();
    let mut n = 0;
    while rt
        .admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())
        .await
        .is_ok()
    {
        n += 1;
    }
    n
}

async fn cleanup(prefix: &str) {
    let mut c = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

/// `ingress:100/minute` with `lease: 8`: a leases 8 and spends 1, b gets exactly the 92 left;
/// a's 7 unspent calls go back once its lease lapses (400 ms), and b spends them: 100 in all.
/// The headers count a leased call as an unleased one would (99 left after the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_a_leased_limit_exactly() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: lim\nrate_limits: ['ingress:100/minute']\n";
    let (a, b) = (
        replica(&prefix, yaml, 8, 400).await,
        replica(&prefix, yaml, 8, 400).await,
    );
    let first = a
        .get("lim")
        .unwrap()
        .admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.limit, first.remaining), (100, 99));
    assert_eq!(admit_all(&b, "lim").await, 92);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(admit_all(&b, "lim").await, 7);
    assert_eq!(admit_all(&a, "lim").await, 0);
    cleanup(&prefix).await;
}

/// 20 admissions at once on a fresh replica (`ingress:1000/minute`, `lease: 8`): one asks for
/// a lease, the others wait for it, 7 spend from it and 12 count a call each, so the window
/// holds 20 and nothing unspent (not 20 leases of 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_asks_for_one_lease() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let g = replica(
        &prefix,
        "name: burst\nrate_limits: ['ingress:1000/minute']\n",
        8,
        30_000,
    )
    .await;
    let rt = g.get("burst").unwrap();
    let all = futures_util::future::join_all(
        (0..20).map(|_| rt.admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())),
    )
    .await;
    assert!(all.iter().all(Result::is_ok));
    let probe = RedisState::connect(REDIS, &prefix, Duration::from_secs(2))
        .await
        .unwrap();
    let window = WindowReq {
        key: "gw:burst:ingress:1000/minute".into(),
        limit: 1000,
        per: Duration::from_secs(60),
    };
    let everything = LeaseReq {
        calls: 1000,
        within: Duration::from_secs(1),
    };
    let (outcome, room) = probe
        .admit_leasing(&[window], "probe", everything, Instant::now())
        .await
        .unwrap();
    assert!(matches!(outcome, Admit::Admitted { .. }));
    assert_eq!(room, 980);
    cleanup(&prefix).await;
}
