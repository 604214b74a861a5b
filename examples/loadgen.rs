//! A bounded gRPC load generator for ratelimitd and any RLS v3 server (docs/benchmarks.md,
//! bench/compare.sh), for what h2load cannot report: answers by code, several descriptors per
//! call, key distributions, an open-loop target rate and HDR latency percentiles.
//!
//! cargo run --release --example loadgen -- --target 127.0.0.1:8081 --domain example \
//!     --key api_key --connections 4 --streams 16 --requests 200000 --json
//!
//! - Load: `--connections` HTTP/2 connections, each with `--streams` calls in flight (or
//!   `--concurrency` in flight in all, spread over the connections).
//! - Bounds: stops after `--requests` calls or `--duration` seconds, whichever comes first, and
//!   never runs longer than `--max-seconds` (default 60, at most 600).
//! - `--rate R`: open loop. Call `n` is due at `start + n / R`; latency counts from when it
//!   was due, not from when a free stream sent it, so a stalled server shows in the
//!   percentiles instead of slowing the load down (no coordinated omission). A pacing thread
//!   releases each call at its time (`std::thread::sleep`, accurate to ~0.1 ms) to whichever
//!   stream is free: tokio's own timer has a 1 ms resolution and would send the calls in
//!   bursts at each millisecond, which queue behind each other and add ~0.5 ms to every
//!   percentile. Without `--rate` the load is closed-loop: each stream sends its next call
//!   when the last one is answered.
//! - Keys: `--dist cycle` (the default: `--keys` values in turn; `--keys 1` is one hot key),
//!   `hot`, `uniform` over `--keys` values, or `zipf` over them with exponent `--zipf-s`.
//! - `--descriptors D`: D descriptors per call, `KEY=v<n>-<d>` for d in 0..D (one counter each).
//! - `slow` counts calls that took `--slow-ms` (default 10) or longer.
//! - Output: one line (`requests= ok= over_limit= errors= seconds= rps= p50_us= ...`), or a
//!   JSON object with `--json`.
//!
//! `--grpc-timeout MS` sends each call with a `grpc-timeout` header, as Envoy's rate-limit
//! filter always does (its `timeout`, 20 ms by default): the server's deadline path.
//!
//! `--parent KEY=VALUE` (repeatable) puts these entries before the varied one in every
//! descriptor, to reach nested rules (bench/rules.sh).
//!
//! `--vary-key` puts the key number in the descriptor key instead of its value, and
//! `--override-limit N` sends a limit override (N per second) in every descriptor: together
//! they send a new per-rule stats key with every call (the metrics-cardinality measurement).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use rand_distr::Zipf;
use ratelimitd::proto::envoy::{
    extensions::common::ratelimit::v3::{
        rate_limit_descriptor::{Entry, RateLimitOverride},
        RateLimitDescriptor,
    },
    service::ratelimit::v3::{rate_limit_service_client::RateLimitServiceClient, RateLimitRequest},
};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// host:port of the RLS server (loopback only).
    #[arg(long, default_value = "127.0.0.1:8081")]
    target: String,
    #[arg(long, default_value = "example")]
    domain: String,
    #[arg(long, default_value = "api_key")]
    key: String,
    /// Distinct descriptor values (1 = one hot key).
    #[arg(long, default_value_t = 1)]
    keys: u64,
    /// How keys are picked from the `--keys` values.
    #[arg(long, value_enum, default_value_t = Dist::Cycle)]
    dist: Dist,
    /// Exponent of the zipf distribution (`--dist zipf`).
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Entries before the varied one in every descriptor (`KEY=VALUE`, repeatable), for nested rules.
    #[arg(long = "parent", value_parser = parse_entry)]
    parents: Vec<(String, String)>,
    /// Descriptors per call.
    #[arg(long, default_value_t = 1)]
    descriptors: usize,
    /// Total calls (the run stops after these, `--duration` or `--max-seconds`).
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Run for this many seconds (still bounded by `--requests` and `--max-seconds`).
    #[arg(long)]
    duration: Option<f64>,
    /// Hard bound on the run, in seconds (at most 600).
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// Calls in flight in all (default: connections x streams).
    #[arg(long)]
    concurrency: Option<usize>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight per connection (default 16, unless --concurrency is given).
    #[arg(long)]
    streams: Option<usize>,
    /// Target rate in calls per second, open-loop (see the module docs).
    #[arg(long)]
    rate: Option<f64>,
    /// Seed of the key picks (runs with the same seed send the same keys).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Vary the descriptor key (`KEY-N`, value `v`) instead of its value.
    #[arg(long)]
    vary_key: bool,
    /// Send this limit (per second) as an override in every descriptor.
    #[arg(long)]
    override_limit: Option<u32>,
    /// Send each call with this `grpc-timeout` (ms), as Envoy does.
    #[arg(long)]
    grpc_timeout: Option<u64>,
    /// Calls at or above this latency (ms) are counted as `slow`.
    #[arg(long, default_value_t = 10)]
    slow_ms: u64,
    /// Print one JSON object instead of the key=value line.
    #[arg(long)]
    json: bool,
}

