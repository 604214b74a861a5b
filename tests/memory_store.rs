//! The in-memory backend under a flood of distinct descriptor values: `MEMORY_MAX_COUNTERS`
//! caps the counters, the oldest are evicted and counted in `/metrics`, and the service keeps
//! answering correctly; an invalid cap refuses to start.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;

/// Two hits per user per day: the second is the last OK, the third is OVER_LIMIT.
const RULES: &str = r#"
domain: mem
descriptors:
  - key: user
    rate_limit: {unit: day, requests_per_unit: 2}
"#;

/// The value of the unlabelled sample `name` in a Prometheus text page.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| match l.split_once(' ') {
            Some((n, v)) if n == name => v.trim().parse().ok(),
            _ => None,
        })
}

/// (overall code, remaining) of one hit on `user`.
async fn hit(
    c: &mut ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<
        tonic::transport::Channel,
    >,
    user: &str,
) -> (i32, u32) {
    let r = c
        .should_rate_limit(request("mem", &[&[("user", user)]]))
        .await
        .unwrap()
        .into_inner();
    (r.overall_code, r.statuses[0].limit_remaining)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_values_beyond_the_cap_evict_the_oldest_counters_and_are_counted() {
    let dir = config_dir(&[("rules.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("MEMORY_MAX_COUNTERS", "1000")
        .start();
    let mut c = rl.client().await;
    // Every counter must end at the same second (one day window), so the eviction order is
    // the creation order, and no day may end during the test.
    ensure_window_room(86_400, Duration::from_secs(120)).await;
    let ok = Code::Ok as i32;

    // 5,000 users, one call each, in order: the first 4,000 counters are evicted.
    for i in 0..5_000 {
        assert_eq!(hit(&mut c, &format!("u{i}")).await, (ok, 1), "u{i}");
    }
    let (status, text) = http_get(&rl.http, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "ratelimitd_memory_counters"),
        Some(1000.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ratelimitd_memory_evictions_total"),
        Some(4000.0),
        "{text}"
    );

    // The newest 1,000 kept their counts: u4999's second hit is its last OK.
    assert_eq!(hit(&mut c, "u4999").await, (ok, 0));
    assert_eq!(
        hit(&mut c, "u4999").await,
        (Code::OverLimit as i32, 0),
        "still limited"
    );
    // u0 was evicted, so it starts over (the documented cost of a full store); creating it
    // evicts the oldest survivor, u4000, which starts over too and evicts u4001.
    assert_eq!(hit(&mut c, "u0").await, (ok, 1));
    assert_eq!(hit(&mut c, "u4000").await, (ok, 1));
    assert_eq!(hit(&mut c, "u0").await, (ok, 0), "u0's new counter counts");
    let (_, text) = http_get(&rl.http, "/metrics");
    assert_eq!(sample(&text, "ratelimitd_memory_counters"), Some(1000.0));
    assert_eq!(
        sample(&text, "ratelimitd_memory_evictions_total"),
        Some(4002.0)
    );
}

/// `serve` with `MEMORY_MAX_COUNTERS=value`: (exit code, stderr).
fn serve_with_max_counters(value: &str) -> (Option<i32>, String) {
    let dir = config_dir(&[("rules.yaml", RULES)]);
    serve_expecting_refusal(dir.path(), &[("MEMORY_MAX_COUNTERS", value)])
}

#[test]
fn an_invalid_memory_max_counters_refuses_to_start_and_names_the_setting() {
    for (value, reason) in [
        ("abc", "is not a whole number"),
        ("-5", "is not a whole number"),
        ("1.5", "is not a whole number"),
        ("0", "must be at least 1 (0 would hold no counter)"),
    ] {
        let (code, err) = serve_with_max_counters(value);
        assert_eq!(code, Some(2), "{value}: {err}");
        assert!(
            err.contains(&format!(
                "invalid value '{value}' for '--memory-max-counters <MEMORY_MAX_COUNTERS>': MEMORY_MAX_COUNTERS {reason}"
            )),
            "{value}: {err}"
        );
    }
}
