//! A deliberately naive reference model of each counting algorithm, written from its
//! definition and not from `src/limiter/algorithm.rs`, and property tests holding the
//! in-memory store (which runs `algorithm.rs`) to it: random sequences of times, costs and
//! limits must give the same `allowed`, `remaining`, `reset_ms` and `retry_ms`, and charge
//! the same requests. `tests/redis_engine.rs` holds the Redis script to the in-memory store,
//! so all three agree.
//!
//! The model, one limit at a time:
//! - fixed window: a map window index → count; a request fits if count + cost ≤ limit.
//! - sliding window: the same map, and the two-window estimate computed from the raw counts
//!   in the order `algorithm.rs` documents (the estimate is defined in IEEE doubles, in that
//!   order). Its Retry-After is found by asking the same question at later instants, with
//!   nothing else counted meanwhile: the first millisecond at which the request fits.
//! - token bucket: token counting in exact integers. The level is kept in tokens × window
//!   (ms), so a token is `window` units, the bucket holds `burst × window` and refills
//!   continuously at `limit` units per millisecond; nothing is rounded until an answer is.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use proptest::{prelude::*, test_runner::TestRunner};
use ratelimitd::{
    limiter::{
        algorithm::{Algorithm, Quota},
        engine::{Batch, Charging, Check, Role},
        Clock, Unit, MAX_COUNT,
    },
    store::{MemoryStore, Store},
};

/// A whole hour (so a whole minute and second too).
const T0: u64 = 1_699_999_200_000;

/// One limit, as a rule states it.
#[derive(Debug, Clone, Copy)]
struct Limit {
    algorithm: Algorithm,
    limit: u32,
    unit: Unit,
    multiplier: u32,
    burst: Option<u32>,
}

impl Limit {
    fn window_ms(&self) -> u64 {
        self.unit.seconds() * u64::from(self.multiplier) * 1000
    }

    /// Most a single request may cost: the bucket's size, or the window's limit. A limit of 0
    /// refuses every request with a cost (the reference's meaning), a bucket's too: refilling
    /// nothing, it holds nothing, whatever its `burst`.
    fn capacity(&self) -> u64 {
        match self.limit {
            0 => 0,
            limit => u64::from(self.burst.unwrap_or(limit)),
        }
    }
}

/// What the model expects of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    allowed: bool,
    remaining: u64,
    reset_ms: u64,
    retry_ms: u64,
    charged: bool,
}

/// One limit's state in the model.
#[derive(Debug, Clone)]
enum Model {
    /// Window index (`now / window`) → hits counted in it.
    Windows(HashMap<u64, u64>),
    /// Tokens × window (ms) in the bucket, as of `at` (ms).
    Bucket { level: u128, at: u64 },
}

impl Model {
    fn new(l: &Limit) -> Self {
        match l.algorithm {
            Algorithm::TokenBucket => Model::Bucket {
                level: u128::from(l.capacity()) * u128::from(l.window_ms()),
                at: 0,
            },
            _ => Model::Windows(HashMap::new()),
        }
    }

    /// Decides `cost` at `now`. `always_fixed`: a fixed window is charged whenever the cost
    /// fits its capacity, even when over (the reference's rule); otherwise every algorithm is
    /// charged only when the request is allowed.
    fn decide(&mut self, l: &Limit, now: u64, cost: u64, always_fixed: bool) -> Expected {
        match self {
            Model::Windows(counts) if l.algorithm == Algorithm::FixedWindow => {
                fixed(counts, l, now, cost, always_fixed)
            }
            Model::Windows(counts) => sliding(counts, l, now, cost),
            Model::Bucket { level, at } => bucket(level, at, l, now, cost),
        }
    }
}

/// From the whole second of `now` to the end of its window, as the reference reports it.
fn until_window_end(w: u64, now: u64) -> u64 {
    (now / w + 1) * w - now / 1000 * 1000
}

fn fixed(counts: &mut HashMap<u64, u64>, l: &Limit, now: u64, cost: u64, always: bool) -> Expected {
    let w = l.window_ms();
    let limit = u64::from(l.limit);
    let count = counts.entry(now / w).or_insert(0);
    let after = count.saturating_add(cost).min(MAX_COUNT);
    let fits = cost <= limit;
    let allowed = fits && after <= limit;
    let charged = fits && (allowed || always);
    if charged {
        *count = after;
    }
    let reset_ms = until_window_end(w, now);
    Expected {
        allowed,
        remaining: if allowed { limit - after } else { 0 },
        reset_ms,
        retry_ms: if allowed { 0 } else { reset_ms },
        charged,
    }
}

