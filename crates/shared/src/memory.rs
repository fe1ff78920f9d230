//! [`InMemory`]: the shared state of one process (a mutex over windows and counters), for a
//! single replica and as each replica's fallback while the shared one is unavailable.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Admit, HealthEvent, Picked, SharedError, SharedState, TokenReq, WindowReq};

/// A token reservation: when, under which id, how many.
type TokenEntry = (Instant, String, u64);

/// One process's state: windows of admission instants, counters.
#[derive(Default)]
pub struct InMemory {
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Token windows.
    tokens: Mutex<HashMap<String, VecDeque<TokenEntry>>>,
    counters: Mutex<HashMap<String, u64>>,
}

fn prune(q: &mut VecDeque<Instant>, now: Instant, per: Duration) {
    while q
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= per)
    {
        q.pop_front();
    }
}

#[async_trait::async_trait]
impl SharedState for InMemory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn admit(&self, windows: &[WindowReq], now: Instant) -> Result<Admit, SharedError> {
        Ok(self.admit_now(windows, now))
    }

    async fn pick_reserving(
        &self,
        candidates: &[WindowReq],
        tokens: &[Option<TokenReq>],
        least_used: bool,
        id: &str,
        now: Instant,
    ) -> Result<Picked, SharedError> {
        let mut all = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut toks = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut best: Option<(usize, usize)> = None;
        let mut earliest: Option<Duration> = None;
        for (i, w) in candidates.iter().enumerate() {
            if let Some(Some(t)) = tokens.get(i) {
                let q = toks.entry(t.key.clone()).or_default();
                while q
                    .front()
                    .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= w.per)
                {
                    q.pop_front();
                }
                let used: u64 = q.iter().map(|(_, _, n)| n).sum();
                let cost = t.cost.min(t.limit);
                if used + cost > t.limit {
                    let mut must_free = used + cost - t.limit;
                    let mut free = w.per;
                    for (at, _, n) in q.iter() {
                        if *n >= must_free {
                            free = (*at + w.per).saturating_duration_since(now);
                            break;
                        }
                        must_free -= n;
                    }
                    earliest = Some(earliest.map_or(free, |e| e.min(free)));
                    continue;
                }
            }
            let q = all.entry(w.key.clone()).or_default();
            prune(q, now, w.per);
            if (q.len() as u64) < w.limit {
                if best.is_none_or(|(_, n)| q.len() < n) {
                    best = Some((i, q.len()));
                }
                if !least_used {
                    break;
                }
            } else {
                let free = q.front().map_or(Duration::ZERO, |t| {
                    (*t + w.per).saturating_duration_since(now)
                });
                earliest = Some(earliest.map_or(free, |e| e.min(free)));
            }
        }
        Ok(match best {
            Some((i, _)) => {
                all.entry(candidates[i].key.clone())
                    .or_default()
                    .push_back(now);
                if let Some(Some(t)) = tokens.get(i) {
                    toks.entry(t.key.clone()).or_default().push_back((
                        now,
                        id.to_owned(),
                        t.cost.min(t.limit),
                    ));
                }
                Picked::Index(i)
            }
            None => Picked::Busy(earliest.unwrap_or_default()),
        })
    }

    async fn settle_tokens(
        &self,
        req: &TokenReq,
        id: &str,
        actual: u64,
    ) -> Result<(), SharedError> {
        let mut toks = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = toks
            .get_mut(&req.key)
            .and_then(|q| q.iter_mut().rev().find(|(_, i, _)| i == id))
        {
            e.2 = actual;
        }
        Ok(())
    }

    async fn add(&self, counter: &str, n: u64) -> Result<u64, SharedError> {
        let mut c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = c.entry(counter.to_owned()).or_default();
        *v += n;
        Ok(*v)
    }

    async fn get(&self, counter: &str) -> Result<u64, SharedError> {
        Ok(self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(counter)
            .copied()
            .unwrap_or(0))
    }

    async fn init(&self, counter: &str, n: u64) -> Result<(), SharedError> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(counter.to_owned())
            .or_insert(n);
        Ok(())
    }

    async fn publish_health(&self, _: &str, _: &HealthEvent) -> Result<(), SharedError> {
        Ok(()) // one process: its actors already know
    }
}

impl InMemory {
    /// The synchronous core of [`SharedState::admit`].
    pub fn admit_now(&self, windows: &[WindowReq], now: Instant) -> Admit {
        let mut all = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut refused: Option<(usize, Duration)> = None;
        for (i, w) in windows.iter().enumerate() {
            let q = all.entry(w.key.clone()).or_default();
            prune(q, now, w.per);
            if q.len() as u64 >= w.limit {
                let free_in = q.front().map_or(Duration::ZERO, |t| {
                    (*t + w.per).saturating_duration_since(now)
                });
                if refused.is_none_or(|(_, d)| free_in > d) {
                    refused = Some((i, free_in));
                }
            }
        }
        if let Some((index, free_in)) = refused {
            return Admit::Refused { index, free_in };
        }
        let remaining = windows
            .iter()
            .map(|w| {
                let q = all.entry(w.key.clone()).or_default();
                q.push_back(now);
                w.limit.saturating_sub(q.len() as u64)
            })
            .collect();
        if all.len() > 4096 {
            let longest = windows.iter().map(|w| w.per).max().unwrap_or_default();
            all.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < longest)
            });
        }
        Admit::Admitted { remaining }
    }
}
