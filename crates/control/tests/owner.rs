//! The control plane's one owner: changes sent from many tasks at once apply one at a time,
//! each published whole; a refused change leaves the state and its version as they were.

use std::sync::Arc;

use keypool_config::raw::RawUpstream;
use keypool_control::{Control, ControlError, KeyChange, Parts};
use keypool_policy::gateway::Gateways;
use keypool_pool::KeyPool;

type Error = Box<dyn std::error::Error>;

fn key(name: &str) -> RawUpstream {
    RawUpstream {
        name: Some(name.to_owned()),
        sk: Some(format!("sk-{name}")),
        endpoint: Some("http://127.0.0.1:9".to_owned()),
        ..RawUpstream::default()
    }
}

async fn control() -> Result<Arc<Control>, Error> {
    let config = Arc::new(keypool_config::from_yaml(
        "upstreams:\n  - sk: sk-first\n    name: first\n    endpoint: http://127.0.0.1:9\n",
    )?);
    let pool = KeyPool::start(&config.upstreams, config.lb_policy);
    let gateways = Arc::new(Gateways::new(std::slice::from_ref(&config.default_gateway)));
    let (feed, _) = tokio::sync::broadcast::channel(4);
    let parts = Parts {
        config,
        gateways,
        pool,
        store: None,
        redis: None,
        feed,
    };
    Ok(Control::start(parts).await?)
}

#[actix_rt::test] // the key pool's actors need an actix system
async fn concurrent_changes_apply_one_at_a_time_and_are_published_whole() {
    let control = control().await.unwrap();
    let start = control.version();
    let adds: Vec<_> = (0..16)
        .map(|i| {
            let c = control.clone();
            tokio::spawn(async move { c.add_key("test", key(&format!("k{i}"))).await })
        })
        .collect();
    // meanwhile every state read is one some change left: a version per key added
    let reader = {
        let c = control.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let state = c.state();
                let keys = state.key_entries(&c.pool).len() as u64;
                assert_eq!(state.version() - start, keys - 1, "a state half applied");
                tokio::task::yield_now().await;
            }
        })
    };
    for add in adds {
        add.await.unwrap().unwrap();
    }
    reader.await.unwrap();
    assert_eq!(control.version(), start + 16);
    assert_eq!(control.key_entries().len(), 17);
    assert_eq!(control.pool.keys().len(), 17, "every key runs in the pool");

    let again = control.add_key("test", key("k3")).await.unwrap_err();
    assert!(matches!(again, ControlError::Exists(_)), "{again}");
    let zero = KeyChange {
        rpm: Some(Some(0)),
        ..KeyChange::default()
    };
    let refused = control.update_key("test", "k3", zero).await.unwrap_err();
    assert!(matches!(refused, ControlError::Invalid(_)), "{refused}");
    let huge = KeyChange {
        tpm: Some(Some(keypool_config::MAX_TPM + 1)),
        ..KeyChange::default()
    };
    let refused = control.update_key("test", "k3", huge).await.unwrap_err();
    assert!(matches!(refused, ControlError::Invalid(_)), "{refused}");
    assert_eq!(
        control.version(),
        start + 16,
        "a refused change is no version"
    );

    let off = KeyChange {
        enabled: Some(false),
        ..KeyChange::default()
    };
    assert!(!control.update_key("test", "k3", off).await.unwrap().enabled);
    assert_eq!(control.snapshot().disabled, vec!["k3".to_owned()]);
    control.remove_key("test", "k3").await.unwrap();
    assert!(control.key_entry("k3").is_none());
    assert_eq!(
        control.pool.keys().len(),
        16,
        "the removed key drained and went"
    );
    let config_owned = control.remove_key("test", "first").await.unwrap_err();
    assert!(matches!(config_owned, ControlError::Precondition(_)));
    assert_eq!(control.version(), start + 18);
}

#[actix_rt::test]
async fn gateway_changes_wake_watchers_and_default_stays_the_files() {
    let control = control().await.unwrap();
    let mut changes = control.watch_changes();
    changes.borrow_and_update();
    let raw =
        serde_json::from_value(serde_json::json!({"name": "team", "models": ["gpt-4o"]})).unwrap();
    let made = control.put_gateway("test", None, raw, false).await.unwrap();
    assert_eq!(made.owner, keypool_control::OWNER_ADMIN);
    assert!(changes.has_changed().unwrap(), "WatchConfig is woken");
    assert_eq!(*changes.borrow_and_update(), control.version());
    assert!(control.gateways.get("team").is_some(), "served at once");
    let names: Vec<_> = control
        .listed_gateways()
        .iter()
        .map(|g| g.raw.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["default", "team"]);
    for refused in [
        control.delete_gateway("test", "default").await,
        control.rotate_secret("test", "default").await.map(drop),
    ] {
        assert!(matches!(refused, Err(ControlError::Precondition(_))));
    }
    control.delete_gateway("test", "team").await.unwrap();
    assert!(control.gateways.get("team").is_none());
}