/// The sliding estimate at `t` with `extra` more hits in `t`'s window: the previous window's
/// count weighted by the part of it still inside the sliding window, plus the current count.
fn estimate(counts: &HashMap<u64, u64>, w: u64, t: u64, extra: u64) -> f64 {
    let index = t / w;
    let elapsed = t - index * w;
    let previous = index
        .checked_sub(1)
        .and_then(|i| counts.get(&i))
        .copied()
        .unwrap_or(0);
    let current = counts
        .get(&index)
        .copied()
        .unwrap_or(0)
        .saturating_add(extra)
        .min(MAX_COUNT);
    let weight = (w - elapsed) as f64 / w as f64;
    previous as f64 * weight + current as f64
}

fn sliding(counts: &mut HashMap<u64, u64>, l: &Limit, now: u64, cost: u64) -> Expected {
    let w = l.window_ms();
    let limit = u64::from(l.limit);
    let fits_at = |t: u64| cost <= limit && estimate(counts, w, t, cost) <= limit as f64;
    let allowed = fits_at(now);
    let est = estimate(counts, w, now, cost);
    let retry_ms = if allowed {
        0
    } else if cost > limit {
        // Never fits: until this window ends.
        (now / w + 1) * w - now
    } else {
        // The estimate only falls as time passes with nothing counted, and two windows on
        // nothing is left but the cost: the first instant it fits, by bisection.
        let (mut lo, mut hi) = (0, (now / w + 2) * w - now);
        assert!(fits_at(now + hi), "fits once both windows are over");
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits_at(now + mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    };
    if allowed {
        let count = counts.entry(now / w).or_insert(0);
        *count = count.saturating_add(cost).min(MAX_COUNT);
    }
    Expected {
        allowed,
        remaining: if allowed {
            (limit as f64 - est).floor() as u64
        } else {
            0
        },
        reset_ms: until_window_end(w, now),
        retry_ms,
        charged: allowed,
    }
}

fn bucket(level: &mut u128, at: &mut u64, l: &Limit, now: u64, cost: u64) -> Expected {
    let w = u128::from(l.window_ms());
    let rate = u128::from(l.limit); // units per ms
    let full = u128::from(l.capacity()) * w;
    *level = (*level + u128::from(now - *at) * rate).min(full);
    *at = now;
    let need = u128::from(cost) * w;
    let fits = cost <= l.capacity();
    let allowed = fits && *level >= need;
    if allowed {
        *level -= need;
    }
    // Milliseconds until the bucket holds `units`, refilling at `rate`.
    let until = |units: u128| -> u64 {
        let missing = units.saturating_sub(*level);
        if missing == 0 {
            0
        } else {
            u64::try_from(missing.div_ceil(rate)).unwrap()
        }
    };
    Expected {
        allowed,
        remaining: if allowed {
            u64::try_from(*level / w).unwrap()
        } else {
            0
        },
        reset_ms: until(full),
        retry_ms: if allowed {
            0
        } else if fits {
            until(need)
        } else {
            // Never fits: until the bucket is full, at least 1 ms.
            until(full).max(1)
        },
        charged: allowed,
    }
}

/// How far the clock moves before a request.
#[derive(Debug, Clone, Copy)]
enum Advance {
    /// This many milliseconds.
    Ms(u64),
    /// To the next window edge, plus -1, 0 or 1 ms.
    ToEdge(i8),
    /// `k` token intervals (window / limit), rounded down or up.
    Tokens(u64, bool),
    /// The last refusal's `retry_ms`, minus 1 or 0 ms (0 ms if the last request passed).
    Retry(u8),
}

#[derive(Debug, Clone)]
struct Step {
    advance: Advance,
    /// Even: a cost of 1; odd: `(seed >> 1) % (capacity + 3)`, i.e. 0..=capacity+2.
    cost_seed: u64,
}

#[derive(Debug, Clone)]
struct Case {
    limit: Limit,
    /// Fixed windows charged even when over (`Charging::Always`); else strict charging,
    /// which for one check charges exactly the allowed requests. Sliding windows and buckets
    /// are charged only when allowed under both.
    always: bool,
    start_ms: u64,
    steps: Vec<Step>,
}

fn limit() -> impl Strategy<Value = Limit> {
    (
        prop_oneof![
            Just(Algorithm::FixedWindow),
            Just(Algorithm::SlidingWindow),
            Just(Algorithm::TokenBucket)
        ],
        prop_oneof![1 => Just(0u32), 8 => 1..=8u32, 2 => 9..=100_000u32],
        prop_oneof![
            3 => Just(Unit::Second),
            3 => Just(Unit::Minute),
            2 => Just(Unit::Hour),
            1 => Just(Unit::Day)
        ],
        prop_oneof![3 => Just(1u32), 2 => 2..=5u32],
        proptest::option::of(prop_oneof![4 => 1..=10u32, 1 => 11..=100_000u32]),
    )
        .prop_map(|(algorithm, limit, unit, multiplier, burst)| Limit {
            algorithm,
            limit,
            unit,
            multiplier,
            burst: burst.filter(|_| algorithm == Algorithm::TokenBucket),
        })
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            2 => Just(Advance::Ms(0)),
            2 => (1..2_000u64).prop_map(Advance::Ms),
            1 => (1..10_000_000u64).prop_map(Advance::Ms),
            // Fractions of a second, minute or hour: estimates on whole numbers.
            2 => (prop_oneof![Just(1_000u64), Just(60_000), Just(3_600_000)], 1..=12u64)
                .prop_map(|(unit, eighths)| Advance::Ms(unit * eighths / 8)),
            2 => (-1..=1i8).prop_map(Advance::ToEdge),
            2 => (1..=3u64, any::<bool>()).prop_map(|(k, up)| Advance::Tokens(k, up)),
            3 => (0..=1u8).prop_map(Advance::Retry),
        ],
        any::<u64>(),
    )
        .prop_map(|(advance, cost_seed)| Step { advance, cost_seed })
}