fn parse_entry(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Dist {
    Cycle,
    Hot,
    Uniform,
    Zipf,
}

impl Dist {
    fn name(self) -> &'static str {
        match self {
            Dist::Cycle => "cycle",
            Dist::Hot => "hot",
            Dist::Uniform => "uniform",
            Dist::Zipf => "zipf",
        }
    }
}

/// What one stream saw.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    over: u64,
    errors: u64,
}

impl Tally {
    fn new() -> Self {
        Tally {
            // 1 µs to 10 min, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).unwrap(),
            ok: 0,
            over: 0,
            errors: 0,
        }
    }
}

fn main() {
    let args = Args::parse();
    assert!(
        args.target.starts_with("127.")
            || args.target.starts_with("localhost")
            || args.target.starts_with("[::1]"),
        "load is only sent to loopback addresses"
    );
    assert!(args.max_seconds <= 600, "--max-seconds is at most 600");
    assert!(args.keys >= 1 && args.descriptors >= 1);
    assert!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let args = Arc::new(args);
    let connections = args.connections.max(1);
    let in_flight = args
        .concurrency
        .unwrap_or(connections * args.streams.unwrap_or(16))
        .max(1);
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            Channel::from_shared(format!("http://{}", args.target))
                .unwrap()
                .connect()
                .await
                .expect("connect"),
        );
    }
    let limit = Duration::from_secs(args.max_seconds)
        .min(args.duration.map_or(Duration::MAX, Duration::from_secs_f64));
    let started = Instant::now();
    let deadline = started + limit;
    let next = Arc::new(AtomicU64::new(0));
    let paced = args
        .rate
        .map(|rate| pace(rate, args.requests, limit, started, in_flight));
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let client = RateLimitServiceClient::new(channels[t % connections].clone());
        let (args, next, paced) = (args.clone(), next.clone(), paced.clone());
        tasks.push(tokio::spawn(stream(
            client, args, next, paced, deadline, t as u64,
        )));
    }
    let mut all = Tally::new();
    for t in tasks {
        let tally = t.await.unwrap();
        all.latency.add(&tally.latency).unwrap();
        all.ok += tally.ok;
        all.over += tally.over;
        all.errors += tally.errors;
    }
    report(&args, &all, started.elapsed(), connections, in_flight);
}

