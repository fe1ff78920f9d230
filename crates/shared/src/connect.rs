//! Where the shared state's Redis is and how keypool stays connected to it: one server, a
//! Redis Cluster, or a master found through Sentinel ([`RedisTarget`]), behind one connection
//! type ([`Conn`]) that the scripts and commands run on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use crate::SharedError;

/// How the shared state's Redis is reached.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis.url`: one server (or a proxy in front of several).
    Single(String),
    /// `redis.cluster`: seed nodes of a Redis Cluster; the rest of the cluster is discovered.
    /// The keys a script touches share one hash tag, so each script touches one slot; a
    /// gateway's keys have their own tag, so gateways spread over the masters.
    Cluster(Vec<String>),
    /// `redis.sentinel`: the master named `master`, as the Sentinels at `nodes` report it,
    /// reached with `password` and database `db`; followed when Sentinel fails over.
    Sentinel {
        master: String,
        nodes: Vec<String>,
        password: Option<String>,
        db: i64,
    },
}

impl std::fmt::Debug for RedisTarget {
    // URLs may hold passwords: only the shape is shown
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(_) => f.write_str("Single(..)"),
            Self::Cluster(n) => write!(f, "Cluster({} seed nodes)", n.len()),
            Self::Sentinel { master, nodes, .. } => {
                write!(f, "Sentinel({master:?}, {} sentinels)", nodes.len())
            }
        }
    }
}

/// A connection to whichever kind of Redis the target is: cheap to clone, reconnecting by
/// itself.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The connections of a [`RedisState`](crate::RedisState): fixed for one server and a cluster
/// (their clients follow the servers themselves), swapped for Sentinel when the master moves.
pub(crate) enum Source {
    Fixed(Conn),
    Sentinel(Arc<Following>),
}

impl Source {
    pub(crate) fn conn(&self) -> Conn {
        match self {
            Self::Fixed(c) => c.clone(),
            Self::Sentinel(f) => Conn::Single(f.current.load().as_ref().clone()),
        }
    }

    /// A call failed: with Sentinel, the master may have moved; ask again (at most one lookup
    /// at a time).
    pub(crate) fn failed(&self) {
        if let Self::Sentinel(f) = self {
            f.clone().relocate();
        }
    }
}

/// A master found through Sentinel: the connection to where it was last seen.
pub(crate) struct Following {
    master: String,
    nodes: Vec<String>,
    password: Option<String>,
    db: i64,
    timeout: Duration,
    current: arc_swap::ArcSwap<ConnectionManager>,
    address: std::sync::Mutex<(String, u16)>,
    looking: AtomicBool,
    failures: Arc<crate::Failures>,
}

impl Following {
    fn relocate(self: Arc<Self>) {
        if self.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = self.check().await {
                self.failures.background(&e);
            }
            // one lookup per second at most, however many calls fail meanwhile
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.looking.store(false, Ordering::Release);
        });
    }

    /// Asks the Sentinels where the master is; reconnects when it moved.
    async fn check(&self) -> Result<(), SharedError> {
        let at = master_address(&self.nodes, &self.master, self.timeout).await?;
        let same = *self
            .address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == at;
        if same {
            return Ok(());
        }
        let url = master_url(&at, self.password.as_deref(), self.db);
        let conn = manager(&url, self.timeout).await?;
        tracing::warn!(host = %at.0, port = at.1, master = %self.master, "Sentinel moved the shared state's master: following it");
        self.current.store(Arc::new(conn));
        *self
            .address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
        Ok(())
    }
}

fn master_url((host, port): &(String, u16), password: Option<&str>, db: i64) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    match password {
        Some(p) => format!("redis://:{}@{host}:{port}/{db}", url_escape(p)),
        None => format!("redis://{host}:{port}/{db}"),
    }
}

