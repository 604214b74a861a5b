//! The in-memory store through the `Store` trait only (its internals may change under it): one
//! hot key, and many keys; then a whole `ShouldRateLimit` answered in process by the service
//! over that store (validation, matching, keys, the store, the response), without gRPC.
//!
//! `cargo bench --bench store`; what each case measures is in docs/benchmarks.md.

mod common;

use std::{
    future::Future,
    hint::black_box,
    num::NonZeroUsize,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use ratelimitd::{
    limiter::engine::{Batch, Check},
    metrics::{Stats, StatsSettings},
    proto::envoy::{
        extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
        service::ratelimit::v3::{rate_limit_response::Code, RateLimitRequest},
    },
    service::{RateLimiter, ServiceSettings},
    store::{MemoryStore, Store},
};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
}

/// Runs `fut` to completion: polled once with a no-op waker, since the memory store and the
/// service over it complete without waiting (a runtime's `block_on` would add some 150 ns to
/// every call measured); on the runtime if it does wait. Call with the runtime entered, for
/// anything that needs its context.
fn run<F: Future>(rt: &Runtime, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => rt.block_on(fut),
    }
}

fn store(max_counters: usize) -> MemoryStore {
    MemoryStore::new(
        common::clock(),
        NonZeroUsize::new(max_counters).expect("a positive cap"),
    )
}

fn batch(checks: &[Check]) -> Batch<'_> {
    Batch::plain(checks, common::NOW_MS)
}

/// Distinct counters cycled through by the many-keys cases.
const MANY: usize = 100_000;

fn memory_store(c: &mut Criterion) {
    let rt = runtime();
    let _entered = rt.enter();
    let tree = common::tree(common::RULES);
    let mut g = c.benchmark_group("store");

    // Every call on the same key(s): a lookup of existing counters, under contention from
    // nobody (one thread).
    for (name, key) in [("hot_key", "fixed"), ("hot_key_three_mixed", "three_mixed")] {
        let s = store(MANY);
        let checks = common::checks(&tree, key, "hot");
        g.bench_function(name, |b| {
            b.iter(|| run(&rt, s.decide(black_box(&batch(&checks)))))
        });
    }

    // One fixed window per call, cycling through MANY keys. With room for all of them, each
    // call finds its counter in a table of MANY (after the first pass); with room for a tenth,
    // each call creates its counter and evicts the oldest.
    let many: Vec<Check> = (0..MANY)
        .flat_map(|i| common::checks(&tree, "fixed", &format!("user-{i}")))
        .collect();
    for (name, cap) in [
        ("many_keys_existing", MANY * 2),
        ("many_keys_evicting", MANY / 10),
    ] {
        let s = store(cap);
        for check in &many {
            let _ = run(&rt, s.decide(&batch(std::slice::from_ref(check))));
        }
        let mut next = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                let check = &many[next];
                next = (next + 1) % MANY;
                run(
                    &rt,
                    s.decide(black_box(&batch(std::slice::from_ref(check)))),
                )
            })
        });
    }
    g.finish();
}

fn request(entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).to_owned(),
                    value: (*v).to_owned(),
                })
                .collect(),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// `RateLimiter::answer`, the call the gRPC handler makes, over the memory store. No metrics
/// recorder is installed, so recording costs nothing here (it does in the server).
fn service(c: &mut Criterion) {
    let rt = runtime();
    let _entered = rt.enter();
    let limiter = RateLimiter::new(
        Arc::new(ArcSwap::from_pointee(common::tree(common::RULES))),
        Arc::new(store(MANY)),
        common::clock(),
        // The server's defaults where `Default` differs (NEAR_LIMIT_RATIO, MAX_CONCURRENT_CALLS).
        ServiceSettings {
            near_limit_ratio: 0.8,
            max_concurrent_calls: 10_000,
            ..ServiceSettings::default()
        },
        Arc::new(Stats::new(None, StatsSettings::default())),
    );
    let mut g = c.benchmark_group("service");
    let cases = [
        ("fixed_window", request(&[("fixed", "user-1234567")])),
        ("three_mixed", request(&[("three_mixed", "user-1234567")])),
        ("no_rule", request(&[("unknown", "x")])),
    ];
    for (name, req) in cases {
        let answer = run(&rt, limiter.answer(&req)).expect("answered");
        assert_eq!(answer.overall_code, Code::Ok as i32, "{name}");
        g.bench_function(name, |b| {
            b.iter(|| run(&rt, limiter.answer(black_box(&req))))
        });
    }
    g.finish();
}

criterion_group!(benches, memory_store, service);
criterion_main!(benches);
