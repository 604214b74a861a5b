//! `LOCAL_CACHE_SIZE_IN_BYTES`: fixed-window counters known to be over their limit for the
//! rest of their window, answered here with no store round trip (the reference keeps them in
//! freecache).
//!
//! Exact, not a guess: an entry is added only when the count *stored* for a fixed window is
//! above its limit, and that count only grows until the window ends (the key names the
//! window), so every later check of the key in that window is over, whatever its cost.
//! Entries lapse at the window's end. Sliding windows and token buckets are not cached: when
//! their refusal ends depends on the next request's cost and on time, not on the window.
//!
//! A check answered here is not charged: its counter is already above the limit (the
//! reference skips its increment too). The rest of the request still goes to the store, with
//! the charging policy adjusted so that it decides what it would have with the cached checks
//! in the batch ([`LocalCache::answer`]).
//!
//! Bounded in bytes: keys come from traffic. quick_cache weighs each entry (key length plus a
//! fixed overhead) and evicts by weight, so the cache holds at most the configured size.

use quick_cache::{sync::Cache, Weighter};

use crate::limiter::{
    algorithm::{evaluate, State},
    engine::{Batch, Charging, Check, Decided},
    Algorithm,
};

/// Bytes an entry costs besides its key: the value, the table slot and the allocation's
/// header, roughly.
const ENTRY_OVERHEAD: u64 = 64;

/// A cached counter: its count when last stored, and when its window ends (Unix ms).
#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u64,
    ends_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct ByBytes;

impl Weighter<String, Entry> for ByBytes {
    fn weight(&self, key: &String, _: &Entry) -> u64 {
        key.len() as u64 + ENTRY_OVERHEAD
    }
}

/// The checks of a request answered from the cache, and how the store charges the others.
#[derive(Debug)]
pub struct Local {
    /// Per check of the batch: its decision when answered here.
    pub decided: Vec<Option<Decided>>,
    /// The charging policy for the checks left to the store.
    pub charging: Charging,
}

/// Over-limit fixed windows, bounded in bytes.
pub struct LocalCache {
    entries: Cache<String, Entry, ByBytes>,
}

impl LocalCache {
    /// A cache of at most `bytes`; `None` for 0 (disabled, as in the reference).
    pub fn new(bytes: u64) -> Option<Self> {
        if bytes == 0 {
            return None;
        }
        // quick_cache sizes its tables from the item estimate up front: keep it to what the
        // bytes can hold with short keys, and bounded.
        let items = usize::try_from(bytes / (ENTRY_OVERHEAD + 32))
            .unwrap_or(usize::MAX)
            .clamp(16, 1 << 22);
        Some(Self {
            entries: Cache::with_weighter(items, bytes, ByBytes),
        })
    }

    /// Entries held (some may have lapsed and not been evicted yet).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The count cached for `key`, while its window lasts.
    fn count(&self, key: &str, now_ms: u64) -> Option<u64> {
        self.entries
            .get(key)
            .filter(|e| now_ms < e.ends_ms)
            .map(|e| e.count)
    }

    /// Answers the checks of `batch` that the cache can, or `None` when it can answer none
    /// (then the batch goes to the store unchanged).
    ///
    /// The store's policy for the rest, so that it charges what it would have charged with
    /// the cached checks present (they are over, and would not be charged under any policy
    /// in a way anyone can observe: their count is already above the limit):
    /// - always: unchanged;
    /// - stop when over: only the checks that would be over ([`Charging::OnlyOver`]), since
    ///   one already is;
    /// - strict: nothing when a cached check refuses the request by itself (neither shadowed
    ///   nor a quota descriptor); a quota descriptor's check is not answered here, because
    ///   whether it refuses depends on the others.
    ///
    /// Not used for [`Charging::Never`] (`/usage` reads the store).
    pub fn answer(&self, batch: &Batch<'_>) -> Option<Local> {
        if matches!(batch.charging, Charging::Never) {
            return None;
        }
        let strict = batch.charging == Charging::AllOrNothing && !batch.never_refuse;
        let mut decided: Option<Vec<Option<Decided>>> = None;
        let mut refuses = false;
        for (i, c) in batch.checks.iter().enumerate() {
            if c.quota.algorithm != Algorithm::FixedWindow {
                continue;
            }
            let role = batch.roles.get(c.descriptor).copied().unwrap_or_default();
            if strict && role.quota {
                continue;
            }
            let Some(count) = self.count(&c.key, batch.now_ms) else {
                continue;
            };
            let state = State { a: count, b: 0 };
            let verdict = evaluate(&c.quota, state, c.cost, batch.now_ms).verdict;
            if verdict.allowed {
                // Cannot happen (the count is above the limit); the store decides then.
                continue;
            }
            refuses |= !role.shadow && !role.quota;
            let slot = decided
                .get_or_insert_with(|| vec![None; batch.checks.len()])
                .get_mut(i)?;
            *slot = Some(Decided {
                verdict,
                charge: None,
                cached: true,
            });
        }
        let decided = decided?;
        let charging = match batch.charging {
            Charging::StopWhenOver | Charging::OnlyOver => Charging::OnlyOver,
            Charging::AllOrNothing if strict && refuses => Charging::Never,
            other => other,
        };
        Some(Local { decided, charging })
    }

