//! The counting algorithms as pure functions of a key's state, a cost and the time: the model
//! both stores follow (the in-memory store runs this code; the Redis script repeats it
//! operation for operation, and property tests hold the three to the same decisions).
//!
//! Time is in milliseconds of the caller's clock (see the README's "Counting engine").
//!
//! - `fixed_window`: a count per window; a request fits if the count after it is at most the
//!   limit (the reference's rule).
//! - `sliding_window`: the two-window estimate `previous × (window − elapsed) / window +
//!   current`, computed in IEEE double precision in this order in both stores, so both give
//!   the same answer for the same inputs.
//! - `token_bucket`: GCRA. The state is the theoretical arrival time (TAT) in milliseconds
//!   plus a remainder in 1/limit milliseconds, so refills are exact: every quantity below is
//!   an integer of at most 2^53 ("scaled" units are 1/limit ms; the debt and a cost are each
//!   at most 2^52, config validation sees to it), which also keeps it exact in the doubles of
//!   Redis' Lua.

use super::Unit;

/// How a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// The reference's windows aligned to the Unix epoch.
    #[default]
    FixedWindow,
    /// The weighted two-window estimate.
    SlidingWindow,
    /// GCRA: a bucket of `burst` tokens refilled at `requests_per_unit` per window.
    TokenBucket,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ];

    /// The config name (`fixed_window`, `sliding_window`, `token_bucket`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket => "token_bucket",
        }
    }

    /// Parses a config name, exactly (as YAML keys are).
    pub fn parse(s: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::parse(s).ok_or_else(|| {
            format!("unknown algorithm '{s}' (fixed_window, sliding_window or token_bucket)")
        })
    }
}

/// Largest scaled quantity a token bucket may reach (`burst × window in ms`), so that every
/// intermediate value is an exact integer in a double.
pub const MAX_SCALED: u64 = 1 << 52;

/// The numbers one limit's arithmetic needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub algorithm: Algorithm,
    /// `requests_per_unit`.
    pub limit: u64,
    /// The window (`unit × unit_multiplier`) in milliseconds.
    pub window_ms: u64,
    /// Token bucket capacity; the limit for window algorithms. A request costing more never
    /// fits.
    pub capacity: u64,
}

impl Quota {
    /// A window algorithm's quota, or a token bucket's with `burst` (default: the limit).
    ///
    /// A limit of 0 means every request (with a cost) is over it, as in the reference, for a
    /// token bucket too: one that refills 0 tokens per window holds none, whatever its
    /// `burst` (otherwise it would admit a burst, then refill at the arithmetic's floor of
    /// one token per window).
    pub fn new(
        algorithm: Algorithm,
        limit: u32,
        unit: Unit,
        multiplier: u32,
        burst: Option<u32>,
    ) -> Self {
        let limit = u64::from(limit);
        Quota {
            algorithm,
            limit,
            window_ms: unit.seconds() * u64::from(multiplier.max(1)) * 1000,
            capacity: match algorithm {
                Algorithm::TokenBucket if limit > 0 => burst.map_or(limit, u64::from),
                _ => limit,
            },
        }
    }
}

/// A key's state, as read from the store (absent keys read as zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// Window algorithms: the current window's count. Token bucket: the TAT in ms.
    pub a: u64,
    /// Sliding window: the previous window's count. Token bucket: the TAT's remainder in
    /// 1/limit ms (below `limit`).
    pub b: u64,
}

/// One limit's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The request fits this limit.
    pub allowed: bool,
    /// Whole requests (tokens) left after this request, or before it when it does not fit.
    pub remaining: u64,
    /// Milliseconds until the window ends (window algorithms) or the bucket is full again.
    pub reset_ms: u64,
    /// When refused: milliseconds until this request would fit; 0 when allowed.
    pub retry_ms: u64,
    /// The count this request brings the limit to, for the near/over-limit statistics:
    /// `limit − remaining` when allowed, above `limit` when not.
    pub used: u64,
}

/// The state after charging `cost`, and the verdict as if it is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// What to store if the request is charged.
    pub charged: State,
}

