//! The gRPC answers of the real binary, against the in-memory backend and a real Redis: codes,
//! remaining counts, resets, hits_addend, limit overrides, headers (toward the client and the
//! upstream), shadow mode, request validation, and exactness under concurrency.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::{
    extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride,
    service::ratelimit::v3::{
        rate_limit_response::{rate_limit::Unit, Code},
        RateLimitRequest, RateLimitResponse,
    },
};
use support::*;
use tonic::Code as GrpcCode;

const RULES: &str = r#"
domain: svc
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 5, name: per-k}
  - key: hourly
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
  - key: quota
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: several
    rate_limits:
      - {unit: second, requests_per_unit: 1}
      - {unit: minute, requests_per_unit: 1}
"#;

/// A running service for one backend with this file's rules.
fn start(backend: &str, env: &[(&str, &str)]) -> Service {
    start_service(backend, RULES, env)
}

async fn call(s: &Service, req: RateLimitRequest) -> RateLimitResponse {
    s.rl.client()
        .await
        .should_rate_limit(req)
        .await
        .unwrap()
        .into_inner()
}

async fn call_err(s: &Service, req: RateLimitRequest) -> tonic::Status {
    s.rl.client()
        .await
        .should_rate_limit(req)
        .await
        .unwrap_err()
}

async fn counts_down_then_over_limit_with_retry_after(backend: &'static str) {
    let s = start(backend, &[]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    for remaining in (0..5).rev() {
        let r = call(&s, request("svc", &[&[("k", "a")]])).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        let st = &r.statuses[0];
        assert_eq!(st.code, Code::Ok as i32);
        assert_eq!(st.limit_remaining, remaining);
        let limit = st.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit, limit.name.as_str()),
            (5, Unit::Minute as i32, "per-k")
        );
        let reset = st.duration_until_reset.as_ref().unwrap().seconds;
        assert!((1..=60).contains(&reset), "reset {reset}");
        assert!(
            r.response_headers_to_add.is_empty(),
            "no headers while OK by default"
        );
        assert!(
            r.request_headers_to_add.is_empty(),
            "no upstream headers by default"
        );
    }
    let r = call(&s, request("svc", &[&[("k", "a")]])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let reset = r.statuses[0].duration_until_reset.as_ref().unwrap().seconds;
    assert!(reset >= 1);
    assert_eq!(header(&r, "Retry-After"), Some(reset.to_string().as_str()));
    assert_eq!(r.response_headers_to_add.len(), 1);
    // Another value of the same key has its own counter.
    let r = call(&s, request("svc", &[&[("k", "b")]])).await;
    assert_eq!(r.statuses[0].limit_remaining, 4);
}

async fn statuses_follow_request_order_and_any_over_limit_fails_the_request(backend: &'static str) {
    let s = start(backend, &[]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    let descs: &[&[(&str, &str)]] = &[
        &[("free", "x")],
        &[("unknown", "x")],
        &[("hourly", "h")],
        &[("k", "z")],
    ];
    let r = call(&s, request("svc", descs)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 4);
    // unlimited: OK, no limit, remaining u32::MAX
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[0].current_limit, None);
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
    assert_eq!(r.statuses[0].duration_until_reset, None);
    // no rule: OK, no limit, remaining 0
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].current_limit, None);
    assert_eq!(r.statuses[1].limit_remaining, 0);
    assert_eq!(r.statuses[2].limit_remaining, 2);
    assert_eq!(
        r.statuses[2].current_limit.as_ref().unwrap().unit,
        Unit::Hour as i32
    );
    assert!((1..=3600).contains(&r.statuses[2].duration_until_reset.as_ref().unwrap().seconds));
    assert_eq!(r.statuses[3].limit_remaining, 4);
    // Use up "hourly": the whole request is over limit, the others keep their own codes.
    call(&s, request("svc", &[&[("hourly", "h")]])).await;
    call(&s, request("svc", &[&[("hourly", "h")]])).await;
    let r = call(&s, request("svc", descs)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let codes: Vec<i32> = r.statuses.iter().map(|s| s.code).collect();
    assert_eq!(
        codes,
        vec![
            Code::Ok as i32,
            Code::Ok as i32,
            Code::OverLimit as i32,
            Code::Ok as i32
        ]
    );
    assert_eq!(r.statuses[3].limit_remaining, 3);
    // Retry-After is the longest reset among over-limit descriptors: the hour.
    let reset = r.statuses[2].duration_until_reset.as_ref().unwrap().seconds;
    assert_eq!(header(&r, "Retry-After"), Some(reset.to_string().as_str()));
}

