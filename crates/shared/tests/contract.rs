//! The `SharedState` contract, one suite over both implementations: in process, and the real
//! Redis on 127.0.0.1:6379 (a unique key prefix per test, removed afterwards).

// helpers shared by the two suites fail the test the same way #[test] bodies do
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::sync::Arc;
use std::time::Duration;

use keypool_shared::{
    Admit, BudgetReq, Granted, Held, InMemory, LeaseReq, Picked, RedisState, RedisTarget,
    SessionReq, SharedState, Spent, Stick, TokenReq, WindowReq,
};
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379/0";

struct Redis {
    state: Arc<RedisState>,
    prefix: String,
}

impl Redis {
    async fn new() -> Self {
        let prefix = format!("kp-test-{:016x}:", fastrand::u64(..));
        let state = RedisState::connect(REDIS, &prefix, Duration::from_secs(2))
            .await
            .expect("the Redis on 127.0.0.1:6379");
        Self {
            state: Arc::new(state),
            prefix,
        }
    }

    async fn cleanup(self) {
        keypool_shared::testing::remove_keys(REDIS, &self.prefix)
            .await
            .unwrap();
    }
}

fn w(key: &str, limit: u64, per_ms: u64) -> WindowReq {
    WindowReq {
        key: key.to_owned(),
        limit,
        per: Duration::from_millis(per_ms),
    }
}

async fn counts_exactly_and_slides(s: &dyn SharedState) {
    let win = [w("a", 3, 600)];
    for left in [2, 1, 0] {
        assert_eq!(
            s.admit(&win, Instant::now()).await.unwrap(),
            Admit::Admitted {
                remaining: vec![left]
            }
        );
    }
    match s.admit(&win, Instant::now()).await.unwrap() {
        Admit::Refused { index: 0, free_in } => assert!(free_in <= Duration::from_millis(600)),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert!(matches!(
        s.admit(&win, Instant::now()).await.unwrap(),
        Admit::Admitted { .. }
    ));
}

async fn all_or_nothing(s: &dyn SharedState) {
    let wide = w("wide", 10, 60_000);
    let narrow = w("narrow", 1, 60_000);
    assert!(matches!(
        s.admit(&[wide.clone(), narrow.clone()], Instant::now())
            .await
            .unwrap(),
        Admit::Admitted { .. }
    ));
    // narrow is full: the call is refused and `wide` does not count it
    assert!(matches!(
        s.admit(&[wide.clone(), narrow], Instant::now())
            .await
            .unwrap(),
        Admit::Refused { index: 1, .. }
    ));
    assert_eq!(
        s.admit(&[wide], Instant::now()).await.unwrap(),
        Admit::Admitted { remaining: vec![8] }
    );
}

async fn never_over_admits_under_concurrency(s: Arc<dyn SharedState>) {
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            matches!(
                s.admit(&[w("busy", 10, 60_000)], Instant::now())
                    .await
                    .unwrap(),
                Admit::Admitted { .. }
            )
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 10);
}

async fn picks_least_used_or_first_and_reserves(s: &dyn SharedState) {
    let c = [
        w("k1", 2, 60_000),
        w("k2", 100, 60_000),
        w("k3", 100, 60_000),
    ];
    let now = Instant::now;
    // least used, ties to the earlier: k1, k2, k3, then k1 (1) = k2 (1) = k3 (1) → k1 again
    let mut got = Vec::new();
    for _ in 0..5 {
        match s.pick(&c, true, now()).await.unwrap() {
            Picked::Index(i) => got.push(i),
            Picked::Busy(_) => panic!("busy"),
        }
    }
    // k1 is full after two: then k2, k3 alternate
    assert_eq!(got, [0, 1, 2, 0, 1]);
    // first with room: k1 is full, so k2
    assert_eq!(s.pick(&c, false, now()).await.unwrap(), Picked::Index(1));
    // all full: busy until the first frees up
    let full = [w("f1", 1, 60_000), w("f2", 1, 60_000)];
    s.pick(&full, true, now()).await.unwrap();
    s.pick(&full, true, now()).await.unwrap();
    match s.pick(&full, true, now()).await.unwrap() {
        Picked::Busy(d) => assert!(d > Duration::from_secs(50) && d <= Duration::from_secs(60)),
        other @ Picked::Index(_) => panic!("{other:?}"),
    }
}

