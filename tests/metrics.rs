//! `/metrics` after a known request sequence: exact per-rule counter values under the
//! reference's names and labels, service counters, and bounded cardinality (configured rules
//! kept, request-derived keys capped, idle series expired), and the bounded
//! `domain_not_found` of unknown domains.
#![allow(clippy::unwrap_used)]
mod support;

use std::{sync::Arc, time::Duration};

use ratelimitd::proto::envoy::{
    extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride,
    service::ratelimit::v3::RateLimitRequest,
};
use support::*;

const RULES: &str = r#"
domain: m
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: parent
    descriptors:
      - key: child
        value: c1
        rate_limit: {unit: minute, requests_per_unit: 100}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: user
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: route
    value_to_metric: true
    rate_limit: {unit: minute, requests_per_unit: 10}
"#;

/// Replaces a file the way deployers do (write aside, then rename), so a reload never reads
/// a half-written file.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_rule_and_service_counters_have_exact_values() {
    let dir = config_dir(&[("m.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let mut c = rl.client().await;
    ensure_window_room(60, Duration::from_secs(10)).await;

    // 7 hits on a limit of 5: 5 within (the 5th above floor(5 * 0.8) = 4 is near), 2 over.
    for _ in 0..7 {
        c.should_rate_limit(request("m", &[&[("k", "secret-user-1")]]))
            .await
            .unwrap();
    }
    // hits_addend 3 on the nested rule.
    let mut req = request("m", &[&[("parent", "p"), ("child", "c1")]]);
    req.hits_addend = 3;
    c.should_rate_limit(req).await.unwrap();
    // Shadow: 3 hits on a limit of 1, the last two let through.
    for _ in 0..3 {
        c.should_rate_limit(request("m", &[&[("shadow", "s")]]))
            .await
            .unwrap();
    }
    // detailed_metric and value_to_metric put the value in the labels; plain rules do not.
    c.should_rate_limit(request("m", &[&[("user", "alice")]]))
        .await
        .unwrap();
    c.should_rate_limit(request("m", &[&[("route", "/a")]]))
        .await
        .unwrap();
    // An invalid request is a service error.
    c.should_rate_limit(request("", &[&[("k", "v")]]))
        .await
        .unwrap_err();

    let (status, text) = http_get(&rl.http, "/metrics");
    assert_eq!(status, 200);
    let k = [("domain", "m"), ("key1", "k")];
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_total_hits", &k),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_within_limit", &k),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_near_limit", &k),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_over_limit", &k),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_shadow_mode", &k),
        Some(0.0)
    );

    let nested = [("domain", "m"), ("key1", "parent"), ("key2", "child_c1")];
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_total_hits", &nested),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_within_limit", &nested),
        Some(3.0)
    );

    let shadow = [("domain", "m"), ("key1", "shadow")];
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_total_hits", &shadow),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_over_limit", &shadow),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_shadow_mode", &shadow),
        Some(2.0)
    );
    // The 1st hit reached the limit of 1 from 0: above floor(0.8) = 0, so near.
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_near_limit", &shadow),
        Some(1.0)
    );

    let detailed = [("domain", "m"), ("key1", "user_alice")];
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_total_hits", &detailed),
        Some(1.0)
    );
    let vtm = [("domain", "m"), ("key1", "route_/a")];
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_total_hits", &vtm),
        Some(1.0)
    );

    // Values a rule did not ask for never reach the metrics (they can be personal data).
    assert!(!text.contains("secret-user-1"), "{text}");

    let method = [("grpc_method", "ShouldRateLimit")];
    assert_eq!(
        sample(&text, "ratelimit_service_total_requests", &method),
        Some(14.0)
    );
    assert_eq!(
        sample(
            &text,
            "ratelimit_service_should_rate_limit_error",
            &[("err_type", "service_error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_config_load_success", &[]),
        Some(1.0)
    );
    assert_eq!(sample(&text, "ratelimitd_healthy", &[]), Some(1.0));
    assert!(text.contains("ratelimit_service_response_time_seconds_bucket{grpc_method=\"ShouldRateLimit\",le=\"0.02\"}"), "{text}");
    assert!(
        text.contains("ratelimitd_backend_request_duration_seconds_count"),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ratelimitd_backend_requests_in_flight", &[]),
        Some(0.0)
    );
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
}

#[tokio::test]
async fn prometheus_listener_serves_the_same_metrics_when_enabled() {
    let dir = config_dir(&[("m.yaml", RULES)]);
    let port = free_port();
    let rl = Ratelimitd::builder(dir.path())
        .env("USE_PROMETHEUS", "true")
        .env("PROMETHEUS_ADDR", &format!("127.0.0.1:{port}"))
        .env("PROMETHEUS_PATH", "/prom")
        .start();
    rl.client()
        .await
        .should_rate_limit(request("m", &[&[("k", "v")]]))
        .await
        .unwrap();
    let (status, text) = http_get(&format!("127.0.0.1:{port}"), "/prom");
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &text,
            "ratelimit_service_rate_limit_total_hits",
            &[("domain", "m"), ("key1", "k")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_load_metrics_follow_reloads() {
    let dir = config_dir(&[("m.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let metrics = || http_get(&rl.http, "/metrics").1;
    let first = metrics();
    assert_eq!(
        sample(&first, "ratelimit_service_config_load_success", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&first, "ratelimitd_config_generation", &[]),
        Some(1.0)
    );
    let hash1 = first
        .lines()
        .find(|l| l.starts_with("ratelimitd_config_info{") && l.ends_with(" 1"))
        .unwrap()
        .to_owned();

    write_atomically(
        &dir.path().join("m.yaml"),
        "domain: m\ndescriptors:\n  - key: k\n    rate_limit: {unit: eon, requests_per_unit: 1}\n",
    );
    // Reloads land within a second here; the full suite on a 2-core runner (clusters,
    // sentinels and Envoys starting beside this test) has starved one past 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sample(&metrics(), "ratelimit_service_config_load_error", &[]) != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no config_load_error\n{}",
            metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics();
    assert_eq!(
        sample(&text, "ratelimitd_config_generation", &[]),
        Some(1.0),
        "a bad config changes nothing"
    );
    assert!(text.contains(&hash1));

    write_atomically(
        &dir.path().join("m.yaml"),
        "domain: m\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 9}\n",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&metrics(), "ratelimitd_config_generation", &[]) != Some(2.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload\n{}",
            metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics();
    assert_eq!(
        sample(&text, "ratelimit_service_config_load_success", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_config_load_error", &[]),
        Some(1.0)
    );
    let old_hash_now = hash1.trim_end_matches(" 1").to_owned() + " 0";
    assert!(
        text.contains(&old_hash_now),
        "the old hash series drops to 0\n{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("ratelimitd_config_info{") && l.ends_with(" 1"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_receives_the_reference_stat_names() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let dir = config_dir(&[("m.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("USE_STATSD", "true")
        .env("STATSD_HOST", "127.0.0.1")
        .env("STATSD_PORT", &port.to_string())
        .env("STATSD_PROTOCOL", "udp")
        .env("STATS_FLUSH_INTERVAL", "100ms")
        .env("EXTRA_TAGS", "cluster:eu")
        .start();
    let mut c = rl.client().await;
    ensure_window_room(60, Duration::from_secs(10)).await;
    for _ in 0..7 {
        c.should_rate_limit(request("m", &[&[("k", "v")]]))
            .await
            .unwrap();
    }
    c.should_rate_limit(request("", &[&[("k", "v")]]))
        .await
        .unwrap_err();

    // Sum every counter line received until the expected totals arrive (flushes send deltas).
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
    let mut timers = 0;
    let want = [
        (
            "ratelimit.service.rate_limit.m.k.total_hits.__cluster=eu",
            7,
        ),
        (
            "ratelimit.service.rate_limit.m.k.within_limit.__cluster=eu",
            5,
        ),
        (
            "ratelimit.service.rate_limit.m.k.near_limit.__cluster=eu",
            1,
        ),
        (
            "ratelimit.service.rate_limit.m.k.over_limit.__cluster=eu",
            2,
        ),
        (
            "ratelimit_server.ShouldRateLimit.total_requests.__cluster=eu",
            8,
        ),
        (
            "ratelimit.service.call.should_rate_limit.service_error.__cluster=eu",
            1,
        ),
        ("ratelimit.service.config_load_success.__cluster=eu", 1),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65_536];
    while std::time::Instant::now() < deadline
        && !(timers >= 8 && want.iter().all(|(k, v)| totals.get(*k) == Some(v)))
    {
        if let Ok(n) = server.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if let Some(name) = line.strip_suffix("|c") {
                    let (name, v) = name.rsplit_once(':').unwrap();
                    *totals.entry(name.to_owned()).or_default() += v.parse::<u64>().unwrap();
                } else if line
                    .starts_with("ratelimit_server.ShouldRateLimit.response_time.__cluster=eu:")
                    && line.ends_with("|ms")
                {
                    timers += 1;
                }
            }
        }
    }
    for (k, v) in want {
        assert_eq!(totals.get(k), Some(&v), "{k}: {totals:?}");
    }
    assert_eq!(timers, 8, "one response_time per call");
}

/// A request's descriptors, each a list of `(key, value)` entries.
type Descriptors<'a> = &'a [&'a [(&'a str, &'a str)]];

/// The reference's `domain_not_found`: one per descriptor of a request whose domain no config
/// defines, named as its StatsD stat and as its built-in Prometheus mapping leaves it (no rule
/// for it: the escaped StatsD name, no labels); beyond METRICS_MAX_DYNAMIC_KEYS domains, one
/// `__overflow` series, and the folds counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_domains_count_domain_not_found_bounded() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let dir = config_dir(&[("m.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("METRICS_MAX_DYNAMIC_KEYS", "2")
        .env("USE_STATSD", "true")
        .env("STATSD_HOST", "127.0.0.1")
        .env("STATSD_PORT", &port.to_string())
        .env("STATSD_PROTOCOL", "udp")
        .env("STATS_FLUSH_INTERVAL", "100ms")
        .start();
    let mut c = rl.client().await;
    // (domain, descriptors, calls)
    let calls: [(&str, Descriptors, usize); 6] = [
        // Two descriptors: counted twice, as the reference's GetLimit runs per descriptor.
        ("nope", &[&[("k", "v")], &[("x", "y")]], 1),
        ("other-app", &[&[("k", "v")]], 3),
        // A known domain, even with no matching rule: not counted.
        ("m", &[&[("unknown_key", "v")]], 2),
        // Beyond the cap of 2 domains: folded.
        ("third", &[&[("k", "v")]], 1),
        ("fourth", &[&[("k", "v")], &[("k", "w")]], 1),
        ("nope", &[&[("k", "v")]], 1),
    ];
    for (domain, descriptors, times) in calls {
        for _ in 0..times {
            let r = c
                .should_rate_limit(request(domain, descriptors))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.overall_code, 1, "OK");
        }
    }
    // Invalid (empty domain): refused before any lookup, not counted.
    c.should_rate_limit(request("", &[&[("k", "v")]]))
        .await
        .unwrap_err();

    let name = |d: &str| format!("ratelimit_service_rate_limit_{d}_domain_not_found");
    // Twice: the series stay from one scrape to the next.
    for _ in 0..2 {
        let (status, text) = http_get(&rl.http, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(sample(&text, &name("nope"), &[]), Some(3.0), "{text}");
        assert_eq!(sample(&text, &name("other_app"), &[]), Some(3.0));
        assert_eq!(sample(&text, &name("__overflow"), &[]), Some(3.0));
        assert_eq!(
            sample(
                &text,
                "ratelimitd_metrics_unknown_domains_overflow_total",
                &[]
            ),
            Some(3.0)
        );
        for absent in ["m", "third", "fourth", ""] {
            assert!(!text.contains(&name(absent)), "{absent}: {text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("ratelimit_service_rate_limit_")
                    && l.contains("domain_not_found "))
                .count(),
            3,
            "{text}"
        );
    }

    let want = [
        ("ratelimit.service.rate_limit.nope.domain_not_found", 3),
        ("ratelimit.service.rate_limit.other-app.domain_not_found", 3),
        (
            "ratelimit.service.rate_limit.__overflow.domain_not_found",
            3,
        ),
    ];
    let totals = statsd_totals(&server, &want);
    for (k, v) in want {
        assert_eq!(totals.get(k), Some(&v), "{k}: {totals:?}");
    }
    assert_eq!(
        totals
            .keys()
            .filter(|k| k.ends_with(".domain_not_found"))
            .count(),
        3,
        "{totals:?}"
    );
}

const TOTAL_HITS: &str = "ratelimit_service_rate_limit_total_hits";
const OVERFLOW: [(&str, &str); 2] = [("domain", "m"), ("key1", "__overflow")];

/// How many `total_hits` series (one per stats key) a `/metrics` text has.
fn total_hits_series(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("ratelimit_service_rate_limit_total_hits{"))
        .count()
}

/// One descriptor `(key, value)` in domain `m`, with a limit override of 1000 per hour.
fn with_override(key: &str, value: &str) -> RateLimitRequest {
    let mut req = request("m", &[&[(key, value)]]);
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 1000,
        unit: 3, // HOUR
    });
    req
}

/// Sends `req(0..n)`, 8 calls in flight; every call must succeed.
async fn send_all(
    rl: &Ratelimitd,
    n: usize,
    req: impl Fn(usize) -> RateLimitRequest + Send + Sync + 'static,
) {
    let req = Arc::new(req);
    let mut tasks = Vec::new();
    for first in 0..8 {
        let mut c = rl.client().await;
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            for i in (first..n).step_by(8) {
                c.should_rate_limit(req(i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// 5,000 distinct request-derived stats keys against a cap of 50: 50 series of their own, the
/// rest in the domain's overflow series, and configured rules untouched by the cap.
async fn check_cap(req: impl Fn(usize) -> RateLimitRequest + Send + Sync + 'static) {
    let dir = config_dir(&[("m.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("METRICS_MAX_DYNAMIC_KEYS", "50")
        .start();
    rl.client()
        .await
        .should_rate_limit(request("m", &[&[("k", "v")]]))
        .await
        .unwrap();
    send_all(&rl, 5000, req).await;

    let (status, text) = http_get(&rl.http, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        total_hits_series(&text),
        50 + 1 + 1,
        "50 request-derived keys, the overflow series and the configured m.k\n{text}"
    );
    assert_eq!(sample(&text, TOTAL_HITS, &OVERFLOW), Some(4950.0));
    assert_eq!(
        sample(
            &text,
            "ratelimit_service_rate_limit_within_limit",
            &OVERFLOW
        ),
        Some(4950.0)
    );
    assert_eq!(
        sample(&text, TOTAL_HITS, &[("domain", "m"), ("key1", "k")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ratelimitd_metrics_dynamic_keys", &[]),
        Some(50.0)
    );
    assert_eq!(
        sample(&text, "ratelimitd_metrics_dynamic_keys_overflow_total", &[]),
        Some(4950.0)
    );
    assert!(text.len() < 64 * 1024, "/metrics is {} bytes", text.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_keys_beyond_the_cap_fold_into_one_overflow_series() {
    check_cap(|i| with_override(&format!("o{i}"), "v")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detailed_metric_values_beyond_the_cap_fold_into_one_overflow_series() {
    check_cap(|i| request("m", &[&[("user", &format!("u{i}"))]])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_rules_and_idle_traffic_keys_leave_metrics_after_the_idle_timeout() {
    let rule = |key: &str| {
        format!("  - key: {key}\n    rate_limit: {{unit: hour, requests_per_unit: 100}}\n")
    };
    let dir = config_dir(&[(
        "m.yaml",
        &format!("domain: m\ndescriptors:\n{}{}", rule("kept"), rule("gone")),
    )]);
    let rl = Ratelimitd::builder(dir.path())
        // Long enough that the last request and its scrape (two local calls) fit well inside.
        .env("METRICS_IDLE_TIMEOUT", "4s")
        .start();
    let metrics = || http_get(&rl.http, "/metrics").1;
    let kept = [("domain", "m"), ("key1", "kept")];
    let gone = [("domain", "m"), ("key1", "gone")];
    let traffic = [("domain", "m"), ("key1", "t")];
    let mut c = rl.client().await;
    // In this order, so that once `gone` has been idle past the timeout, so have the others.
    c.should_rate_limit(request("m", &[&[("kept", "x")]]))
        .await
        .unwrap();
    c.should_rate_limit(with_override("t", "x")).await.unwrap();
    c.should_rate_limit(request("m", &[&[("gone", "x")]]))
        .await
        .unwrap();
    let text = metrics();
    assert_eq!(sample(&text, TOTAL_HITS, &kept), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, TOTAL_HITS, &gone),
        Some(1.0),
        "rules in force stay"
    );

    write_atomically(
        &dir.path().join("m.yaml"),
        &format!("domain: m\ndescriptors:\n{}", rule("kept")),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sample(&metrics(), TOTAL_HITS, &gone).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed rule's series is still there\n{}",
            metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics();
    assert_eq!(
        sample(&text, "ratelimitd_config_generation", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, TOTAL_HITS, &kept),
        Some(1.0),
        "a rule in force stays however long it is idle\n{text}"
    );
    assert_eq!(sample(&text, TOTAL_HITS, &traffic), None, "{text}");
    assert_eq!(
        sample(&text, "ratelimitd_metrics_dynamic_keys", &[]),
        Some(0.0)
    );

    // The traffic key comes back as a new series, counted from zero.
    c.should_rate_limit(with_override("t", "x")).await.unwrap();
    let text = metrics();
    assert_eq!(sample(&text, TOTAL_HITS, &traffic), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "ratelimitd_metrics_dynamic_keys", &[]),
        Some(1.0)
    );
}

/// PROMETHEUS_MAPPER_YAML: the reference's series renamed by a statsd_exporter mapping file
/// (the first mapping matching the reference's StatsD name wins; `drop` removes a series; an
/// unmapped name gets statsd_exporter's escaped name), our own series untouched; a bad file
/// stops start-up naming the setting.
#[tokio::test]
async fn a_prometheus_mapper_file_renames_the_reference_series() {
    const MAPPER: &str = r#"
mappings:
  - match: "ratelimit.service.rate_limit.*.*.over_limit"
    name: "custom_over"
    timer_type: histogram
    labels: {dom: "$1", rule: "$2"}
  - match: "ratelimit.service.rate_limit.*.*.near_limit"
    action: drop
  - match: "ratelimit_server.*.total_requests"
    name: "custom_requests_total"
    labels: {method: "$1"}
"#;
    let dir = config_dir(&[("m.yaml", RULES)]);
    let files = tempfile::TempDir::new().unwrap();
    let mapper = files.path().join("mapper.yaml");
    std::fs::write(&mapper, MAPPER).unwrap();
    let rl = Ratelimitd::builder(dir.path())
        .env("PROMETHEUS_MAPPER_YAML", mapper.to_str().unwrap())
        .start();
    ensure_window_room(60, Duration::from_secs(10)).await;
    let mut c = rl.client().await;
    for _ in 0..7 {
        c.should_rate_limit(request("m", &[&[("k", "v")]]))
            .await
            .unwrap();
    }
    let text = http_get(&rl.http, "/metrics").1;
    assert_eq!(
        sample(&text, "custom_over", &[("dom", "m"), ("rule", "k")]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "custom_requests_total",
            &[("method", "ShouldRateLimit")]
        ),
        Some(7.0)
    );
    assert_eq!(
        sample(&text, "ratelimit_service_rate_limit_m_k_total_hits", &[]),
        Some(7.0),
        "unmapped: the escaped StatsD name"
    );
    for gone in [
        "ratelimit_service_rate_limit_near_limit",
        "ratelimit_service_rate_limit_over_limit",
        "ratelimit_service_rate_limit_total_hits",
        "ratelimit_service_total_requests",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(&format!("{gone}{{"))),
            "{gone} still exported"
        );
    }
    assert!(
        text.contains("ratelimitd_calls_in_flight"),
        "our own series keep their names"
    );

    std::fs::write(&mapper, "mappings:\n  - match: a.*\n    nmae: x\n").unwrap();
    let (code, log) = serve_expecting_refusal(
        dir.path(),
        &[("PROMETHEUS_MAPPER_YAML", mapper.to_str().unwrap())],
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("PROMETHEUS_MAPPER_YAML") && log.contains("unknown field `nmae`"),
        "{log}"
    );
}
