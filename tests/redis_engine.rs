//! The counting engine's Redis scripts (`src/store/engine.lua`, and `fixed.lua` for fixed
//! windows charged always) against a real `redis-server`: the same decisions as the in-memory
//! store (which runs the Rust model) on random request sequences, exact counts under
//! concurrency from two stores, recovery after `SCRIPT FLUSH`, saturation at 2^63 - 1, the
//! keys' TTLs, and foreign values leaving nothing written.
#![allow(clippy::unwrap_used)]
mod support;

use std::{
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use proptest::{prelude::*, test_runner::TestRunner};
use ratelimitd::{
    limiter::{
        algorithm::{window_start_ms, Algorithm, Quota, State},
        engine::{Batch, Charging, Check, Role},
        SystemClock, Unit, MAX_COUNT,
    },
    store::{MemoryStore, RedisSettings, RedisStore, SocketType, Store},
};
use support::RedisServer;

/// A whole hour (so a whole minute and second too). The script takes the caller's time, so
/// any instant works, real or not.
const T0: u64 = 1_699_999_200_000;

fn redis_store(redis: &RedisServer) -> RedisStore {
    RedisStore::new(&RedisSettings {
        url: redis.addr(),
        socket_type: SocketType::Tcp,
        auth: String::new(),
        tls: false,
        tls_files: Default::default(),
        pool_size: 1,
        timeout: Duration::from_secs(5),
        redis_type: Default::default(),
        sentinel_auth: String::new(),
        close_on_readonly: false,
    })
    .unwrap()
}

fn memory_store() -> MemoryStore {
    MemoryStore::new(Arc::new(SystemClock), NonZeroUsize::new(1_000_000).unwrap())
}

/// Stores `count` in `memory`'s `key`, as `SET key count` stores it in Redis: charged in one
/// request to a day-long fixed window as large as a count can be (every key's state is read
/// alike, whatever algorithm later reads it).
async fn seed_memory(memory: &MemoryStore, key: &str, count: u64, now_ms: u64) {
    let checks = [Check {
        descriptor: 0,
        quota: Quota {
            algorithm: Algorithm::FixedWindow,
            limit: MAX_COUNT,
            window_ms: 86_400_000,
            capacity: MAX_COUNT,
        },
        key: key.to_owned(),
        previous: None,
        cost: count,
        jitter_secs: 0,
        per_second: false,
    }];
    let batch = Batch::plain(&checks, now_ms);
    let d = memory.decide(&batch).await.unwrap();
    assert_eq!(d[0].charge, Some(State { a: count, b: 0 }), "{key}");
}

/// One limit of a generated rule.
#[derive(Debug, Clone)]
struct Limit {
    algorithm: Algorithm,
    limit: u32,
    unit: Unit,
    multiplier: u32,
    burst: Option<u32>,
}

impl Limit {
    fn quota(&self) -> Quota {
        Quota::new(
            self.algorithm,
            self.limit,
            self.unit,
            self.multiplier,
            self.burst,
        )
    }
}

/// A limited descriptor: its role and its limits.
#[derive(Debug, Clone)]
struct Descriptor {
    role: Role,
    limits: Vec<Limit>,
}

/// One request: how far the clock moved since the last one, a cost seed per descriptor (half
/// the time 1, else 0..=capacity+2 for its largest capacity) and the jitter.
#[derive(Debug, Clone)]
struct Step {
    advance_ms: u64,
    cost_seeds: Vec<u64>,
    jitter_secs: u64,
}

#[derive(Debug, Clone)]
struct Case {
    descriptors: Vec<Descriptor>,
    charging: Charging,
    never_refuse: bool,
    /// Every descriptor counts in descriptor 0's keys (with its limits), as descriptors
    /// matching one `share_threshold` pattern do: checks of one batch share keys.
    shared: bool,
    /// Quota descriptors of the request that have no rule (`QUOTA_MODE`).
    unruled_quota: usize,
    start_ms: u64,
    steps: Vec<Step>,
}

/// A limit of any algorithm, or (`fixed`) a fixed window.
fn limit(fixed: bool) -> impl Strategy<Value = Limit> {
    (
        if fixed {
            Just(Algorithm::FixedWindow).boxed()
        } else {
            prop_oneof![
                Just(Algorithm::FixedWindow),
                Just(Algorithm::SlidingWindow),
                Just(Algorithm::TokenBucket)
            ]
            .boxed()
        },
        // Mostly small limits, where costs reach past them; some large ones, where a sliding
        // window's estimate has fractions that need rounding.
        prop_oneof![1 => Just(0u32), 8 => 1..=8u32, 2 => 9..=100_000u32],
        prop_oneof![Just(Unit::Second), Just(Unit::Minute), Just(Unit::Hour)],
        1..=5u32,
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

fn descriptor(fixed: bool) -> impl Strategy<Value = Descriptor> {
    (
        prop_oneof![6 => Just((false, false)), 1 => Just((true, false)), 2 => Just((false, true)), 1 => Just((true, true))],
        proptest::collection::vec(limit(fixed), 1..=3),
    )
        .prop_map(|((shadow, quota), limits)| Descriptor {
            role: Role { shadow, quota },
            limits,
        })
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            2 => Just(0u64),
            2 => 1..2_000u64,
            1 => 1..10_000_000u64,
            // Eighths of a second, a minute or an hour: steps land on exact fractions of
            // windows, where a sliding window's estimate sits on whole numbers (so a change in
            // rounding shows), and often in the next window (so previous counts are weighed).
            6 => (prop_oneof![Just(1_000u64), Just(60_000), Just(3_600_000)], 1..=12u64)
                .prop_map(|(unit, eighths)| unit * eighths / 8),
        ],
        proptest::collection::vec(any::<u64>(), 3),
        // At least a second: a key must outlive, in Redis' real time, its last use in the
        // case's simulated time (see `model_and_redis_decide_alike`).
        1..=3u64,
    )
        .prop_map(|(advance_ms, cost_seeds, jitter_secs)| Step {
            advance_ms,
            cost_seeds,
            jitter_secs,
        })
}

/// A case of any algorithms and charging, or (`fixed`) of fixed windows charged always: the
/// requests `fixed.lua` takes, except a step whose cost exceeds a limit (`engine.lua` then).
fn case(fixed: bool) -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(descriptor(fixed), 1..=3),
        if fixed {
            Just(Charging::Always).boxed()
        } else {
            prop_oneof![
                3 => Just(Charging::Always),
                3 => Just(Charging::StopWhenOver),
                1 => Just(Charging::OnlyOver),
                3 => Just(Charging::AllOrNothing),
                1 => Just(Charging::Never)
            ]
            .boxed()
        },
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.25),
        prop_oneof![4 => Just(0usize), 1 => Just(1usize)],
        0..7_200_000u64,
        proptest::collection::vec(step(), 1..=30),
    )
        .prop_map(
            |(mut descriptors, charging, never_refuse, shared, unruled_quota, offset, steps)| {
                if shared {
                    let first = descriptors.first().map(|d| d.limits.clone());
                    for d in descriptors.iter_mut().skip(1) {
                        d.limits.clone_from(first.as_ref().unwrap());
                    }
                }
                Case {
                    descriptors,
                    charging,
                    never_refuse,
                    shared,
                    unruled_quota,
                    start_ms: T0 + offset,
                    steps,
                }
            },
        )
}

