//! [`KeyTally`]: what requests count on a key without sending its actor a message.
//!
//! Most attempts change nothing on a key but numbers that add up: one more request in its
//! window, one more success, its latency and tokens, one attempt fewer in flight. A message to
//! the key actor for each (two per request) woke the actor thread about once per request and
//! cost ~28% of keypool's CPU under load. So a [`Lease`](crate::Lease) adds them here, in
//! atomics, and the key actor folds them into its own windows and counters on its next tick and
//! before it handles any message: it stays the one owner of that state, the tally is its inbox.
//! What can refuse (an rpm/tpm budget) or change health (every outcome but success) still goes
//! to the actor as a message.
//!
//! Order: the actor folds the tally before it handles any message, so a success folded from it
//! counts as having come before that message. That is only true when no settlement was waiting
//! in the actor's mailbox, so a success takes the tally only then ([`quiet`]); otherwise it is a
//! message too, behind the failures it followed. The circuit breaker therefore sees the same
//! sequence it would see with a message per attempt.
//!
//! [`quiet`]: KeyTally::quiet

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use keypool_telemetry::metrics::KeyHandles;

/// Counts added by requests, drained by the key actor.
#[derive(Debug)]
pub struct KeyTally {
    /// Leases alive on this key: one per attempt between its pick and its settlement (or drop).
    in_flight: AtomicU32,
    /// Requests taken on a key without a budget since the last fold.
    recorded: AtomicU64,
    /// Successful attempts since the last fold.
    succeeded: AtomicU64,
    /// Their summed latency, in microseconds.
    latency_us: AtomicU64,
    /// Their real token usage (keys without a tpm budget; a tpm key settles by message).
    tokens: AtomicU64,
    /// Settlements sent to the actor and not yet handled by it.
    settles_queued: AtomicU32,
    /// The times to first byte of this process's last two attempts on the key, microseconds
    /// (the newest in the low half, 0: none yet), for `lb_policy: latency`.
    ttfb_last_two: AtomicU64,
    /// The key's attempt metrics, resolved once.
    pub(crate) metrics: KeyHandles,
    /// Where the key's other outcomes are counted and its alerts go.
    pub(crate) telemetry: keypool_telemetry::Telemetry,
}

/// What one fold drained from a tally.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Folded {
    pub recorded: u64,
    pub succeeded: u64,
    pub latency_us: u64,
    pub tokens: u64,
}