async fn unknown_domain_is_ok_without_limits(backend: &'static str) {
    let s = start(backend, &[]);
    let r = call(&s, request("nope", &[&[("k", "a")]])).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(r.statuses[0].current_limit, None);
    assert_eq!(r.statuses[0].limit_remaining, 0);
}

async fn hits_addend_request_level_per_descriptor_and_zero(backend: &'static str) {
    let s = start(backend, &[]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    let mut req = request("svc", &[&[("k", "h")]]);
    req.hits_addend = 3;
    assert_eq!(call(&s, req).await.statuses[0].limit_remaining, 2);
    // Per-descriptor 0 checks without counting, and wins over the request's value.
    let mut req = request("svc", &[&[("k", "h")]]);
    req.hits_addend = 4;
    req.descriptors[0].hits_addend = Some(0);
    let r = call(&s, req).await;
    assert_eq!(
        (r.statuses[0].code, r.statuses[0].limit_remaining),
        (Code::Ok as i32, 2)
    );
    // Request-level 0 means 1.
    let r = call(&s, request("svc", &[&[("k", "h")]])).await;
    assert_eq!(r.statuses[0].limit_remaining, 1);
    // Crossing the limit in one step: 4 + 2 > 5.
    let mut req = request("svc", &[&[("k", "h")]]);
    req.descriptors[0].hits_addend = Some(2);
    let r = call(&s, req).await;
    assert_eq!(
        (r.statuses[0].code, r.statuses[0].limit_remaining),
        (Code::OverLimit as i32, 0)
    );
}

async fn limit_override_replaces_the_configured_limit(backend: &'static str) {
    let s = start(backend, &[]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    let mut req = request("svc", &[&[("k", "o")]]);
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: 3,
    }); // HOUR
    let r = call(&s, req.clone()).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit, limit.name.as_str()),
        (2, Unit::Hour as i32, "")
    );
    assert_eq!(r.statuses[0].limit_remaining, 1);
    call(&s, req.clone()).await;
    assert_eq!(call(&s, req).await.overall_code, Code::OverLimit as i32);
    // Overrides apply to descriptors with no configured rule too (in a known domain).
    let mut req = request("svc", &[&[("nothing", "here")]]);
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 7,
        unit: 1,
    });
    assert_eq!(call(&s, req).await.statuses[0].limit_remaining, 6);
    // An unknown unit is the caller's error (the reference crashes on it).
    let mut req = request("svc", &[&[("k", "o")]]);
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: 42,
    });
    let e = call_err(&s, req).await;
    assert_eq!(e.code(), GrpcCode::InvalidArgument);
    assert_eq!(
        e.message(),
        "descriptor 0 has a limit override with unknown unit 42"
    );
}

async fn rule_shadow_mode_reports_ok_but_counts(backend: &'static str) {
    let s = start(backend, &[]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    for expected_remaining in [0, 0, 0] {
        let r = call(&s, request("svc", &[&[("shadow", "s")]])).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, expected_remaining);
        assert!(header(&r, "Retry-After").is_none());
    }
}

