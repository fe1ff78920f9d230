//! A gateway's limits leased from the shared state (`redis.lease`), over the real Redis on
//! 127.0.0.1:6379 (a unique key prefix per test, removed afterwards): two replicas (two
//! gateway sets, two connections) hold an `ingress:` limit and each caller's `secret:` limit
//! exactly, alone or together, what a lapsed lease left goes back to the others, and a burst
//! asks for one lease at a time (per caller for `secret:` limits).

#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;
use std::time::Duration;

use keypool_config::gateway::{RawGateway, validate_gateway};
use keypool_policy::Caller;
use keypool_policy::gateway::Gateways;
use keypool_shared::{Admit, LeaseReq, RedisState, SharedState, WindowReq};
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379/0";

fn spec(yaml: &str) -> Arc<keypool_config::Gateway> {
    let raw: RawGateway = serde_norway::from_str(yaml).unwrap();
    Arc::new(validate_gateway(&raw, "g").unwrap())
}

/// One replica's gateways: `yaml`'s gateway, its limits in Redis under `prefix`, leased
/// `calls` at a time for `within_ms`.
async fn replica(prefix: &str, yaml: &str, calls: u32, within_ms: u64) -> Gateways {
    let lease = LeaseReq {
        calls,
        within: Duration::from_millis(within_ms),
    };
    replica_leasing(prefix, yaml, Some(lease)).await
}

async fn replica_leasing(prefix: &str, yaml: &str, lease: Option<LeaseReq>) -> Gateways {
    replica_on(REDIS, prefix, yaml, lease).await
}

async fn replica_on(url: &str, prefix: &str, yaml: &str, lease: Option<LeaseReq>) -> Gateways {
    let spec = spec(yaml);
    let shared: Arc<dyn SharedState> = Arc::new(
        RedisState::connect(url, prefix, Duration::from_secs(2))
            .await
            .expect("a Redis"),
    );
    Gateways::with_shared(
        &[spec],
        Some(shared),
        lease,
        keypool_telemetry::Telemetry::default(),
    )
}

/// Admits on `g`'s gateway `gw` until one is refused; answers how many were admitted.
async fn admit_all(g: &Gateways, gw: &str) -> u64 {
    admit_all_as(g, gw, &Caller::ANONYMOUS).await
}

async fn admit_all_as(g: &Gateways, gw: &str, caller: &Caller) -> u64 {
    let rt = g.get(gw).unwrap();
    let mut n = 0;
    while rt
        .admit_everywhere(caller, None, Instant::now())
        .await
        .is_ok()
    {
        n += 1;
    }
    n
}

fn caller(id: &str) -> Caller {
    Caller {
        id: Some(Arc::from(id)),
        ..Caller::ANONYMOUS
    }
}

/// The calls window `key` (limit 1000 a minute) still has room for, asked of Redis directly.
async fn room(prefix: &str, key: &str) -> u32 {
    1000 - counted(prefix, key).await
}

/// The calls window `key` (limit 1000 a minute) counts now, asked of Redis directly (the
/// probe's reservation given back at once).
async fn counted(prefix: &str, key: &str) -> u32 {
    let probe = RedisState::connect(REDIS, prefix, Duration::from_secs(2))
        .await
        .unwrap();
    let window = WindowReq {
        key: key.into(),
        limit: 1000,
        per: Duration::from_secs(60),
    };
    let everything = LeaseReq {
        calls: 1000,
        within: Duration::from_secs(1),
    };
    let (outcome, room) = probe
        .admit_leasing(
            std::slice::from_ref(&window),
            "probe",
            everything,
            Instant::now(),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, Admit::Admitted { .. }));
    probe
        .return_lease(&window, "probe", room, room)
        .await
        .unwrap();
    1000 - room
}

async fn cleanup(prefix: &str) {
    keypool_shared::testing::remove_keys(REDIS, prefix)
        .await
        .unwrap();
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
/// holds 20 and nothing unspent (not 20 leases of 8). Where the ask lands before the others
/// are first polled (this machine busy), they come one after another instead: leases of 8
/// until the 20 are spent, the last one's spare calls unspent. Either way no more than one
/// lease's spare calls are ever held, and one lease asked for ahead of need (a call that left
/// a quarter of a lease).
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
    let room = room(&prefix, "gw:burst:ingress:1000/minute").await;
    assert!((1000 - 20 - 7 - 8..=1000 - 20).contains(&room), "{room}");
    cleanup(&prefix).await;
}

