//! The spill file: batches the database could not take, as JSON lines, appended and fsync'd,
//! replayed (and truncated) once the database is back.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::{StoreError, StoredEvent};

#[derive(Clone)]
pub(crate) struct Spill {
    path: PathBuf,
    max_bytes: u64,
}

fn err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Spill {
        path: path.display().to_string(),
        source,
    }
}

impl Spill {
    pub(crate) fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self { path, max_bytes }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Appends events and fsyncs. Returns how many did not fit under the size cap (dropped).
    pub(crate) fn append(&self, events: &[StoredEvent]) -> Result<usize, StoreError> {
        let mut room = self.max_bytes.saturating_sub(self.len());
        let mut buf = Vec::new();
        let mut dropped = 0;
        for e in events {
            let line =
                serde_json::to_vec(e).map_err(|e| err(&self.path, std::io::Error::other(e)))?;
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

    /// Everything spilled so far (a torn last line from a crash is skipped).
    pub(crate) fn read_all(&self) -> Result<Vec<StoredEvent>, StoreError> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(&self.path, e)),
        };
        let mut out = Vec::new();
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(|e| err(&self.path, e))?;
            if let Ok(e) = serde_json::from_str::<StoredEvent>(&line) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Empties the file after a successful replay.
    pub(crate) fn clear(&self) -> Result<(), StoreError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(&self.path, e)),
        }
    }
}
