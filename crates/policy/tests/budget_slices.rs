//! USD budgets held in slices (`redis.lease`), over the real Redis on 127.0.0.1:6379 (a
//! unique key prefix per test, removed afterwards): two replicas (two `Budgets`, two
//! connections) admit exactly what the budget allows, a slice is never bigger than the room
//! left, once the slices lapse Redis holds the exact spend and nothing held, and a request
//! given up mid-hold strands nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use keypool_config::budget::{Budget, Period};
use keypool_policy::budget::{Budgets, Hold, Wanted};
use keypool_shared::{LeaseReq, RedisState, SharedState};

const REDIS: &str = "redis://127.0.0.1:6379/0";
/// $1, and a request's estimate of $0.001.
const DOLLAR: u64 = 1_000_000_000;
const ESTIMATE: u64 = 1_000_000;

async fn replica(prefix: &str, calls: u32, within_ms: u64) -> Arc<Budgets> {
    replica_at(REDIS, prefix, calls, within_ms).await
}

async fn replica_at(url: &str, prefix: &str, calls: u32, within_ms: u64) -> Arc<Budgets> {
    let shared: Arc<dyn SharedState> = Arc::new(
        RedisState::connect(url, prefix, Duration::from_secs(2))
            .await
            .expect("the Redis on 127.0.0.1:6379"),
    );
    let lease = LeaseReq {
        calls,
        within: Duration::from_millis(within_ms),
    };
    Arc::new(Budgets::new(
        Some(shared),
        Some(lease),
        keypool_telemetry::Telemetry::default(),
    ))
}

fn wanted() -> Wanted {
    let budget = Budget {
        nanos: DOLLAR,
        period: Period::Total,
    };
    Wanted::key("k1", budget, Utc::now())
}

/// Holds an estimate on `b` until the budget refuses; answers the holds.
async fn hold_all(b: &Arc<Budgets>) -> Vec<Hold> {
    let mut holds = Vec::new();
    while let Ok(Some(h)) = b.hold(vec![wanted()], ESTIMATE).await {
        holds.push(h);
    }
    holds
}

/// The budget's `spent` and `held` in Redis.
async fn counters(prefix: &str) -> (u64, u64) {
    counters_at(REDIS, prefix).await
}

async fn counters_at(url: &str, prefix: &str) -> (u64, u64) {
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (spent, held): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
        .arg(format!("{prefix}{}", wanted().req.key))
        .arg("spent")
        .arg("held")
        .query_async(&mut c)
        .await
        .unwrap();
    (spent.unwrap_or(0), held.unwrap_or(0))
}

async fn cleanup(prefix: &str) {
    keypool_shared::testing::remove_keys(REDIS, prefix)
        .await
        .unwrap();
}

/// $1 with estimates of $0.001 and `lease: 8`: a holds a slice of 8 estimates and uses 1, b
/// gets exactly the 992 left (in slices of 8), a the 7 left of its slice: 1,000 in all, as
/// without slices. Each request spends half its estimate; once the slices lapse (400 ms)
/// Redis holds nothing and has exactly the $0.50 spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_a_budget_in_slices_exactly() {
    let prefix = format!("kp-slices-{:016x}:", fastrand::u64(..));
    let (a, b) = (
        replica(&prefix, 8, 400).await,
        replica(&prefix, 8, 400).await,
    );
    let first = a.hold(vec![wanted()], ESTIMATE).await.unwrap().unwrap();
    assert_eq!(counters(&prefix).await, (0, 8 * ESTIMATE));
    let on_b = hold_all(&b).await;
    assert_eq!(on_b.len(), 992);
    let mut on_a = hold_all(&a).await;
    assert_eq!(on_a.len(), 7);
    on_a.push(first);
    for h in on_a.into_iter().chain(on_b) {
        h.settle(ESTIMATE / 2);
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(counters(&prefix).await, (DOLLAR / 2, 0));
    cleanup(&prefix).await;
}

