//! In a Redis Cluster keypool's keys spread over the masters: each gateway's keys share a
//! hash tag of their own, pins each have their own, and the pool's keys keep one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keypool_shared::testing::Servers;
use keypool_shared::{
    Admit, BudgetReq, Held, Picked, RedisState, RedisTarget, SharedState, WindowReq,
};
use tokio::time::Instant;

fn w(key: &str, limit: u64) -> WindowReq {
    WindowReq {
        key: key.to_owned(),
        limit,
        per: Duration::from_secs(60),
    }
}

fn budget(key: &str, limit: u64) -> BudgetReq {
    BudgetReq {
        key: key.to_owned(),
        limit,
        ttl: Some(Duration::from_secs(60)),
    }
}

/// Two replicas admit 40 calls at once against two windows of gateway `g` (one script each
/// time: the windows share its tag): exactly 10; its budget and its caller's hold together;
/// its token quota is one counter.
async fn one_gateway_is_exact(replicas: &[Arc<dyn SharedState>; 2], g: &str) {
    let windows = [
        w(&format!("gw:{g}:10/m"), 10),
        w(&format!("gw:{g}:100/m:alice"), 100),
    ];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (s, windows) = (replicas[i % 2].clone(), windows.clone());
        tasks.push(tokio::spawn(async move {
            matches!(
                s.admit(&windows, Instant::now()).await.unwrap(),
                Admit::Admitted { .. }
            )
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 10, "gateway {g}");

    let both = [
        budget(&format!("budget:gw:{g}:day:2026-12-06"), 100),
        budget(&format!("budget:caller:{g}:alice:day:2026-12-06"), 30),
    ];
    assert_eq!(replicas[0].hold(&both, 20).await.unwrap(), Held::Held);
    assert_eq!(replicas[1].hold(&both, 20).await.unwrap(), Held::Held);
    assert_eq!(
        replicas[0].hold(&both, 1).await.unwrap(),
        Held::Over { index: 1, spent: 0 }
    );
    replicas[1].add(&format!("quota:{g}"), 7).await.unwrap();
    assert_eq!(replicas[0].get(&format!("quota:{g}")).await.unwrap(), 7);
}

/// Three gateways whose tags are on three different masters: each one's admissions (two
/// windows at once, from two replicas) stay exact, its budget and its caller's hold together,
/// and its keys are all on its own master; pins land on more than one master; the pool's keys
/// on the one that holds `{kp-spread:}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_gateways_spread_over_its_masters() {
    let servers = Servers::cluster(3).expect("a Redis Cluster");
    let target = RedisTarget::Cluster(servers.urls(0));
    let connect = || RedisState::connect_to(&target, "kp-spread:", Duration::from_secs(2));
    let replicas: [Arc<dyn SharedState>; 2] = [
        Arc::new(connect().await.unwrap()),
        Arc::new(connect().await.unwrap()),
    ];
    let gateways = one_gateway_per_master(&servers);

    for (g, _) in &gateways {
        one_gateway_is_exact(&replicas, g).await;
    }
    for i in 0..30 {
        replicas[0]
            .pin(&format!("resp_{i}"), "k1", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            replicas[1]
                .pinned(&format!("resp_{i}"))
                .await
                .unwrap()
                .as_deref(),
            Some("k1")
        );
    }
    let candidates = [w("key:k1:req", 5), w("key:k2:req", 5)];
    assert_eq!(
        replicas[0]
            .pick_reserving(&candidates, &[None, None], true, "p1", Instant::now())
            .await
            .unwrap(),
        Picked::Index(0)
    );

    // where each key is: a gateway's on its master only, the pool's on one, pins on several
    let on = servers.keys_by_port().unwrap();
    for (g, master) in &gateways {
        let tag = format!("{{kp-spread:gw:{g}}}");
        for (port, keys) in &on {
            let mine = keys.iter().filter(|k| k.starts_with(&tag)).count();
            if port == master {
                // two windows, two budgets, the quota counter
                assert!(mine >= 5, "{g} on {port}: {keys:?}");
            } else {
                assert_eq!(mine, 0, "{g} on {port}: {keys:?}");
            }
        }
    }
    let pool = servers.master_of("{kp-spread:}").unwrap();
    for (port, keys) in &on {
        let n = keys
            .iter()
            .filter(|k| k.starts_with("{kp-spread:}"))
            .count();
        assert_eq!(n > 0, *port == pool, "{port}: {keys:?}");
    }
    let pinned: HashSet<u16> = on
        .iter()
        .filter(|(_, keys)| keys.iter().any(|k| k.starts_with("{kp-spread:pin:")))
        .map(|(p, _)| *p)
        .collect();
    assert!(pinned.len() >= 2, "30 pins on {pinned:?}");
}

/// Three gateway names whose tags' slots are on three different masters (and those masters).
fn one_gateway_per_master(servers: &Servers) -> Vec<(String, u16)> {
    // one gateway per master, found by asking the cluster where each tag's slot is
    let mut gateways: Vec<(String, u16)> = Vec::new();
    for i in 0..1000 {
        let g = format!("team-{i}");
        let master = servers.master_of(&format!("{{kp-spread:gw:{g}}}")).unwrap();
        if gateways.iter().all(|(_, m)| *m != master) {
            gateways.push((g, master));
        }
        if gateways.len() == 3 {
            break;
        }
    }
    assert_eq!(gateways.len(), 3, "{gateways:?}");
    gateways
}
