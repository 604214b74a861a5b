//! One request's checks decided together: every limit of every limited descriptor is
//! evaluated against the state its keys held at one instant, then the charging policy picks
//! which to charge. The in-memory store runs [`decide`] under the locks of every key it
//! touches; the Redis script does the same steps in the same order, so both stores decide
//! alike (property tests compare them).

use smallvec::SmallVec;

use super::algorithm::{evaluate, Algorithm, Quota, State, Verdict};

/// Which checks a request charges (`STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`, `STRICT_CHARGING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Charging {
    /// The reference's default: every fitting check is charged, and a fixed window is charged
    /// even when over its limit. A refused sliding-window or token-bucket check is not (its
    /// Retry-After would otherwise be wrong the moment it is sent).
    #[default]
    Always,
    /// The reference's `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT=true`: when any check would be
    /// over, only the checks that would be over are charged (fixed windows; the reference
    /// increments exactly those keys); otherwise all are. Decided atomically, in one round trip.
    StopWhenOver,
    /// [`Charging::StopWhenOver`] when some check of the request is already known to be over
    /// (answered from the local cache, `crate::local_cache`): only the checks that would be
    /// over are charged.
    OnlyOver,
    /// `STRICT_CHARGING=true`: a request is charged to all its checks or to none. One refused
    /// by the answer charges nothing anywhere.
    AllOrNothing,
    /// Nothing is charged or written: the usage view (`/usage`, `ratelimitd usage`).
    Never,
}

/// How one limited descriptor's refusal counts toward refusing the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Role {
    /// The rule's `shadow_mode`: never refuses.
    pub shadow: bool,
    /// A quota descriptor (`quota_mode`, `QUOTA_MODE`): refuses only with all the others.
    pub quota: bool,
}

/// One limit of one limited descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Index of its descriptor among the request's limited descriptors (into
    /// [`Batch::roles`]).
    pub descriptor: usize,
    pub quota: Quota,
    /// The state's key: the current window's counter, or the bucket.
    pub key: String,
    /// Sliding window: the previous window's counter.
    pub previous: Option<String>,
    /// `hits_addend`; 0 checks without charging.
    pub cost: u64,
    /// Extra seconds of life for the keys (`EXPIRATION_JITTER_MAX_SECONDS`), so keys written
    /// together do not all expire together.
    pub jitter_secs: u64,
    /// Its limit's unit is `SECOND` (whatever the multiplier or algorithm): with
    /// `REDIS_PERSECOND=true` its keys live in the per-second Redis, as in the reference.
    pub per_second: bool,
}

impl Check {
    /// When a charged key is no longer needed (Unix ms): the end of its window (of the next
    /// one for a sliding window, whose count is read then as the previous one), or when the
    /// bucket is full again.
    pub fn ends_ms(&self, now_ms: u64, charged: &State) -> u64 {
        let w = self.quota.window_ms.max(1);
        match self.quota.algorithm {
            Algorithm::FixedWindow => super::algorithm::window_start_ms(w, now_ms) + w,
            Algorithm::SlidingWindow => super::algorithm::window_start_ms(w, now_ms) + 2 * w,
            Algorithm::TokenBucket => charged.a + 1,
        }
    }

    /// [`Check::ends_ms`] plus the jitter: when Redis may expire the key.
    pub fn expires_ms(&self, now_ms: u64, charged: &State) -> u64 {
        self.ends_ms(now_ms, charged)
            .saturating_add(self.jitter_secs.saturating_mul(1000))
    }
}

/// How many checks (and descriptors) a request's lists hold inline, in `SmallVec`s, before
/// they go to the heap: Envoy's usual requests carry one to three descriptors, and each of
/// their lists then costs no allocation.
pub const INLINE_CHECKS: usize = 4;

