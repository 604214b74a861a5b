//! Each algorithm's decision: `engine::decide` on one request's checks, as the memory store
//! runs it under its locks and the Redis script mirrors it. Pure: no store, no clock.
//!
//! `cargo bench --bench limiter`; what each case measures is in docs/benchmarks.md.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ratelimitd::limiter::{
    algorithm::State,
    engine::{decide, Batch},
};

fn decisions(c: &mut Criterion) {
    let tree = common::tree(common::RULES);
    let mut g = c.benchmark_group("decide");
    let cases = [
        ("fixed_window", "fixed"),
        ("sliding_window", "sliding"),
        ("token_bucket", "token"),
        ("three_fixed", "three_fixed"),
        ("three_mixed", "three_mixed"),
    ];
    for (name, key) in cases {
        let checks = common::checks(&tree, key, "user-1234567");
        let batch = Batch::plain(&checks, common::NOW_MS);
        // The keys' states after one earlier call in the same window: a counted window (and
        // a previous one for the sliding window), a bucket with a TAT ahead of now.
        let fresh = vec![State::default(); checks.len()];
        let states: Vec<State> = decide(&batch, &fresh)
            .iter()
            .map(|d| d.charge.expect("the first call is charged"))
            .collect();
        assert!(
            decide(&batch, &states).iter().all(|d| d.verdict.allowed),
            "{name}: the bench limits are never reached"
        );
        g.bench_function(name, |b| {
            b.iter(|| decide(black_box(&batch), black_box(&states)))
        });
    }
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
