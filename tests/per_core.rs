//! `RUNTIME_FLAVOR=per_core`: gRPC connections spread over several single-threaded runtimes
//! count exactly together, on each backend and listener kind, and drain together at SIGTERM.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;

const RULES: &str =
    "domain: pc\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 40}\n";

const PER_CORE: [(&str, &str); 2] = [("RUNTIME_FLAVOR", "per_core"), ("WORKER_THREADS", "3")];

/// `clients` connections, each its own TCP (or Unix) connection, so the acceptor hands them
/// to the runtimes in turn; each sends `calls` calls for the same counter, all at once.
/// Returns every answer's code and remaining count.
async fn concurrent_calls(rl: &Ratelimitd, clients: usize, calls: usize) -> Vec<(Code, u32)> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = rl.client().await;
        for _ in 0..calls {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let r = c
                    .should_rate_limit(request("pc", &[&[("k", "shared")]]))
                    .await
                    .unwrap()
                    .into_inner();
                (r.overall_code(), r.statuses[0].limit_remaining)
            }));
        }
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// 60 calls against a limit of 40: exactly 40 allowed, each seeing a different remaining
/// count (39 down to 0), and 20 refused.
fn assert_counted_exactly(answers: &[(Code, u32)], what: &str) {
    let mut remaining: Vec<u32> = answers
        .iter()
        .filter(|(code, _)| *code == Code::Ok)
        .map(|(_, r)| *r)
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..40).collect::<Vec<_>>(), "{what}");
    let refused = answers
        .iter()
        .filter(|a| **a == (Code::OverLimit, 0))
        .count();
    assert_eq!(refused, 20, "{what}: {answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_three_runtimes_count_exactly_in_memory_and_on_redis() {
    for backend in ["memory", "redis"] {
        let svc = start_service(backend, RULES, &PER_CORE);
        let answers = concurrent_calls(&svc.rl, 6, 10).await;
        assert_counted_exactly(&answers, backend);
        if let Some(redis) = &svc.redis {
            assert_eq!(redis.keys().len(), 1, "one counter");
            // One Redis connection per runtime, each opened by the runtime that uses it: the
            // three serving calls and the one that checked Redis at start-up. The one more in
            // CLIENT LIST is the test's own.
            let clients = redis.command(&["CLIENT", "LIST"]);
            assert_eq!(
                clients.lines().filter(|l| l.contains("addr=")).count(),
                3 + 1 + 1,
                "{clients}"
            );
        }
        let (_, metrics) = http_get(&svc.rl.http, "/metrics");
        assert_eq!(
            sample(
                &metrics,
                "ratelimit_service_total_requests",
                &[("grpc_method", "ShouldRateLimit")]
            ),
            Some(60.0),
            "{backend}: every call counted once in the shared metrics"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_on_every_runtime_finish_at_sigterm() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let mut rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("DRAIN_TIMEOUT", "10s")
        .envs(&PER_CORE)
        .start();
    // Each client's connection opened (and handed to its runtime) before Redis stalls.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = rl.client().await;
        c.should_rate_limit(request("pc", &[&[("k", "warm")]]))
            .await
            .unwrap();
        clients.push(c);
    }
    redis.pause();
    let calls: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                c.should_rate_limit(request("pc", &[&[("k", "inflight")]]))
                    .await
            })
        })
        .collect();
    let in_flight = || {
        let (_, m) = http_get(&rl.http, "/metrics");
        sample(&m, "ratelimitd_calls_in_flight", &[]) == Some(3.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !in_flight() {
        assert!(
            std::time::Instant::now() < deadline,
            "3 calls never in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rl.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.resume();
    let mut remaining = Vec::new();
    for call in calls {
        let r = call.await.unwrap().expect("an in-flight call completes");
        let r = r.into_inner();
        assert_eq!(r.overall_code(), Code::Ok);
        remaining.push(r.statuses[0].limit_remaining);
    }
    remaining.sort_unstable();
    assert_eq!(remaining, [37, 38, 39]);
    let exit = rl
        .wait_exit(Duration::from_secs(10))
        .expect("exits after draining");
    assert_eq!(exit.code(), Some(0), "{}", rl.log());
    assert!(rl.log().contains("ratelimitd stopped"), "{}", rl.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_is_served_by_every_runtime() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let sock_dir = tempfile::TempDir::new().unwrap();
    let sock = sock_dir.path().join("rl.sock");
    let mut rl = Ratelimitd::builder(dir.path())
        .env("GRPC_UDS", sock.to_str().unwrap())
        .envs(&PER_CORE)
        .start();
    let answers = concurrent_calls(&rl, 6, 10).await;
    assert_counted_exactly(&answers, "unix socket");
    assert_eq!(rl.terminate().code(), Some(0));
    assert!(!sock.exists(), "socket file removed at shutdown");
}

#[test]
fn an_unknown_runtime_flavor_names_the_three_choices() {
    let dir = config_dir(&[("rules.yaml", "domain: d\n")]);
    let (code, err) = serve_expecting_refusal(dir.path(), &[("RUNTIME_FLAVOR", "per_thread")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "invalid RUNTIME_FLAVOR 'per_thread' (expected multi_thread, current_thread or per_core)"
        ),
        "{err}"
    );
}
