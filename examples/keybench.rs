//! Micro-benchmark of counter-key building, the per-descriptor work of every request, timed
//! in a release binary (not asserted in tests, where timings only make flaky failures):
//!
//! ```text
//! cargo run --release --example keybench -- --iterations 2000000 --rounds 7
//! ```
//!
//! For each key builder (values as they are, values as keyed hashes) and descriptor shape it
//! prints ns per key, best and median of the rounds. Each key is built and dropped, so the
//! figure includes its one allocation and free, as on the request path. Values cycle through
//! 1024 distinct ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, time::Instant};

use clap::Parser;
use ratelimitd::limiter::{CacheKeyBuilder, Unit, ValueHasher};

#[derive(Parser)]
struct Args {
    /// Keys built per round.
    #[arg(long, default_value_t = 2_000_000)]
    iterations: usize,
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

/// A descriptor shape: entry keys, with the value of the first entry varying.
struct Shape {
    name: &'static str,
    first_key: &'static str,
    rest: &'static [(&'static str, &'static str)],
    values: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let shapes = [
        Shape {
            name: "1 entry (remote_address=IPv4)",
            first_key: "remote_address",
            rest: &[],
            values: (0..1024u32)
                .map(|i| format!("10.{}.{}.{}", i >> 8, i & 0xff, 7))
                .collect(),
        },
        Shape {
            name: "2 entries (api_key=sk_live_<24>, path=/v1/orders)",
            first_key: "api_key",
            rest: &[("path", "/v1/orders")],
            values: (0..1024).map(|i| format!("sk_live_{i:024}")).collect(),
        },
    ];
    for (mode, builder) in builders() {
        for shape in &shapes {
            let sample = build(&builder, shape, 0);
            let (best, median) = measure(&builder, shape, args.iterations, args.rounds);
            println!(
                "{mode:<7} {:<52} best {best:6.1} ns/key  median {median:6.1} ns/key  e.g. {sample}",
                shape.name
            );
        }
    }
}

/// The key builders compared: values as they are (the reference's keys), and values as keyed
/// hashes (`CACHE_KEY_HASH_SECRET_FILE`).
fn builders() -> Vec<(&'static str, CacheKeyBuilder)> {
    let hasher = ValueHasher::try_new(b"a benchmark secret, 32 bytes....").unwrap();
    vec![
        ("plain", CacheKeyBuilder::new("ratelimit:")),
        (
            "hashed",
            CacheKeyBuilder::new("ratelimit:").with_value_hasher(hasher),
        ),
    ]
}

fn build(b: &CacheKeyBuilder, shape: &Shape, i: usize) -> String {
    let value = shape.values[i % shape.values.len()].as_str();
    let entries = std::iter::once((shape.first_key, value)).chain(shape.rest.iter().copied());
    b.build(
        black_box("example"),
        black_box(entries),
        Unit::Minute,
        black_box(1_700_000_000 + i as u64),
    )
}

/// (best, median) ns per key over `rounds` rounds of `iterations` keys.
fn measure(b: &CacheKeyBuilder, shape: &Shape, iterations: usize, rounds: usize) -> (f64, f64) {
    // Warm-up: caches, branch predictors, the allocator's free lists.
    for i in 0..iterations / 10 {
        black_box(build(b, shape, i));
    }
    let mut per_key: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let started = Instant::now();
            for i in 0..iterations {
                black_box(build(b, shape, i));
            }
            started.elapsed().as_nanos() as f64 / iterations.max(1) as f64
        })
        .collect();
    per_key.sort_by(f64::total_cmp);
    (per_key[0], per_key[per_key.len() / 2])
}
