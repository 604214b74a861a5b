//! The `ShouldRateLimit` hot path in-process, for instruction and allocation counts
//! (bench/callgrind.sh, docs/benchmarks.md "Instructions per request"): the service as
//! `ratelimitd serve` builds it on the memory backend (the global metrics recorder installed,
//! per-rule counters, the system clock), called `--requests` times on one thread with the
//! same request, no network and no gRPC framing in between.
//!
//! cargo run --release --example hotpath -- --requests 10000 [--config rules.yaml]
//!
//! The request is domain `bench`, one descriptor `k=v` (bench/lib.sh's unreachable rule), or
//! `--descriptors D` of them (`k=v0`, `k=v1`, ...). Run it for two counts under valgrind and
//! divide the difference by the difference of the counts: start-up and shutdown cancel out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{num::NonZeroUsize, sync::Arc};

use arc_swap::ArcSwap;
use clap::Parser;
use ratelimitd::{
    config::{compile, parse},
    limiter::{Clock, SystemClock},
    metrics::{Stats, StatsSettings},
    proto::envoy::{
        extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
        service::ratelimit::v3::{rate_limit_response::Code, RateLimitRequest},
    },
    service::{RateLimiter, ServiceSettings},
    store::MemoryStore,
};

/// bench/lib.sh's `write_unreachable_rule`: every call does the full work.
const RULES: &str = "
domain: bench
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 4000000000}
";

#[derive(Parser)]
struct Args {
    /// Calls to make.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Descriptors per call.
    #[arg(long, default_value_t = 1)]
    descriptors: usize,
    /// A rule file instead of the built-in one (domain `bench`, key `k`).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

fn main() {
    let args = Args::parse();
    let rules = match &args.config {
        Some(path) => std::fs::read_to_string(path).unwrap(),
        None => RULES.to_owned(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // As `serve` does: the global recorder first, then the service's handles.
        let _prometheus = ratelimitd::metrics::install(None, None).unwrap();
        let raw = parse("bench.yaml", &rules).unwrap();
        let tree = compile(&[("bench.yaml".to_owned(), raw)], false).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = MemoryStore::new(clock.clone(), NonZeroUsize::new(100_000).unwrap());
        let limiter = RateLimiter::new(
            Arc::new(ArcSwap::from_pointee(tree)),
            Arc::new(store),
            clock,
            ServiceSettings {
                near_limit_ratio: 0.8,
                ..ServiceSettings::default()
            },
            Arc::new(Stats::new(None, StatsSettings::default())),
        );
        let req = RateLimitRequest {
            domain: "bench".into(),
            descriptors: (0..args.descriptors)
                .map(|d| RateLimitDescriptor {
                    entries: vec![Entry {
                        key: "k".into(),
                        value: if args.descriptors == 1 {
                            "v".into()
                        } else {
                            format!("v{d}")
                        },
                    }],
                    ..Default::default()
                })
                .collect(),
            hits_addend: 0,
        };
        let mut ok = 0u64;
        for _ in 0..args.requests {
            let answer = limiter.answer(&req).await.unwrap();
            ok += u64::from(answer.overall_code == Code::Ok as i32);
        }
        println!("requests={} ok={ok}", args.requests);
    });
}