/// Evaluates `cost` against `quota` at `now_ms`, given the key's `state`. A cost above the
/// capacity never fits; the caller decides whether to store `charged` (see `Charging`).
pub fn evaluate(quota: &Quota, state: State, cost: u64, now_ms: u64) -> Outcome {
    match quota.algorithm {
        Algorithm::FixedWindow => fixed(quota, state, cost, now_ms),
        Algorithm::SlidingWindow => sliding(quota, state, cost, now_ms),
        Algorithm::TokenBucket => bucket(quota, state, cost, now_ms),
    }
}

/// Start of the window (ms) containing `now_ms`, aligned to the Unix epoch.
pub fn window_start_ms(window_ms: u64, now_ms: u64) -> u64 {
    now_ms / window_ms.max(1) * window_ms.max(1)
}

/// Milliseconds until the window containing `now_ms` ends, counted from the whole second as
/// the reference counts it (`window − now % window` in seconds), so a fixed window reports
/// the reference's `duration_until_reset` exactly.
fn until_window_end(window_ms: u64, now_ms: u64) -> u64 {
    let secs = (window_ms / 1000).max(1);
    let now_s = now_ms / 1000;
    (secs - now_s % secs) * 1000
}

fn fixed(q: &Quota, s: State, cost: u64, now_ms: u64) -> Outcome {
    let after = s.a.saturating_add(cost).min(super::MAX_COUNT);
    let reset_ms = until_window_end(q.window_ms, now_ms);
    let allowed = cost <= q.capacity && after <= q.limit;
    Outcome {
        verdict: Verdict {
            allowed,
            remaining: if allowed { q.limit - after } else { 0 },
            reset_ms,
            retry_ms: if allowed { 0 } else { reset_ms },
            used: after,
        },
        charged: State { a: after, b: s.b },
    }
}

fn sliding(q: &Quota, s: State, cost: u64, now_ms: u64) -> Outcome {
    let w = q.window_ms.max(1);
    let elapsed = now_ms - window_start_ms(w, now_ms);
    let after = s.a.saturating_add(cost).min(super::MAX_COUNT);
    // The order of these operations is the Redis script's.
    let weight = (w - elapsed) as f64 / w as f64;
    let estimate = s.b as f64 * weight + after as f64;
    let allowed = cost <= q.capacity && estimate <= q.limit as f64;
    let reset_ms = until_window_end(w, now_ms);
    let remaining = if allowed {
        (q.limit as f64 - estimate).floor() as u64
    } else {
        0
    };
    let retry_ms = if allowed {
        0
    } else {
        sliding_retry(q, s, cost, w, elapsed)
    };
    Outcome {
        verdict: Verdict {
            allowed,
            remaining,
            reset_ms,
            retry_ms,
            used: if allowed {
                q.limit - remaining
            } else {
                (estimate.ceil() as u64).max(q.limit + 1)
            },
        },
        charged: State { a: after, b: s.b },
    }
}

/// Milliseconds until `cost` fits a sliding window, if nothing else is counted meanwhile:
/// later in this window, while the previous count's weight falls; else in the next window,
/// once this window's count (becoming the previous one) has faded enough. Never 0.
fn sliding_retry(q: &Quota, s: State, cost: u64, w: u64, elapsed: u64) -> u64 {
    let limit = q.limit as f64;
    let wf = w as f64;
    let left = w - elapsed;
    if cost > q.capacity {
        return left;
    }
    let room = limit - (s.a as f64 + cost as f64);
    if room >= 0.0 && s.b > 0 {
        // prev × (left − t) / w ≤ room  ⇔  t ≥ left − room × w / prev
        let t = (left as f64 - room * wf / s.b as f64).ceil();
        if t <= left as f64 {
            return (t as u64).max(1);
        }
    }
    // In the next window: current × (w − t') / w + cost ≤ limit.
    let room_next = limit - cost as f64;
    let t_next = if s.a == 0 {
        0.0
    } else {
        (wf - room_next * wf / s.a as f64).ceil().max(0.0)
    };
    left + t_next as u64
}