fn case() -> impl Strategy<Value = Case> {
    (
        limit(),
        any::<bool>(),
        0..86_400_000u64,
        proptest::collection::vec(step(), 1..=40),
    )
        .prop_map(|(limit, always, offset, steps)| Case {
            limit,
            always,
            start_ms: T0 + offset,
            steps,
        })
}

/// The instant of the next step.
fn next_instant(l: &Limit, now: u64, advance: Advance, last_retry: u64) -> u64 {
    let w = l.window_ms();
    match advance {
        Advance::Ms(ms) => now + ms,
        Advance::ToEdge(d) => ((now / w + 1) * w).saturating_add_signed(d.into()).max(now),
        Advance::Tokens(k, up) => {
            let limit = u64::from(l.limit.max(1));
            now + if up {
                (k * w).div_ceil(limit)
            } else {
                k * w / limit
            }
        }
        Advance::Retry(minus) => now + last_retry.saturating_sub(minus.into()),
    }
}

/// A settable clock, for the memory store's sweeper.
struct FakeClock(AtomicU64);

impl Clock for FakeClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The check the service would send for `l` at `now`: a window's key names its start, a
/// sliding window also names the previous window's, a bucket's key never changes.
fn check(l: &Limit, now: u64, cost: u64) -> Check {
    let quota = Quota::new(l.algorithm, l.limit, l.unit, l.multiplier, l.burst);
    let w = l.window_ms();
    let start = now / w * w;
    let (key, previous) = match l.algorithm {
        Algorithm::FixedWindow => (format!("k:{start}"), None),
        Algorithm::SlidingWindow => (format!("k:{start}"), Some(format!("k:{}", start - w))),
        Algorithm::TokenBucket => ("k:tb".to_owned(), None),
    };
    Check {
        descriptor: 0,
        quota,
        key,
        previous,
        cost,
        jitter_secs: 0,
        per_second: false,
    }
}