async fn global_shadow_mode_answers_ok_overall_and_keeps_statuses(backend: &'static str) {
    let s = start(backend, &[("SHADOW_MODE", "true")]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    call(&s, request("svc", &[&[("hourly", "g")]])).await;
    call(&s, request("svc", &[&[("hourly", "g")]])).await;
    call(&s, request("svc", &[&[("hourly", "g")]])).await;
    let r = call(&s, request("svc", &[&[("hourly", "g")]])).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert!(
        header(&r, "Retry-After").is_none(),
        "no Retry-After on an OK answer"
    );
}

async fn quota_mode_fails_only_when_every_quota_descriptor_fails(backend: &'static str) {
    let s = start(backend, &[]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    call(&s, request("svc", &[&[("quota", "q")]])).await;
    let r = call(&s, request("svc", &[&[("quota", "q")], &[("k", "q")]])).await;
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "the only quota descriptor failed"
    );
}

async fn rate_limit_headers_when_enabled(backend: &'static str) {
    let s = start(
        backend,
        &[
            ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
            ("LIMIT_REMAINING_HEADER", "X-Left"),
        ],
    );
    ensure_window_room(60, Duration::from_secs(5)).await;
    let r = call(&s, request("svc", &[&[("k", "hd")], &[("hourly", "hd")]])).await;
    // The descriptor closest to its limit: hourly (2 left) rather than k (4 left).
    let keys: Vec<&str> = r
        .response_headers_to_add
        .iter()
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(keys, vec!["RateLimit-Limit", "X-Left", "RateLimit-Reset"]);
    assert_eq!(header(&r, "RateLimit-Limit"), Some("3"));
    assert_eq!(header(&r, "X-Left"), Some("2"));
    let reset = r.statuses[1]
        .duration_until_reset
        .as_ref()
        .unwrap()
        .seconds
        .to_string();
    assert_eq!(header(&r, "RateLimit-Reset"), Some(reset.as_str()));
    for _ in 0..2 {
        call(&s, request("svc", &[&[("hourly", "hd")]])).await;
    }
    let r = call(&s, request("svc", &[&[("k", "hd")], &[("hourly", "hd")]])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let keys: Vec<&str> = r
        .response_headers_to_add
        .iter()
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(
        keys,
        vec![
            "RateLimit-Limit",
            "X-Left",
            "RateLimit-Reset",
            "Retry-After"
        ]
    );
    assert_eq!(header(&r, "X-Left"), Some("0"));
}

/// `request_headers_to_add` as `(key, value)` pairs, in order.
fn upstream_headers(r: &RateLimitResponse) -> Vec<(&str, &str)> {
    r.request_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect()
}

/// The reference's PR #1168: with LIMIT_REQUEST_HEADERS_ENABLED the RateLimit-* values of the
/// descriptor closest to its limit go to `request_headers_to_add` under the
/// LIMIT_REQUEST_*_HEADER names, on every answer with a limited descriptor (OVER_LIMIT too),
/// independently of the response headers.
async fn rate_limit_request_headers_when_enabled(backend: &'static str) {
    let s = start(
        backend,
        &[
            ("LIMIT_REQUEST_HEADERS_ENABLED", "true"),
            ("LIMIT_REQUEST_REMAINING_HEADER", "X-Upstream-Left"),
        ],
    );
    ensure_window_room(60, Duration::from_secs(5)).await;
    let r = call(&s, request("svc", &[&[("k", "rq")], &[("hourly", "rq")]])).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    let reset = r.statuses[1]
        .duration_until_reset
        .as_ref()
        .unwrap()
        .seconds
        .to_string();
    // hourly (2 left) is closer to its limit than k (4 left).
    assert_eq!(
        upstream_headers(&r),
        [
            ("RateLimit-Limit", "3"),
            ("X-Upstream-Left", "2"),
            ("RateLimit-Reset", reset.as_str())
        ]
    );
    assert!(
        r.response_headers_to_add.is_empty(),
        "LIMIT_RESPONSE_HEADERS_ENABLED is off: {r:?}"
    );
    // No limited descriptor (no rule, unlimited): no headers.
    let r = call(&s, request("svc", &[&[("free", "x")], &[("nope", "x")]])).await;
    assert!(r.request_headers_to_add.is_empty(), "{r:?}");
    for _ in 0..2 {
        call(&s, request("svc", &[&[("hourly", "rq")]])).await;
    }
    let r = call(&s, request("svc", &[&[("k", "rq")], &[("hourly", "rq")]])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let reset = r.statuses[1]
        .duration_until_reset
        .as_ref()
        .unwrap()
        .seconds
        .to_string();
    assert_eq!(
        upstream_headers(&r),
        [
            ("RateLimit-Limit", "3"),
            ("X-Upstream-Left", "0"),
            ("RateLimit-Reset", reset.as_str())
        ]
    );

    // Both on: each list under its own names, the same values.
    let s = start(
        backend,
        &[
            ("LIMIT_REQUEST_HEADERS_ENABLED", "true"),
            ("LIMIT_REQUEST_LIMIT_HEADER", "X-Up-Limit"),
            ("LIMIT_REQUEST_REMAINING_HEADER", "X-Up-Remaining"),
            ("LIMIT_REQUEST_RESET_HEADER", "X-Up-Reset"),
            ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
        ],
    );
    ensure_window_room(60, Duration::from_secs(5)).await;
    let r = call(&s, request("svc", &[&[("k", "both")]])).await;
    let reset = r.statuses[0]
        .duration_until_reset
        .as_ref()
        .unwrap()
        .seconds
        .to_string();
    assert_eq!(
        upstream_headers(&r),
        [
            ("X-Up-Limit", "5"),
            ("X-Up-Remaining", "4"),
            ("X-Up-Reset", reset.as_str())
        ]
    );
    let downstream: Vec<(&str, &str)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        downstream,
        [
            ("RateLimit-Limit", "5"),
            ("RateLimit-Remaining", "4"),
            ("RateLimit-Reset", reset.as_str())
        ]
    );
}

async fn rate_limit_reset_is_the_longest_wait_when_several_limits_are_over(backend: &'static str) {
    let s = start(backend, &[("LIMIT_RESPONSE_HEADERS_ENABLED", "true")]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    let req = || request("svc", &[&[("several", "r")]]);
    assert_eq!(call(&s, req()).await.overall_code, Code::Ok as i32);
    // Over the minute, and the second too unless a second boundary passed between calls.
    let r = call(&s, req()).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let wait = r.statuses[0].duration_until_reset.as_ref().unwrap().seconds;
    assert!(wait > 1, "the minute's wait, not the second's: {wait}");
    let wait = wait.to_string();
    assert_eq!(header(&r, "Retry-After"), Some(wait.as_str()));
    // The header describes the descriptor's status, as in the reference: the longest wait,
    // not the reported limit's own reset.
    assert_eq!(header(&r, "RateLimit-Reset"), Some(wait.as_str()), "{r:?}");
}

async fn invalid_requests_are_invalid_argument_with_a_message(backend: &'static str) {
    let s = start(backend, &[]);
    let cases: Vec<(RateLimitRequest, &str)> = vec![
        (
            request("", &[&[("k", "v")]]),
            "rate limit domain must not be empty",
        ),
        (
            request("svc", &[]),
            "rate limit descriptor list must not be empty",
        ),
        (
            request("svc", &[&[("k", "v")], &[]]),
            "descriptor 1 has no entries",
        ),
        (
            request("svc", &[&[("k", "v"), ("", "v")]]),
            "descriptor 0 entry 1 has an empty key",
        ),
    ];
    for (req, message) in cases {
        let e = call_err(&s, req).await;
        assert_eq!(e.code(), GrpcCode::InvalidArgument);
        assert_eq!(e.message(), message);
    }
    // Thousands of descriptors.
    let many: Vec<&[(&str, &str)]> = vec![&[("k", "v")]; 3000];
    let e = call_err(&s, request("svc", &many)).await;
    assert_eq!(e.code(), GrpcCode::InvalidArgument);
    assert_eq!(
        e.message(),
        "3000 descriptors in one request; at most 256 are accepted"
    );
    // A 16 KiB value.
    let big = "x".repeat(16 * 1024);
    let e = call_err(&s, request("svc", &[&[("k", &big)]])).await;
    assert_eq!(e.code(), GrpcCode::InvalidArgument);
    assert_eq!(
        e.message(),
        "descriptor 0 entry 0 is longer than 8192 bytes"
    );
    // A 2 MiB message is refused by the transport before it is decoded.
    let huge = "x".repeat(2 * 1024 * 1024);
    let e = call_err(&s, request("svc", &[&[("k", &huge)]])).await;
    assert_eq!(e.code(), GrpcCode::OutOfRange, "{e:?}");
    // And the service still answers.
    assert_eq!(
        call(&s, request("svc", &[&[("k", "after")]]))
            .await
            .statuses[0]
            .limit_remaining,
        4
    );
}

async fn concurrent_clients_get_exactly_the_limit(backend: &'static str) {
    let dir = config_dir(&[(
        "rules.yaml",
        "domain: race\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 50}\n",
    )]);
    let redis = (backend == "redis").then(RedisServer::start);
    // With Redis, two instances share the counters; in memory, one instance.
    let instances: Vec<Ratelimitd> = match &redis {
        Some(r) => vec![
            Ratelimitd::builder(dir.path()).redis(r).start(),
            Ratelimitd::builder(dir.path()).redis(r).start(),
        ],
        None => vec![Ratelimitd::builder(dir.path()).start()],
    };
    ensure_window_room(60, Duration::from_secs(10)).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut client = instances[i % instances.len()].client().await;
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..10 {
                let r = client
                    .should_rate_limit(request("race", &[&[("k", "shared")]]))
                    .await
                    .unwrap()
                    .into_inner();
                ok += usize::from(r.overall_code == Code::Ok as i32);
            }
            ok
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    assert_eq!(
        allowed, 50,
        "exactly requests_per_unit of 160 concurrent requests allowed"
    );
    if let Some(r) = &redis {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let key = format!("race_k_shared_{}", now / 60 * 60);
        assert_eq!(
            r.command(&["GET", &key]),
            "$3\r\n160\r\n",
            "every hit counted once"
        );
    }
}

const META_RULES: &str = r#"
domain: meta
descriptors:
  - key: over
    metadata: {name: over}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    metadata: {name: free}
    rate_limit: {unlimited: true}
  - key: a
    metadata: {name: service_a, nested: {x: 1}}
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: b
    metadata: {name: service_b, nested: {x: 2, y: true}, tags: [t1, 2.5]}
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

/// JSON as a protobuf Value, for the expected `dynamic_metadata`.
fn pb_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(pb_value).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(prost_types::Struct {
            fields: m.into_iter().map(|(k, v)| (k, pb_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

async fn response_dynamic_metadata_as_the_reference(backend: &'static str) {
    let s = start_service(
        backend,
        META_RULES,
        &[("RESPONSE_DYNAMIC_METADATA", "true")],
    );
    ensure_window_room(60, Duration::from_secs(5)).await;
    let mut req = request(
        "meta",
        &[
            &[("over", "x")],
            &[("free", "y")],
            &[("a", "1")],
            &[("b", "2")],
            &[("k", "v")],
        ],
    );
    req.hits_addend = 2;
    req.descriptors[3].hits_addend = Some(1);
    req.descriptors[4].limit = Some(RateLimitOverride {
        requests_per_unit: 10,
        unit: 1,
    }); // SECOND
    let r = call(&s, req).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    // The over-limit and the unlimited descriptors' metadata are left out; of the others the
    // first value of a key wins and mappings are merged.
    let expected = pb_value(serde_json::json!({
        "domain": "meta",
        "descriptors": [
            {"entries": ["over=x"]},
            {"entries": ["free=y"]},
            {"entries": ["a=1"]},
            {"entries": ["b=2"], "hitsAddend": 1},
            {"entries": ["k=v"], "limit": "requests_per_unit:10 unit:SECOND"},
        ],
        "hitsAddend": 2,
        "metadata": {
            "name": "service_a",
            "nested": {"x": 1, "y": true},
            "tags": ["t1", 2.5],
        },
    }));
    let Some(prost_types::value::Kind::StructValue(expected)) = expected.kind else {
        unreachable!()
    };
    assert_eq!(r.dynamic_metadata, Some(expected));
    // No request hits_addend and no descriptor passing: no `hitsAddend`, no `metadata`.
    let mut req = request("meta", &[&[("over", "y")]]);
    req.descriptors[0].hits_addend = Some(5);
    let r = call(&s, req).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let expected = pb_value(serde_json::json!({
        "domain": "meta",
        "descriptors": [{"entries": ["over=y"], "hitsAddend": 5}],
    }));
    let Some(prost_types::value::Kind::StructValue(expected)) = expected.kind else {
        unreachable!()
    };
    assert_eq!(r.dynamic_metadata, Some(expected));

    // Off by default.
    let off = start_service(backend, META_RULES, &[]);
    let r = call(&off, request("meta", &[&[("a", "1")]])).await;
    assert_eq!(r.dynamic_metadata, None);
}

both_backends! {
    counts_down_then_over_limit => counts_down_then_over_limit_with_retry_after;
    statuses_in_request_order => statuses_follow_request_order_and_any_over_limit_fails_the_request;
    unknown_domain => unknown_domain_is_ok_without_limits;
    hits_addend => hits_addend_request_level_per_descriptor_and_zero;
    limit_override => limit_override_replaces_the_configured_limit;
    rule_shadow_mode => rule_shadow_mode_reports_ok_but_counts;
    global_shadow_mode => global_shadow_mode_answers_ok_overall_and_keeps_statuses;
    quota_mode => quota_mode_fails_only_when_every_quota_descriptor_fails;
    rate_limit_headers => rate_limit_headers_when_enabled;
    rate_limit_request_headers => rate_limit_request_headers_when_enabled;
    rate_limit_reset_several => rate_limit_reset_is_the_longest_wait_when_several_limits_are_over;
    invalid_requests => invalid_requests_are_invalid_argument_with_a_message;
    concurrent_exact => concurrent_clients_get_exactly_the_limit;
    response_dynamic_metadata => response_dynamic_metadata_as_the_reference;
}
