//! Selection policies: the order in which eligible keys are offered a reservation.

use keypool_config::LbPolicy;

/// Times to first byte this close are the same speed to `lb_policy: latency` (least-used
/// decides among them): a connection's set-up or a scheduler's hiccup moves a fast key's
/// time by a few milliseconds. The least step: a slower fastest key's is a quarter of its time
/// ([`LATENCY_STEP_SHARE`]).
pub const LATENCY_STEP_MS: u32 = 5;

/// A step is at least this share of the fastest key's time (1/4): a provider's times to
/// first byte vary by tens of milliseconds from one call to the next, so keys of one region
/// tie at 400 and 480 ms as they do at 1 and 4.
pub const LATENCY_STEP_SHARE: u32 = 4;

/// What ranking needs to know of an eligible key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Position in the config (0 = first).
    pub order: usize,
    /// Requests in the key's trailing window.
    pub window_requests: u32,
    pub in_flight: u32,
    /// The key's recent time to first byte, whole milliseconds (0: not measured yet).
    pub ttfb_ms: u32,
}

/// Sorts `cands` best first:
/// - `least-used`: fewest requests in the trailing window, then fewest in flight, then config order;
/// - `order`: config order (openai-api-route);
/// - `random`: a uniform shuffle;
/// - `latency`: lowest recent time to first byte in steps above the fastest key's of
///   [`LATENCY_STEP_MS`] or a quarter of its time, whichever is more (keys within one step of
///   it tie with it, and a key not measured yet is among them, so it gets measured), then as
///   `least-used`.
pub fn rank(policy: LbPolicy, cands: &mut [Candidate]) {
    match policy {
        LbPolicy::Latency => {
            let fastest = cands
                .iter()
                .map(|c| c.ttfb_ms)
                .filter(|&ms| ms > 0)
                .min()
                .unwrap_or(0);
            let width = (fastest / LATENCY_STEP_SHARE).max(LATENCY_STEP_MS);
            cands.sort_unstable_by_key(|c| {
                let step = c.ttfb_ms.saturating_sub(fastest) / width;
                (step, c.window_requests, c.in_flight, c.order)
            });
        }
        LbPolicy::LeastUsed => {
            cands.sort_unstable_by_key(|c| (c.window_requests, c.in_flight, c.order));
        }
        LbPolicy::Order => cands.sort_unstable_by_key(|c| c.order),
        LbPolicy::Random => fastrand::shuffle(cands),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(order: usize, window_requests: u32, in_flight: u32) -> Candidate {
        Candidate {
            order,
            window_requests,
            in_flight,
            ttfb_ms: 0,
        }
    }

    #[test]
    fn latency_then_least_used() {
        let timed = |order, ttfb_ms, window_requests| Candidate {
            ttfb_ms,
            ..c(order, window_requests, 0)
        };
        let mut v = vec![
            timed(0, 50, 0),
            timed(1, 5, 9),
            timed(2, 6, 3),
            timed(3, 2, 20),
            timed(4, 8, 1),
            timed(5, 0, 30),
        ];
        rank(LbPolicy::Latency, &mut v);
        // within 5 ms of the fastest (2 ms) or not measured, least-used first; then 7-11 ms;
        // then the slow one
        assert_eq!(orders(&v), vec![2, 1, 3, 5, 4, 0]);
    }

    #[test]
    fn latency_steps_start_at_the_fastest_key() {
        let timed = |order, ttfb_ms| Candidate {
            ttfb_ms,
            ..c(order, 10 - order as u32, 0)
        };
        // 4 and 6 ms are one step apart on a grid from zero; here they tie, least-used decides
        let mut v = vec![timed(0, 4), timed(1, 6)];
        rank(LbPolicy::Latency, &mut v);
        assert_eq!(orders(&v), vec![1, 0]);
        let mut v = vec![timed(0, 4), timed(1, 9)];
        rank(LbPolicy::Latency, &mut v);
        assert_eq!(orders(&v), vec![0, 1]);
        // from a fastest of 400 ms a step is 100 ms: 480 ties with it, 500 does not
        let mut v = vec![timed(0, 400), timed(1, 480)];
        rank(LbPolicy::Latency, &mut v);
        assert_eq!(orders(&v), vec![1, 0]);
        let mut v = vec![timed(0, 400), timed(1, 500)];
        rank(LbPolicy::Latency, &mut v);
        assert_eq!(orders(&v), vec![0, 1]);
    }

    fn orders(cands: &[Candidate]) -> Vec<usize> {
        cands.iter().map(|c| c.order).collect()
    }

    #[test]
    fn least_used_then_in_flight_then_order() {
        let mut v = vec![c(0, 5, 0), c(1, 2, 3), c(2, 2, 1), c(3, 2, 1)];
        rank(LbPolicy::LeastUsed, &mut v);
        assert_eq!(orders(&v), vec![2, 3, 1, 0]);
    }

    #[test]
    fn order_ignores_usage() {
        let mut v = vec![c(2, 0, 0), c(0, 9, 9), c(1, 1, 1)];
        rank(LbPolicy::Order, &mut v);
        assert_eq!(orders(&v), vec![0, 1, 2]);
    }

    #[test]
    fn random_is_a_permutation_and_spreads() {
        let mut firsts = [0u32; 3];
        for _ in 0..300 {
            let mut v = vec![c(0, 0, 0), c(1, 0, 0), c(2, 0, 0)];
            rank(LbPolicy::Random, &mut v);
            let mut sorted = orders(&v);
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2]);
            firsts[v[0].order] += 1;
        }
        assert!(firsts.iter().all(|&n| n > 50), "{firsts:?}");
    }
}