/// Everything a store needs to decide one request.
#[derive(Debug, Clone)]
pub struct Batch<'a> {
    pub checks: &'a [Check],
    /// Per limited descriptor.
    pub roles: &'a [Role],
    /// Quota descriptors in the request, including those with no rule under `QUOTA_MODE`:
    /// the request is refused when that many are.
    pub quota_total: usize,
    pub charging: Charging,
    /// `SHADOW_MODE`: the answer is never a refusal, so strict charging charges.
    pub never_refuse: bool,
    pub now_ms: u64,
}

impl<'a> Batch<'a> {
    /// `checks`, all of one plain descriptor (neither shadowed nor a quota one), under the
    /// default charging, at `now_ms`: the commonest request.
    pub fn plain(checks: &'a [Check], now_ms: u64) -> Self {
        Batch {
            checks,
            roles: &[Role {
                shadow: false,
                quota: false,
            }],
            quota_total: 0,
            charging: Charging::Always,
            never_refuse: false,
            now_ms,
        }
    }
}

/// A request's decisions, one per check in order: inline for the usual few checks, like the
/// checks themselves, so a store's answer costs no allocation.
pub type DecidedList = SmallVec<[Decided; INLINE_CHECKS]>;

/// One check's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    pub verdict: Verdict,
    /// The state to store, when charged.
    pub charge: Option<State>,
    /// Answered from the local cache (`LOCAL_CACHE_SIZE_IN_BYTES`), not by the store.
    pub cached: bool,
}

/// Decides every check of `batch` from `states` (one per check, read at one instant; absent
/// keys are `State::default()`), in order. Checks are decided one after another, each seeing
/// what the checks before it charged to the same keys (two descriptors sharing a counter
/// through `share_threshold` count one after the other, as the reference's pipeline does).
pub fn decide(batch: &Batch<'_>, states: &[State]) -> DecidedList {
    let now = batch.now_ms;
    let checks = batch.checks;
    let fits = |c: &Check| c.cost <= c.quota.capacity;
    // The reference reads every counter first and judges each against what it read.
    let would_over: Vec<bool> = match batch.charging {
        Charging::StopWhenOver | Charging::OnlyOver => checks
            .iter()
            .zip(states)
            .map(|(c, s)| !evaluate(&c.quota, *s, c.cost, now).verdict.allowed)
            .collect(),
        _ => Vec::new(),
    };
    let any_over = batch.charging == Charging::OnlyOver || would_over.iter().any(|&o| o);
    let mut out = DecidedList::with_capacity(checks.len());
    for (i, c) in checks.iter().enumerate() {
        let state = current(checks, states, &out, i);
        let o = evaluate(&c.quota, state, c.cost, now);
        let fixed = c.quota.algorithm == Algorithm::FixedWindow;
        let charge = fits(c)
            && match batch.charging {
                Charging::Always => o.verdict.allowed || fixed,
                Charging::StopWhenOver | Charging::OnlyOver => {
                    !any_over || (would_over.get(i).copied().unwrap_or(false) && fixed)
                }
                // Tentatively; undone below if the request is refused.
                Charging::AllOrNothing => true,
                Charging::Never => false,
            };
        out.push(Decided {
            verdict: if charge || !o.verdict.allowed {
                o.verdict
            } else {
                standing(c, state, now)
            },
            charge: charge.then_some(o.charged),
            cached: false,
        });
    }
    if batch.charging == Charging::AllOrNothing && refused(batch, &out) {
        // Nothing is charged: every check as it stands without this request.
        for ((c, s), d) in checks.iter().zip(states).zip(&mut out) {
            let o = evaluate(&c.quota, *s, c.cost, now);
            *d = Decided {
                verdict: if o.verdict.allowed {
                    standing(c, *s, now)
                } else {
                    o.verdict
                },
                charge: None,
                cached: false,
            };
        }
    }
    out
}

/// A check that fits but is not charged: its limit as it stands, without this request.
fn standing(c: &Check, state: State, now: u64) -> Verdict {
    let mut verdict = evaluate(&c.quota, state, 0, now).verdict;
    verdict.allowed = true;
    verdict
}