async fn token_windows_hold_sums_and_settle(s: &dyn SharedState) {
    let req = |cost| TokenReq {
        key: "t1".to_owned(),
        limit: 100,
        cost,
    };
    let c = [w("r1", 1000, 60_000), w("r2", 1000, 60_000)];
    let c = &c;
    let pick = |cost: u64, id: &'static str| {
        let toks = [Some(req(cost)), None];
        async move {
            s.pick_reserving(c, &toks, false, id, Instant::now())
                .await
                .unwrap()
        }
    };
    // 40 + 40 fit in 100; a third 40 does not: the pick moves to the key without a budget
    assert_eq!(pick(40, "a").await, Picked::Index(0));
    assert_eq!(pick(40, "b").await, Picked::Index(0));
    assert_eq!(pick(40, "c").await, Picked::Index(1));
    // "a" used 10 in the end: 10 + 40 + 40 = 90, so 40 fits again
    s.settle_tokens(&req(40), "a", 10).await.unwrap();
    assert_eq!(pick(40, "d").await, Picked::Index(0));
    // full (90 + 40 > 100) and no other candidate: busy until "a" leaves the window
    let only = [w("r1", 1000, 60_000)];
    match s
        .pick_reserving(&only, &[Some(req(40))], true, "e", Instant::now())
        .await
        .unwrap()
    {
        Picked::Busy(d) => assert!(d > Duration::from_secs(50), "{d:?}"),
        other @ Picked::Index(_) => panic!("{other:?}"),
    }
    // settling an unknown reservation changes nothing
    s.settle_tokens(&req(40), "nobody", 0).await.unwrap();
    assert!(matches!(
        s.pick_reserving(&only, &[Some(req(40))], true, "f", Instant::now())
            .await
            .unwrap(),
        Picked::Busy(_)
    ));
}

/// A limit above 4096 counts in runs, not one record per call: still never over the limit.
async fn large_limits_never_over_admit(s: &dyn SharedState) {
    let win = [w("huge", 5000, 60_000)];
    for i in 0..5000 {
        let a = s.admit(&win, Instant::now()).await.unwrap();
        assert!(matches!(a, Admit::Admitted { .. }), "call {i}: {a:?}");
    }
    match s.admit(&win, Instant::now()).await.unwrap() {
        Admit::Refused { index: 0, free_in } => {
            assert!(free_in > Duration::from_secs(50) && free_in <= Duration::from_secs(60));
        }
        other => panic!("the 5001st call: {other:?}"),
    }
}

/// A large window slides whole: filled, it refuses; once its period has passed since the
/// calls, every run has left and the count starts again from zero (no stale count kept).
async fn large_windows_slide_whole(s: &dyn SharedState) {
    let win = [w("huge-slide", 5000, 4000)];
    let start = std::time::Instant::now();
    for i in 0..5000 {
        let a = s.admit(&win, Instant::now()).await.unwrap();
        assert!(matches!(a, Admit::Admitted { .. }), "call {i}: {a:?}");
    }
    let filled = start.elapsed();
    assert!(
        filled < Duration::from_millis(3500),
        "filling took {filled:?}"
    );
    assert!(matches!(
        s.admit(&win, Instant::now()).await.unwrap(),
        Admit::Refused { index: 0, .. }
    ));
    // every call came before `filled`: 4,300 ms after it, all have left
    tokio::time::sleep(Duration::from_millis(4300)).await;
    assert_eq!(
        s.admit(&win, Instant::now()).await.unwrap(),
        Admit::Admitted {
            remaining: vec![4999]
        }
    );
}

