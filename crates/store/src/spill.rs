//! The spill file: batches the database could not take (or, on overflow, the queue could
//! not), as JSON lines, appended with one fsync per batch, replayed (and removed) once the
//! database takes them.
//!
//! Two writers append (the usage writer while the database is down, the overflow thread while
//! the queue is full) and one reads: appends and the start of a replay hold one lock. A replay
//! first renames the file to `<path>.replaying` (unless one is left from before: that is
//! replayed first), so what is appended meanwhile starts a new file, replayed next, and no
//! event appended during a replay is removed with it.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::{StoreError, StoredEvent};

#[derive(Clone)]
pub(crate) struct Spill {
    path: PathBuf,
    replaying: PathBuf,
    max_bytes: u64,
    lock: Arc<Mutex<()>>,
}

fn err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Spill {
        path: path.display().to_string(),
        source,
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

impl Spill {
    pub(crate) fn new(path: PathBuf, max_bytes: u64) -> Self {
        let mut replaying = path.clone().into_os_string();
        replaying.push(".replaying");
        Self {
            path,
            replaying: PathBuf::from(replaying),
            max_bytes,
            lock: Arc::default(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes waiting to be replayed (both files).
    pub(crate) fn len(&self) -> u64 {
        size(&self.path) + size(&self.replaying)
    }

    /// Appends events and fsyncs once. Returns how many did not fit under the size cap
    /// (dropped).
    pub(crate) fn append(&self, events: &[StoredEvent]) -> Result<usize, StoreError> {
        let mut buf = Vec::new();
        let mut lines = Vec::with_capacity(events.len());
        for e in events {
            let line =
                serde_json::to_vec(e).map_err(|e| err(&self.path, std::io::Error::other(e)))?;
            lines.push(line);
        }
        let _one = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut room = self.max_bytes.saturating_sub(self.len());
        let mut dropped = 0;
        for line in lines {
            if (line.len() as u64 + 1) > room {
                dropped += 1;
                continue;
            }
            room -= line.len() as u64 + 1;
            buf.extend_from_slice(&line);
            buf.push(b'\n');
        }
        if !buf.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| err(&self.path, e))?;
            f.write_all(&buf).map_err(|e| err(&self.path, e))?;
            f.sync_data().map_err(|e| err(&self.path, e))?;
        }
        Ok(dropped)
    }

    /// The events of one replay, in the order they were spilled: the file left by an
    /// unfinished replay, else the spill file, moved aside (a torn last line from a crash is
    /// skipped).
    pub(crate) fn read_all(&self) -> Result<Vec<StoredEvent>, StoreError> {
        {
            let _one = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            if !self.replaying.exists() {
                match std::fs::rename(&self.path, &self.replaying) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(err(&self.path, e)),
                }
            }
        }
        let f = match std::fs::File::open(&self.replaying) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(&self.replaying, e)),
        };
        let mut out = Vec::new();
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(|e| err(&self.replaying, e))?;
            if let Ok(e) = serde_json::from_str::<StoredEvent>(&line) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Removes what one replay read, once it is stored.
    pub(crate) fn clear(&self) -> Result<(), StoreError> {
        match std::fs::remove_file(&self.replaying) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(&self.replaying, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Spill;
    use crate::StoredEvent;

    fn events(n: usize) -> Vec<StoredEvent> {
        (0..n)
            .map(|i| StoredEvent {
                id: format!("{i:032x}"),
                at_ms: 5,
                gateway: "default".into(),
                caller: None,
                model: "m".into(),
                key_name: Some("k".into()),
                provider: None,
                attempts: 1,
                status: 200,
                stream: false,
                latency_ms: 7,
                ttfb_ms: None,
                prompt_tokens: Some(3),
                completion_tokens: Some(4),
                total_tokens: Some(7),
                client_ip: None,
                user_agent: None,
                error: None,
                cache_read_tokens: Some(1),
                cache_write_tokens: Some(0),
                cache_write_1h_tokens: Some(0),
                cost_pico: None,
                requested_model: None,
                cache_hit: false,
                guardrails: None,
                log: None,
            })
            .collect()
    }

    /// What is appended while a replay is under way starts a new file: the replay's removal
    /// never takes it along.
    #[test]
    fn an_append_during_a_replay_is_kept_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::new(dir.path().join("s.jsonl"), 1 << 30);
        spill.append(&events(3)).unwrap();
        let first = spill.read_all().unwrap();
        assert_eq!(first.len(), 3);
        spill.append(&events(2)).unwrap(); // meanwhile
        spill.clear().unwrap();
        assert!(spill.len() > 0, "the later events wait");
        assert_eq!(spill.read_all().unwrap().len(), 2);
        spill.clear().unwrap();
        assert_eq!(spill.len(), 0);
    }
}
