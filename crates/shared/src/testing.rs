//! Real Redis topologies for tests (feature `testing`): a Redis Cluster of spawned
//! `redis-server`s, and a master with a replica watched by a spawned Sentinel. Each server is on
//! a free port, without persistence, in its own temporary directory, and killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Removes every key under `prefix` from the Redis at `url`: what a test wrote under a prefix
/// of its own, at its end (`KEYS`: for tests' small data sets).
pub async fn remove_keys(url: &str, prefix: &str) -> Result<()> {
    let e = |e: redis::RedisError| e.to_string();
    let mut c = redis::Client::open(url)
        .map_err(e)?
        .get_multiplexed_async_connection()
        .await
        .map_err(e)?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .map_err(e)?;
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut c)
            .await
            .map_err(e)?;
    }
    Ok(())
}

/// Spawned `redis-server`s (cluster nodes, or a master, its replica and a Sentinel).
pub struct Servers {
    children: Vec<Option<Child>>,
    /// Each server's port, in spawn order.
    pub ports: Vec<u16>,
    dir: PathBuf,
}

type Result<T> = std::result::Result<T, String>;

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f() {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("timed out waiting for {what}"))
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Servers {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "keypool-{tag}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(Self {
            children: Vec::new(),
            ports: Vec::new(),
            dir,
        })
    }

    fn spawn(&mut self, args: &[String]) -> Result<u16> {
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(args)
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| format!("redis-server: {e}"))?;
        self.children.push(Some(child));
        self.ports.push(port);
        wait_for("redis-server to listen", Duration::from_secs(5), || {
            cli(port, &["PING"]).filter(|o| o.contains("PONG"))
        })?;
        Ok(port)
    }

    /// One server that tests may pause ([`Servers::pause`]).
    pub fn single() -> Result<Self> {
        let mut s = Self::new("single")?;
        s.spawn(&["--enable-debug-command".into(), "yes".into()])?;
        Ok(s)
    }

    /// Pauses server `i` for `secs` seconds (`DEBUG SLEEP`, from a thread of its own: this
    /// returns at once): what it is sent meanwhile waits, and runs after.
    pub fn pause(&self, i: usize, secs: f64) {
        let port = self.ports[i];
        std::thread::spawn(move || cli(port, &["DEBUG", "SLEEP", &secs.to_string()]));
    }

    /// `redis://127.0.0.1:<port>` for each server from `from` on.
    pub fn urls(&self, from: usize) -> Vec<String> {
        self.ports[from..]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Every key on each server, by its port (`KEYS *`: for tests' small data sets).
    pub fn keys_by_port(&self) -> Result<std::collections::HashMap<u16, Vec<String>>> {
        self.ports
            .iter()
            .map(|&p| {
                let out = cli(p, &["KEYS", "*"]).ok_or_else(|| format!("KEYS on {p} failed"))?;
                let keys = out.lines().filter(|l| !l.is_empty()).map(str::to_owned);
                Ok((p, keys.collect()))
            })
            .collect()
    }

    /// Kills server `i` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The index of the server whose port is `port`.
    pub fn index_of(&self, port: u16) -> Option<usize> {
        self.ports.iter().position(|p| *p == port)
    }

    /// A Redis Cluster of `masters` masters (no replicas), every slot assigned and the
    /// cluster state `ok` on every node.
    pub fn cluster(masters: usize) -> Result<Self> {
        let mut s = Self::new("cluster")?;
        for i in 0..masters {
            let conf = s.dir.join(format!("nodes-{i}.conf"));
            s.spawn(&[
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf.display().to_string(),
                "--cluster-node-timeout".into(),
                "1000".into(),
            ])?;
        }
        let nodes: Vec<String> = s.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
        if !out.success() {
            return Err("redis-cli --cluster create failed".into());
        }
        for &p in &s.ports {
            wait_for("cluster_state:ok", Duration::from_secs(20), || {
                cli(p, &["CLUSTER", "INFO"]).filter(|o| o.contains("cluster_state:ok"))
            })?;
        }
        Ok(s)
    }

    /// The port of the cluster master that holds `key`'s slot.
    pub fn master_of(&self, key: &str) -> Result<u16> {
        let port = *self.ports.first().ok_or("no servers")?;
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|o| o.trim().parse().ok())
            .ok_or("CLUSTER KEYSLOT failed")?;
        let nodes = cli(port, &["CLUSTER", "NODES"]).ok_or("CLUSTER NODES failed")?;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            let holds = f[8..].iter().any(|r| {
                let mut ends = r.split('-').filter_map(|n| n.parse::<u16>().ok());
                match (ends.next(), ends.next()) {
                    (Some(a), Some(b)) => (a..=b).contains(&slot),
                    (Some(a), None) => a == slot,
                    _ => false,
                }
            });
            if holds {
                let addr = f[1].split('@').next().unwrap_or("");
                return addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("cannot read the address {addr:?}"));
            }
        }
        Err(format!("no master holds slot {slot}"))
    }

    /// A master (server 0), its replica (server 1) and one Sentinel (server 2) that watches it
    /// as `master` and fails over half a second after it stops answering.
    pub fn sentinel(master: &str) -> Result<Self> {
        let mut s = Self::new("sentinel")?;
        let primary = s.spawn(&[])?;
        s.spawn(&[
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ])?;
        let replica = s.ports[1];
        wait_for("the replica to sync", Duration::from_secs(10), || {
            cli(replica, &["INFO", "replication"]).filter(|o| o.contains("master_link_status:up"))
        })?;
        let conf = s.dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {master} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {master} 500\n\
                 sentinel failover-timeout {master} 3000\n\
                 sentinel parallel-syncs {master} 1\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        s.spawn(&[conf.display().to_string(), "--sentinel".into()])?;
        let sentinel = s.ports[2];
        wait_for(
            "the Sentinel to see the replica",
            Duration::from_secs(10),
            || cli(sentinel, &["SENTINEL", "replicas", master]).filter(|o| o.contains("slave")),
        )?;
        Ok(s)
    }

    /// Waits until the Sentinel (server 2) names a master other than `old` and returns its
    /// port.
    pub fn wait_for_failover(&self, master: &str, old: u16) -> Result<u16> {
        let sentinel = self.ports[2];
        wait_for("Sentinel to fail over", Duration::from_secs(30), || {
            let out = cli(sentinel, &["SENTINEL", "get-master-addr-by-name", master])?;
            let port: u16 = out.lines().nth(1)?.trim().parse().ok()?;
            (port != old).then_some(port)
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