/// The checks of one step of case `id` at `now`, keyed as the service will key them: a
/// window's key names its start, a bucket's key is the same at every instant.
fn checks(id: u64, case: &Case, step: &Step, now: u64) -> Vec<Check> {
    let mut out = Vec::new();
    for (d, desc) in case.descriptors.iter().enumerate() {
        let max_capacity = desc
            .limits
            .iter()
            .map(|l| l.quota().capacity)
            .max()
            .unwrap_or(0);
        let seed = step.cost_seeds[d];
        let cost = if seed.is_multiple_of(2) {
            1
        } else {
            (seed >> 1) % (max_capacity + 3)
        };
        for (i, l) in desc.limits.iter().enumerate() {
            let quota = l.quota();
            let owner = if case.shared { 0 } else { d };
            let base = format!("case{id}:d{owner}:l{i}");
            let start = window_start_ms(quota.window_ms, now) / 1000;
            let (key, previous) = match l.algorithm {
                Algorithm::FixedWindow => (format!("{base}:{start}"), None),
                Algorithm::SlidingWindow => (
                    format!("{base}:{start}"),
                    Some(format!("{base}:{}", start - quota.window_ms / 1000)),
                ),
                Algorithm::TokenBucket => (format!("{base}:tb"), None),
            };
            out.push(Check {
                descriptor: d,
                quota,
                key,
                previous,
                cost,
                jitter_secs: step.jitter_secs,
                per_second: false,
            });
        }
    }
    out
}