/// `secret:100/minute` with `lease: 8`: each caller has a lease of its own. On a, alice and
/// bob each lease 8 and spend 1; on b each gets exactly the 92 left of their own limit, and
/// alice's 7 unspent calls go back once a's lease lapses (400 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_leases_its_own_secret_limit() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: per\nrate_limits: ['secret:100/minute']\n";
    let (a, b) = (
        replica(&prefix, yaml, 8, 400).await,
        replica(&prefix, yaml, 8, 400).await,
    );
    let (alice, bob) = (caller("alice"), caller("bob"));
    for who in [&alice, &bob] {
        let h = a
            .get("per")
            .unwrap()
            .admit_everywhere(who, None, Instant::now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((h.limit, h.remaining), (100, 99));
    }
    assert_eq!(admit_all_as(&b, "per", &alice).await, 92);
    assert_eq!(admit_all_as(&b, "per", &bob).await, 92);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(admit_all_as(&b, "per", &alice).await, 7);
    assert_eq!(admit_all_as(&a, "per", &alice).await, 0);
    cleanup(&prefix).await;
}

/// `ingress:100/minute` with `secret:40/minute` (`lease: 8`: the `ingress:` holder leases 8,
/// each caller's 4): the gateway's `ingress:` calls are leased once per replica, not once per
/// caller. On a, alice's first call leases both scopes in one round trip and bob's spends the
/// gateway's lease and leases his own; on b each gets exactly the 36 left of their own limit
/// (the call after that spends b's `ingress:` lease, is refused by the caller's limit, and gives
/// it back), and carol then gets the rest of the gateway's 100, all of it once a's leases
/// have lapsed: exactly 100 in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_scopes_lease_the_gateway_once_and_each_caller_once() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: both\nrate_limits: ['ingress:100/minute', 'secret:40/minute']\n";
    let (a, b) = (
        replica(&prefix, yaml, 8, 400).await,
        replica(&prefix, yaml, 8, 400).await,
    );
    let (alice, bob, carol) = (caller("alice"), caller("bob"), caller("carol"));
    for who in [&alice, &bob] {
        let h = a
            .get("both")
            .unwrap()
            .admit_everywhere(who, None, Instant::now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((h.limit, h.remaining), (40, 39));
    }
    assert_eq!(admit_all_as(&b, "both", &alice).await, 36);
    assert_eq!(admit_all_as(&b, "both", &bob).await, 36);
    let before = admit_all_as(&b, "both", &carol).await;
    // a holds what is left of its `ingress:` lease of 4 and at most the 8 it asked ahead
    assert!(
        (100 - 74 - 2 - 8..=100 - 74 - 2).contains(&before),
        "{before}"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    let after = admit_all_as(&b, "both", &carol).await;
    assert_eq!(74 + before + after, 100);
    assert_eq!(admit_all_as(&a, "both", &carol).await, 0);
    cleanup(&prefix).await;
}

/// `ingress:50/minute` with `secret:1000/minute` (`lease: 8`: the gateway's leases of 5,
/// alice's of 8). On a, alice's first call leases 5 of both scopes (her third asks for her
/// next 8 ahead of need); b's carol takes 40 calls; a admits 9 more of alice's (its gateway
/// lease's 4, then a last lease of 5), spending her second lease down to 3. Her next calls find
/// the gateway's limit spent: each spends a call of hers here, is refused, and gives it back,
/// and, refused, asks for no lease ahead (that call leaves a quarter of her lease each time).
/// So Redis counts her two leases (13), and after a graceful stop her 10 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_by_one_scope_gives_the_others_back() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: back\nrate_limits: ['ingress:50/minute', 'secret:1000/minute']\n";
    let (a, b) = (
        replica(&prefix, yaml, 8, 30_000).await,
        replica(&prefix, yaml, 8, 30_000).await,
    );
    let (alice, carol) = (caller("alice"), caller("carol"));
    let (on_a, on_b) = (a.get("back").unwrap(), b.get("back").unwrap());
    assert!(
        on_a.admit_everywhere(&alice, None, Instant::now())
            .await
            .is_ok()
    );
    for _ in 0..40 {
        assert!(
            on_b.admit_everywhere(&carol, None, Instant::now())
                .await
                .is_ok()
        );
    }
    // one at a time, so what is asked ahead lands before the next call
    for _ in 0..9 {
        assert!(
            on_a.admit_everywhere(&alice, None, Instant::now())
                .await
                .is_ok()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        assert!(
            on_a.admit_everywhere(&alice, None, Instant::now())
                .await
                .is_err()
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = "gw:back:secret:1000/minute:alice";
    assert_eq!(
        counted(&prefix, key).await,
        13,
        "no lease asked by a refused call"
    );
    a.give_back_shared().await;
    assert_eq!(
        counted(&prefix, key).await,
        10,
        "no call kept by a refused one"
    );
    cleanup(&prefix).await;
}

/// A caller's lease is not held up by another's being asked for: 10 of alice's admissions
/// and 3 of bob's at once (`secret:1000/minute`, `lease: 8`) ask for two leases, so bob's
/// window holds his lease of 8 (3 spent, 5 left here), not 3 single calls counted after
/// alice's landed. Alice's holds her 10, at most one lease's spare calls (as above) and one
/// lease asked for ahead of need (her 8th call from a lease of 8 leaves a quarter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_ask_for_their_leases_side_by_side() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let g = replica(
        &prefix,
        "name: two\nrate_limits: ['secret:1000/minute']\n",
        8,
        30_000,
    )
    .await;
    let rt = g.get("two").unwrap();
    let (alice, bob) = (caller("alice"), caller("bob"));
    let who = |i: usize| if i % 2 == 1 && i < 6 { &bob } else { &alice };
    let all = futures_util::future::join_all(
        (0..13).map(|i| rt.admit_everywhere(who(i), None, Instant::now())),
    )
    .await;
    assert!(all.iter().all(Result::is_ok));
    assert_eq!(room(&prefix, "gw:two:secret:1000/minute:bob").await, 992);
    let alices = room(&prefix, "gw:two:secret:1000/minute:alice").await;
    assert!(
        (1000 - 10 - 7 - 8..=1000 - 10).contains(&alices),
        "{alices}"
    );
    cleanup(&prefix).await;
}

/// A gateway's policy replaced with the same limits keeps its leases (a still holds 7 of the
/// `ingress:100/minute` it leased: b gets 92); replaced with other limits, the old holder
/// gives back what it held (b then gets those 7 too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_policy_keeps_its_leases_only_with_the_same_limits() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: re\nrate_limits: ['ingress:100/minute']\n";
    let (a, b) = (
        replica(&prefix, yaml, 8, 30_000).await,
        replica(&prefix, yaml, 8, 30_000).await,
    );
    assert!(
        a.get("re")
            .unwrap()
            .admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())
            .await
            .is_ok()
    );
    a.replace(&[spec(
        "name: re\nrate_limits: ['ingress:100/minute']\nmodels: [m]\n",
    )]);
    assert_eq!(admit_all(&b, "re").await, 92);
    a.replace(&[spec(
        "name: re\nrate_limits: ['ingress:100/minute', 'ingress:1000/hour']\n",
    )]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(admit_all(&b, "re").await, 7);
    cleanup(&prefix).await;
}

