//! [`RateWindow`]: exact usage over a trailing span (60 s for rpm / tpm).
//!
//! Every admitted unit is kept with its time, so "n per minute" means at most n in *any* trailing
//! minute, not per clock minute. Entries carry a cost (1 for requests, tokens for tpm) and an id,
//! so a token reservation made at pick time can be settled to the real count afterwards. A
//! window whose entries are never settled (a key's calls) keeps one entry a millisecond; one of
//! reservations (a key's tokens) merges its settled entries the same way from time to time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    cost: u64,
    id: u64,
}

/// Usage within a trailing span.
#[derive(Debug, Clone)]
pub struct RateWindow {
    span: Duration,
    entries: VecDeque<Entry>,
    used: u64,
    merge: Merge,
}

/// Which entries of one millisecond a window keeps as one.
#[derive(Debug, Clone, Copy)]
enum Merge {
    /// None: every entry on its own.
    Never,
    /// All, as they are recorded ([`RateWindow::merging`]); `last_ms` is the last entry's.
    Calls { epoch: Instant, last_ms: u64 },
    /// Settled ones, once the window holds `compact_at` entries ([`RateWindow::compacting`]).
    Settled { epoch: Instant, compact_at: usize },
}

/// The fewest entries a compacting window holds before it merges its settled ones.
const COMPACT_FROM: usize = 4096;

/// Whole milliseconds from `epoch` to `t`.
fn ms_since(epoch: Instant, t: Instant) -> u64 {
    let d = t.saturating_duration_since(epoch);
    d.as_secs() * 1000 + u64::from(d.subsec_millis())
}

impl RateWindow {
    pub fn new(span: Duration) -> Self {
        Self {
            span,
            entries: VecDeque::new(),
            used: 0,
            merge: Merge::Never,
        }
    }

    /// A window whose entries are never settled (a key's calls): what is recorded within one
    /// millisecond (counted from `epoch`) is one entry, at the time of the latest. So a busy
    /// key with a large budget keeps at most one entry a millisecond of its span (60,000 for
    /// a minute, 1.9 MB) instead of one a call (32 bytes each: 77 MB for a minute at 40,000
    /// calls a second). An entry moved later leaves the window later: a call is counted up to
    /// a millisecond longer than it was made, never shorter, so the limit holds in every
    /// trailing span and a call may be refused up to a millisecond early.
    pub fn merging(span: Duration, epoch: Instant) -> Self {
        Self {
            merge: Merge::Calls {
                epoch,
                last_ms: u64::MAX,
            },
            ..Self::new(span)
        }
    }

    /// A window of reservations settled later (a key's tokens): an entry keeps its id until it
    /// is settled, and once the window holds twice what it held after its last compaction
    /// (at least 4,096 entries), neighbouring settled entries of one millisecond become one,
    /// at the later one's time (counted up to a millisecond longer, never shorter). So it
    /// holds at most an entry a millisecond of its span, beside the reservations not yet
    /// settled (requests in flight), at an amortised constant cost a record.
    pub fn compacting(span: Duration, epoch: Instant) -> Self {
        Self {
            merge: Merge::Settled {
                epoch,
                compact_at: COMPACT_FROM,
            },
            ..Self::new(span)
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.entries.front() {
            if front.at + self.span > now {
                break;
            }
            self.used -= front.cost;
            self.entries.pop_front();
        }
    }

    /// Units used in the span ending at `now`.
    pub fn used(&mut self, now: Instant) -> u64 {
        self.expire(now);
        self.used
    }

    /// The earliest time at which `cost` more units fit under `limit`: `now` when they fit now.
    /// A cost larger than the whole limit is treated as the limit (it fits in an empty window).
    pub fn free_at(&mut self, now: Instant, limit: u64, cost: u64) -> Instant {
        self.expire(now);
        let cost = cost.min(limit);
        if self.used + cost <= limit {
            return now;
        }
        let mut must_free = self.used + cost - limit;
        for e in &self.entries {
            if e.cost >= must_free {
                return e.at + self.span;
            }
            must_free -= e.cost;
        }
        // unreachable in practice: freeing every entry always makes room
        now + self.span
    }

    /// Records `cost` units at `now` under `id` (in a [`Self::merging`] window, into the last
    /// entry where it is of the same millisecond: then `id` cannot be settled).
    pub fn record(&mut self, now: Instant, id: u64, cost: u64) {
        self.expire(now);
        self.used += cost;
        match &mut self.merge {
            Merge::Never => {}
            Merge::Calls { epoch, last_ms } => {
                let ms = ms_since(*epoch, now);
                if let Some(last) = self.entries.back_mut()
                    && now >= last.at
                    && ms == *last_ms
                {
                    last.at = now;
                    last.cost += cost;
                    return;
                }
                *last_ms = ms;
            }
            Merge::Settled { epoch, compact_at } => {
                if self.entries.len() >= *compact_at {
                    let epoch = *epoch;
                    self.compact(epoch);
                }
            }
        }
        self.entries.push_back(Entry { at: now, cost, id });
    }

    /// Merges neighbouring settled entries (id 0) of one millisecond into the later one, and
    /// sets the next compaction at twice what is left.
    fn compact(&mut self, epoch: Instant) {
        let mut kept: VecDeque<Entry> = VecDeque::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if let Some(last) = kept.back_mut()
                && e.id == 0
                && last.id == 0
                && e.at >= last.at
                && ms_since(epoch, e.at) == ms_since(epoch, last.at)
            {
                last.at = e.at;
                last.cost += e.cost;
                continue;
            }
            kept.push_back(e);
        }
        self.entries = kept;
        if let Merge::Settled { compact_at, .. } = &mut self.merge {
            *compact_at = (self.entries.len() * 2).max(COMPACT_FROM);
        }
    }