/// Open loop: the calls due within `limit` (at most `requests`), and a semaphore that a
/// pacing thread gives one permit at each call's time, then `streams` more once all are
/// out, so that every stream wakes and finds nothing left.
#[derive(Clone)]
struct Paced {
    calls: u64,
    started: Instant,
    rate: f64,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Paced {
    /// When call `n` is due.
    fn due(&self, n: u64) -> Instant {
        self.started + Duration::from_secs_f64(n as f64 / self.rate)
    }
}

fn pace(rate: f64, requests: u64, limit: Duration, started: Instant, streams: usize) -> Paced {
    let paced = Paced {
        calls: requests.min((limit.as_secs_f64() * rate).ceil() as u64),
        started,
        rate,
        permits: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let pacer = paced.clone();
    std::thread::spawn(move || {
        for n in 0..pacer.calls {
            let due = pacer.due(n);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            pacer.permits.add_permits(1);
        }
        pacer.permits.add_permits(streams);
    });
    paced
}

/// One stream: takes call numbers until the run is over.
async fn stream(
    mut client: RateLimitServiceClient<Channel>,
    args: Arc<Args>,
    next: Arc<AtomicU64>,
    paced: Option<Paced>,
    deadline: Instant,
    id: u64,
) -> Tally {
    let mut tally = Tally::new();
    let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(id));
    let zipf = (args.dist == Dist::Zipf).then(|| Zipf::new(args.keys as f64, args.zipf_s).unwrap());
    loop {
        if let Some(p) = &paced {
            match p.permits.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= args.requests {
            break;
        }
        let due = match &paced {
            Some(p) => {
                if n >= p.calls {
                    break;
                }
                p.due(n)
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        let key = match args.dist {
            Dist::Cycle => n % args.keys,
            Dist::Hot => 0,
            Dist::Uniform => rng.random_range(0..args.keys),
            // Zipf samples 1..=keys as a float.
            Dist::Zipf => zipf.as_ref().map_or(0, |z| rng.sample(z) as u64 - 1),
        };
        let mut request = tonic::Request::new(build(&args, key));
        if let Some(ms) = args.grpc_timeout {
            request.set_timeout(Duration::from_millis(ms));
        }
        let answer = client.should_rate_limit(request).await;
        let waited = due.elapsed();
        match answer {
            Ok(r) if r.get_ref().overall_code == 1 => tally.ok += 1,
            Ok(_) => tally.over += 1,
            Err(_) => tally.errors += 1,
        }
        tally
            .latency
            .saturating_record(waited.as_micros().try_into().unwrap_or(u64::MAX));
    }
    tally
}

fn build(args: &Args, key: u64) -> RateLimitRequest {
    let descriptors = (0..args.descriptors)
        .map(|d| {
            let suffix = if args.descriptors > 1 {
                format!("-{d}")
            } else {
                String::new()
            };
            let (key, value) = if args.vary_key {
                (format!("{}-{key}{suffix}", args.key), "v".to_owned())
            } else {
                (args.key.clone(), format!("v{key}{suffix}"))
            };
            let mut entries: Vec<Entry> = args
                .parents
                .iter()
                .map(|(key, value)| Entry {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect();
            entries.push(Entry { key, value });
            RateLimitDescriptor {
                entries,
                limit: args
                    .override_limit
                    .map(|requests_per_unit| RateLimitOverride {
                        requests_per_unit,
                        unit: 1, // SECOND
                    }),
                hits_addend: None,
            }
        })
        .collect();
    RateLimitRequest {
        domain: args.domain.clone(),
        descriptors,
        hits_addend: 0,
    }
}

fn report(args: &Args, all: &Tally, elapsed: Duration, connections: usize, in_flight: usize) {
    let h = &all.latency;
    let calls = h.len();
    let secs = elapsed.as_secs_f64();
    let rps = calls as f64 / secs;
    let q = |p: f64| h.value_at_quantile(p);
    // Recorded values are rounded within 3 significant digits: a call just under the bound
    // may count, never one at or above it that is missed.
    let slow = h.count_between(h.lowest_equivalent(args.slow_ms * 1000), u64::MAX);
    if args.json {
        let out = serde_json::json!({
            "requests": calls,
            "ok": all.ok,
            "over_limit": all.over,
            "errors": all.errors,
            "seconds": secs,
            "rps": rps,
            "target_rate": args.rate,
            "connections": connections,
            "in_flight": in_flight,
            "descriptors": args.descriptors,
            "dist": args.dist.name(),
            "keys": args.keys,
            "slow_ms": args.slow_ms,
            "slow": slow,
            "latency_us": {
                "mean": h.mean(),
                "p50": q(0.50),
                "p90": q(0.90),
                "p99": q(0.99),
                "p999": q(0.999),
                "max": h.max(),
            },
        });
        println!("{out}");
    } else {
        println!(
            "requests={calls} ok={} over_limit={} errors={} seconds={secs:.2} rps={rps:.0} mean_us={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} slow={slow}",
            all.ok,
            all.over,
            all.errors,
            h.mean(),
            q(0.50),
            q(0.90),
            q(0.99),
            q(0.999),
            h.max(),
        );
    }
}