/// Random cases: each store gets the same batches at the same clock values and must return
/// the same decisions, step by step. The memory store never expires anything during a case
/// and Redis expires nothing either: every TTL is at least its key's last use in simulated
/// time plus the jitter (≥ 1 s), and a case takes milliseconds of real time. So both hold
/// the same states, and any difference is a difference in arithmetic or charging.
#[test]
fn model_and_redis_decide_alike() {
    decide_alike(case(false));
}

/// As [`model_and_redis_decide_alike`], with only fixed windows charged always, so that most
/// requests take `fixed.lua` (INCRBY and EXPIRE) and their decisions are made in Rust from the
/// counts it returns: the same as the model's, shared keys included.
#[test]
fn fixed_windows_charged_always_decide_alike() {
    decide_alike(case(true));
}

fn decide_alike(cases: impl Strategy<Value = Case>) {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async { redis_store(&redis) });
    let ids = AtomicU64::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&cases, |case| {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let memory = memory_store();
        let roles: Vec<Role> = case.descriptors.iter().map(|d| d.role).collect();
        let quota_total = roles.iter().filter(|r| r.quota).count() + case.unruled_quota;
        let mut now = case.start_ms;
        for (i, step) in case.steps.iter().enumerate() {
            now += step.advance_ms;
            let checks = checks(id, &case, step, now);
            let batch = Batch {
                checks: &checks,
                roles: &roles,
                quota_total,
                charging: case.charging,
                never_refuse: case.never_refuse,
                now_ms: now,
            };
            let (want, got) = rt.block_on(async {
                (
                    memory.decide(&batch).await.unwrap(),
                    store.decide(&batch).await,
                )
            });
            let got = got.map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?;
            prop_assert_eq!(got, want, "step {} at {} ms: {:#?}", i, now, checks);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A count for [`large_counts_round_alike`]: small, around a double's 2^53, or anything up
/// to 2^63 - 1.
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=1_000u64,
        (1u64 << 53) - 8..=(1u64 << 53) + 8,
        0..=MAX_COUNT,
    ]
}