impl KeyTally {
    pub(crate) fn new(key: &str, provider: &str, telemetry: keypool_telemetry::Telemetry) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            recorded: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            settles_queued: AtomicU32::new(0),
            ttfb_last_two: AtomicU64::new(0),
            metrics: telemetry.metrics().key_handles(key, provider),
            telemetry,
        }
    }

    /// One attempt's time to first byte (or the time it waited in vain): it takes the place
    /// of the older of the last two.
    pub(crate) fn observe_ttfb(&self, ttfb: Duration) {
        let us = u32::try_from(ttfb.as_micros()).unwrap_or(u32::MAX).max(1);
        let _ = self
            .ttfb_last_two
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some((old << 32) | u64::from(us))
            });
    }

    /// The key's recent time to first byte in whole milliseconds: the faster of its last two
    /// attempts, so one hiccup (a cold connection, a scheduler's pause) does not rank it
    /// slower and two slow answers in a row do; 0 until two were seen.
    pub(crate) fn ttfb_ms(&self) -> u32 {
        let last_two = self.ttfb_last_two.load(Ordering::Relaxed);
        let (newest, older) = (last_two as u32, (last_two >> 32) as u32);
        if older == 0 {
            return 0;
        }
        newest.min(older) / 1000
    }

    /// Attempts in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests recorded and not yet folded into the actor's window: ranking adds them to the
    /// window count the actor published.
    pub(crate) fn pending(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// A lease was taken (after its reservation, if the key has a budget).
    pub(crate) fn leased(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A lease ended, however it ended.
    pub(crate) fn returned(&self) {
        // never below zero, even if a bug settled a lease twice
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// One request on a key without a budget (nothing to refuse, nobody waits).
    pub(crate) fn record(&self) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
    }

    /// One successful attempt: its latency (the key's mean), its whole duration from the lease
    /// (the latency histogram) and, on keys without tpm, its real tokens.
    pub(crate) fn success(&self, latency: Duration, elapsed: Duration, tokens: Option<u64>) {
        self.succeeded.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.fetch_add(us, Ordering::Relaxed);
        if let Some(t) = tokens {
            self.tokens.fetch_add(t, Ordering::Relaxed);
        }
        self.metrics.success.inc();
        self.metrics.latency.observe(elapsed.as_secs_f64());
    }

    /// No settlement waits in the actor's mailbox: a success may be counted here without
    /// reordering it before an earlier failure.
    pub(crate) fn quiet(&self) -> bool {
        self.settles_queued.load(Ordering::Acquire) == 0
    }

    /// A settlement is about to be sent to the actor (call before sending).
    pub(crate) fn settle_sent(&self) {
        self.settles_queued.fetch_add(1, Ordering::AcqRel);
    }

    /// The actor handled a settlement (the actor's side).
    pub(crate) fn settle_handled(&self) {
        let _ = self
            .settles_queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Takes everything counted since the last fold (the key actor's side).
    pub(crate) fn fold(&self) -> Folded {
        Folded {
            recorded: self.recorded.swap(0, Ordering::Relaxed),
            succeeded: self.succeeded.swap(0, Ordering::Relaxed),
            latency_us: self.latency_us.swap(0, Ordering::Relaxed),
            tokens: self.tokens.swap(0, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_drain_what_requests_added() {
        let t = KeyTally::new(
            "tally-test",
            "openai",
            keypool_telemetry::Telemetry::default(),
        );
        t.record();
        t.record();
        t.leased();
        t.success(Duration::from_millis(3), Duration::from_millis(3), Some(40));
        t.success(Duration::from_millis(5), Duration::from_millis(5), None);
        assert_eq!(t.pending(), 2);
        assert_eq!(
            t.fold(),
            Folded {
                recorded: 2,
                succeeded: 2,
                latency_us: 8000,
                tokens: 40
            }
        );
        assert_eq!(t.fold(), Folded::default());
        assert_eq!(t.in_flight(), 1);
        t.returned();
        t.returned();
        assert_eq!(t.in_flight(), 0, "never below zero");
        assert!(t.quiet());
        t.settle_sent();
        assert!(!t.quiet(), "a settlement waits in the mailbox");
        t.settle_handled();
        assert!(t.quiet());
    }

    #[test]
    fn the_recent_ttfb_is_the_faster_of_the_last_two() {
        let t = KeyTally::new(
            "ttfb-test",
            "openai",
            keypool_telemetry::Telemetry::default(),
        );
        let ms = Duration::from_millis;
        t.observe_ttfb(ms(40));
        assert_eq!(t.ttfb_ms(), 0, "one attempt is not a measure yet");
        t.observe_ttfb(ms(2));
        assert_eq!(
            t.ttfb_ms(),
            2,
            "the cold first attempt does not count against the key"
        );
        t.observe_ttfb(ms(30));
        assert_eq!(t.ttfb_ms(), 2, "one hiccup does not rank the key slower");
        t.observe_ttfb(ms(25));
        assert_eq!(t.ttfb_ms(), 25, "two slow answers in a row do");
        t.observe_ttfb(ms(3));
        assert_eq!(t.ttfb_ms(), 3, "one fast answer brings it back");
        t.observe_ttfb(Duration::from_secs(5_000));
        t.observe_ttfb(Duration::from_secs(6_000));
        assert_eq!(t.ttfb_ms(), u32::MAX / 1000, "saturates, never wraps");
    }
}