fn url_escape(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn err(e: &redis::RedisError) -> SharedError {
    SharedError(e.to_string())
}

async fn manager(url: &str, timeout: Duration) -> Result<ConnectionManager, SharedError> {
    let client = redis::Client::open(url).map_err(|e| err(&e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    tokio::time::timeout(
        timeout * 4,
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| SharedError("connecting to Redis timed out".into()))?
    .map_err(|e| err(&e))
}

/// Where the Sentinels say `master` is: the first Sentinel that answers decides.
pub(crate) async fn master_address(
    nodes: &[String],
    master: &str,
    timeout: Duration,
) -> Result<(String, u16), SharedError> {
    let mut last = SharedError("no Sentinel configured".into());
    for node in nodes {
        let ask = async {
            let client = redis::Client::open(node.as_str())?;
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async::<Option<(String, u16)>>(&mut c)
                .await
        };
        match tokio::time::timeout(timeout * 4, ask).await {
            Ok(Ok(Some(at))) => return Ok(at),
            Ok(Ok(None)) => {
                last = SharedError(format!("Sentinel does not know the master {master:?}"));
            }
            Ok(Err(e)) => last = err(&e),
            Err(_) => last = SharedError("Sentinel did not answer in time".into()),
        }
    }
    Err(last)
}

/// Connects to `target` (or fails within a few `timeout`s).
pub(crate) async fn connect(
    target: &RedisTarget,
    timeout: Duration,
    failures: &Arc<crate::Failures>,
) -> Result<Source, SharedError> {
    match target {
        RedisTarget::Single(url) => Ok(Source::Fixed(Conn::Single(manager(url, timeout).await?))),
        RedisTarget::Cluster(nodes) => {
            let client = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(|e| err(&e))?;
            let conn = tokio::time::timeout(timeout * 4, client.get_async_connection())
                .await
                .map_err(|_| SharedError("connecting to the Redis Cluster timed out".into()))?
                .map_err(|e| err(&e))?;
            Ok(Source::Fixed(Conn::Cluster(conn)))
        }
        RedisTarget::Sentinel {
            master,
            nodes,
            password,
            db,
        } => {
            let at = master_address(nodes, master, timeout).await?;
            let conn = manager(&master_url(&at, password.as_deref(), *db), timeout).await?;
            let following = Arc::new(Following {
                master: master.clone(),
                nodes: nodes.clone(),
                password: password.clone(),
                db: *db,
                timeout,
                current: arc_swap::ArcSwap::new(Arc::new(conn)),
                address: std::sync::Mutex::new(at),
                looking: AtomicBool::new(false),
                failures: failures.clone(),
            });
            // a master that moves without a failed call (a planned switch-over) is found too
            let watch = Arc::downgrade(&following);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let Some(f) = watch.upgrade() else { return };
                    f.relocate();
                }
            });
            Ok(Source::Sentinel(following))
        }
    }
}

/// A URL a subscription can use: the server, a cluster node (a `PUBLISH` reaches every node of
/// a cluster, so any one will do; `attempt` turns through them), or the master Sentinel names.
pub(crate) async fn pubsub_url(
    target: &RedisTarget,
    attempt: usize,
    timeout: Duration,
) -> Result<String, SharedError> {
    match target {
        RedisTarget::Single(url) => Ok(url.clone()),
        RedisTarget::Cluster(nodes) => nodes
            .get(attempt % nodes.len().max(1))
            .cloned()
            .ok_or_else(|| SharedError("no cluster node configured".into())),
        RedisTarget::Sentinel {
            master,
            nodes,
            password,
            db,
        } => {
            let at = master_address(nodes, master, timeout).await?;
            Ok(master_url(&at, password.as_deref(), *db))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_urls_escape_passwords_and_bracket_ipv6() {
        assert_eq!(
            master_url(&("10.0.0.1".into(), 6380), Some("p@ss:w/rd"), 2),
            "redis://:p%40ss%3Aw%2Frd@10.0.0.1:6380/2"
        );
        assert_eq!(
            master_url(&("::1".into(), 6379), None, 0),
            "redis://[::1]:6379/0"
        );
    }

    #[test]
    fn targets_never_show_their_urls() {
        let t = RedisTarget::Single("redis://:hunter2@h:6379".into());
        assert_eq!(format!("{t:?}"), "Single(..)");
        let t = RedisTarget::Sentinel {
            master: "m".into(),
            nodes: vec!["redis://:hunter2@s:26379".into()],
            password: Some("hunter2".into()),
            db: 0,
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