/// Windows with random (also huge) counts, limits up to `u32::MAX` and costs up to 2^64 - 1,
/// seeded into both stores: the sliding window's floating-point estimate, the counts' exact
/// sums and the `used` values beyond 2^53 come out alike.
#[test]
fn large_counts_round_alike() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async { redis_store(&redis) });
    let ids = AtomicU64::new(0);
    let strategy = (
        count(),
        count(),
        prop_oneof![0..=10u32, 0..=u32::MAX],
        prop_oneof![
            Just(Unit::Second),
            Just(Unit::Minute),
            Just(Unit::Hour),
            Just(Unit::Day)
        ],
        1..=5u32,
        0..86_400_000u64,
        prop_oneof![0..=20u64, any::<u64>(), Just(u64::MAX)],
        prop_oneof![
            Just(Charging::Always),
            Just(Charging::StopWhenOver),
            Just(Charging::OnlyOver),
            Just(Charging::AllOrNothing)
        ],
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(
        &strategy,
        |(current, previous, limit, unit, multiplier, offset, cost, charging)| {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let memory = memory_store();
            let now = T0 + offset;
            let (cur, prev, fixed) = (
                format!("big{id}:cur"),
                format!("big{id}:prev"),
                format!("big{id}:fixed"),
            );
            let seeds = [
                (cur.clone(), current),
                (prev.clone(), previous),
                (fixed.clone(), current),
            ];
            for (key, value) in &seeds {
                redis.command(&["SET", key, &value.to_string()]);
            }
            let quota = |a| Quota::new(a, limit, unit, multiplier, None);
            let checks = [
                Check {
                    descriptor: 0,
                    quota: quota(Algorithm::SlidingWindow),
                    key: cur,
                    previous: Some(prev),
                    cost,
                    jitter_secs: 1,
                    per_second: false,
                },
                Check {
                    descriptor: 0,
                    quota: quota(Algorithm::FixedWindow),
                    key: fixed,
                    previous: None,
                    cost,
                    jitter_secs: 1,
                    per_second: false,
                },
            ];
            let batch = Batch {
                checks: &checks,
                roles: &[Role::default()],
                quota_total: 0,
                charging,
                never_refuse: false,
                now_ms: now,
            };
            let (want, got) = rt.block_on(async {
                for (key, value) in &seeds {
                    seed_memory(&memory, key, *value, now).await;
                }
                (
                    memory.decide(&batch).await.unwrap(),
                    store.decide(&batch).await,
                )
            });
            let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, want);
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Counts near 2^63 - 1 and costs up to 2^64 - 1 saturate alike in both stores, and the
/// reported `used` stays exact beyond a double's 2^53.
#[tokio::test]
async fn counts_saturate_at_the_largest_redis_integer_alike() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let memory = memory_store();
    let now = T0 + 1_234;
    for (key, value) in [
        ("sat:fixed", MAX_COUNT - 3),
        ("sat:odd", (1 << 53) + 1),
        ("sat:cur", MAX_COUNT - 1),
        ("sat:prev", MAX_COUNT),
    ] {
        redis.command(&["SET", key, &value.to_string()]);
        seed_memory(&memory, key, value, now).await;
    }
    let quota = |a| Quota::new(a, 5, Unit::Hour, 1, None);
    let check = |key: &str, previous: Option<&str>, algorithm, cost| Check {
        descriptor: 0,
        quota: quota(algorithm),
        key: key.into(),
        previous: previous.map(Into::into),
        cost,
        jitter_secs: 0,
        per_second: false,
    };
    for cost in [0, 1, 5, 6, MAX_COUNT, u64::MAX] {
        let checks = [
            check("sat:fixed", None, Algorithm::FixedWindow, cost),
            check("sat:odd", None, Algorithm::FixedWindow, cost),
            check("sat:cur", Some("sat:prev"), Algorithm::SlidingWindow, cost),
            check("sat:tb", None, Algorithm::TokenBucket, cost),
        ];
        for charging in [
            Charging::Always,
            Charging::StopWhenOver,
            Charging::OnlyOver,
            Charging::AllOrNothing,
        ] {
            let batch = Batch {
                checks: &checks,
                roles: &[Role {
                    shadow: true,
                    quota: false,
                }],
                quota_total: 0,
                charging,
                never_refuse: false,
                now_ms: now,
            };
            let want = memory.decide(&batch).await.unwrap();
            let got = store.decide(&batch).await.unwrap();
            assert_eq!(got, want, "cost {cost}, {charging:?}");
        }
    }
    assert_eq!(
        redis.command(&["GET", "sat:fixed"]),
        format!("$19\r\n{MAX_COUNT}\r\n")
    );
}

/// The same for fixed windows charged always (`fixed.lua`, INCRBY): an increment that would
/// overflow leaves 2^63 - 1, and counts beyond 2^53 come back exact, as the model has them.
#[tokio::test]
async fn fixed_counts_saturate_and_stay_exact_alike() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let memory = memory_store();
    let now = T0 + 1_234;
    let odd = (1u64 << 53) + 1;
    for (key, value) in [("fs:near", MAX_COUNT - 3), ("fs:odd", odd)] {
        redis.command(&["SET", key, &value.to_string()]);
        seed_memory(&memory, key, value, now).await;
    }
    let check = |key: &str, cost| {
        let mut c = one_check(
            key,
            None,
            Quota::new(Algorithm::FixedWindow, 5, Unit::Hour, 1, None),
        );
        c.cost = cost;
        c
    };
    for cost in [0, 1, 5, 2] {
        // fs:near twice: the second increment starts from the first's (saturated) count.
        let checks = [
            check("fs:near", cost),
            check("fs:odd", cost),
            check("fs:near", cost),
        ];
        let batch = Batch::plain(&checks, now);
        let want = memory.decide(&batch).await.unwrap();
        let got = store.decide(&batch).await.unwrap();
        assert_eq!(got, want, "cost {cost}");
    }
    assert_eq!(
        redis.command(&["GET", "fs:near"]),
        format!("$19\r\n{MAX_COUNT}\r\n")
    );
    let odd_now = (odd + 1 + 5 + 2).to_string();
    assert_eq!(
        redis.command(&["GET", "fs:odd"]),
        format!("${}\r\n{odd_now}\r\n", odd_now.len())
    );
}

