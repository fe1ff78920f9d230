//! The pool's actors driven through their messages, on a real actix runtime.

use std::sync::Arc;
use std::time::Duration;

use keypool_config::{LbPolicy, ModelRule, UpstreamKey};
use tokio::time::Instant;

use crate::{BusyCause, Health, KeyPool, Lease, NoKey, Outcome, Pick, PoolHandle};

fn key(name: &str, rpm: Option<u32>, tpm: Option<u64>) -> Arc<UpstreamKey> {
    Arc::new(UpstreamKey {
        rpm,
        tpm,
        ..UpstreamKey::plain(name, "http://127.0.0.1:1/v1").unwrap()
    })
}

fn pick(est_tokens: u64, exclude: Vec<u64>) -> Pick {
    Pick {
        model: "gpt-4o-mini".into(),
        path: "/v1/chat/completions".into(),
        access: crate::KeyAccess::Token(Some("t".into())),
        passthrough: false,
        est_tokens,
        exclude,
        only: None,
        session: None,
    }
}

/// A pick in session `name` (kept a minute unused).
fn in_session(name: &str) -> Pick {
    Pick {
        session: Some(crate::SessionReq {
            key: format!("aff:{name}"),
            ttl: Duration::from_secs(60),
        }),
        ..pick(10, vec![])
    }
}

/// One pick (settled at once) in each of `sessions`, in turn: the key each got and what its
/// session did (`hit`, `miss`, `move`).
async fn session_picks(pool: &PoolHandle, sessions: &[&str]) -> Vec<(String, &'static str)> {
    let mut seen = vec![];
    for s in sessions {
        let l = pool.pick(&in_session(s)).await.unwrap();
        let stick = l.affinity.map_or("none", crate::Stick::as_str);
        seen.push((l.key.name.to_string(), stick));
        l.settle(ok());
    }
    seen
}

async fn lease(pool: &PoolHandle) -> Result<Lease, NoKey> {
    pool.pick(&pick(10, vec![])).await
}

fn ok() -> Outcome {
    Outcome::Success {
        tokens: Some(10),
        latency: Duration::from_millis(5),
    }
}

#[actix_rt::test]
async fn least_used_spreads_four_each_then_refuses_with_the_reset_time() {
    let keys = [
        key("a", Some(4), None),
        key("b", Some(4), None),
        key("c", Some(4), None),
    ];
    let pool = KeyPool::start(&keys, LbPolicy::LeastUsed);
    let start = Instant::now();
    let mut per_key = std::collections::HashMap::<String, u32>::new();
    for _ in 0..12 {
        let l = lease(&pool).await.unwrap();
        *per_key.entry(l.key.name.to_string()).or_default() += 1;
        l.settle(ok());
    }
    assert_eq!(per_key.values().copied().collect::<Vec<_>>(), vec![4, 4, 4]);
    match lease(&pool).await {
        Err(NoKey::Busy { until, cause }) => {
            assert_eq!(cause, BusyCause::Budget);
            let wait = until - start;
            assert!(
                wait > Duration::from_secs(59) && wait <= Duration::from_secs(61),
                "{wait:?}"
            );
        }
        other => panic!("expected busy, got {other:?}"),
    }
}