/// A replica stopping gracefully gives back the calls it leased and did not spend at once
/// (not when its lease would lapse, 30 s here): b then gets all 99 left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_gives_unspent_calls_back() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: stop\nrate_limits: ['ingress:100/minute']\n";
    let (a, b) = (
        replica(&prefix, yaml, 8, 30_000).await,
        replica(&prefix, yaml, 8, 30_000).await,
    );
    assert!(
        a.get("stop")
            .unwrap()
            .admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())
            .await
            .is_ok()
    );
    a.give_back_shared().await;
    assert_eq!(admit_all(&b, "stop").await, 99);
    cleanup(&prefix).await;
}

/// `lease: 16` on `ingress:1000/minute`: the admission that leaves a quarter of the lease (4
/// calls) asks for the next one in the background, so it has landed before the first is
/// spent. After 12 admissions two leases are counted in Redis (32 calls), and the next 20
/// admissions spend them with no round trip of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_lease_is_asked_for_ahead_of_need() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: ahead\nrate_limits: ['ingress:1000/minute']\n";
    let g = replica(&prefix, yaml, 16, 5000).await;
    let rt = g.get("ahead").unwrap();
    let admit = async || {
        rt.admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())
            .await
            .unwrap()
            .unwrap()
    };
    for _ in 0..11 {
        admit().await;
    }
    // 11 spent: the first lease has 5 left, nothing asked ahead yet
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = "gw:ahead:ingress:1000/minute";
    // the 12th leaves 4: the next lease is asked for; its headers still count from the first
    assert_eq!(admit().await.remaining, 1000 - 16 + 4);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = replica(&prefix, yaml, 1, 5000).await;
    let seen = other
        .get("ahead")
        .unwrap()
        .admit_everywhere(&Caller::ANONYMOUS, None, Instant::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.remaining, 1000 - 32 - 1, "two leases counted");
    // the 4 left and the 16 asked ahead are spent here without asking (the 16th of those
    // asks ahead again)
    for _ in 0..20 {
        admit().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(room(&prefix, key).await, 1000 - 48 - 1);
    cleanup(&prefix).await;
}