/// Allowed requests from `tasks` concurrent clients over two stores (two connections), each
/// sending `per_task` requests of `checks` at one instant.
async fn allowed_concurrently(
    stores: &[Arc<RedisStore>; 2],
    checks: Vec<Check>,
    roles: Vec<Role>,
    charging: Charging,
    tasks: usize,
    per_task: usize,
) -> usize {
    let checks = Arc::new(checks);
    let roles = Arc::new(roles);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = stores[t % 2].clone();
            let (checks, roles) = (checks.clone(), roles.clone());
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..per_task {
                    let batch = Batch {
                        checks: &checks,
                        roles: &roles,
                        quota_total: 0,
                        charging,
                        never_refuse: false,
                        now_ms: T0 + 30_000,
                    };
                    let d = store.decide(&batch).await.unwrap();
                    if d.iter().all(|d| d.verdict.allowed) {
                        allowed += 1;
                    }
                }
                allowed
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

fn one_check(key: &str, previous: Option<&str>, quota: Quota) -> Check {
    Check {
        descriptor: 0,
        quota,
        key: key.into(),
        previous: previous.map(Into::into),
        cost: 1,
        jitter_secs: 0,
        per_second: false,
    }
}

/// 32 clients over two stores on one key per algorithm: exactly the capacity is allowed, and
/// the stored state counts exactly what was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_under_concurrency_for_every_algorithm() {
    let redis = RedisServer::start();
    let stores = [Arc::new(redis_store(&redis)), Arc::new(redis_store(&redis))];
    let cases = [
        (
            one_check(
                "cc:fixed",
                None,
                Quota::new(Algorithm::FixedWindow, 10, Unit::Hour, 1, None),
            ),
            10,
        ),
        (
            one_check(
                "cc:sliding",
                Some("cc:sliding:prev"),
                Quota::new(Algorithm::SlidingWindow, 10, Unit::Hour, 1, None),
            ),
            10,
        ),
        (
            one_check(
                "cc:bucket",
                None,
                Quota::new(Algorithm::TokenBucket, 10, Unit::Hour, 1, Some(7)),
            ),
            7,
        ),
    ];
    for (check, capacity) in cases {
        let algorithm = check.quota.algorithm;
        let allowed = allowed_concurrently(
            &stores,
            vec![check],
            vec![Role::default()],
            Charging::Always,
            32,
            4,
        )
        .await;
        assert_eq!(allowed, capacity, "{algorithm:?}");
    }
    // The default charging counts a fixed window's refused hits too (the reference's rule);
    // a sliding window counts only what it allowed; the bucket is 7 tokens (6 h) in debt.
    assert_eq!(redis.command(&["GET", "cc:fixed"]), "$3\r\n128\r\n");
    assert_eq!(redis.command(&["GET", "cc:sliding"]), "$2\r\n10\r\n");
    let tat = T0 + 30_000 + 7 * 360_000;
    assert_eq!(
        redis.command(&["GET", "cc:bucket"]),
        format!("${}\r\n{tat}:0\r\n", tat.to_string().len() + 2)
    );
}