/// With $0.005 left, a slice is that room (5 estimates), not 8: the budget is never held past
/// its amount, and b is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_is_never_bigger_than_the_room_left() {
    let prefix = format!("kp-slices-{:016x}:", fastrand::u64(..));
    let (a, b) = (
        replica(&prefix, 8, 400).await,
        replica(&prefix, 8, 400).await,
    );
    a.restore(&wanted(), DOLLAR - 5 * ESTIMATE).await;
    let on_a = hold_all(&a).await;
    assert_eq!(on_a.len(), 5);
    assert_eq!(
        counters(&prefix).await,
        (DOLLAR - 5 * ESTIMATE, 5 * ESTIMATE)
    );
    assert!(hold_all(&b).await.is_empty());
    drop(on_a); // given up unsettled: they spent nothing
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(counters(&prefix).await, (DOLLAR - 5 * ESTIMATE, 0));
    cleanup(&prefix).await;
}

/// A replica stopping gracefully settles its slices at once (not when they would lapse, 30 s
/// here): Redis holds nothing of them and has what their requests spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_settles_the_slices_at_once() {
    let prefix = format!("kp-slices-{:016x}:", fastrand::u64(..));
    let a = replica(&prefix, 8, 30_000).await;
    for _ in 0..3 {
        a.hold(vec![wanted()], ESTIMATE)
            .await
            .unwrap()
            .unwrap()
            .settle(ESTIMATE / 4);
    }
    assert_eq!(counters(&prefix).await, (0, 8 * ESTIMATE));
    a.settle_slices().await;
    assert_eq!(counters(&prefix).await, (3 * ESTIMATE / 4, 0));
    cleanup(&prefix).await;
}

/// One hold made and given back on the Redis at `url`, so its script is loaded there: a call
/// sent while the server is paused then runs as it is once the pause ends (a fresh server
/// would answer `NOSCRIPT`, and the call would be sent again only if its caller still waited).
async fn load_the_script(url: &str) {
    let b = replica_at(url, "s:", 1, 400).await;
    b.hold(vec![wanted()], ESTIMATE)
        .await
        .unwrap()
        .unwrap()
        .settle(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(counters_at(url, "s:").await, (0, 0));
}

/// A request on `a` given up with its hold sent and unanswered: `redis` (the script loaded)
/// paused, the request dropped after 100 ms, then time for the pause to end and the call to
/// run.
async fn give_up_a_hold(redis: &keypool_shared::testing::Servers, a: &Arc<Budgets>) {
    let url = &redis.urls(0)[0];
    load_the_script(url).await;
    redis.pause(0, 0.4);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let given_up =
        tokio::time::timeout(Duration::from_millis(100), a.hold(vec![wanted()], ESTIMATE)).await;
    assert!(given_up.is_err(), "answered while Redis was paused");
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// A request given up while its slice is being asked for (the client went away) does not lose
/// the slice: the ask finishes on its own and the next request holds against it, so Redis
/// holds one slice, not a stranded one and a second. (A Redis of the test's own, paused so the
/// request is given up with its ask sent and not yet answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_mid_ask_leaves_the_slice_to_the_next() {
    let redis = keypool_shared::testing::Servers::single().expect("a redis-server");
    let url = &redis.urls(0)[0];
    let a = replica_at(url, "s:", 8, 30_000).await;
    give_up_a_hold(&redis, &a).await;
    assert_eq!(counters_at(url, "s:").await, (0, 8 * ESTIMATE));
    let next = a.hold(vec![wanted()], ESTIMATE).await.unwrap().unwrap();
    assert_eq!(counters_at(url, "s:").await, (0, 8 * ESTIMATE));
    next.settle(ESTIMATE);
    a.settle_slices().await;
    assert_eq!(counters_at(url, "s:").await, (ESTIMATE, 0));
}

/// Without slices too: a request given up while its hold is on its way (the client went away)
/// leaves nothing held once the hold has landed (it is given back), where it used to stay held
/// until the budget's period ended. (A Redis of the test's own, paused as above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_mid_hold_leaves_nothing_held() {
    let redis = keypool_shared::testing::Servers::single().expect("a redis-server");
    let url = &redis.urls(0)[0];
    let a = replica_at(url, "s:", 1, 400).await;
    give_up_a_hold(&redis, &a).await;
    assert_eq!(counters_at(url, "s:").await, (0, 0));
}