/// A lease reserves up to its calls at once, never past the window's room, and what goes
/// back is room again. On a key with a token window it holds one estimate per call there
/// too, at most a tenth of its limit and the room left, counted until settled; where that is
/// under two estimates it takes one call. Exact and large windows alike. (Shared state only:
/// one process leases nothing.)
async fn leases_reserve_ahead_and_go_back(s: &dyn SharedState) {
    let lease = |calls| LeaseReq {
        calls,
        within: Duration::from_millis(1000),
    };
    for (key, limit, calls) in [("lease-exact", 10, 4), ("lease-large", 5000, 2000)] {
        let win = [w(key, limit, 60_000)];
        let take = async |id: &str, calls| {
            let (picked, granted) = s
                .pick_leasing(&win, &[], true, id, lease(calls), Instant::now())
                .await
                .unwrap();
            (picked, granted.calls)
        };
        assert_eq!(take("l1", calls).await, (Picked::Index(0), calls));
        assert_eq!(take("l2", calls).await, (Picked::Index(0), calls));
        let rest = u32::try_from(limit).unwrap() - 2 * calls;
        assert_eq!(take("l3", calls).await, (Picked::Index(0), rest));
        assert!(matches!(take("l4", calls).await, (Picked::Busy(_), 0)));
        assert_eq!(s.return_lease(&win[0], "l1", calls, 3).await.unwrap(), 3);
        assert_eq!(take("l5", calls).await, (Picked::Index(0), 3));
        assert!(matches!(take("l6", 1).await, (Picked::Busy(_), 0)));
    }
    let win = [w("lease-tokens", 100, 60_000)];
    let tokens = |limit, cost| {
        [Some(TokenReq {
            key: "lease-tokens:tok".into(),
            limit,
            cost,
        })]
    };
    let take = async |id: &str, (limit, cost), calls| {
        s.pick_leasing(
            &win,
            &tokens(limit, cost),
            true,
            id,
            lease(calls),
            Instant::now(),
        )
        .await
        .unwrap()
    };
    let granted = |calls, tokens| Granted { calls, tokens };
    // 10 calls, 10 estimates of 30 (300 of the tenth's 300)
    assert_eq!(
        take("t1", (3000, 30), 10).await,
        (Picked::Index(0), granted(10, 300))
    );
    // a tenth of 3000 holds 6 estimates of 50
    assert_eq!(
        take("t2", (3000, 50), 10).await,
        (Picked::Index(0), granted(6, 300))
    );
    // one estimate of 200 is more than half the tenth: one call
    assert_eq!(
        take("t3", (3000, 200), 10).await,
        (Picked::Index(0), granted(1, 200))
    );
    // 800 held; the slices settle to what their calls used, and the room is back
    s.settle_tokens(&tokens(3000, 300)[0].clone().unwrap(), "t1", 40)
        .await
        .unwrap();
    s.settle_tokens(&tokens(3000, 300)[0].clone().unwrap(), "t2", 0)
        .await
        .unwrap();
    s.settle_tokens(&tokens(3000, 200)[0].clone().unwrap(), "t3", 0)
        .await
        .unwrap();
    // 40 used of 3000: a slice of 300 again
    assert_eq!(
        take("t4", (3000, 30), 10).await,
        (Picked::Index(0), granted(10, 300))
    );
    // 340 counted: one estimate of 2661 does not fit
    assert!(matches!(
        take("t5", (3000, 2661), 10).await,
        (Picked::Busy(_), _)
    ));
}

