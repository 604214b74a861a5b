//! The six counters of one stats key, and how a descriptor's hits are split between them.
//!
//! A configured rule holds its own [`RuleCounters`] in a [`RuleSlot`], filled at the rule's
//! first hit (a series appears in `/metrics` once counted, as with the reference's statsd
//! exporter), so counting later hits is a few atomic adds: no registry or map lookup on the
//! request path. Only stats keys built from request values are looked up per call (in
//! [`super::Stats`]), because they cannot be known in advance.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
};

use metrics::Counter;

use super::{
    NEAR_LIMIT, OVER_LIMIT, OVER_LIMIT_WITH_LOCAL_CACHE, SHADOW_MODE, TOTAL_HITS, WITHIN_LIMIT,
};

/// A configured rule's counters, registered at its first hit and kept with the rule.
pub type RuleSlot = OnceLock<Arc<RuleCounters>>;

/// One limited descriptor's outcome, for counting.
#[derive(Debug, Clone, Copy)]
pub struct HitOutcome {
    pub requests_per_unit: u32,
    pub hits: u64,
    /// Counter value after this request's hits.
    pub after: u64,
    pub shadow_mode: bool,
    /// Answered from the local cache (`LOCAL_CACHE_SIZE_IN_BYTES`): its hits are also counted
    /// in `over_limit_with_local_cache`.
    pub local_cache: bool,
}

/// `total_hits`, `over_limit`, `near_limit`, `within_limit`, `shadow_mode` and
/// `over_limit_with_local_cache` of one stats key.
pub struct RuleCounters {
    total_hits: Counter,
    over_limit: Counter,
    near_limit: Counter,
    within_limit: Counter,
    shadow_mode: Counter,
    over_limit_with_local_cache: Counter,
    /// [`super::Stats`]' coarse clock when last counted, for the idle timeout.
    last_used: AtomicU64,
}

impl fmt::Debug for RuleCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleCounters")
            .field("last_used", &self.last_used)
            .finish_non_exhaustive()
    }
}

impl RuleCounters {
    /// Counters that count nowhere.
    pub fn noop() -> Self {
        Self::new(|_| Counter::noop(), 0)
    }

    /// Registers each of the five metrics with `register` (given the metric name).
    pub(super) fn new(register: impl Fn(&'static str) -> Counter, now: u64) -> Self {
        Self {
            total_hits: register(TOTAL_HITS),
            over_limit: register(OVER_LIMIT),
            near_limit: register(NEAR_LIMIT),
            within_limit: register(WITHIN_LIMIT),
            shadow_mode: register(SHADOW_MODE),
            over_limit_with_local_cache: register(OVER_LIMIT_WITH_LOCAL_CACHE),
            last_used: AtomicU64::new(now),
        }
    }

    pub(super) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// An `increment(0)`: changes no value, and bumps the generation the Prometheus exporter
    /// compares to decide a series is idle (see [`super::Stats`]).
    pub(super) fn mark_changed(&self) {
        for c in [
            &self.total_hits,
            &self.over_limit,
            &self.near_limit,
            &self.within_limit,
            &self.shadow_mode,
            &self.over_limit_with_local_cache,
        ] {
            c.increment(0);
        }
    }

    /// Counts one descriptor's hits at `now` exactly as the reference's base limiter does:
    /// the hits that crossed a threshold are split between the buckets they fall in.
    pub(super) fn record(&self, now: u64, o: HitOutcome, near_limit_ratio: f32) {
        // Written only when the clock moved, so a hot key's counters are not rewritten per hit.
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
        let limit = u64::from(o.requests_per_unit);
        let before = o.after.saturating_sub(o.hits);
        // float32 arithmetic, then floor, as the reference computes it.
        let near = (o.requests_per_unit as f32 * near_limit_ratio).floor() as u64;
        // f32 rounding can put the threshold above the limit (2^24 + 3 rounds up); the
        // subtractions below need near <= limit.
        let near = near.min(limit);
        self.total_hits.increment(o.hits);
        if o.local_cache {
            // The reference counts these hits as over the limit, and here as well.
            self.over_limit_with_local_cache.increment(o.hits);
        }
        if o.after > limit {
            if before >= limit {
                self.over_limit.increment(o.hits);
            } else {
                self.over_limit.increment(o.after - limit);
                self.near_limit.increment(limit - near.max(before));
            }
            if o.shadow_mode {
                let shadowed = if before >= limit {
                    o.hits
                } else {
                    o.after - limit
                };
                self.shadow_mode.increment(shadowed);
            }
        } else {
            if o.after > near {
                let n = if before >= near {
                    o.hits
                } else {
                    o.after - near
                };
                self.near_limit.increment(n);
            }
            self.within_limit.increment(o.hits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_limit_threshold_rounded_above_the_limit_does_not_underflow() {
        let counters = RuleCounters::noop();
        // 2^24 + 3 as f32 rounds up to 2^24 + 4: the threshold would be above the limit.
        let limit = (1u32 << 24) + 3;
        for (hits, after) in [(1, 1), (5, u64::from(limit) + 2), (1, u64::from(limit))] {
            let o = HitOutcome {
                requests_per_unit: limit,
                hits,
                after,
                shadow_mode: false,
                local_cache: false,
            };
            counters.record(7, o, 1.0);
        }
        assert_eq!(counters.last_used(), 7);
    }
}
