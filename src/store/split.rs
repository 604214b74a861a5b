//! `REDIS_PERSECOND=true`: the checks of limits whose unit is `SECOND` are counted in a second
//! Redis, every other check in the main one, as the reference does (its `CacheKey.PerSecond`).
//! Keys are the same in either; only the server differs. Per-second counters are the hottest
//! and shortest-lived, so a deployment can give them a Redis of their own.
//!
//! A request whose checks all belong to one server is one call to it, as without the split.
//! One touching both is split into two sub-batches sent concurrently and merged back in
//! order; each check keeps its descriptor index, and each sub-batch carries the request's
//! roles, quota count and `never_refuse`. That is exact for [`Charging::Always`],
//! [`Charging::Never`] and [`Charging::OnlyOver`], where a check's decision depends only on
//! its own keys.
//!
//! [`Charging::StopWhenOver`] and [`Charging::AllOrNothing`] depend on every check, so across
//! the two servers they are decided from a read, then charged: phase 1 asks both servers
//! charging nothing; phase 2 charges what the one-server engine would charge given those
//! verdicts. Each call is atomic within its server, not across the two: a hit landing between
//! the phases is seen by phase 2's own server-side checks only. The reference is not atomic
//! here either (it GETs every key from both pools, then INCRBYs).
//!
//! Either server failing fails the request with its error (the per-second one's wrapped in
//! [`StoreError::PerSecond`], so the log says which). The other server's part may have been
//! charged by then, as with the reference, which sends to both.

use super::{RedisSettings, RedisStore, Store, StoreError};
use crate::limiter::{
    algorithm::Algorithm,
    engine::{refused, Batch, Charging, Check, Decided},
};

/// Two stores: the main one and the one for per-second limits.
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

    /// Decides `parts` on their stores concurrently as `charging` (a part without checks costs
    /// no round trip); each decision at its check's place in `batch`, `None` where no part has
    /// the check.
    async fn decide_parts(
        &self,
        batch: &Batch<'_>,
        parts: &Parts,
        charging: Charging,
    ) -> Result<Vec<Option<Decided>>, StoreError> {
        let main = Batch {
            checks: &parts.main.checks,
            charging,
            ..*batch
        };
        let per_second = Batch {
            checks: &parts.per_second.checks,
            charging,
            ..*batch
        };
        let (main, per_second) =
            tokio::join!(self.main.decide(&main), self.per_second.decide(&per_second));
        let mut out = vec![None; batch.checks.len()];
        place(&mut out, &parts.main.at, main?)?;
        place(
            &mut out,
            &parts.per_second.at,
            per_second.map_err(StoreError::per_second)?,
        )?;
        Ok(out)
    }

    /// [`SplitStore::decide_parts`] for parts covering every check.
    async fn decide_all(
        &self,
        batch: &Batch<'_>,
        parts: &Parts,
        charging: Charging,
    ) -> Result<Vec<Decided>, StoreError> {
        complete(self.decide_parts(batch, parts, charging).await?)
    }
}

impl<S: Store> Store for SplitStore<S> {
    async fn decide(&self, batch: &Batch<'_>) -> Result<Vec<Decided>, StoreError> {
        let per_second = batch.checks.iter().filter(|c| c.per_second).count();
        if per_second == 0 {
            return self.main.decide(batch).await;
        }
        if per_second == batch.checks.len() {
            return self
                .per_second
                .decide(batch)
                .await
                .map_err(StoreError::per_second);
        }
        let all = Parts::new(batch.checks, |_, _| true);
        match batch.charging {
            // Each check's charge depends on its own keys alone.
            Charging::Always | Charging::Never | Charging::OnlyOver => {
                self.decide_all(batch, &all, batch.charging).await
            }
            Charging::StopWhenOver => {
                let read = self.decide_all(batch, &all, Charging::Never).await?;
                if read.iter().all(|d| d.verdict.allowed) {
                    // Nothing over: everything is charged, each server still stopping at
                    // what it finds over by then.
                    return self.decide_all(batch, &all, Charging::StopWhenOver).await;
                }
                // Something over: only the fixed windows that are (and that fit) are charged,
                // as the engine does; the others answer as they stand.
                let over = Parts::new(batch.checks, |i, c| {
                    stop_when_over_charges(c) && read.get(i).is_some_and(|d| !d.verdict.allowed)
                });
                let charged = self.decide_parts(batch, &over, Charging::Always).await?;
                Ok(read
                    .into_iter()
                    .zip(charged)
                    .map(|(read, charged)| charged.unwrap_or(read))
                    .collect())
            }
            Charging::AllOrNothing => {
                let read = self.decide_all(batch, &all, Charging::Never).await?;
                if refused(batch, &read) {
                    // Refused: nothing charged anywhere, every check as it stands.
                    return Ok(read);
                }
                // Each server charges its checks all or none, so a refusal it finds by then
                // (a hit in between, or checks sharing a key) still charges nothing there.
                self.decide_all(batch, &all, Charging::AllOrNothing).await
            }
        }
    }
}