/// An admission's lease reserves up to its calls in every window at once, never past the room
/// of the fullest, and answers the remaining counts after all of them; what goes back is room
/// again in each window. Exact and large windows alike. (Shared state only.)
async fn admissions_lease_ahead_and_go_back(s: &dyn SharedState) {
    let lease = |calls| LeaseReq {
        calls,
        within: Duration::from_millis(1000),
    };
    for (tag, limit) in [("exact", 10_u64), ("large", 5000)] {
        let wins = [
            w(&format!("gw:lease-{tag}:narrow"), limit, 60_000),
            w(&format!("gw:lease-{tag}:wide"), 2 * limit, 60_000),
        ];
        let take = async |id: &str, calls| {
            s.admit_leasing(&wins, id, lease(calls), Instant::now())
                .await
                .unwrap()
        };
        let admitted = |narrow: u64, wide: u64| Admit::Admitted {
            remaining: vec![narrow, wide],
        };
        let calls = limit * 2 / 5;
        let n = u32::try_from(calls).unwrap();
        assert_eq!(
            take("l1", n).await,
            (admitted(limit - calls, 2 * limit - calls), n)
        );
        assert_eq!(
            take("l2", n).await,
            (admitted(limit - 2 * calls, 2 * limit - 2 * calls), n)
        );
        // the narrow window has room for a fifth of its limit: that is all the lease gets
        let rest = limit - 2 * calls;
        assert_eq!(
            take("l3", n).await,
            (admitted(0, limit), u32::try_from(rest).unwrap())
        );
        assert!(matches!(
            take("l4", n).await,
            (Admit::Refused { index: 0, .. }, 0)
        ));
        for win in &wins {
            assert_eq!(s.return_lease(win, "l1", n, 3).await.unwrap(), 3);
        }
        assert_eq!(take("l5", n).await, (admitted(0, limit), 3));
        assert!(matches!(
            s.admit(&wins, Instant::now()).await.unwrap(),
            Admit::Refused { index: 0, .. }
        ));
    }
}

async fn counters(s: &dyn SharedState) {
    assert_eq!(s.get("q").await.unwrap(), 0);
    s.init("q", 100).await.unwrap();
    s.init("q", 5).await.unwrap(); // the first value stays
    assert_eq!(s.add("q", 10).await.unwrap(), 110);
    assert_eq!(s.get("q").await.unwrap(), 110);
}

fn budget(key: &str, limit: u64, ttl_ms: Option<u64>) -> BudgetReq {
    BudgetReq {
        key: key.to_owned(),
        limit,
        ttl: ttl_ms.map(Duration::from_millis),
    }
}

/// Holds count against the limit until settled; a settlement replaces the estimate by the
/// spend; two budgets hold all or nothing; a budget's period lapses with its ttl.
async fn budgets_hold_settle_and_lapse(s: &dyn SharedState) {
    let (gw, caller) = (
        budget("b:gw", 100, Some(60_000)),
        budget("b:caller", 30, None),
    );
    let both = [gw.clone(), caller.clone()];
    assert_eq!(s.hold(&both, 20).await.unwrap(), Held::Held);
    // the caller has 30 - 20 held = room left, so a second hold still fits (overshoot by at
    // most its own estimate)
    assert_eq!(s.hold(&both, 20).await.unwrap(), Held::Held);
    assert_eq!(
        s.hold(&both, 1).await.unwrap(),
        Held::Over { index: 1, spent: 0 },
        "40 held of the caller's 30"
    );
    // nothing was held for the gateway by the refused call: 40 held there
    let settled = s.settle_budgets(&both, 20, 5).await.unwrap();
    assert_eq!(
        settled,
        vec![
            Spent {
                before: 0,
                after: 5
            };
            2
        ]
    );
    s.settle_budgets(&both, 20, 0).await.unwrap();
    assert_eq!(
        s.hold(std::slice::from_ref(&gw), 95).await.unwrap(),
        Held::Held
    );
    assert_eq!(
        s.hold(std::slice::from_ref(&gw), 1).await.unwrap(),
        Held::Over { index: 0, spent: 5 }
    );
    s.settle_budgets(std::slice::from_ref(&gw), 95, 95)
        .await
        .unwrap();
    assert_eq!(
        s.hold(&[gw], 1).await.unwrap(),
        Held::Over {
            index: 0,
            spent: 100
        }
    );
    // a restore sets the spend only where there is none
    s.init_budget(&caller, 999).await.unwrap();
    let restored = budget("b:restored", 10, Some(200));
    s.init_budget(&restored, 10).await.unwrap();
    s.init_budget(&restored, 0).await.unwrap();
    assert_eq!(
        s.hold(std::slice::from_ref(&restored), 1).await.unwrap(),
        Held::Over {
            index: 0,
            spent: 10
        }
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.hold(&[restored], 1).await.unwrap(),
        Held::Held,
        "the period lapsed"
    );
}

