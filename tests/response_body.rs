//! `LIMIT_RESPONSE_BODY` on the real binary: the exact `raw_body` of an OVER_LIMIT answer and
//! its `content-type`, none on OK answers, and the settings refused at start-up.
#![allow(clippy::unwrap_used)]
mod support;

use ratelimitd::proto::envoy::{
    extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride,
    service::ratelimit::v3::{rate_limit_response::Code, RateLimitRequest, RateLimitResponse},
};
use support::*;

const RULES: &str = r#"
domain: svc
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 2, name: per-k}
  - key: unnamed
    value: v
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 1}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 1}
"#;

async fn call(s: &Service, req: RateLimitRequest) -> RateLimitResponse {
    s.rl.client()
        .await
        .should_rate_limit(req)
        .await
        .unwrap()
        .into_inner()
}

/// Calls until the answer is OVER_LIMIT (at most `n` calls), checking that every OK answer
/// before it has neither a body nor a content type.
async fn until_over(s: &Service, req: &RateLimitRequest, n: usize) -> RateLimitResponse {
    for _ in 0..n {
        let r = call(s, req.clone()).await;
        if r.overall_code == Code::OverLimit as i32 {
            return r;
        }
        assert!(r.raw_body.is_empty(), "an OK answer with a body: {r:?}");
        assert_eq!(header(&r, "content-type"), None);
    }
    panic!("not over limit after {n} calls");
}

fn problem(rule: &str, limit: u32, window: &str, retry_after: &str) -> String {
    format!(
        r#"{{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit of {limit} requests per {window} exceeded (rule {rule}); retry after {retry_after} s","rule":"{rule}","limit":{limit},"window":"{window}","retry_after":{retry_after}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problem_json_names_the_rule_limit_window_and_wait() {
    let s = start_service(
        "memory",
        RULES,
        &[
            ("LIMIT_RESPONSE_BODY", "problem-json"),
            ("LIMIT_RULE_HEADER", "X-Rule"),
        ],
    );
    let r = until_over(&s, &request("svc", &[&[("k", "a")]]), 3).await;
    let retry = header(&r, "Retry-After").unwrap();
    assert_eq!(header(&r, "X-Rule"), Some("per-k"));
    assert_eq!(header(&r, "content-type"), Some("application/problem+json"));
    assert_eq!(
        std::str::from_utf8(&r.raw_body).unwrap(),
        problem("per-k", 2, "1h", retry)
    );

    // An unnamed rule is named by its path, as LIMIT_RULE_HEADER shows it; a window of
    // several units carries its multiplier.
    let r = until_over(&s, &request("svc", &[&[("unnamed", "v")]]), 2).await;
    let (rule, retry) = (
        header(&r, "X-Rule").unwrap(),
        header(&r, "Retry-After").unwrap(),
    );
    assert_eq!(
        std::str::from_utf8(&r.raw_body).unwrap(),
        problem(rule, 1, "5m", retry)
    );

    // A limit Envoy sends is `limit override`, whatever the request's values.
    let mut req = request("svc", &[&[("k", "<script>")]]);
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 4, // DAY
    });
    let r = until_over(&s, &req, 2).await;
    let retry = header(&r, "Retry-After").unwrap();
    assert_eq!(
        std::str::from_utf8(&r.raw_body).unwrap(),
        problem("limit override", 1, "1d", retry)
    );

    // Shadow mode answers OK: no body.
    let req = request("svc", &[&[("shadow", "x")]]);
    for _ in 0..3 {
        let r = call(&s, req.clone()).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.raw_body.is_empty());
        assert_eq!(header(&r, "content-type"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_filled_in_with_its_content_type() {
    let dir = tempfile::TempDir::new().unwrap();
    let template = dir.path().join("429.json");
    std::fs::write(
        &template,
        "{\"error\":\"slow down\",\"rule\":\"{rule}\",\"limit\":{limit},\"per\":\"{window}\",\"wait\":{retry_after}}\n",
    )
    .unwrap();
    let s = start_service(
        "memory",
        RULES,
        &[
            ("LIMIT_RESPONSE_BODY", "template"),
            ("LIMIT_RESPONSE_BODY_TEMPLATE", template.to_str().unwrap()),
            ("LIMIT_RESPONSE_BODY_CONTENT_TYPE", "application/json"),
        ],
    );
    let r = until_over(&s, &request("svc", &[&[("k", "a")]]), 3).await;
    let retry = header(&r, "Retry-After").unwrap();
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(
        std::str::from_utf8(&r.raw_body).unwrap(),
        format!(
            "{{\"error\":\"slow down\",\"rule\":\"per-k\",\"limit\":2,\"per\":\"1h\",\"wait\":{retry}}}\n"
        )
    );
}

#[test]
fn bad_body_settings_refuse_to_start() {
    let dir = config_dir(&[("rules.yaml", RULES)]);
    let (code, log) = serve_expecting_refusal(
        dir.path(),
        &[
            ("LIMIT_RESPONSE_BODY", "template"),
            ("LIMIT_RESPONSE_BODY_TEMPLATE", "/nonexistent/429.txt"),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        log.contains("LIMIT_RESPONSE_BODY_TEMPLATE: cannot read /nonexistent/429.txt: "),
        "{log}"
    );
    let (code, log) = serve_expecting_refusal(dir.path(), &[("LIMIT_RESPONSE_BODY", "json")]);
    assert_ne!(code, Some(0));
    assert!(
        log.contains("is not one of none, problem-json, template"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_is_no_body() {
    let s = start_service("memory", RULES, &[]);
    let r = until_over(&s, &request("svc", &[&[("k", "a")]]), 3).await;
    assert!(r.raw_body.is_empty());
    assert_eq!(header(&r, "content-type"), None);
}
