//! Rule matching and counter-key building: the pure, per-descriptor work of every call before
//! the store is asked. Matching runs on the shipped `config/example.yaml`; keys on the rules
//! of `bench/algorithms.sh` (benches/common).
//!
//! `cargo bench --bench matcher`; what each case measures is in docs/benchmarks.md.
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ratelimitd::{
    limiter::{copy_base, CacheKeyBuilder, ValueHasher},
    matcher,
    service::limit_keys,
};

/// `matcher::find` on the shipped rules, with the scratch string reused as the service does.
fn matching(c: &mut Criterion) {
    let tree = common::tree(include_str!("../config/example.yaml"));
    let mut g = c.benchmark_group("match");
    let cases: [(&str, &[(&str, &str)]); 4] = [
        // One level, the value not configured: a miss on `key_value`, a hit on `key`.
        ("key_only", &[("api_key", "user-42")]),
        // One level, the value configured.
        ("exact_value", &[("api_key", "partner-1234")]),
        // Two levels: the wildcard `/api/*`, then an exact `method_POST`.
        (
            "wildcard_two_levels",
            &[("path", "/api/users"), ("method", "POST")],
        ),
        // No rule for the key: the whole level is searched, then nothing.
        ("no_rule", &[("unknown", "x")]),
    ];
    for (name, entries) in cases {
        let mut scratch = String::new();
        assert!(
            matcher::find(&tree, "example", entries, &mut scratch).is_some() == (name != "no_rule"),
            "{name}: unexpected match result"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                matcher::find(
                    black_box(&tree),
                    black_box("example"),
                    black_box(entries),
                    &mut scratch,
                )
                .map(|m| m.rule.limits.len())
            })
        });
    }
    g.finish();
}

/// A descriptor's counter keys: `CacheKeyBuilder::base`, then `service::limit_keys` for each
/// limit, the last one taking the base itself, as the service plans its checks (one
/// allocation per key).
fn keys(c: &mut Criterion) {
    let tree = common::tree(common::RULES);
    let plain = CacheKeyBuilder::new("ratelimit_");
    let hashed = CacheKeyBuilder::new("ratelimit_")
        .with_value_hasher(ValueHasher::try_new(b"a bench secret of 32 bytes......").unwrap());
    let mut g = c.benchmark_group("keys");
    let cases = [
        ("fixed_window", "fixed", &plain),
        ("sliding_window", "sliding", &plain),
        ("token_bucket", "token", &plain),
        ("three_mixed", "three_mixed", &plain),
        ("fixed_window_hashed_value", "fixed", &hashed),
    ];
    for (name, key, builder) in cases {
        let entries = [(key, "user-1234567")];
        let m = matcher::find(&tree, "bench", &entries, &mut String::new()).unwrap();
        let limits = &m.rule.limits;
        let single = limits.len() == 1;
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut base =
                    builder.base(black_box("bench"), black_box(&entries).iter().copied());
                let mut keys = Vec::with_capacity(limits.len());
                for (i, limit) in limits.iter().enumerate() {
                    let own = if i + 1 < limits.len() {
                        copy_base(&base)
                    } else {
                        std::mem::take(&mut base)
                    };
                    keys.push(limit_keys(own, limit, single, black_box(common::NOW_MS)));
                }
                keys
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matching, keys);
criterion_main!(benches);
