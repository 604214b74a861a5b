//! A request's checks spread over several stores, decided concurrently and merged back in
//! order: [`Parted`] says which part each check belongs to and decides one part; [`decide`]
//! does the rest. Two users:
//!
//! - `REDIS_PERSECOND=true` ([`SplitStore`]): the checks of limits whose unit is `SECOND` are
//!   counted in a second Redis, every other check in the main one, as the reference does (its
//!   `CacheKey.PerSecond`). Keys are the same in either; only the server differs.
//! - `REDIS_TYPE=cluster` (`cluster.rs`): one part per hash slot, since one script call can
//!   only touch keys of one slot.
//!
//! A request whose checks all belong to one part is one call, as without the split. Otherwise
//! each part is a sub-batch, all sent concurrently; each check keeps its descriptor index, and
//! each sub-batch carries the request's roles, quota count and `never_refuse`. That is exact
//! for [`Charging::Always`], [`Charging::Never`] and [`Charging::OnlyOver`], where a check's
//! decision depends only on its own keys.
//!
//! [`Charging::StopWhenOver`] and [`Charging::AllOrNothing`] depend on every check, so across
//! parts they are decided from a read, then charged: phase 1 asks every part charging
//! nothing; phase 2 charges what the one-store engine would charge given those verdicts. Each
//! call is atomic within its part, not across parts: a hit landing between the phases is seen
//! by phase 2's own checks in that part only. The reference is not atomic here either (it GETs
//! every key, then INCRBYs).
//!
//! Any part failing fails the request with its error (the first part's, in part order). The
//! other parts may have been charged by then, as with the reference, which sends to all.

use std::{collections::BTreeMap, future::Future};

use super::{RedisSettings, RedisStore, Store, StoreError};
use crate::limiter::engine::{refused, Batch, Charging, Check, Decided, DecidedList};

/// Stores over which a batch's checks are spread, each check in exactly one part.
pub(super) trait Parted: Sync {
    /// The part `c` belongs to; parts are decided (and their errors reported) in this order.
    fn part_of(&self, c: &Check) -> u32;

    /// Decides `batch`, whose checks all belong to `part`, on that part's store.
    fn decide_part(
        &self,
        part: u32,
        batch: &Batch<'_>,
    ) -> impl Future<Output = Result<DecidedList, StoreError>> + Send;
}

/// Decides `batch` over `stores`' parts, as one store would decide it (see the module doc for
/// what is atomic).
pub(super) async fn decide<P: Parted>(
    stores: &P,
    batch: &Batch<'_>,
) -> Result<DecidedList, StoreError> {
    let mut of = batch.checks.iter().map(|c| stores.part_of(c));
    let Some(first) = of.next() else {
        return Ok(DecidedList::new());
    };
    if of.all(|p| p == first) {
        return stores.decide_part(first, batch).await;
    }
    let all = Parts::new(stores, batch.checks, |_, _| true);
    match batch.charging {
        // Each check's charge depends on its own keys alone.
        Charging::Always | Charging::Never | Charging::OnlyOver => {
            decide_all(stores, batch, &all, batch.charging).await
        }
        Charging::StopWhenOver => {
            let read = decide_all(stores, batch, &all, Charging::Never).await?;
            if read.iter().all(|d| d.verdict.allowed) {
                // Nothing over: everything is charged, each part still stopping at what it
                // finds over by then.
                return decide_all(stores, batch, &all, Charging::StopWhenOver).await;
            }
            // Something over: the engine's own rule for that case, in every part (only the
            // checks that would be over are charged; the others answer as they stand).
            decide_all(stores, batch, &all, Charging::OnlyOver).await
        }
        Charging::AllOrNothing => {
            let read = decide_all(stores, batch, &all, Charging::Never).await?;
            if refused(batch, &read) {
                // Refused: nothing charged anywhere, every check as it stands.
                return Ok(read);
            }
            // Each part charges its checks all or none, so a refusal it finds by then (a hit
            // in between, or checks sharing a key) still charges nothing there.
            decide_all(stores, batch, &all, Charging::AllOrNothing).await
        }
    }
}