/// A budget slice holds what was wanted while the budgets have room for it, then their
/// smallest room, never less than the request's own amount; settling it gives back the slice
/// and adds what its requests spent. (Shared state only.)
async fn budget_slices_hold_up_to_the_room(s: &dyn SharedState) {
    let (gw, caller) = (
        budget("slice:gw", 100, Some(60_000)),
        budget("slice:caller", 1000, None),
    );
    let both = [gw.clone(), caller.clone()];
    assert_eq!(s.hold_slice(&both, 10, 40).await.unwrap(), (Held::Held, 40));
    assert_eq!(s.hold_slice(&both, 10, 40).await.unwrap(), (Held::Held, 40));
    // 20 left in the gateway's budget: that is the slice
    assert_eq!(s.hold_slice(&both, 10, 40).await.unwrap(), (Held::Held, 20));
    assert_eq!(
        s.hold_slice(&both, 10, 40).await.unwrap(),
        (Held::Over { index: 0, spent: 0 }, 0)
    );
    // the first slice's requests spent 35 of its 40: 5 is room again
    s.settle_budgets(&both, 40, 35).await.unwrap();
    // less room (5) than the request's amount (10): held whole, as a lone hold would be
    assert_eq!(s.hold_slice(&both, 10, 40).await.unwrap(), (Held::Held, 10));
    assert!(matches!(
        s.hold(&both, 1).await.unwrap(),
        Held::Over { index: 0, .. }
    ));
}