/// Strict charging under concurrency: the loose descriptor is charged exactly as often as the
/// tight one allows, never for a request the tight one refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_charging_leaves_the_losing_requests_uncounted_under_concurrency() {
    let redis = RedisServer::start();
    let stores = [Arc::new(redis_store(&redis)), Arc::new(redis_store(&redis))];
    let tight = one_check(
        "st:tight",
        None,
        Quota::new(Algorithm::FixedWindow, 5, Unit::Hour, 1, None),
    );
    let mut loose = one_check(
        "st:loose",
        None,
        Quota::new(Algorithm::TokenBucket, 1000, Unit::Hour, 1, None),
    );
    loose.descriptor = 1;
    let allowed = allowed_concurrently(
        &stores,
        vec![tight, loose],
        vec![Role::default(); 2],
        Charging::AllOrNothing,
        32,
        4,
    )
    .await;
    assert_eq!(allowed, 5);
    assert_eq!(redis.command(&["GET", "st:tight"]), "$1\r\n5\r\n");
    // Five tokens of 3.6 s each: the TAT is 18 s after the instant.
    let tat = T0 + 30_000 + 5 * 3_600;
    assert_eq!(
        redis.command(&["GET", "st:loose"]),
        format!("${}\r\n{tat}:0\r\n", tat.to_string().len() + 2)
    );
}

/// After `SCRIPT FLUSH` (what a restarted Redis looks like to EVALSHA) the next call gets
/// NOSCRIPT, runs its script with EVAL, and Redis has it cached again: `fixed.lua` for fixed
/// windows charged always, `engine.lua` for the rest.
#[tokio::test]
async fn a_flushed_script_is_sent_again_and_counts_continue() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let fixed = [one_check(
        "ns:fixed",
        None,
        Quota::new(Algorithm::FixedWindow, 5, Unit::Hour, 1, None),
    )];
    let bucket = [one_check(
        "ns:bucket",
        None,
        Quota::new(Algorithm::TokenBucket, 5, Unit::Hour, 1, None),
    )];
    let sha = |source: &str| redis::Script::new(source).get_hash().to_owned();
    let (fixed_sha, engine_sha) = (
        sha(include_str!("../src/store/fixed.lua")),
        sha(include_str!("../src/store/engine.lua")),
    );
    let exists = || redis.command(&["SCRIPT", "EXISTS", &fixed_sha, &engine_sha]);
    let d = store.decide(&Batch::plain(&fixed, T0)).await.unwrap();
    assert_eq!(d[0].verdict.remaining, 4);
    assert_eq!(exists(), "*2\r\n:1\r\n:0\r\n", "fixed.lua alone so far");
    let d = store.decide(&Batch::plain(&bucket, T0)).await.unwrap();
    assert_eq!(d[0].verdict.remaining, 4);
    assert_eq!(exists(), "*2\r\n:1\r\n:1\r\n");
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]), "+OK\r\n");
    assert_eq!(exists(), "*2\r\n:0\r\n:0\r\n");
    let d = store.decide(&Batch::plain(&fixed, T0)).await.unwrap();
    assert_eq!(d[0].verdict.remaining, 3, "charged once, not twice");
    let d = store.decide(&Batch::plain(&bucket, T0)).await.unwrap();
    assert_eq!(d[0].verdict.remaining, 3, "charged once, not twice");
    assert_eq!(exists(), "*2\r\n:1\r\n:1\r\n");
    assert_eq!(redis.command(&["GET", "ns:fixed"]), "$1\r\n2\r\n");
}