    /// Replaces the cost recorded under `id` (a reservation settled to the real amount), once:
    /// the entry is settled and may merge. An entry that already left the window is not
    /// brought back; id 0 names no reservation.
    pub fn settle(&mut self, id: u64, actual: u64) {
        if id == 0 {
            return;
        }
        if let Some(e) = self.entries.iter_mut().rev().find(|e| e.id == id) {
            self.used = self.used - e.cost + actual;
            e.cost = actual;
            // settled once: its id is free to merge (ids start at 1)
            e.id = 0;
        }
    }

    /// When the oldest entry leaves the window, if there is one.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.at + self.span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn trailing_minute_is_exact_at_the_edges() {
        let mut w = RateWindow::new(MIN);
        let t0 = Instant::now();
        for id in 0..4 {
            w.record(Instant::now(), id, 1);
            advance(Duration::from_secs(10)).await;
        }
        // at t0+40s: 4 used, entries at 0,10,20,30
        assert_eq!(w.used(Instant::now()), 4);
        assert_eq!(w.free_at(Instant::now(), 4, 1), t0 + MIN);
        // one nanosecond before the first entry leaves, still full
        advance(Duration::from_secs(20) - Duration::from_nanos(1)).await;
        assert_eq!(w.used(Instant::now()), 4);
        assert!(w.free_at(Instant::now(), 4, 1) > Instant::now());
        // exactly 60 s after it was recorded, it is gone
        advance(Duration::from_nanos(1)).await;
        assert_eq!(w.used(Instant::now()), 3);
        assert_eq!(w.free_at(Instant::now(), 4, 1), Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn token_costs_settle_and_free_in_order() {
        let mut w = RateWindow::new(MIN);
        let t0 = Instant::now();
        w.record(t0, 1, 600);
        advance(Duration::from_secs(5)).await;
        w.record(Instant::now(), 2, 300);
        // 900 of 1000 used: 200 more must wait until entry 1 (600) leaves
        assert_eq!(w.free_at(Instant::now(), 1000, 200), t0 + MIN);
        // the first request really used 50 tokens
        w.settle(1, 50);
        assert_eq!(w.used(Instant::now()), 350);
        assert_eq!(w.free_at(Instant::now(), 1000, 200), Instant::now());
        // a request bigger than the limit fits once the window is empty
        assert_eq!(
            w.free_at(Instant::now(), 1000, 5000),
            t0 + Duration::from_secs(65)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_not_fixed_clock_window() {
        let mut w = RateWindow::new(MIN);
        // 2 at t=50s, 2 at t=70s: a fixed clock minute would allow 4 in [50,70]; the trailing
        // window with limit 3 refuses the 4th at t=70s.
        advance(Duration::from_secs(50)).await;
        w.record(Instant::now(), 1, 1);
        w.record(Instant::now(), 2, 1);
        advance(Duration::from_secs(20)).await;
        w.record(Instant::now(), 3, 1);
        assert!(w.free_at(Instant::now(), 3, 1) > Instant::now());
        assert_eq!(
            w.next_expiry(),
            Some(Instant::now() + Duration::from_secs(40))
        );
    }

    /// A compacting window keeps its reservations until they are settled, then merges the
    /// settled ones of one millisecond: 10,000 reservations of 10 tokens in one millisecond,
    /// settled at 5 each as they come, never hold more than 4,096 entries and count exactly;
    /// one still unsettled keeps its own entry and settles after compactions passed it.
    #[tokio::test(start_paused = true)]
    async fn a_compacting_window_merges_what_was_settled() {
        let mut w = RateWindow::compacting(MIN, Instant::now());
        w.record(Instant::now(), 1, 100);
        for id in 2..=10_001 {
            w.record(Instant::now(), id, 10);
            w.settle(id, 5);
        }
        assert!(w.entries.len() <= COMPACT_FROM, "{}", w.entries.len());
        assert_eq!(w.used(Instant::now()), 100 + 50_000);
        w.settle(1, 30);
        assert_eq!(w.used(Instant::now()), 30 + 50_000);
        // settled entries merge only with neighbours of the same millisecond
        advance(Duration::from_millis(1)).await;
        for id in 10_002..=14_200 {
            w.record(Instant::now(), id, 1);
            w.settle(id, 1);
        }
        assert!(w.entries.len() <= COMPACT_FROM, "{}", w.entries.len());
        // a compaction now leaves the first entry (settled late, its neighbour not yet
        // merged with it), one a millisecond, and nothing else
        w.compact(w.entries[0].at);
        assert!(w.entries.len() <= 3, "{}", w.entries.len());
        assert_eq!(w.used(Instant::now()), 30 + 50_000 + 4199);
        advance(Duration::from_millis(59_999)).await;
        assert_eq!(w.used(Instant::now()), 4199);
    }

    /// A merging window keeps one entry a millisecond, at its latest call's time: 10,000
    /// calls within a millisecond are one entry, still counted whole, and they leave the
    /// window together a span after the latest of them.
    #[tokio::test(start_paused = true)]
    async fn a_merging_window_keeps_an_entry_a_millisecond() {
        let epoch = Instant::now();
        let mut w = RateWindow::merging(MIN, epoch);
        for _ in 0..10_000 {
            w.record(Instant::now(), 0, 1);
        }
        advance(Duration::from_micros(900)).await;
        let latest = Instant::now();
        w.record(latest, 0, 1);
        assert_eq!(w.entries.len(), 1);
        advance(Duration::from_micros(100)).await;
        w.record(Instant::now(), 0, 1);
        assert_eq!((w.entries.len(), w.used(Instant::now())), (2, 10_002));
        // under a limit of 10,002 the next call fits once the first entry (10,001 calls) left
        assert_eq!(w.free_at(Instant::now(), 10_002, 1), latest + MIN);
        advance(Duration::from_nanos(60_000_000_000 - 100_000 - 1)).await;
        assert_eq!(w.used(Instant::now()), 10_002);
        advance(Duration::from_nanos(1)).await;
        assert_eq!(w.used(Instant::now()), 1);
    }
}

/// Usage over the trailing minute in one-second buckets: constant memory, for keys without a
/// budget, where the count only ranks keys (and is shown to admins) and need not be exact.
#[derive(Debug, Clone)]
pub struct BucketWindow {
    epoch: Instant,
    /// `(second since epoch, units)` per slot, indexed by second modulo 60.
    slots: [(u64, u64); 60],
}

impl BucketWindow {
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            slots: [(u64::MAX, 0); 60],
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    pub fn add(&mut self, now: Instant, cost: u64) {
        let sec = self.second(now);
        let slot = &mut self.slots[(sec % 60) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += cost;
    }

    /// Units in the last 60 one-second buckets (the current one included).
    pub fn used(&self, now: Instant) -> u64 {
        let sec = self.second(now);
        self.slots
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s + 60 > sec)
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;
    use tokio::time::advance;

    #[tokio::test(start_paused = true)]
    async fn counts_the_trailing_minute_in_constant_memory() {
        let mut w = BucketWindow::new(Instant::now());
        for _ in 0..10_000 {
            w.add(Instant::now(), 1);
        }
        advance(Duration::from_secs(30)).await;
        w.add(Instant::now(), 5);
        assert_eq!(w.used(Instant::now()), 10_005);
        advance(Duration::from_secs(30)).await;
        assert_eq!(w.used(Instant::now()), 5);
        advance(Duration::from_secs(60)).await;
        assert_eq!(w.used(Instant::now()), 0);
    }
}