async fn pins_last_their_ttl(s: &dyn SharedState) {
    assert_eq!(s.pinned("resp_a").await.unwrap(), None);
    s.pin("resp_a", "key-1", Duration::from_secs(60))
        .await
        .unwrap();
    s.pin("resp_b", "key-2", Duration::from_millis(150))
        .await
        .unwrap();
    assert_eq!(s.pinned("resp_a").await.unwrap().as_deref(), Some("key-1"));
    assert_eq!(s.pinned("resp_b").await.unwrap().as_deref(), Some("key-2"));
    // a later pin replaces the earlier one
    s.pin("resp_a", "key-3", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(s.pinned("resp_a").await.unwrap().as_deref(), Some("key-3"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.pinned("resp_b").await.unwrap(), None, "expired");
}

/// A session keeps the key it named while that key has room, whatever least-used says; then
/// it moves, and keeps the new key; a session new here takes the usual choice.
async fn sessions_keep_their_key(s: &dyn SharedState) {
    let c = [
        w("s1", 3, 60_000),
        w("s2", 100, 60_000),
        w("s3", 100, 60_000),
    ];
    let session = |name: &str| SessionReq {
        key: format!("aff:{name}"),
        ttl: Duration::from_secs(60),
    };
    let mut n = 0;
    let mut pick = async |cands: &[WindowReq], name: &str| {
        n += 1;
        s.pick_in_session(
            cands,
            &[],
            true,
            &format!("call-{n}"),
            &session(name),
            Instant::now(),
        )
        .await
        .unwrap()
    };
    assert_eq!(pick(&c, "a").await, (Picked::Index(0), Stick::Miss));
    // s1 has the most calls now, but the session stays while it has room (3 a minute)
    assert_eq!(pick(&c, "a").await, (Picked::Index(0), Stick::Hit));
    assert_eq!(pick(&c, "a").await, (Picked::Index(0), Stick::Hit));
    // another session spreads least-used
    assert_eq!(pick(&c, "b").await, (Picked::Index(1), Stick::Miss));
    // s1 is full: session a moves to the least used, and stays there
    assert_eq!(pick(&c, "a").await, (Picked::Index(2), Stick::Moved));
    assert_eq!(pick(&c, "a").await, (Picked::Index(2), Stick::Hit));
    // its key no longer a candidate (cooling, or tried already): it moves
    assert_eq!(pick(&c[..2], "a").await, (Picked::Index(1), Stick::Moved));
    // nothing with room: busy, and the session keeps what it named
    let full = [w("s1", 3, 60_000)];
    assert!(matches!(pick(&full, "a").await.0, Picked::Busy(_)));
    assert_eq!(pick(&c, "a").await, (Picked::Index(1), Stick::Hit));
}

/// A session's pick with a lease reserves the calls in the key the session keeps (or moves
/// to), as a plain leased pick does.
async fn session_picks_lease_their_key(s: &dyn SharedState) {
    let c = [w("l1", 5, 60_000), w("l2", 100, 60_000)];
    let session = SessionReq {
        key: "aff:leased".into(),
        ttl: Duration::from_secs(60),
    };
    let lease = LeaseReq {
        calls: 4,
        within: Duration::from_secs(1),
    };
    let pick = async |id: &str| {
        let (picked, stick, granted) = s
            .pick_in_session_leasing(&c, &[], true, id, (&session, lease), Instant::now())
            .await
            .unwrap();
        (picked, stick, granted.calls)
    };
    assert_eq!(pick("x1").await, (Picked::Index(0), Stick::Miss, 4));
    // l1 has room for 1 more: the session keeps it, leasing what is left
    assert_eq!(pick("x2").await, (Picked::Index(0), Stick::Hit, 1));
    // full: the session moves to l2 and leases there
    assert_eq!(pick("x3").await, (Picked::Index(1), Stick::Moved, 4));
    assert_eq!(pick("x4").await, (Picked::Index(1), Stick::Hit, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_contract() {
    let s: Arc<dyn SharedState> = Arc::new(InMemory::default());
    counts_exactly_and_slides(s.as_ref()).await;
    all_or_nothing(s.as_ref()).await;
    never_over_admits_under_concurrency(s.clone()).await;
    picks_least_used_or_first_and_reserves(s.as_ref()).await;
    token_windows_hold_sums_and_settle(s.as_ref()).await;
    counters(s.as_ref()).await;
    large_limits_never_over_admit(s.as_ref()).await;
    large_windows_slide_whole(s.as_ref()).await;
    pins_last_their_ttl(s.as_ref()).await;
    budgets_hold_settle_and_lapse(s.as_ref()).await;
    sessions_keep_their_key(s.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_contract() {
    let r = Redis::new().await;
    let s: Arc<dyn SharedState> = r.state.clone();
    counts_exactly_and_slides(s.as_ref()).await;
    all_or_nothing(s.as_ref()).await;
    never_over_admits_under_concurrency(s.clone()).await;
    picks_least_used_or_first_and_reserves(s.as_ref()).await;
    token_windows_hold_sums_and_settle(s.as_ref()).await;
    counters(s.as_ref()).await;
    large_limits_never_over_admit(s.as_ref()).await;
    large_windows_slide_whole(s.as_ref()).await;
    leases_reserve_ahead_and_go_back(s.as_ref()).await;
    admissions_lease_ahead_and_go_back(s.as_ref()).await;
    session_picks_lease_their_key(s.as_ref()).await;
    budget_slices_hold_up_to_the_room(s.as_ref()).await;
    pins_last_their_ttl(s.as_ref()).await;
    budgets_hold_settle_and_lapse(s.as_ref()).await;
    sessions_keep_their_key(s.as_ref()).await;
    // ... in at most 1,025 runs (here a few: the calls came within a second)
    {
        let mut c = redis::Client::open(REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let runs: u64 = redis::cmd("ZCARD")
            .arg(format!("{}huge:b", r.prefix))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!((1..=1025).contains(&runs), "{runs} runs");
        let log: u64 = redis::cmd("EXISTS")
            .arg(format!("{}huge", r.prefix))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(log, 0, "no per-call log for a large limit");
        // a large window's three keys lapse together, `per + step` and the longest lease
        // after its newest run started (60,000 ms, 58 ms steps and 60,000 ms here)
        let mut ttls = Vec::new();
        for part in ["b", "c", "n"] {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(format!("{}huge:{part}", r.prefix))
                .query_async(&mut c)
                .await
                .unwrap();
            ttls.push(ttl);
        }
        assert!(
            ttls.iter().all(|t| (100_000..=120_058).contains(t)),
            "{ttls:?}"
        );
        assert!(
            ttls.iter().max().unwrap() - ttls.iter().min().unwrap() < 1_000,
            "{ttls:?}"
        );
    }
    // two "replicas" (two connections) share the same windows
    let other = RedisState::connect(REDIS, &r.prefix, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(matches!(
        other
            .admit(&[w("busy", 10, 60_000)], Instant::now())
            .await
            .unwrap(),
        Admit::Refused { .. }
    ));
    // ... and the pins
    assert_eq!(
        other.pinned("resp_a").await.unwrap().as_deref(),
        Some("key-3")
    );
    r.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_fails_fast() {
    // nothing listens on port 1
    let err = RedisState::connect("redis://127.0.0.1:1/0", "x:", Duration::from_millis(200))
        .await
        .err()
        .unwrap();
    assert!(!err.0.is_empty());
}

async fn unbudgeted_windows_rank_evenly(s: &dyn SharedState) {
    let c = [
        w("u1", u64::MAX, 3_600_000),
        w("u2", u64::MAX, 3_600_000),
        w("u3", u64::MAX, 3_600_000),
    ];
    let mut counts = [0usize; 3];
    for _ in 0..30 {
        match s.pick(&c, true, Instant::now()).await.unwrap() {
            Picked::Index(i) => counts[i] += 1,
            Picked::Busy(_) => panic!("unbudgeted windows are never busy"),
        }
    }
    assert_eq!(counts, [10, 10, 10]);
}

/// A lease on unbudgeted windows takes all its calls (there is no room to run out of) and
/// counts them for the ranking, so the next picks go to the others first; giving one back is
/// nothing to do. (Shared state only.)
async fn unbudgeted_leases_count_for_the_ranking(s: &dyn SharedState) {
    let c = [w("ul1", u64::MAX, 3_600_000), w("ul2", u64::MAX, 3_600_000)];
    let lease = LeaseReq {
        calls: 8,
        within: Duration::from_secs(1),
    };
    let take = async |id: &str| {
        let (picked, granted) = s
            .pick_leasing(&c, &[], true, id, lease, Instant::now())
            .await
            .unwrap();
        (picked, granted.calls)
    };
    assert_eq!(take("a").await, (Picked::Index(0), 8));
    assert_eq!(take("b").await, (Picked::Index(1), 8));
    assert_eq!(take("c").await, (Picked::Index(0), 8));
    for _ in 0..8 {
        assert_eq!(
            s.pick(&c, true, Instant::now()).await.unwrap(),
            Picked::Index(1)
        );
    }
    assert_eq!(s.return_lease(&c[0], "a", 8, 7).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbudgeted_picks_spread_evenly_in_both() {
    let mem = InMemory::default();
    unbudgeted_windows_rank_evenly(&mem).await;
    let r = Redis::new().await;
    unbudgeted_windows_rank_evenly(r.state.as_ref()).await;
    unbudgeted_leases_count_for_the_ranking(r.state.as_ref()).await;
    r.cleanup().await;
}

/// A 3-master Redis Cluster the test starts: the same contract holds, the pool's keys land in
/// one slot, and two connections (two replicas) share the windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_contract() {
    let servers = keypool_shared::testing::Servers::cluster(3).expect("a Redis Cluster");
    let target = RedisTarget::Cluster(servers.urls(0));
    let connect = || RedisState::connect_to(&target, "kp-cluster:", Duration::from_secs(2));
    let s: Arc<dyn SharedState> = Arc::new(connect().await.unwrap());
    counts_exactly_and_slides(s.as_ref()).await;
    all_or_nothing(s.as_ref()).await;
    never_over_admits_under_concurrency(s.clone()).await;
    picks_least_used_or_first_and_reserves(s.as_ref()).await;
    token_windows_hold_sums_and_settle(s.as_ref()).await;
    counters(s.as_ref()).await;
    large_limits_never_over_admit(s.as_ref()).await;
    leases_reserve_ahead_and_go_back(s.as_ref()).await;
    admissions_lease_ahead_and_go_back(s.as_ref()).await;
    budget_slices_hold_up_to_the_room(s.as_ref()).await;
    unbudgeted_windows_rank_evenly(s.as_ref()).await;
    pins_last_their_ttl(s.as_ref()).await;
    budgets_hold_settle_and_lapse(s.as_ref()).await;
    sessions_keep_their_key(s.as_ref()).await;
    let other = connect().await.unwrap();
    assert!(matches!(
        other
            .admit(&[w("busy", 10, 60_000)], Instant::now())
            .await
            .unwrap(),
        Admit::Refused { .. }
    ));
    // the pool's keys (all of these but the pins and the gateways' `gw:lease-*`) share one
    // hash tag: all on the master that holds `{kp-cluster:}` (cluster_spread.rs: where the
    // others go)
    let holder = servers.master_of("{kp-cluster:}x").unwrap();
    for (port, keys) in servers.keys_by_port().unwrap() {
        let pool = keys
            .iter()
            .filter(|k| k.starts_with("{kp-cluster:}"))
            .count();
        assert_eq!(pool > 0, port == holder, "{port}: {keys:?}");
        assert!(
            keys.iter().all(
                |k| ["{kp-cluster:}", "{kp-cluster:pin:", "{kp-cluster:gw:lease-"]
                    .iter()
                    .any(|p| k.starts_with(p))
            ),
            "{keys:?}"
        );
    }
}

/// The master that holds the slot is killed while calls are in flight: every call ends (an
/// error within its timeout, never a hang), and the state answers again when the cluster does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_mid_load_fails_calls_fast() {
    let mut servers = keypool_shared::testing::Servers::cluster(3).expect("a Redis Cluster");
    let target = RedisTarget::Cluster(servers.urls(0));
    let s = Arc::new(
        RedisState::connect_to(&target, "kp-kill:", Duration::from_millis(200))
            .await
            .unwrap(),
    );
    let load = {
        let s = s.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                let t = std::time::Instant::now();
                match s
                    .admit(&[w("load", 1_000_000, 60_000)], Instant::now())
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                slowest = slowest.max(t.elapsed());
            }
            (ok, failed, slowest)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let holder = servers.master_of("{kp-kill:}x").unwrap();
    servers.kill(servers.index_of(holder).unwrap());
    let (ok, failed, slowest) = load.await.unwrap();
    assert!(ok > 0, "calls succeeded before the kill");
    assert!(failed > 0, "calls failed after the kill");
    assert!(
        slowest < Duration::from_secs(2),
        "a call hung for {slowest:?}"
    );
}

/// A master watched by Sentinel: the contract holds through it, and when the master dies the
/// state follows Sentinel to the promoted replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_contract_and_failover() {
    let mut servers = keypool_shared::testing::Servers::sentinel("kpm").expect("a Sentinel");
    let target = RedisTarget::Sentinel {
        master: "kpm".into(),
        nodes: servers.urls(2),
        password: None,
        db: 0,
    };
    let s: Arc<dyn SharedState> = Arc::new(
        RedisState::connect_to(&target, "kp-sentinel:", Duration::from_millis(300))
            .await
            .unwrap(),
    );
    counts_exactly_and_slides(s.as_ref()).await;
    all_or_nothing(s.as_ref()).await;
    counters(s.as_ref()).await;
    let old = servers.ports[0];
    servers.kill(0);
    let new = servers.wait_for_failover("kpm", old).unwrap();
    assert_eq!(new, servers.ports[1]);
    // within a few seconds the state writes to the new master
    let start = std::time::Instant::now();
    loop {
        if s.add("after-failover", 1).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never followed the failover"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let win = [w("after", 2, 60_000)];
    assert!(matches!(
        s.admit(&win, Instant::now()).await.unwrap(),
        Admit::Admitted { .. }
    ));
    assert!(matches!(
        s.admit(&win, Instant::now()).await.unwrap(),
        Admit::Admitted { .. }
    ));
    assert!(matches!(
        s.admit(&win, Instant::now()).await.unwrap(),
        Admit::Refused { .. }
    ));
}