/// A restarted Redis has lost its script cache (and, without persistence, its counters): once
/// the connection is back, calls succeed again through EVAL, with no error from NOSCRIPT.
#[tokio::test]
async fn a_restarted_redis_gets_the_script_again() {
    let mut redis = RedisServer::start();
    let store = redis_store(&redis);
    let checks = [one_check(
        "rs:bucket",
        None,
        Quota::new(Algorithm::TokenBucket, 5, Unit::Hour, 1, None),
    )];
    let d = store.decide(&Batch::plain(&checks, T0)).await.unwrap();
    assert_eq!(d[0].verdict.remaining, 4);
    redis.restart();
    // The first calls may meet the dropped connection (a transient error, never retried by
    // the store); the connection comes back within about a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let d = loop {
        match store.decide(&Batch::plain(&checks, T0)).await {
            Ok(d) => break d,
            Err(e) => {
                assert!(
                    e.is_transient(),
                    "only connection errors while it restarts: {e}"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "not back in 10 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(d[0].verdict.remaining, 4, "a fresh Redis: a full bucket");
    let d = store.decide(&Batch::plain(&checks, T0)).await.unwrap();
    assert_eq!(d[0].verdict.remaining, 3);
}

/// Milliseconds to live of `key`.
fn pttl(redis: &RedisServer, key: &str) -> u64 {
    redis
        .command(&["PTTL", key])
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap()
}

/// Every key's TTL: a fixed window the reference's (window + jitter, from now); a sliding
/// window's current key to the end of the next window; a bucket until it is full again (TAT +
/// 1 ms); each plus the jitter. TTLs are relative, so they are read back within the time the
/// test took since the call (allowed: 2 s, far below every difference checked).
#[tokio::test]
async fn keys_live_as_long_as_they_are_read() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let now = T0 + 3_600_000 + 15_500; // 15.5 s into a minute, in a fresh hour
    let mut checks = vec![
        one_check(
            "ttl:fixed",
            None,
            Quota::new(Algorithm::FixedWindow, 5, Unit::Minute, 2, None),
        ),
        one_check(
            "ttl:sliding",
            Some("ttl:sliding:prev"),
            Quota::new(Algorithm::SlidingWindow, 5, Unit::Minute, 1, None),
        ),
        // 2 per second: 3 tokens put the TAT 1.5 s ahead.
        one_check(
            "ttl:bucket",
            None,
            Quota::new(Algorithm::TokenBucket, 2, Unit::Second, 1, Some(4)),
        ),
    ];
    for c in &mut checks {
        c.cost = 3;
        c.jitter_secs = 7;
    }
    let batch = Batch::plain(&checks, now);
    let started = std::time::Instant::now();
    let d = store.decide(&batch).await.unwrap();
    assert!(d.iter().all(|d| d.verdict.allowed && d.charge.is_some()));
    let expect = [
        ("ttl:fixed", 120_000 + 7_000),
        ("ttl:sliding", 2 * 60_000 - 15_500 + 7_000),
        ("ttl:bucket", 1_500 + 1 + 7_000),
    ];
    for (key, want) in expect {
        let got = pttl(&redis, key);
        let slack = started.elapsed().as_millis() as u64 + 1;
        assert!(
            got <= want && got + slack >= want,
            "{key}: pttl {got}, want {want} (within {slack} ms)"
        );
    }
    assert_eq!(redis.command(&["EXISTS", "ttl:sliding:prev"]), ":0\r\n");
    // A fixed window alone takes fixed.lua (INCRBY, EXPIRE): the same TTL.
    let alone = [Check {
        key: "ttl:fixed:alone".into(),
        ..checks[0].clone()
    }];
    let started = std::time::Instant::now();
    store.decide(&Batch::plain(&alone, now)).await.unwrap();
    let got = pttl(&redis, "ttl:fixed:alone");
    let slack = started.elapsed().as_millis() as u64 + 1;
    assert!(
        got <= 127_000 && got + slack >= 127_000,
        "ttl:fixed:alone: pttl {got}"
    );
    assert_eq!(
        d[2].charge,
        Some(State {
            a: now + 1_500,
            b: 0
        })
    );
}

/// A key holding someone else's value fails the call with a response error, and the script
/// stops before writing anything: the other check's key is not created.
#[tokio::test]
async fn a_foreign_value_fails_the_call_before_any_write() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    redis.command(&["SET", "fv:bucket", "not-a-bucket"]);
    let checks = [
        one_check(
            "fv:fixed",
            None,
            Quota::new(Algorithm::FixedWindow, 5, Unit::Hour, 1, None),
        ),
        one_check(
            "fv:bucket",
            None,
            Quota::new(Algorithm::TokenBucket, 5, Unit::Hour, 1, None),
        ),
    ];
    let e = store.decide(&Batch::plain(&checks, T0)).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("not a bucket"), "{e}");
    assert_eq!(redis.command(&["EXISTS", "fv:fixed"]), ":0\r\n");
}