/// Check `i`'s state: as read, unless an earlier check of the batch charged its key (or, for
/// a sliding window, its previous window's key). `decided` holds the checks before `i`, whose
/// `charge` is what they wrote (no second list of charges is kept).
fn current(checks: &[Check], states: &[State], decided: &[Decided], i: usize) -> State {
    let (Some(c), Some(read)) = (checks.get(i), states.get(i)) else {
        return State::default();
    };
    let latest = |key: &str| {
        checks
            .iter()
            .zip(decided)
            .take(i)
            .rev()
            .find_map(|(other, d)| d.charge.filter(|_| other.key == key))
    };
    let mut state = *read;
    if let Some(s) = latest(&c.key) {
        state.a = s.a;
        if c.previous.is_none() {
            state.b = s.b;
        }
    }
    if let Some(prev) = &c.previous {
        if let Some(s) = latest(prev) {
            state.b = s.a;
        }
    }
    state
}

/// Whether the answer to the request will be a refusal, as the service computes it: a
/// refused descriptor that is neither shadowed nor a quota descriptor, or every quota
/// descriptor refused. `decided` is in the order of `batch.checks`.
pub fn refused(batch: &Batch<'_>, decided: &[Decided]) -> bool {
    if batch.never_refuse {
        return false;
    }
    let mut over = vec![false; batch.roles.len()];
    for (c, d) in batch.checks.iter().zip(decided) {
        if !d.verdict.allowed {
            if let Some(d) = over.get_mut(c.descriptor) {
                *d = true;
            }
        }
    }
    let mut failed_quota = 0;
    for (role, over) in batch.roles.iter().zip(over) {
        if over && !role.shadow {
            if role.quota {
                failed_quota += 1;
            } else {
                return true;
            }
        }
    }
    batch.quota_total > 0 && failed_quota == batch.quota_total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Unit;

    const NOW: u64 = 1_700_000_040_000;

    fn check(descriptor: usize, algorithm: Algorithm, limit: u32, cost: u64) -> Check {
        Check {
            descriptor,
            quota: Quota::new(algorithm, limit, Unit::Minute, 1, None),
            key: format!("k{descriptor}"),
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

    fn count(n: u64) -> State {
        State { a: n, b: 0 }
    }

    #[test]
    fn by_default_fixed_windows_count_even_when_over_and_other_algorithms_do_not() {
        let checks = [
            check(0, Algorithm::FixedWindow, 5, 1),
            check(1, Algorithm::SlidingWindow, 5, 1),
            check(2, Algorithm::FixedWindow, 5, 1),
        ];
        let roles = [Role::default(); 3];
        let d = decide(
            &batch(&checks, &roles, Charging::Always),
            &[count(5), count(5), count(1)],
        );
        assert_eq!(
            d[0].charge,
            Some(count(6)),
            "over, counted as the reference does"
        );
        assert!(!d[0].verdict.allowed);
        assert_eq!(d[1].charge, None, "a refused sliding window is not charged");
        assert_eq!(d[2].charge, Some(count(2)));
    }

    #[test]
    fn stop_when_over_charges_only_the_checks_that_would_be_over() {
        let checks = [
            check(0, Algorithm::FixedWindow, 5, 1),
            check(1, Algorithm::FixedWindow, 5, 1),
        ];
        let roles = [Role::default(); 2];
        let b = batch(&checks, &roles, Charging::StopWhenOver);
        let d = decide(&b, &[count(5), count(1)]);
        assert_eq!(d[0].charge, Some(count(6)));
        assert_eq!(d[1].charge, None);
        // The uncharged one reports its count as it stands: 4 left.
        assert!(d[1].verdict.allowed);
        assert_eq!(d[1].verdict.remaining, 4);
        // Nothing over: everything charged.
        let d = decide(&b, &[count(1), count(1)]);
        assert_eq!((d[0].charge, d[1].charge), (Some(count(2)), Some(count(2))));
    }

    #[test]
    fn only_over_charges_the_checks_that_would_be_over_even_when_none_is() {
        let checks = [
            check(0, Algorithm::FixedWindow, 5, 1),
            check(1, Algorithm::FixedWindow, 5, 1),
            check(2, Algorithm::TokenBucket, 5, 1),
        ];
        let roles = [Role::default(); 3];
        let b = batch(&checks, &roles, Charging::OnlyOver);
        // Nothing over here (another check, answered elsewhere, is): nothing charged.
        let d = decide(&b, &[count(1), count(1), State::default()]);
        assert!(d.iter().all(|d| d.charge.is_none()));
        assert_eq!(d[0].verdict.remaining, 4, "as it stands");
        // A fixed window over: that one alone is charged, as under StopWhenOver.
        let d = decide(&b, &[count(5), count(1), State::default()]);
        assert_eq!(d[0].charge, Some(count(6)));
        assert_eq!((d[1].charge, d[2].charge), (None, None));
    }

    #[test]
    fn strict_charging_charges_everything_or_nothing() {
        let checks = [
            check(0, Algorithm::FixedWindow, 5, 1),
            check(1, Algorithm::TokenBucket, 5, 1),
        ];
        let roles = [Role::default(); 2];
        let b = batch(&checks, &roles, Charging::AllOrNothing);
        let d = decide(&b, &[count(5), State::default()]);
        assert!(d.iter().all(|d| d.charge.is_none()));
        assert!(d[1].verdict.allowed);
        assert_eq!(d[1].verdict.remaining, 5, "the bucket untouched");
        let d = decide(&b, &[count(1), State::default()]);
        assert!(d.iter().all(|d| d.charge.is_some()));
        assert_eq!(d[1].verdict.remaining, 4);
    }

    #[test]
    fn strict_charging_follows_shadow_and_quota_roles() {
        let checks = [
            check(0, Algorithm::FixedWindow, 5, 1),
            check(1, Algorithm::FixedWindow, 5, 1),
        ];
        // A shadowed descriptor over its limit does not refuse the request: both charged.
        let roles = [
            Role {
                shadow: true,
                quota: false,
            },
            Role::default(),
        ];
        let d = decide(
            &batch(&checks, &roles, Charging::AllOrNothing),
            &[count(5), count(0)],
        );
        assert!(d.iter().all(|d| d.charge.is_some()));
        // One of two quota descriptors over: the request passes, so both are charged.
        let roles = [Role {
            shadow: false,
            quota: true,
        }; 2];
        let b = batch(&checks, &roles, Charging::AllOrNothing);
        assert!(decide(&b, &[count(5), count(0)])
            .iter()
            .all(|d| d.charge.is_some()));
        // Both over: refused, nothing charged.
        assert!(decide(&b, &[count(5), count(5)])
            .iter()
            .all(|d| d.charge.is_none()));
    }

    #[test]
    fn a_cost_above_the_capacity_is_never_charged() {
        let checks = [check(0, Algorithm::FixedWindow, 5, 6)];
        let roles = [Role::default()];
        for charging in [
            Charging::Always,
            Charging::StopWhenOver,
            Charging::AllOrNothing,
        ] {
            let d = decide(&batch(&checks, &roles, charging), &[count(0)]);
            assert_eq!(d[0].charge, None, "{charging:?}");
            assert!(!d[0].verdict.allowed);
        }
    }

    #[test]
    fn checks_sharing_a_key_count_one_after_the_other() {
        let mut second = check(1, Algorithm::FixedWindow, 60, 1);
        second.key = "k0".to_owned();
        let checks = [check(0, Algorithm::FixedWindow, 60, 1), second];
        let roles = [Role::default(); 2];
        for charging in [
            Charging::Always,
            Charging::StopWhenOver,
            Charging::AllOrNothing,
        ] {
            let d = decide(&batch(&checks, &roles, charging), &[count(1), count(1)]);
            let got: Vec<_> = d.iter().map(|d| (d.verdict.remaining, d.charge)).collect();
            assert_eq!(
                got,
                [(58, Some(count(2))), (57, Some(count(3)))],
                "{charging:?}"
            );
        }
    }
}
