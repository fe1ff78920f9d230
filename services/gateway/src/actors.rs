//! The actor host: a dedicated thread running an actix `System`, where the `KeyPool` and its
//! `KeyActor`s live. Request tasks on the HTTP workers reach them through `Addr`s (which are `Send`).

use std::sync::Arc;
use std::thread::JoinHandle;

use keypool_config::{LbPolicy, UpstreamKey};
use keypool_pool::{KeyPool, KeySeed, PoolHandle};

/// Owns the actor thread; [`ActorHost::stop`] ends it.
pub struct ActorHost {
    system: actix_rt::System,
    thread: Option<JoinHandle<()>>,
}

impl ActorHost {
    /// Starts the actor thread and the pool on it.
    pub fn start(
        keys: Vec<Arc<UpstreamKey>>,
        policy: LbPolicy,
        seeds: std::collections::HashMap<String, KeySeed>,
        announcer: keypool_shared::HealthAnnouncer,
        telemetry: keypool_telemetry::Telemetry,
    ) -> std::io::Result<(Self, PoolHandle)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("keypool-actors".into())
            .spawn(move || {
                let runner = actix_rt::System::new();
                let started = runner.block_on(async {
                    (
                        KeyPool::start_seeded(&keys, policy, &seeds, announcer, telemetry),
                        actix_rt::System::current(),
                    )
                });
                if tx.send(started).is_ok() {
                    let _ = runner.run();
                }
            })?;
        let (pool, system) = rx
            .recv()
            .map_err(|_| std::io::Error::other("the actor thread did not start"))?;
        Ok((
            Self {
                system,
                thread: Some(thread),
            },
            pool,
        ))
    }

    /// Stops the actor system and waits for its thread.
    pub fn stop(mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