/// `fixed.lua` writes as it goes (INCRBY), so a key holding someone else's value (a word, a
/// negative number, another type) fails the call only after the keys before it were
/// incremented: those are put back as they were, values and TTLs, and a key the call created
/// is gone again. Nothing else is written.
#[tokio::test]
async fn a_foreign_value_fails_a_fixed_window_call_and_its_increments_are_undone() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let fixed = |key: &str| {
        one_check(
            key,
            None,
            Quota::new(Algorithm::FixedWindow, 5, Unit::Hour, 1, None),
        )
    };
    redis.command(&["SET", "fu:held", "2", "EX", "1000"]);
    redis.command(&["SET", "fu:near", &(MAX_COUNT - 1).to_string(), "EX", "900"]);
    for (foreign, setup, message) in [
        ("fu:word", vec!["SET", "fu:word", "abc"], "not an integer"),
        ("fu:neg", vec!["SET", "fu:neg", "-3"], "negative"),
        ("fu:list", vec!["RPUSH", "fu:list", "x"], "WRONGTYPE"),
    ] {
        redis.command(&setup);
        // fu:held twice, fu:near saturated (2^63 - 2 + 5 would overflow: set to 2^63 - 1),
        // fu:fresh created, then the foreign key.
        let near = Check {
            cost: 5,
            ..fixed("fu:near")
        };
        let checks = [
            fixed("fu:held"),
            near,
            fixed("fu:fresh"),
            fixed("fu:held"),
            fixed(foreign),
        ];
        let e = store.decide(&Batch::plain(&checks, T0)).await.unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains(message), "{foreign}: {e}");
        assert_eq!(
            redis.command(&["GET", "fu:held"]),
            "$1\r\n2\r\n",
            "{foreign}"
        );
        let near = (MAX_COUNT - 1).to_string();
        assert_eq!(
            redis.command(&["GET", "fu:near"]),
            format!("$19\r\n{near}\r\n"),
            "{foreign}"
        );
        assert_eq!(
            redis.command(&["EXISTS", "fu:fresh"]),
            ":0\r\n",
            "{foreign}"
        );
        // The TTLs as they were (less the time since), not the window's hour.
        assert!(pttl(&redis, "fu:held") <= 1_000_000, "{foreign}");
        assert!(pttl(&redis, "fu:near") <= 900_000, "{foreign}");
    }
    assert_eq!(redis.command(&["GET", "fu:neg"]), "$2\r\n-3\r\n");
    assert_eq!(redis.command(&["GET", "fu:word"]), "$3\r\nabc\r\n");
}