    /// Remembers the fixed windows that `decided` stored above their limit, until their
    /// windows end.
    pub fn remember(&self, checks: &[Check], decided: &[Decided], now_ms: u64) {
        for (c, d) in checks.iter().zip(decided) {
            let Some(state) = d.charge else { continue };
            if c.quota.algorithm == Algorithm::FixedWindow && state.a > c.quota.capacity {
                let ends_ms = c.ends_ms(now_ms, &state);
                self.entries.insert(
                    c.key.clone(),
                    Entry {
                        count: state.a,
                        ends_ms,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{
        algorithm::Quota,
        engine::{decide, Role},
        Unit,
    };

    /// 40 s into a minute: 20 s left in the window.
    const NOW: u64 = 1_700_000_080_000;

    fn check(key: &str, algorithm: Algorithm, cost: u64) -> Check {
        Check {
            descriptor: 0,
            quota: Quota::new(algorithm, 2, Unit::Minute, 1, None),
            key: key.to_owned(),
            previous: None,
            cost,
            jitter_secs: 0,
            per_second: false,
        }
    }

    fn batch<'a>(checks: &'a [Check], roles: &'a [Role], charging: Charging) -> Batch<'a> {
        Batch {
            checks,
            roles,
            quota_total: roles.iter().filter(|r| r.quota).count(),
            charging,
            never_refuse: false,
            now_ms: NOW,
        }
    }

    fn over(cache: &LocalCache, c: &Check) {
        let d = decide(
            &batch(
                std::slice::from_ref(c),
                &[Role::default()],
                Charging::Always,
            ),
            &[State { a: 2, b: 0 }],
        );
        cache.remember(std::slice::from_ref(c), &d, NOW);
    }

    #[test]
    fn zero_bytes_disables_it() {
        assert!(LocalCache::new(0).is_none());
    }

    #[test]
    fn a_fixed_window_stored_over_its_limit_is_answered_until_its_window_ends() {
        let cache = LocalCache::new(1 << 20).unwrap();
        let c = check("d_k_v_1700000040", Algorithm::FixedWindow, 1);
        assert_eq!(NOW % 60_000, 40_000);
        over(&cache, &c);
        assert_eq!(cache.len(), 1);
        let checks = [c];
        let roles = [Role::default()];
        let local = cache
            .answer(&batch(&checks, &roles, Charging::Always))
            .unwrap();
        let d = local.decided[0].unwrap();
        assert!(d.cached && d.charge.is_none());
        assert!(!d.verdict.allowed);
        assert_eq!(d.verdict.remaining, 0);
        assert_eq!(d.verdict.reset_ms, 20_000);
        assert_eq!(local.charging, Charging::Always);
        // A cost of 0 is over as well: the stored count (3) is above the limit (2).
        let checks = [check("d_k_v_1700000040", Algorithm::FixedWindow, 0)];
        assert!(cache
            .answer(&batch(&checks, &roles, Charging::Always))
            .is_some());
        // At the window's end the entry lapses.
        let mut late = batch(&checks, &roles, Charging::Always);
        late.now_ms = NOW + 20_000;
        assert!(cache.answer(&late).is_none());
    }

    #[test]
    fn only_counts_stored_above_the_limit_are_cached() {
        let cache = LocalCache::new(1 << 20).unwrap();
        let roles = [Role::default()];
        // Refused but not charged (strict charging): a smaller cost may still fit later.
        let c = check("strict", Algorithm::FixedWindow, 1);
        let b = batch(std::slice::from_ref(&c), &roles, Charging::AllOrNothing);
        let d = decide(&b, &[State { a: 2, b: 0 }]);
        cache.remember(std::slice::from_ref(&c), &d, NOW);
        // Charged up to the limit, not above: the next hit decides.
        let c = check("full", Algorithm::FixedWindow, 1);
        let b = batch(std::slice::from_ref(&c), &roles, Charging::Always);
        let d = decide(&b, &[State { a: 1, b: 0 }]);
        cache.remember(std::slice::from_ref(&c), &d, NOW);
        // Token buckets are never cached.
        let c = check("bucket", Algorithm::TokenBucket, 5);
        let d = [Decided {
            charge: Some(State { a: u64::MAX, b: 0 }),
            ..d[0]
        }];
        cache.remember(std::slice::from_ref(&c), &d, NOW);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_rest_is_charged_as_the_store_would_have_with_the_cached_checks() {
        let cache = LocalCache::new(1 << 20).unwrap();
        let cached = check("cached", Algorithm::FixedWindow, 1);
        over(&cache, &cached);
        let mut other = check("other", Algorithm::FixedWindow, 1);
        other.descriptor = 1;
        let checks = [cached, other];
        let plain = [Role::default(); 2];
        let charging = |roles: &[Role], c| cache.answer(&batch(&checks, roles, c)).unwrap();
        assert_eq!(
            charging(&plain, Charging::StopWhenOver).charging,
            Charging::OnlyOver
        );
        assert_eq!(
            charging(&plain, Charging::AllOrNothing).charging,
            Charging::Never,
            "refused by the cached check: nothing charged"
        );
        let shadowed = [
            Role {
                shadow: true,
                quota: false,
            },
            Role::default(),
        ];
        assert_eq!(
            charging(&shadowed, Charging::AllOrNothing).charging,
            Charging::AllOrNothing
        );
        let quota = [
            Role {
                shadow: false,
                quota: true,
            },
            Role::default(),
        ];
        assert!(
            cache
                .answer(&batch(&checks, &quota, Charging::AllOrNothing))
                .is_none(),
            "a quota descriptor's check goes to the store under strict charging"
        );
        assert!(cache
            .answer(&batch(&checks, &plain, Charging::Never))
            .is_none());
    }

    #[test]
    fn it_holds_no_more_than_its_size() {
        let cache = LocalCache::new(64 * 1024).unwrap();
        for i in 0..10_000 {
            over(
                &cache,
                &check(&format!("key-{i:0>40}"), Algorithm::FixedWindow, 1),
            );
        }
        let held = cache.entries.weight();
        assert!(held <= 64 * 1024, "{held} bytes held");
        assert!(cache.len() < 10_000);
    }
}
