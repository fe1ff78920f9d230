//! The one task that owns the control plane's [`State`]: it takes typed [`Command`]s one at a
//! time, applies each (validated, persisted, reconciled with the running pool and gateways),
//! publishes the new state, records who asked in the audit log, and answers. Reads never wait
//! for it.

use std::collections::HashSet;
use std::sync::Arc;

use keypool_config::raw::RawUpstream;
use keypool_config::{Config, RawGateway};
use keypool_policy::gateway::Gateways;
use keypool_pool::PoolHandle;
use keypool_pricing::RawPrice;
use keypool_store::Store;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::{AdminPrices, ControlError, GatewayEntry, KeyChange, KeyEntry, State};

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// A change for the owner to apply, with where its answer goes.
pub(crate) enum Command {
    PutGateway {
        name: Option<String>,
        raw: Box<RawGateway>,
        replace: bool,
        reply: Reply<GatewayEntry>,
    },
    DeleteGateway {
        name: String,
        reply: Reply<()>,
    },
    RotateSecret {
        name: String,
        reply: Reply<(GatewayEntry, String)>,
    },
    AddKey {
        raw: Box<RawUpstream>,
        reply: Reply<KeyEntry>,
    },
    UpdateKey {
        name: String,
        change: KeyChange,
        reply: Reply<KeyEntry>,
    },
    /// Answered with the removed key's drain (the caller waits for it, the owner does not).
    RemoveKey {
        name: String,
        reply: Reply<Vec<JoinHandle<()>>>,
    },
    SetPrices {
        entries: Vec<RawPrice>,
        reply: Reply<AdminPrices>,
    },
    /// A reloaded config file (SIGHUP).
    ApplyFile {
        config: Arc<Config>,
        reply: Reply<()>,
    },
    /// A frontend's snapshot from its control plane.
    ApplySnapshot {
        config: Arc<Config>,
        disabled: HashSet<String>,
        version: u64,
        reply: Reply<()>,
    },
    /// Another replica changed the store.
    Reload {
        reply: Reply<()>,
    },
}

/// What became of a command.
enum Applied {
    Refused,
    Done,
    /// Applied, and what it created is named so (a key added without a name).
    Named(String),
}

/// The owner: the state, and what applying a change touches.
pub(crate) struct Owner {
    pub state: State,
    pub published: Arc<arc_swap::ArcSwap<State>>,
    pub changed: watch::Sender<u64>,
    pub gateways: Arc<Gateways>,
    pub pool: PoolHandle,
    pub store: Option<Store>,
    pub redis: Option<Arc<keypool_shared::RedisState>>,
}

impl Owner {
    /// Start-up: the file's entries written to the store, what the admin service stored
    /// applied, the prices in force, the `default` gateway with every key's tokens.
    pub async fn start(&mut self) -> Result<(), ControlError> {
        if let Some(store) = self.store.clone() {
            self.restore(&store).await?;
            self.read_prices(&store).await?;
        }
        self.apply_prices();
        self.apply_gateways()?;
        self.publish();
        Ok(())
    }

    /// Applies commands until every [`crate::Control`] is gone.
    pub async fn run(mut self, mut inbox: mpsc::Receiver<(String, Command)>) {
        while let Some((who, command)) = inbox.recv().await {
            let described = crate::audit::described(&command);
            let applied = self.apply(command).await;
            if let Some((action, target, detail)) = described {
                let target = match applied {
                    Applied::Refused => continue,
                    Applied::Done => target,
                    Applied::Named(name) => name,
                };
                self.audit(&who, action, target, &detail).await;
            }
        }
    }

    /// Applies the command and answers it.
    async fn apply(&mut self, command: Command) -> Applied {
        // a caller that stopped waiting does not stop the change
        fn answer<T>(reply: Reply<T>, result: Result<T, ControlError>) -> Applied {
            let ok = result.is_ok();
            let _ = reply.send(result);
            if ok { Applied::Done } else { Applied::Refused }
        }
        match command {
            Command::PutGateway {
                name,
                raw,
                replace,
                reply,
            } => answer(
                reply,
                self.put_gateway(name.as_deref(), *raw, replace).await,
            ),
            Command::DeleteGateway { name, reply } => {
                answer(reply, self.delete_gateway(&name).await)
            }
            Command::RotateSecret { name, reply } => answer(reply, self.rotate_secret(&name).await),
            Command::AddKey { raw, reply } => {
                let added = self.add_key(*raw).await;
                match added.as_ref().map(|e| e.key.name.to_string()) {
                    Ok(name) => {
                        let _ = reply.send(added);
                        Applied::Named(name)
                    }
                    Err(_) => answer(reply, added),
                }
            }
            Command::UpdateKey {
                name,
                change,
                reply,
            } => answer(reply, self.update_key(&name, change).await),
            Command::RemoveKey { name, reply } => answer(reply, self.remove_key(&name).await),
            Command::SetPrices { entries, reply } => answer(reply, self.set_prices(entries).await),
            Command::ApplyFile { config, reply } => answer(reply, self.apply_file(config).await),
            Command::ApplySnapshot {
                config,
                disabled,
                version,
                reply,
            } => answer(
                reply,
                self.apply_snapshot(&config, &disabled, version).await,
            ),
            Command::Reload { reply } => answer(reply, self.reload().await),
        }
    }

    /// Makes the state as it is now what readers see, and wakes `WatchConfig` streams.
    pub fn publish(&self) {
        self.published.store(Arc::new(self.state.clone()));
        self.changed.send_replace(self.state.version);
    }

    /// A change applied here: a new version, published, and announced to the other replicas
    /// (which re-read the store).
    pub fn bump(&mut self) {
        self.state.version += 1;
        if let Err(e) = self.apply_gateways() {
            tracing::error!(error = %e, "gateways not refreshed");
        }
        self.publish();
        if let (Some(redis), Some(_)) = (self.redis.clone(), &self.store) {
            let version = self.state.version;
            tokio::spawn(async move {
                if let Err(e) = redis.announce_config(version).await {
                    redis.failures().background(&e);
                }
            });
        }
    }

    /// The keys in pool order (config order, then added keys).
    pub fn key_entries(&self) -> Vec<KeyEntry> {
        self.state.key_entries(&self.pool)
    }
}
