//! A bounded gRPC load generator for ratelimitd (and any RLS v3 server), used for
//! docs/benchmarks.md. Sends `--requests` calls with `--concurrency` in flight over
//! `--connections` HTTP/2 connections and prints throughput and latency percentiles.
//!
//! cargo run --release --example loadgen -- --target 127.0.0.1:8081 --domain example \
//!     --key api_key --keys 1 --requests 200000 --concurrency 64
//!
//! `--vary-key` puts the running number in the descriptor key instead of its value, and
//! `--override-limit N` sends a limit override (N per second) in every descriptor: together
//! they send a new per-rule stats key with every call (the metrics-cardinality measurement in
//! docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use clap::Parser;
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
    /// Distinct descriptor values cycled through (1 = one hot key).
    #[arg(long, default_value_t = 1)]
    keys: usize,
    /// Total calls (the run stops after these, or after --max-seconds).
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// Vary the descriptor key (`KEY-N`, value `v`) instead of its value.
    #[arg(long)]
    vary_key: bool,
    /// Send this limit (per second) as an override in every descriptor.
    #[arg(long)]
    override_limit: Option<u32>,
}

fn main() {
    let args = Args::parse();
    assert!(
        args.target.starts_with("127.")
            || args.target.starts_with("localhost")
            || args.target.starts_with("[::1]"),
        "load is only sent to loopback addresses"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(
            Channel::from_shared(format!("http://{}", args.target))
                .unwrap()
                .connect()
                .await
                .expect("connect"),
        );
    }
    let per_task = args.requests / args.concurrency.max(1);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..args.concurrency.max(1) {
        let mut client = RateLimitServiceClient::new(channels[t % channels.len()].clone());
        let (domain, key, keys) = (args.domain.clone(), args.key.clone(), args.keys.max(1));
        let (vary_key, override_limit) = (args.vary_key, args.override_limit);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            let (mut ok, mut over, mut errors) = (0usize, 0usize, 0usize);
            for i in 0..per_task {
                if Instant::now() > deadline {
                    break;
                }
                let n = (t * per_task + i) % keys;
                let (key, value) = if vary_key {
                    (format!("{key}-{n}"), "v".to_owned())
                } else {
                    (key.clone(), format!("v{n}"))
                };
                let req = RateLimitRequest {
                    domain: domain.clone(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![Entry { key, value }],
                        limit: override_limit.map(|requests_per_unit| RateLimitOverride {
                            requests_per_unit,
                            unit: 1, // SECOND
                        }),
                        hits_addend: None,
                    }],
                    hits_addend: 0,
                };
                let s = Instant::now();
                match client.should_rate_limit(req).await {
                    Ok(r) if r.get_ref().overall_code == 1 => ok += 1,
                    Ok(_) => over += 1,
                    Err(_) => errors += 1,
                }
                lat.push(s.elapsed());
            }
            (lat, ok, over, errors)
        }));
    }
    let mut lat = Vec::new();
    let (mut ok, mut over, mut errors) = (0, 0, 0);
    for t in tasks {
        let (l, o, v, e) = t.await.unwrap();
        lat.extend(l);
        ok += o;
        over += v;
        errors += e;
    }
    let elapsed = started.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "requests={} ok={ok} over_limit={over} errors={errors} seconds={:.2} rps={:.0} p50_us={} p90_us={} p99_us={} max_us={}",
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_micros(),
        pct(0.90).as_micros(),
        pct(0.99).as_micros(),
        lat.last().unwrap().as_micros(),
    );
}