#[actix_rt::test]
async fn order_policy_uses_the_first_key_until_its_budget_is_gone() {
    let keys = [key("a", Some(2), None), key("b", None, None)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    let mut names = vec![];
    for _ in 0..4 {
        let l = lease(&pool).await.unwrap();
        names.push(l.key.name.to_string());
        l.settle(ok());
    }
    assert_eq!(names, vec!["a", "a", "b", "b"]);
}

#[actix_rt::test]
async fn exclude_skips_tried_keys_and_model_rules_apply() {
    let mut only_embed = (*key("e", None, None)).clone();
    only_embed.allow = vec![ModelRule::parse("text-embedding-*")];
    let keys = [key("a", None, None), Arc::new(only_embed)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    let first = lease(&pool).await.unwrap();
    assert_eq!(&*first.key.name, "a");
    let id = first.key_id;
    first.settle(ok());
    // chat model: only "a" allows it; excluded → nothing serves
    assert_eq!(
        pool.pick(&pick(1, vec![id])).await.unwrap_err(),
        NoKey::NoneServes
    );
    let mut p = pick(1, vec![id]);
    p.model = "text-embedding-3-small".into();
    assert_eq!(&*pool.pick(&p).await.unwrap().key.name, "e");
}

#[actix_rt::test]
async fn upstream_429_cools_the_key_for_its_retry_after() {
    let keys = [key("a", None, None), key("b", None, None)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    let l = lease(&pool).await.unwrap();
    assert_eq!(&*l.key.name, "a");
    l.settle(Outcome::RateLimited {
        cooldown: Some(Duration::from_millis(300)),
    });
    // let the settle land
    let states = pool.list().await;
    assert!(matches!(states[0].health, Health::CoolingUntil(_)));
    for _ in 0..3 {
        let l = lease(&pool).await.unwrap();
        assert_eq!(&*l.key.name, "b");
        l.settle(ok());
    }
    tokio::time::sleep(Duration::from_millis(320)).await;
    assert_eq!(&*lease(&pool).await.unwrap().key.name, "a");
}

#[actix_rt::test]
async fn only_cooling_keys_report_the_cooldown_end() {
    let pool = KeyPool::start(&[key("a", None, None)], LbPolicy::LeastUsed);
    let start = Instant::now();
    lease(&pool).await.unwrap().settle(Outcome::RateLimited {
        cooldown: Some(Duration::from_secs(5)),
    });
    pool.list().await;
    match lease(&pool).await {
        Err(NoKey::Busy { until, cause }) => {
            assert_eq!(cause, BusyCause::Cooling);
            assert!(until - start >= Duration::from_secs(4));
        }
        other => panic!("expected cooling, got {other:?}"),
    }
}

#[actix_rt::test]
async fn upstream_401_disables_the_key() {
    let pool = KeyPool::start(&[key("a", None, None)], LbPolicy::LeastUsed);
    lease(&pool)
        .await
        .unwrap()
        .settle(Outcome::AuthFailed { status: 401 });
    let states = pool.list().await;
    assert!(matches!(states[0].health, Health::Disabled { .. }));
    assert_eq!(states[0].counters.failure, 1);
    assert_eq!(lease(&pool).await.unwrap_err(), NoKey::AllDisabled);
}

#[actix_rt::test]
async fn repeated_failures_cool_a_key_down() {
    let keys = [key("a", None, None), key("b", None, None)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    for _ in 0..3 {
        let l = lease(&pool).await.unwrap();
        assert_eq!(&*l.key.name, "a");
        l.settle(Outcome::ServerError { status: 500 });
    }
    pool.list().await;
    assert_eq!(&*lease(&pool).await.unwrap().key.name, "b");
}

/// Attempts in flight when a key cooled down that fail after it (a burst failing at once) do
/// not lengthen the cooldown: ten failing together cool it for 1 s, not for the 30 s that ten
/// failures one after another would reach.
#[actix_rt::test]
async fn a_burst_of_failures_in_flight_together_cools_a_key_once() {
    let pool = KeyPool::start(&[key("a", None, None)], LbPolicy::Order);
    let mut leases = Vec::new();
    for _ in 0..10 {
        leases.push(lease(&pool).await.unwrap());
    }
    for l in leases {
        l.settle(Outcome::ServerError { status: 503 });
    }
    let states = pool.list().await;
    let Health::CoolingUntil(until) = states[0].health else {
        panic!("{:?}", states[0].health);
    };
    assert!(
        until <= Instant::now() + Duration::from_secs(1),
        "cooled longer than 1 s"
    );
    assert_eq!(states[0].counters.failure, 10, "every failure is counted");
}

/// A burst of connections the upstream's idle timeout closed as they were reused leaves the
/// key healthy: it is still picked, with no failure streak to carry on.
#[actix_rt::test]
async fn stale_connections_do_not_cool_a_key_down() {
    let keys = [key("a", None, None), key("b", None, None)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    for _ in 0..10 {
        let l = lease(&pool).await.unwrap();
        assert_eq!(&*l.key.name, "a");
        l.settle(Outcome::StaleConnection);
    }
    let states = pool.list().await;
    assert!(
        matches!(states[0].health, Health::Healthy),
        "{:?}",
        states[0].health
    );
    assert_eq!(&*lease(&pool).await.unwrap().key.name, "a");
    // nor do they add to a real failure's streak: two failures after them do not cool it
    for _ in 0..2 {
        lease(&pool)
            .await
            .unwrap()
            .settle(Outcome::ServerError { status: 500 });
    }
    pool.list().await;
    assert_eq!(&*lease(&pool).await.unwrap().key.name, "a");
}

#[actix_rt::test]
async fn dropped_lease_is_settled_as_cancelled() {
    let pool = KeyPool::start(&[key("a", None, None)], LbPolicy::LeastUsed);
    let l = lease(&pool).await.unwrap();
    assert_eq!(pool.list().await[0].in_flight, 1);
    drop(l);
    let s = &pool.list().await[0];
    assert_eq!(s.in_flight, 0);
    assert_eq!(s.counters.failure, 0);
}

#[actix_rt::test]
async fn tpm_reserves_the_estimate_and_settles_the_real_count() {
    let pool = KeyPool::start(&[key("a", None, Some(1000))], LbPolicy::LeastUsed);
    let l1 = pool.pick(&pick(700, vec![])).await.unwrap();
    // 700 reserved: another 700 does not fit
    assert!(matches!(
        pool.pick(&pick(700, vec![])).await,
        Err(NoKey::Busy {
            cause: BusyCause::Budget,
            ..
        })
    ));
    l1.settle(Outcome::Success {
        tokens: Some(100),
        latency: Duration::from_millis(1),
    });
    // settled to 100: now it fits
    let l2 = pool.pick(&pick(700, vec![])).await.unwrap();
    assert_eq!(pool.list().await[0].window_tokens, 800);
    l2.settle(ok());
}

#[actix_rt::test]
async fn seeds_restore_counters_and_the_last_minute() {
    use crate::{KeyCounters, KeySeed};
    let mut seeds = std::collections::HashMap::new();
    seeds.insert(
        "a".to_owned(),
        KeySeed {
            counters: KeyCounters {
                used: 7,
                success: 6,
                failure: 1,
                last_error: None,
            },
            recent: vec![
                (Duration::from_secs(10), 5),
                (Duration::from_secs(30), 5),
                (Duration::from_secs(90), 5),
            ],
        },
    );
    let keys = [key("a", Some(3), None), key("b", Some(3), None)];
    let pool = KeyPool::start_seeded(
        &keys,
        LbPolicy::LeastUsed,
        &seeds,
        keypool_shared::HealthAnnouncer::default(),
        keypool_telemetry::Telemetry::default(),
    );
    let states = pool.list().await;
    assert_eq!(states[0].counters.used, 7);
    assert_eq!(
        states[0].window_requests, 2,
        "the 90 s old request is outside the window"
    );
    // least-used prefers b, which served nothing in the last minute
    assert_eq!(&*lease(&pool).await.unwrap().key.name, "b");
}

#[actix_rt::test]
async fn anonymous_callers_only_reach_noauth_keys() {
    let mut open = (*key("open", None, None)).clone();
    open.noauth = true;
    let keys = [key("closed", None, None), Arc::new(open)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    let mut p = pick(1, vec![]);
    p.access = crate::KeyAccess::Token(None);
    assert_eq!(&*pool.pick(&p).await.unwrap().key.name, "open");
}

#[actix_rt::test]
async fn an_open_gateway_lets_anonymous_callers_use_every_key() {
    let pool = KeyPool::start(&[key("a", None, None)], LbPolicy::Order);
    let mut p = pick(1, vec![]);
    p.access = crate::KeyAccess::Token(None);
    assert_eq!(
        pool.pick(&p).await.unwrap_err(),
        NoKey::NoneServes,
        "not open: noauth keys only"
    );
    p.access = crate::KeyAccess::All;
    assert_eq!(&*pool.pick(&p).await.unwrap().key.name, "a");
}

#[actix_rt::test]
async fn asis_keys_serve_only_requests_with_a_credential_to_pass_on() {
    let mut asis = (*key("asis", None, None)).clone();
    asis.passthrough_auth = true;
    let pool = KeyPool::start(&[Arc::new(asis)], LbPolicy::Order);
    let mut p = pick(1, vec![]);
    p.access = crate::KeyAccess::All;
    assert_eq!(pool.pick(&p).await.unwrap_err(), NoKey::NoneServes);
    p.passthrough = true;
    assert_eq!(&*pool.pick(&p).await.unwrap().key.name, "asis");
}

#[actix_rt::test]
async fn unbudgeted_keys_are_counted_without_messages_and_spread_at_once() {
    let keys = [
        key("a", None, None),
        key("b", None, None),
        key("c", None, None),
    ];
    let pool = KeyPool::start(&keys, LbPolicy::LeastUsed);
    // 30 leases taken back to back, before any actor tick: the tally's pending counts rank them
    let mut held = vec![];
    for _ in 0..30 {
        held.push(lease(&pool).await.unwrap());
    }
    let mut per_key = std::collections::BTreeMap::<String, u32>::new();
    for l in &held {
        *per_key.entry(l.key.name.to_string()).or_default() += 1;
    }
    assert_eq!(
        per_key.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10]
    );
    assert_eq!(pool.list().await[0].in_flight, 10);
    for l in held {
        l.settle(ok());
    }
    for s in pool.list().await {
        assert_eq!(s.in_flight, 0, "{}", s.name);
        assert_eq!(s.counters.used, 10, "{}", s.name);
        assert_eq!(s.counters.success, 10, "{}", s.name);
        assert_eq!(s.window_requests, 10, "{}", s.name);
        assert_eq!(
            s.window_tokens, 100,
            "{}: real tokens of the successes",
            s.name
        );
        assert!(s.latency_ms > 4.0 && s.latency_ms < 6.0, "{}", s.latency_ms);
    }
}

#[actix_rt::test]
async fn a_success_between_failures_resets_the_breaker() {
    let keys = [key("a", None, None), key("b", None, None)];
    let pool = KeyPool::start(&keys, LbPolicy::Order);
    let fail = |pool: PoolHandle| async move {
        let l = lease(&pool).await.unwrap();
        let name = l.key.name.to_string();
        l.settle(Outcome::ServerError { status: 500 });
        name
    };
    assert_eq!(fail(pool.clone()).await, "a");
    assert_eq!(fail(pool.clone()).await, "a");
    // a success comes between, while the failure may still wait in the actor's mailbox: it goes
    // as a message behind it, not into the tally (which the actor would fold in first)
    lease(&pool).await.unwrap().settle(ok());
    assert_eq!(fail(pool.clone()).await, "a");
    assert_eq!(fail(pool.clone()).await, "a");
    let next = |pool: PoolHandle| async move {
        pool.list().await; // every settlement handled
        lease(&pool).await.unwrap().key.name.to_string()
    };
    assert_eq!(next(pool.clone()).await, "a", "two in a row: not yet");
    assert_eq!(fail(pool.clone()).await, "a");
    assert_eq!(next(pool.clone()).await, "b", "three in a row: cooled");
}

/// Without shared state a session keeps its key while it has budget, then moves and keeps the
/// new one; calls without a session still spread least-used.
#[actix_rt::test]
async fn a_session_keeps_its_key_until_it_has_no_room() {
    let keys = [key("a", Some(3), None), key("b", Some(100), None)];
    let pool = KeyPool::start(&keys, LbPolicy::LeastUsed);
    let seen = session_picks(&pool, &["s"; 5]).await;
    let want = [
        ("a", "miss"),
        ("a", "hit"),
        ("a", "hit"),
        ("b", "move"),
        ("b", "hit"),
    ];
    assert_eq!(seen, want.map(|(k, s)| (k.to_owned(), s)));
    let l = lease(&pool).await.unwrap();
    assert_eq!((&*l.key.name, l.affinity), ("b", None));
}

/// With `redis.lease`, picks that find no leased call while another is asking for a lease
/// wait for it, then spend from it or reserve one call each: 20 picks at once (a key of
/// `rpm: 100`, leases of 4) reserve 4 + 16 calls in the shared window and hold none unspent,
/// not 20 leases of 4 (60 unspent). Where the ask lands before the others are first polled
/// (this machine busy) they come one after another: at most the last lease's 3 spare calls
/// are held.
#[actix_rt::test]
async fn one_lease_is_asked_for_at_a_time() {
    let (prefix, shared, pool) = leasing_pool().await;
    let leases = futures_util::future::join_all((0..20).map(|_| lease(&pool))).await;
    assert!(leases.iter().all(Result::is_ok));
    // what the window still has room for: 100 less the 20 spent
    let room = room_of_a(shared.as_ref()).await;
    assert!((77..=80).contains(&room), "{room}");
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// A graceful stop gives back the calls leased and not spent at once: one pick leases 4 of a
/// key's `rpm: 100` (within 30 s) and spends 1; after `give_back_leases` the window has room
/// for the 99 left.
#[actix_rt::test]
async fn a_graceful_stop_gives_unspent_calls_back() {
    let (prefix, shared, pool) = leasing_pool().await;
    assert!(lease(&pool).await.is_ok());
    pool.give_back_leases().await;
    let room = room_of_a(shared.as_ref()).await;
    assert_eq!(room, 99);
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// The pick that leaves a quarter of its lease (16 calls of key `a`'s `rpm: 1000`) asks for
/// the next one in the background: after 12 picks two leases are counted in the shared
/// window. The probe then takes the window's remaining room, so the next 20 picks are served
/// only by what is held here: the first lease's last 4 and the 16 asked for ahead.
#[actix_rt::test]
async fn the_next_lease_of_picks_is_asked_for_ahead_of_need() {
    let (prefix, shared, pool) = leasing_pool_of(1000, 16).await;
    for _ in 0..12 {
        assert!(lease(&pool).await.is_ok());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(room_in_a(shared.as_ref(), 1000).await, 1000 - 32);
    for _ in 0..20 {
        assert!(lease(&pool).await.is_ok());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        room_in_a(shared.as_ref(), 1000).await,
        0,
        "nothing more counted"
    );
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// With `redis.lease`, a session's picks lease calls of the key it keeps: its first pick
/// (the script: a miss) leases 4 of key `a` and the next 3 spend them here as hits, the 5th
/// leases 4 more in the script (a hit there). Another session, new here, goes to the script
/// too and is pinned to the least-used key: `b`, since `a`'s window counts both leases.
#[actix_rt::test]
async fn a_session_spends_leases_of_the_key_it_keeps() {
    let keys = [key("a", Some(100), None), key("b", Some(100), None)];
    let (prefix, shared, pool) = leasing_pool_of_keys(&keys, 4, Duration::from_secs(30)).await;
    let seen = session_picks(&pool, &["s1", "s1", "s1", "s1", "s1", "s2"]).await;
    let want = [
        ("a", "miss"),
        ("a", "hit"),
        ("a", "hit"),
        ("a", "hit"),
        ("a", "hit"),
        ("b", "miss"),
    ];
    assert_eq!(seen, want.map(|(k, s)| (k.to_owned(), s)));
    assert_eq!(room_of_a(shared.as_ref()).await, 100 - 8);
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// What key `a`'s shared window (`rpm: 100`) still has room for, asked of the shared state.
async fn room_of_a(shared: &dyn crate::SharedState) -> u32 {
    room_in_a(shared, 100).await
}

/// What key `a`'s shared window of `rpm` still has room for (taking it), asked of the shared
/// state.
async fn room_in_a(shared: &dyn crate::SharedState, rpm: u32) -> u32 {
    let window = crate::WindowReq {
        key: "key:a:req".into(),
        limit: u64::from(rpm),
        per: crate::key::WINDOW,
    };
    let all = crate::LeaseReq {
        calls: rpm,
        within: Duration::from_secs(1),
    };
    shared
        .pick_leasing(&[window], &[], true, "probe", all, Instant::now())
        .await
        .unwrap()
        .1
        .calls
}

/// A pool of one key `a` (`rpm: 100`) sharing its window in the Redis on 127.0.0.1:6379 under
/// a prefix of its own, leasing 4 calls at a time for 30 s.
async fn leasing_pool() -> (String, Arc<dyn crate::SharedState>, PoolHandle) {
    leasing_pool_of(100, 4).await
}

/// A pool of one key `a` of `rpm` sharing its window as [`leasing_pool`] does, leasing
/// `calls` at a time for 30 s.
async fn leasing_pool_of(
    rpm: u32,
    calls: u32,
) -> (String, Arc<dyn crate::SharedState>, PoolHandle) {
    leasing_pool_with(key("a", Some(rpm), None), calls, Duration::from_secs(30)).await
}

/// A pool of `key` sharing its windows in the Redis on 127.0.0.1:6379 under a prefix of its
/// own, leasing `calls` at a time for `within`.
async fn leasing_pool_with(
    key: Arc<UpstreamKey>,
    calls: u32,
    within: Duration,
) -> (String, Arc<dyn crate::SharedState>, PoolHandle) {
    leasing_pool_of_keys(&[key], calls, within).await
}

/// A pool of `keys` sharing their windows as [`leasing_pool_with`] does.
async fn leasing_pool_of_keys(
    keys: &[Arc<UpstreamKey>],
    calls: u32,
    within: Duration,
) -> (String, Arc<dyn crate::SharedState>, PoolHandle) {
    let prefix = format!("kp-pool-{:016x}:", fastrand::u64(..));
    let shared: Arc<dyn crate::SharedState> = Arc::new(
        crate::RedisState::connect("redis://127.0.0.1:6379/0", &prefix, Duration::from_secs(2))
            .await
            .unwrap(),
    );
    let pool = KeyPool::start(keys, LbPolicy::LeastUsed)
        .with_shared(shared.clone())
        .with_leasing(calls, within);
    (prefix, shared, pool)
}

/// The tokens key `a`'s shared token window counts now (settled use and reservations).
async fn tokens_counted_in_a(prefix: &str) -> u64 {
    let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let sum: Option<u64> = redis::cmd("GET")
        .arg(format!("{prefix}key:a:tok:sum"))
        .query_async(&mut conn)
        .await
        .unwrap();
    sum.unwrap_or(0)
}

/// Waits (up to 2 s) until key `a`'s shared token window counts `n`: a slice settles off the
/// request path.
async fn counted_in_a_becomes(prefix: &str, n: u64) {
    let started = Instant::now();
    while tokens_counted_in_a(prefix).await != n {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "never counted {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With `redis.lease`, a pick on a key with `tpm` leases a token slice beside its calls: one
/// estimate per call (4 x 100 of `tpm: 10000`, one round trip for 4 picks). The others hold
/// their estimates against it here; once its calls are spent and the last of its requests
/// has settled, it is settled in the shared window as one reservation of what they used: 3
/// reported 40 each, one was dropped unsettled (its estimate kept): 220.
#[actix_rt::test]
async fn picks_of_a_tpm_key_lease_a_token_slice() {
    let a = key("a", Some(1000), Some(10_000));
    let (prefix, _, pool) = leasing_pool_with(a, 4, Duration::from_secs(30)).await;
    let mut leases = Vec::new();
    for _ in 0..4 {
        leases.push(pool.pick(&pick(100, vec![])).await.unwrap());
    }
    assert_eq!(tokens_counted_in_a(&prefix).await, 400, "one slice of 4");
    let dropped = leases.pop();
    for l in leases {
        l.settle(Outcome::Success {
            tokens: Some(40),
            latency: Duration::from_millis(1),
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        tokens_counted_in_a(&prefix).await,
        400,
        "a request of the slice is still in flight"
    );
    drop(dropped);
    counted_in_a_becomes(&prefix, 220).await;
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// The pick that leaves a quarter of a lease of 16 asks for the next one in the background,
/// token slice included (sized by its own estimate): after 12 picks two slices of 16 x 100
/// are counted. The next 16 spend the first's last 4 and 12 of the second, which then asks
/// for a third the same way.
#[actix_rt::test]
async fn the_next_token_slice_is_asked_for_ahead_of_need() {
    let a = key("a", Some(1000), Some(100_000));
    let (prefix, _, pool) = leasing_pool_with(a, 16, Duration::from_secs(30)).await;
    let mut leases = Vec::new();
    for _ in 0..12 {
        leases.push(pool.pick(&pick(100, vec![])).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(tokens_counted_in_a(&prefix).await, 3200);
    for _ in 0..16 {
        leases.push(pool.pick(&pick(100, vec![])).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        tokens_counted_in_a(&prefix).await,
        4800,
        "and the next one ahead"
    );
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// A pick whose estimate the slice has no room left for (100 of 800 held, 800 asked) asks
/// for its own lease instead: a second slice, of 8 estimates of 800 capped at a tenth of the
/// `tpm` (so one of 10,000 / 10 = 1000 holds one: one call, its estimate alone).
#[actix_rt::test]
async fn a_pick_the_slice_cannot_hold_reserves_its_own() {
    let a = key("a", Some(1000), Some(10_000));
    let (prefix, _, pool) = leasing_pool_with(a, 8, Duration::from_secs(30)).await;
    let small = pool.pick(&pick(100, vec![])).await.unwrap();
    assert_eq!(tokens_counted_in_a(&prefix).await, 800);
    let large = pool.pick(&pick(800, vec![])).await.unwrap();
    assert_eq!(tokens_counted_in_a(&prefix).await, 1600);
    small.settle(ok());
    large.settle(ok());
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// A leasing pool of key `a` (`tpm: 10000`, leases of 8 within `within`) whose one pick (a
/// slice of 8 x 100) settled having used 40 tokens.
async fn one_pick_of_a_slice_used_40(within: Duration) -> (String, PoolHandle) {
    let a = key("a", Some(1000), Some(10_000));
    let (prefix, _, pool) = leasing_pool_with(a, 8, within).await;
    pool.pick(&pick(100, vec![]))
        .await
        .unwrap()
        .settle(Outcome::Success {
            tokens: Some(40),
            latency: Duration::from_millis(1),
        });
    (prefix, pool)
}

/// A slice whose lease lapses with calls left (one pick of 8 leased, `within` 300 ms) settles
/// then, as what its one request used: 40 of the 800 it held.
#[actix_rt::test]
async fn a_lapsed_slice_settles_what_it_used() {
    let (prefix, _pool) = one_pick_of_a_slice_used_40(Duration::from_millis(300)).await;
    assert_eq!(
        tokens_counted_in_a(&prefix).await,
        800,
        "held until it lapses"
    );
    counted_in_a_becomes(&prefix, 40).await;
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}

/// A graceful stop settles the open token slices before it answers: one pick of a lease of 8
/// (800 held, within 30 s) used 40, and that is what the window counts once
/// `give_back_leases` returns.
#[actix_rt::test]
async fn a_graceful_stop_settles_open_token_slices() {
    let (prefix, pool) = one_pick_of_a_slice_used_40(Duration::from_secs(30)).await;
    assert_eq!(tokens_counted_in_a(&prefix).await, 800);
    pool.give_back_leases().await;
    assert_eq!(tokens_counted_in_a(&prefix).await, 40);
    keypool_shared::testing::remove_keys("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
}