fn bucket(q: &Quota, s: State, cost: u64, now_ms: u64) -> Outcome {
    let limit = q.limit.max(1);
    let w = q.window_ms;
    // burst × T, scaled.
    let tolerance = q.capacity.saturating_mul(w);
    // Debt: how far the TAT is ahead of now, in 1/limit ms.
    let debt = if s.a < now_ms || (s.a == now_ms && s.b == 0) {
        0
    } else {
        (s.a - now_ms).saturating_mul(limit).saturating_add(s.b)
    };
    let add = cost.saturating_mul(w);
    let after = debt.saturating_add(add).min(MAX_SCALED * 2);
    let allowed = cost <= q.capacity && after <= tolerance;
    let (verdict_debt, retry_ms) = if allowed {
        (after, 0)
    } else {
        // Until debt + cost fits: (debt − x × limit) + add ≤ tolerance.
        let over = after.saturating_sub(tolerance);
        let retry = if cost > q.capacity {
            // Never fits: the longest meaningful wait, until the bucket is full.
            debt.div_ceil(limit)
        } else {
            over.div_ceil(limit)
        };
        (debt, retry.max(1))
    };
    let remaining = if allowed {
        (tolerance - after) / w.max(1)
    } else {
        0
    };
    Outcome {
        verdict: Verdict {
            allowed,
            remaining,
            reset_ms: verdict_debt.div_ceil(limit),
            retry_ms,
            used: if allowed {
                q.capacity - remaining
            } else {
                q.capacity + 1
            },
        },
        // Never charged below empty (a refused bucket is charged only under strict charging,
        // when the request passes anyway: a shadowed rule, say).
        charged: State {
            a: now_ms + after.min(tolerance) / limit,
            b: after.min(tolerance) % limit,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_040_000; // a whole minute

    fn q(algorithm: Algorithm, limit: u32, unit: Unit, burst: Option<u32>) -> Quota {
        Quota::new(algorithm, limit, unit, 1, burst)
    }

    /// Charges `cost` at each time while it fits, returning the decisions.
    fn run(q: &Quota, times_costs: &[(u64, u64)]) -> Vec<Verdict> {
        let mut state = State::default();
        let mut window = None;
        times_costs
            .iter()
            .map(|&(t, c)| {
                if q.algorithm != Algorithm::TokenBucket {
                    let start = window_start_ms(q.window_ms, t);
                    match window {
                        Some(w) if w == start => {}
                        Some(w) if w + q.window_ms == start => {
                            state = State { a: 0, b: state.a };
                        }
                        _ => state = State::default(),
                    }
                    window = Some(start);
                }
                let o = evaluate(q, state, c, t);
                if o.verdict.allowed {
                    state = o.charged;
                }
                o.verdict
            })
            .collect()
    }

    #[test]
    fn fixed_window_counts_to_the_limit_and_resets_at_the_epoch_aligned_edge() {
        let q = q(Algorithm::FixedWindow, 3, Unit::Minute, None);
        let v = run(
            &q,
            &[(T0, 1), (T0 + 1_500, 2), (T0 + 59_999, 1), (T0 + 60_000, 1)],
        );
        assert_eq!(
            (v[0].allowed, v[0].remaining, v[0].reset_ms),
            (true, 2, 60_000)
        );
        assert_eq!(
            (v[1].allowed, v[1].remaining, v[1].reset_ms),
            (true, 0, 59_000)
        );
        assert_eq!((v[2].allowed, v[2].retry_ms, v[2].used), (false, 1_000, 4));
        assert_eq!((v[3].allowed, v[3].remaining), (true, 2));
    }

    #[test]
    fn a_cost_above_the_capacity_never_fits() {
        for a in Algorithm::ALL {
            let q = q(a, 5, Unit::Second, None);
            let o = evaluate(&q, State::default(), 6, T0);
            assert!(!o.verdict.allowed, "{a:?}");
        }
    }

    #[test]
    fn a_zero_limit_refuses_every_request_with_a_cost_even_with_a_burst() {
        for burst in [None, Some(5)] {
            for a in Algorithm::ALL {
                let q = q(
                    a,
                    0,
                    Unit::Minute,
                    burst.filter(|_| a == Algorithm::TokenBucket),
                );
                assert_eq!(q.capacity, 0, "{a:?}");
                let mut s = State::default();
                for t in [T0, T0 + 60_000, T0 + 3_600_000] {
                    let o = evaluate(&q, s, 1, t);
                    assert!(!o.verdict.allowed, "{a:?} {burst:?} at {t}");
                    let o = evaluate(&q, s, 0, t);
                    assert!(o.verdict.allowed, "a check without a cost passes");
                    assert_eq!(o.verdict.remaining, 0);
                    s = o.charged;
                }
            }
        }
    }

    #[test]
    fn sliding_window_weighs_the_previous_window_by_its_remaining_overlap() {
        let q = q(Algorithm::SlidingWindow, 10, Unit::Minute, None);
        // 10 in the previous window; a quarter into this one, 7.5 of them still count.
        let s = State { a: 0, b: 10 };
        let o = evaluate(&q, s, 2, T0 + 15_000);
        assert!(o.verdict.allowed);
        assert_eq!(o.verdict.remaining, 0); // 10 − (7.5 + 2) = 0.5, rounded down
        let o = evaluate(&q, State { a: 2, b: 10 }, 1, T0 + 15_000);
        assert!(!o.verdict.allowed);
        // Fits once 10 × (45 − t) / 60 + 3 ≤ 10, i.e. t ≥ 3 s.
        assert_eq!(o.verdict.retry_ms, 3_000);
        // No previous count and a full current window: wait for this one to fade next window.
        let o = evaluate(&q, State { a: 10, b: 0 }, 1, T0 + 30_000);
        assert_eq!(o.verdict.retry_ms, 30_000 + 6_000);
    }

    #[test]
    fn token_bucket_allows_the_burst_then_refills_at_the_rate() {
        // 3 per minute (a token every 20 s), burst 5.
        let q = q(Algorithm::TokenBucket, 3, Unit::Minute, Some(5));
        let mut s = State::default();
        for i in 0..5 {
            let o = evaluate(&q, s, 1, T0);
            assert!(o.verdict.allowed, "burst request {i}");
            assert_eq!(o.verdict.remaining, 4 - i);
            s = o.charged;
        }
        let o = evaluate(&q, s, 1, T0);
        assert!(!o.verdict.allowed);
        assert_eq!(o.verdict.retry_ms, 20_000);
        assert_eq!(
            o.verdict.reset_ms, 100_000,
            "full again after 5 tokens × 20 s"
        );
        let o = evaluate(&q, s, 1, T0 + 19_999);
        assert_eq!((o.verdict.allowed, o.verdict.retry_ms), (false, 1));
        let o = evaluate(&q, s, 1, T0 + 20_000);
        assert!(o.verdict.allowed);
        assert_eq!(o.verdict.remaining, 0);
    }

    #[test]
    fn token_bucket_refills_exactly_when_the_interval_is_not_whole_milliseconds() {
        // 3 per second: a token every 333⅓ ms; burst 3.
        let q = q(Algorithm::TokenBucket, 3, Unit::Second, None);
        let mut s = State::default();
        for _ in 0..3 {
            let o = evaluate(&q, s, 1, T0);
            assert!(o.verdict.allowed);
            s = o.charged;
        }
        assert!(!evaluate(&q, s, 1, T0 + 333).verdict.allowed);
        assert_eq!(evaluate(&q, s, 1, T0 + 333).verdict.retry_ms, 1);
        let o = evaluate(&q, s, 1, T0 + 334);
        assert!(o.verdict.allowed);
        // Over a long run, exactly 3 per second are admitted.
        let mut s = State::default();
        let mut admitted = 0;
        for t in (0..10_000).step_by(7) {
            let o = evaluate(&q, s, 1, T0 + t);
            if o.verdict.allowed {
                admitted += 1;
                s = o.charged;
            }
        }
        assert_eq!(admitted, 3 + 30 - 1, "the burst, then 3 a second for 10 s");
    }
}