/// `token_quota: 100` on three replicas. With `lease_ms: 1000`, b decides from the count it
/// read (0) for a second without reading it again, so it still admits after a spent the quota,
/// and refuses once its view lapsed; a refuses at once, from the total its own addition got
/// back; b's own usage counts at once, before Redis has it. Without leasing, c reads the
/// count for every request and refuses as soon as Redis has a's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_count_is_read_once_a_lease_ms() {
    let prefix = format!("kp-policy-{:016x}:", fastrand::u64(..));
    let yaml = "name: q\ntoken_quota: 100\n";
    let (a, b, c) = (
        replica(&prefix, yaml, 8, 1000).await,
        replica(&prefix, yaml, 8, 1000).await,
        replica_leasing(&prefix, yaml, None).await,
    );
    let (a, b, c) = (
        a.get("q").unwrap(),
        b.get("q").unwrap(),
        c.get("q").unwrap(),
    );
    assert!(b.check_quota_everywhere().await.is_ok());
    assert!(c.check_quota_everywhere().await.is_ok());
    let seen = Instant::now();
    a.add_tokens(100);
    while c.check_quota_everywhere().await.is_ok() {
        assert!(
            seen.elapsed() < Duration::from_secs(2),
            "a's usage reaches Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(a.check_quota_everywhere().await.is_err());
    assert!(
        seen.elapsed() < Duration::from_millis(800),
        "this machine was too slow for the test's window"
    );
    assert!(
        b.check_quota_everywhere().await.is_ok(),
        "b's view is fresh"
    );
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert!(b.check_quota_everywhere().await.is_err(), "b read it again");

    // b's own usage, on a fresh view, refuses at once
    let d = replica(&prefix, "name: own\ntoken_quota: 50\n", 8, 60_000).await;
    let d = d.get("own").unwrap();
    assert!(d.check_quota_everywhere().await.is_ok());
    d.add_tokens(50);
    assert!(d.check_quota_everywhere().await.is_err());
    cleanup(&prefix).await;
}

/// 1,000 requests' tokens settled at once on a replica with a quota (a Redis of its own, to
/// count its commands): their additions to the replicas' count go one at a time, those
/// settled meanwhile together, so far fewer than 1,000 `INCRBY`s reach Redis; none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_additions_go_together_and_none_is_lost() {
    let server = keypool_shared::testing::Servers::single().unwrap();
    let url = server.urls(0).remove(0);
    let yaml = "name: q\ntoken_quota: 2000\n";
    let lease = LeaseReq {
        calls: 8,
        within: Duration::from_secs(60),
    };
    let (a, b) = (
        replica_on(&url, "kp:", yaml, Some(lease)).await,
        replica_on(&url, "kp:", yaml, None).await,
    );
    let (a, b) = (a.get("q").unwrap(), b.get("q").unwrap());
    assert!(a.check_quota_everywhere().await.is_ok(), "a's view: 0");
    let settling: Vec<_> = (0..1000)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.add_tokens(2) })
        })
        .collect();
    for s in settling {
        s.await.unwrap();
    }
    assert!(
        a.check_quota_everywhere().await.is_err(),
        "its own 2,000 at once"
    );
    let started = Instant::now();
    while b.check_quota_everywhere().await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "every addition reaches Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(b.state.tokens_used_everywhere().await, 2000);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let incrbys: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_incrby:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((1..100).contains(&incrbys), "{incrbys} INCRBYs for 1,000");
}

/// A replica reading the count (no lease: every request) adds what it counted and has not
/// sent yet: with Redis paused, its first addition (10) is on its way and the next 100 wait
/// for it; the read finds 10, and the replica refuses at `token_quota: 100` all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_the_quota_adds_what_waits_to_be_sent() {
    let server = keypool_shared::testing::Servers::single().unwrap();
    let url = server.urls(0).remove(0);
    let g = replica_on(&url, "kp:", "name: q\ntoken_quota: 100\n", None).await;
    let q = g.get("q").unwrap();
    server.pause(0, 0.5);
    tokio::time::sleep(Duration::from_millis(50)).await;
    q.add_tokens(10);
    tokio::time::sleep(Duration::from_millis(50)).await;
    q.add_tokens(100);
    // the read is answered after the first addition and before the next is sent
    assert!(q.check_quota_everywhere().await.is_err());
}