/// Decides `parts` concurrently as `charging` (a part without checks costs no round trip);
/// each decision at its check's place in `batch`, `None` where no part has the check.
async fn decide_parts<P: Parted>(
    stores: &P,
    batch: &Batch<'_>,
    parts: &Parts,
    charging: Charging,
) -> Result<Vec<Option<Decided>>, StoreError> {
    let calls = parts.0.iter().map(|(&part, p)| {
        let sub = Batch {
            checks: &p.checks,
            charging,
            ..*batch
        };
        async move { stores.decide_part(part, &sub).await }
    });
    let decided = futures_util::future::join_all(calls).await;
    let mut out = vec![None; batch.checks.len()];
    for (p, decided) in parts.0.values().zip(decided) {
        place(&mut out, &p.at, &decided?)?;
    }
    Ok(out)
}

/// [`decide_parts`] for parts covering every check.
async fn decide_all<P: Parted>(
    stores: &P,
    batch: &Batch<'_>,
    parts: &Parts,
    charging: Charging,
) -> Result<DecidedList, StoreError> {
    complete(decide_parts(stores, batch, parts, charging).await?)
}

/// Two stores: the main one and the one for per-second limits (`REDIS_PERSECOND=true`).
pub struct SplitStore<S = RedisStore> {
    main: S,
    per_second: S,
}

impl SplitStore<RedisStore> {
    /// Both Redis stores, set up as [`RedisStore::new`] does (lazily connected).
    pub fn connect(main: &RedisSettings, per_second: &RedisSettings) -> Result<Self, StoreError> {
        Ok(Self::new(
            RedisStore::new(main)?,
            RedisStore::new(per_second).map_err(StoreError::per_second)?,
        ))
    }

    /// The main Redis.
    pub fn main(&self) -> &RedisStore {
        &self.main
    }

    /// The per-second Redis.
    pub fn per_second(&self) -> &RedisStore {
        &self.per_second
    }

    /// `PING` on both, concurrently; the main one's error first.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let (main, per_second) = tokio::join!(self.main.ping(), self.per_second.ping());
        main?;
        per_second.map_err(StoreError::per_second)
    }
}

impl<S: Store> SplitStore<S> {
    pub fn new(main: S, per_second: S) -> Self {
        Self { main, per_second }
    }
}

/// Part 0 is the main store, part 1 the per-second one.
impl<S: Store> Parted for SplitStore<S> {
    fn part_of(&self, c: &Check) -> u32 {
        u32::from(c.per_second)
    }

    async fn decide_part(&self, part: u32, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        if part == 0 {
            self.main.decide(batch).await
        } else {
            self.per_second
                .decide(batch)
                .await
                .map_err(StoreError::per_second)
        }
    }
}

impl<S: Store> Store for SplitStore<S> {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        decide(self, batch).await
    }
}

/// The checks one part decides, and where each is in the batch.
#[derive(Debug, Default, PartialEq)]
struct Part {
    checks: Vec<Check>,
    at: Vec<usize>,
}

/// A batch's checks split by part, in their order; parts by number.
#[derive(Debug, Default, PartialEq)]
struct Parts(BTreeMap<u32, Part>);

impl Parts {
    /// The checks for which `keep(index, check)` holds, each to its part.
    fn new<P: Parted>(stores: &P, checks: &[Check], keep: impl Fn(usize, &Check) -> bool) -> Self {
        let mut parts = Parts::default();
        for (i, c) in checks.iter().enumerate().filter(|(i, c)| keep(*i, c)) {
            let part = parts.0.entry(stores.part_of(c)).or_default();
            part.checks.push(c.clone());
            part.at.push(i);
        }
        parts
    }
}