/// Runs `case` through the model and the memory store, step by step; the sweeper runs at
/// every step's instant, so the store must also keep every key as long as it is read.
fn run_case(rt: &tokio::runtime::Runtime, case: &Case) -> Result<(), TestCaseError> {
    let l = &case.limit;
    let clock = Arc::new(FakeClock(AtomicU64::new(case.start_ms / 1000)));
    let store = MemoryStore::new(clock.clone(), NonZeroUsize::new(1_000).unwrap());
    let mut model = Model::new(l);
    let charging = if case.always {
        Charging::Always
    } else {
        Charging::AllOrNothing
    };
    let always_fixed = case.always;
    let mut now = case.start_ms;
    let mut last_retry = 0;
    for (i, step) in case.steps.iter().enumerate() {
        if i > 0 {
            now = next_instant(l, now, step.advance, last_retry);
        }
        clock.0.store(now / 1000, Ordering::SeqCst);
        store.sweep();
        let cost = if step.cost_seed % 2 == 0 {
            1
        } else {
            (step.cost_seed >> 1) % (l.capacity() + 3)
        };
        let want = model.decide(l, now, cost, always_fixed);
        let checks = [check(l, now, cost)];
        let batch = Batch {
            checks: &checks,
            roles: &[Role::default()],
            quota_total: 0,
            charging,
            never_refuse: false,
            now_ms: now,
        };
        let d = rt.block_on(store.decide(&batch)).unwrap()[0];
        let got = Expected {
            allowed: d.verdict.allowed,
            remaining: d.verdict.remaining,
            reset_ms: d.verdict.reset_ms,
            retry_ms: d.verdict.retry_ms,
            charged: d.charge.is_some(),
        };
        prop_assert_eq!(
            got,
            want,
            "step {} at {} (+{} ms into the window), cost {}",
            i,
            now,
            now % l.window_ms(),
            cost
        );
        last_retry = want.retry_ms;
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// `cases` random cases, or `PROPTEST_CASES` of them.
fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

#[test]
fn the_memory_store_decides_as_the_reference_model() {
    let rt = runtime();
    if let Err(e) = runner(2_000).run(&case(), |case| run_case(&rt, &case)) {
        panic!("{e}");
    }
}

/// Stores `count` in the memory store's `key` through the engine itself: a fixed window
/// as large as a count can be charges it in one request, whatever the key's algorithm.
fn seed(rt: &tokio::runtime::Runtime, store: &MemoryStore, key: String, count: u64, now: u64) {
    let checks = [Check {
        descriptor: 0,
        quota: Quota {
            algorithm: Algorithm::FixedWindow,
            limit: MAX_COUNT,
            window_ms: 86_400_000,
            capacity: MAX_COUNT,
        },
        key,
        previous: None,
        cost: count,
        jitter_secs: 0,
        per_second: false,
    }];
    let batch = Batch::plain(&checks, now);
    let d = rt.block_on(store.decide(&batch)).unwrap();
    assert_eq!(d[0].charge.map(|s| s.a), Some(count));
}

/// A sliding window's Retry-After from any pair of counts (above the limit too), at any
/// point of the window: the model's is the first millisecond at which the estimate, computed
/// as defined, leaves room for the request; the store must give exactly that, refuse the
/// request a millisecond earlier and allow it then.
#[test]
fn a_sliding_window_retry_is_the_first_instant_the_request_fits() {
    let rt = runtime();
    let strategy = (
        prop_oneof![1..=8u32, 9..=100_000u32, 100_001..=u32::MAX],
        prop_oneof![Just(Unit::Second), Just(Unit::Minute), Just(Unit::Hour)],
        1..=5u32,
        any::<(u64, u64, u64)>(),
        prop_oneof![(0..=64u64).prop_map(Some), Just(None)],
        any::<u64>(),
    );
    let result = runner(5_000).run(
        &strategy,
        |(limit, unit, multiplier, (prev, cur, cost), eighths, offset)| {
            let l = Limit {
                algorithm: Algorithm::SlidingWindow,
                limit,
                unit,
                multiplier,
                burst: None,
            };
            let w = l.window_ms();
            let limit = u64::from(limit);
            let (prev, cur, cost) = (
                prev % (2 * limit + 1),
                cur % (limit + 1),
                cost % (limit + 2),
            );
            // On an exact multiple of a 64th of the window (estimates on whole numbers), or
            // anywhere.
            let elapsed = eighths.map_or(offset % w, |e| w * e / 64 % w);
            let start = T0 / w * w + w;
            let now = start + elapsed;
            let store = MemoryStore::new(
                Arc::new(FakeClock(AtomicU64::new(now / 1000))),
                NonZeroUsize::new(1_000).unwrap(),
            );
            seed(&rt, &store, format!("k:{}", start - w), prev, now);
            seed(&rt, &store, format!("k:{start}"), cur, now);
            let mut model =
                Model::Windows(HashMap::from([(start / w - 1, prev), (start / w, cur)]));
            let ask = |model: &mut Model, at: u64| -> Result<Expected, TestCaseError> {
                let want = model.decide(&l, at, cost, false);
                let checks = [check(&l, at, cost)];
                let batch = Batch::plain(&checks, at);
                let d = rt.block_on(store.decide(&batch)).unwrap()[0];
                let got = Expected {
                    allowed: d.verdict.allowed,
                    remaining: d.verdict.remaining,
                    reset_ms: d.verdict.reset_ms,
                    retry_ms: d.verdict.retry_ms,
                    charged: d.charge.is_some(),
                };
                prop_assert_eq!(got, want, "at {} (+{} ms)", at, at - start);
                Ok(want)
            };
            let first = ask(&mut model, now)?;
            if !first.allowed && cost <= limit {
                let retry = first.retry_ms;
                prop_assert!(!ask(&mut model, now + retry - 1)?.allowed);
                prop_assert!(ask(&mut model, now + retry)?.allowed);
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