/// Under `StopWhenOver`, whether an over check is charged: a fixed window the cost fits.
fn stop_when_over_charges(c: &Check) -> bool {
    c.quota.algorithm == Algorithm::FixedWindow && c.cost <= c.quota.capacity
}

/// The checks one store decides, and where each is in the batch.
#[derive(Debug, Default, PartialEq)]
struct Part {
    checks: Vec<Check>,
    at: Vec<usize>,
}

/// A batch's checks split by store, in their order.
#[derive(Debug, Default, PartialEq)]
struct Parts {
    main: Part,
    per_second: Part,
}

impl Parts {
    /// The checks for which `keep(index, check)` holds, each to its store.
    fn new(checks: &[Check], keep: impl Fn(usize, &Check) -> bool) -> Self {
        let mut parts = Parts::default();
        for (i, c) in checks.iter().enumerate().filter(|(i, c)| keep(*i, c)) {
            let part = if c.per_second {
                &mut parts.per_second
            } else {
                &mut parts.main
            };
            part.checks.push(c.clone());
            part.at.push(i);
        }
        parts
    }
}

/// Puts a part's decisions at their checks' places.
fn place(
    out: &mut [Option<Decided>],
    at: &[usize],
    decided: Vec<Decided>,
) -> Result<(), StoreError> {
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
        *slot = Some(d);
    }
    Ok(())
}

/// Every check's decision, or an error naming the first check without one.
fn complete(decided: Vec<Option<Decided>>) -> Result<Vec<Decided>, StoreError> {
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
        limiter::{algorithm::Quota, engine::Role, SystemClock, Unit},
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

    /// One store, and the same split in two, with check `i` charged `seed[i]` beforehand.
    async fn stores(checks: &[Check], seed: &[u64]) -> (MemoryStore, SplitStore<MemoryStore>) {
        let one = memory();
        let split = SplitStore::new(memory(), memory());
        let seeded: Vec<Check> = checks
            .iter()
            .zip(seed)
            .filter(|(_, &n)| n > 0)
            .map(|(c, &n)| Check {
                cost: n,
                ..c.clone()
            })
            .collect();
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
    ) -> Vec<Decided> {
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
        let parts = Parts::new(&checks, |_, _| true);
        assert_eq!(parts.per_second.at, [0, 2]);
        assert_eq!(parts.main.at, [1, 3]);
        assert_eq!(parts.main.checks, [checks[1].clone(), checks[3].clone()]);
        let some = Parts::new(&checks, |i, _| i != 2);
        assert_eq!((some.per_second.at, some.main.at), (vec![0], vec![1, 3]));

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
        place(&mut out, &parts.main.at, vec![decided(1), decided(3)]).unwrap();
        assert!(complete(out.clone()).is_err(), "checks 0 and 2 missing");
        place(&mut out, &parts.per_second.at, vec![decided(0), decided(2)]).unwrap();
        let merged = complete(out.clone()).unwrap();
        let remaining: Vec<u64> = merged.iter().map(|d| d.verdict.remaining).collect();
        assert_eq!(remaining, [0, 1, 2, 3]);
        assert!(place(&mut out, &[0, 1], vec![decided(0)]).is_err());
        assert!(place(&mut out, &[9], vec![decided(0)]).is_err());
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
        let remaining = |d: Vec<Decided>| d.iter().map(|d| d.verdict.remaining).collect::<Vec<_>>();
        assert_eq!(remaining(split.main.decide(&read).await.unwrap()), [5, 4]);
        assert_eq!(
            remaining(split.per_second.decide(&read).await.unwrap()),
            [4, 5]
        );
    }
}