/// Puts a part's decisions at their checks' places.
fn place(out: &mut [Option<Decided>], at: &[usize], decided: &[Decided]) -> Result<(), StoreError> {
    if at.len() != decided.len() {
        return Err(StoreError::Reply(format!(
            "{} decisions for {} checks",
            decided.len(),
            at.len()
        )));
    }
    for (&i, d) in at.iter().zip(decided) {
        let slot = out.get_mut(i).ok_or_else(|| {
            StoreError::Reply(format!("a decision for check {i}, beyond the batch"))
        })?;
        *slot = Some(*d);
    }
    Ok(())
}

/// Every check's decision, or an error naming the first check without one.
fn complete(decided: Vec<Option<Decided>>) -> Result<DecidedList, StoreError> {
    decided
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.ok_or_else(|| StoreError::Reply(format!("no decision for check {i}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroUsize, sync::Arc};

    use super::*;
    use crate::{
        limiter::{algorithm::Quota, engine::Role, Algorithm, SystemClock, Unit},
        store::MemoryStore,
    };

    const NOW: u64 = 1_700_000_040_000;

    fn memory() -> MemoryStore {
        MemoryStore::new(Arc::new(SystemClock), NonZeroUsize::new(1000).unwrap())
    }

    /// Descriptor `descriptor`'s check of `limit` a second (per second) or a minute.
    fn check(descriptor: usize, per_second: bool, algorithm: Algorithm, limit: u32) -> Check {
        let unit = if per_second {
            Unit::Second
        } else {
            Unit::Minute
        };
        Check {
            descriptor,
            quota: Quota::new(algorithm, limit, unit, 1, None),
            key: format!("k{descriptor}_{per_second}"),
            previous: algorithm
                .eq(&Algorithm::SlidingWindow)
                .then(|| format!("p{descriptor}_{per_second}")),
            cost: 1,
            jitter_secs: 0,
            per_second,
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

    /// The checks that charge check `i` by `seed[i]` (those with 0 left out).
    fn seeded(checks: &[Check], seed: &[u64]) -> Vec<Check> {
        checks
            .iter()
            .zip(seed)
            .filter(|(_, &n)| n > 0)
            .map(|(c, &n)| Check {
                cost: n,
                ..c.clone()
            })
            .collect()
    }

    /// One store, and the same split in two, with check `i` charged `seed[i]` beforehand.
    async fn stores(checks: &[Check], seed: &[u64]) -> (MemoryStore, SplitStore<MemoryStore>) {
        let one = memory();
        let split = SplitStore::new(memory(), memory());
        let seeded = seeded(checks, seed);
        let roles = vec![Role::default(); checks.len()];
        let b = batch(&seeded, &roles, Charging::Always);
        one.decide(&b).await.unwrap();
        split.decide(&b).await.unwrap();
        (one, split)
    }

    /// Decides `checks` on one store and on a split, and asserts the same decisions and the
    /// same counts afterwards; returns the decisions.
    async fn alike(
        checks: &[Check],
        roles: &[Role],
        charging: Charging,
        seed: &[u64],
    ) -> DecidedList {
        let (one, split) = stores(checks, seed).await;
        let b = batch(checks, roles, charging);
        let want = one.decide(&b).await.unwrap();
        assert_eq!(split.decide(&b).await.unwrap(), want, "{charging:?}");
        let read = batch(checks, roles, Charging::Never);
        assert_eq!(
            split.decide(&read).await.unwrap(),
            one.decide(&read).await.unwrap(),
            "{charging:?}: counts afterwards"
        );
        want
    }

    fn charged(d: &[Decided]) -> Vec<bool> {
        d.iter().map(|d| d.charge.is_some()).collect()
    }

    #[test]
    fn parts_keep_order_and_places_and_merge_back() {
        let checks = [
            check(0, true, Algorithm::FixedWindow, 5),
            check(1, false, Algorithm::FixedWindow, 5),
            check(2, true, Algorithm::TokenBucket, 5),
            check(3, false, Algorithm::SlidingWindow, 5),
        ];
        let stores = SplitStore::new(memory(), memory());
        let parts = Parts::new(&stores, &checks, |_, _| true);
        let at = |parts: &Parts, part: u32| parts.0.get(&part).map(|p| p.at.clone());
        assert_eq!(at(&parts, 1), Some(vec![0, 2]), "per-second");
        assert_eq!(at(&parts, 0), Some(vec![1, 3]), "main");
        assert_eq!(parts.0[&0].checks, [checks[1].clone(), checks[3].clone()]);
        let some = Parts::new(&stores, &checks, |i, _| i != 2);
        assert_eq!(
            (at(&some, 1), at(&some, 0)),
            (Some(vec![0]), Some(vec![1, 3]))
        );
        let none = Parts::new(&stores, &checks, |i, _| i % 2 == 1);
        assert_eq!(at(&none, 1), None, "a part without checks is absent");

        let decided = |remaining| Decided {
            verdict: crate::limiter::algorithm::Verdict {
                allowed: true,
                remaining,
                reset_ms: 0,
                retry_ms: 0,
                used: 0,
            },
            charge: None,
            cached: false,
        };
        let mut out = vec![None; 4];
        place(&mut out, &parts.0[&0].at, &[decided(1), decided(3)]).unwrap();
        assert!(complete(out.clone()).is_err(), "checks 0 and 2 missing");
        place(&mut out, &parts.0[&1].at, &[decided(0), decided(2)]).unwrap();
        let merged = complete(out.clone()).unwrap();
        let remaining: Vec<u64> = merged.iter().map(|d| d.verdict.remaining).collect();
        assert_eq!(remaining, [0, 1, 2, 3]);
        assert!(place(&mut out, &[0, 1], &[decided(0)]).is_err());
        assert!(place(&mut out, &[9], &[decided(0)]).is_err());
    }

    #[tokio::test]
    async fn always_never_and_only_over_decide_as_one_store() {
        let checks = [
            check(0, true, Algorithm::FixedWindow, 2),
            check(1, false, Algorithm::FixedWindow, 5),
            check(2, true, Algorithm::SlidingWindow, 3),
            check(3, false, Algorithm::TokenBucket, 4),
        ];
        let roles = [Role::default(); 4];
        for charging in [Charging::Always, Charging::Never, Charging::OnlyOver] {
            alike(&checks, &roles, charging, &[2, 1, 3, 0]).await;
            alike(&checks, &roles, charging, &[0, 0, 0, 0]).await;
        }
    }

    #[tokio::test]
    async fn stop_when_over_charges_only_the_over_checks_across_stores() {
        let checks = [
            check(0, true, Algorithm::FixedWindow, 3),
            check(1, false, Algorithm::FixedWindow, 3),
            check(2, false, Algorithm::SlidingWindow, 3),
        ];
        let roles = [Role::default(); 3];
        let d = alike(&checks, &roles, Charging::StopWhenOver, &[0, 1, 0]).await;
        assert_eq!(charged(&d), [true, true, true], "nothing over: all charged");
        let d = alike(&checks, &roles, Charging::StopWhenOver, &[3, 1, 0]).await;
        assert_eq!(charged(&d), [true, false, false], "the per-second one over");
        let d = alike(&checks, &roles, Charging::StopWhenOver, &[1, 3, 3]).await;
        assert_eq!(
            charged(&d),
            [false, true, false],
            "main over: its fixed window only"
        );
    }

    #[tokio::test]
    async fn strict_charging_is_all_or_nothing_across_stores() {
        let checks = [
            check(0, true, Algorithm::FixedWindow, 3),
            check(1, false, Algorithm::FixedWindow, 3),
        ];
        let plain = [Role::default(); 2];
        let d = alike(&checks, &plain, Charging::AllOrNothing, &[0, 1]).await;
        assert_eq!(charged(&d), [true, true]);
        let d = alike(&checks, &plain, Charging::AllOrNothing, &[3, 1]).await;
        assert_eq!(charged(&d), [false, false], "per-second over: refused");
        let d = alike(&checks, &plain, Charging::AllOrNothing, &[1, 3]).await;
        assert_eq!(charged(&d), [false, false], "main over: refused");
        // A shadowed descriptor over refuses nothing: both charged.
        let shadow = [
            Role {
                shadow: true,
                quota: false,
            },
            Role::default(),
        ];
        let d = alike(&checks, &shadow, Charging::AllOrNothing, &[3, 1]).await;
        assert_eq!(charged(&d), [true, true]);
        // Quota descriptors, one in each store: refused only when both are over.
        let quota = [Role {
            shadow: false,
            quota: true,
        }; 2];
        let d = alike(&checks, &quota, Charging::AllOrNothing, &[3, 1]).await;
        assert_eq!(charged(&d), [true, true]);
        let d = alike(&checks, &quota, Charging::AllOrNothing, &[3, 3]).await;
        assert_eq!(charged(&d), [false, false]);
    }

    #[tokio::test]
    async fn each_check_counts_in_its_own_store_only() {
        let checks = [
            check(0, true, Algorithm::FixedWindow, 5),
            check(1, false, Algorithm::FixedWindow, 5),
        ];
        let split = SplitStore::new(memory(), memory());
        let roles = [Role::default(); 2];
        split
            .decide(&batch(&checks, &roles, Charging::Always))
            .await
            .unwrap();
        let read = batch(&checks, &roles, Charging::Never);
        let remaining = |d: DecidedList| d.iter().map(|d| d.verdict.remaining).collect::<Vec<_>>();
        assert_eq!(remaining(split.main.decide(&read).await.unwrap()), [5, 4]);
        assert_eq!(
            remaining(split.per_second.decide(&read).await.unwrap()),
            [4, 5]
        );
    }

    /// Three memory stores, check `i` in store `descriptor % 3`: the N-way split.
    struct Three([MemoryStore; 3]);

    impl Parted for Three {
        fn part_of(&self, c: &Check) -> u32 {
            (c.descriptor % 3) as u32
        }

        async fn decide_part(
            &self,
            part: u32,
            batch: &Batch<'_>,
        ) -> Result<DecidedList, StoreError> {
            assert!(batch.checks.iter().all(|c| self.part_of(c) == part));
            self.0[part as usize].decide(batch).await
        }
    }

    #[tokio::test]
    async fn n_parts_decide_as_one_store_in_every_charging_mode() {
        let checks: Vec<Check> = (0..7)
            .map(|i| {
                let algorithm = [
                    Algorithm::FixedWindow,
                    Algorithm::SlidingWindow,
                    Algorithm::TokenBucket,
                ][i % 3];
                check(i, false, algorithm, 3)
            })
            .collect();
        let roles = [Role::default(); 7];
        let seeds: [&[u64]; 4] = [
            &[0; 7],
            &[1, 2, 0, 1, 0, 2, 1],
            &[0, 0, 0, 0, 0, 3, 0],
            &[3, 3, 3, 3, 3, 3, 3],
        ];
        for charging in [
            Charging::Always,
            Charging::Never,
            Charging::OnlyOver,
            Charging::StopWhenOver,
            Charging::AllOrNothing,
        ] {
            for seed in seeds {
                let one = memory();
                let three = Three([memory(), memory(), memory()]);
                let seeded = seeded(&checks, seed);
                let b = batch(&seeded, &roles, Charging::Always);
                one.decide(&b).await.unwrap();
                decide(&three, &b).await.unwrap();
                let b = batch(&checks, &roles, charging);
                let want = one.decide(&b).await.unwrap();
                assert_eq!(
                    decide(&three, &b).await.unwrap(),
                    want,
                    "{charging:?} {seed:?}"
                );
                let read = batch(&checks, &roles, Charging::Never);
                assert_eq!(
                    decide(&three, &read).await.unwrap(),
                    one.decide(&read).await.unwrap(),
                    "{charging:?} {seed:?}: counts afterwards"
                );
            }
        }
    }
}
