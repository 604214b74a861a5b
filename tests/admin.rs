//! Admin and debug HTTP endpoints, `explain`, and the rule header: `/rlconfig`, `/explain`,
//! `ratelimitd explain`, `LIMIT_RULE_HEADER`, `POST /json`.
#![allow(clippy::unwrap_used)]
mod support;

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;

const RULES: &str = r#"
domain: adm
descriptors:
  - key: api_key
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: api_key
    value: vip
    rate_limit: {unit: minute, requests_per_unit: 1000, name: vip-keys}
  - key: path
    value: /api/*
    descriptors:
      - key: method
        rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
  - key: quiet
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 5}
"#;

#[tokio::test]
async fn rlconfig_lists_every_rule_in_the_reference_format_on_both_listeners() {
    let dir = config_dir(&[("a.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let expected = "\
adm.api_key: unit=SECOND requests_per_unit=10, shadow_mode: false, quota_mode: false
adm.api_key_vip: unit=MINUTE requests_per_unit=1000, shadow_mode: false, quota_mode: false
adm.free: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false
adm.path_/api/*.method: unit=MINUTE requests_per_unit=1, shadow_mode: false, quota_mode: false
adm.quiet: unit=HOUR requests_per_unit=5, shadow_mode: true, quota_mode: false
";
    assert_eq!(http_get(&rl.debug, "/rlconfig"), (200, expected.to_owned()));
    assert_eq!(http_get(&rl.http, "/rlconfig"), (200, expected.to_owned()));
}

#[tokio::test]
async fn explain_over_http_and_on_the_command_line_say_the_same() {
    let dir = config_dir(&[("a.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let (status, body) = http_get(
        &rl.debug,
        "/explain?domain=adm&descriptor=path=/api/v1,method=GET&descriptor=path=/web,method=GET",
    );
    assert_eq!(status, 200, "{body}");
    let dir_arg = dir.path().to_str().unwrap();
    let (code, cli, _) = run_cli(&[
        "explain",
        "--config",
        dir_arg,
        "--domain",
        "adm",
        "path=/api/v1",
        "method=GET",
        "/",
        "path=/web",
        "method=GET",
    ]);
    assert_eq!(code, 0);
    // The counter key carries the window start, which may differ between the two calls.
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.contains("counter key"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&body), strip(&cli));
    let lines: Vec<&str> = cli.lines().collect();
    assert_eq!(lines[0], "descriptor 1: path=/api/v1, method=GET");
    assert_eq!(
        lines[1],
        "  level 1: path=/api/v1: wildcard match 'path_/api/*'"
    );
    assert_eq!(
        lines[2],
        "  level 2: method=GET: key-only match 'method' (no rule for value 'GET')"
    );
    assert_eq!(
        lines[3],
        "  rule: adm > path=/api/* > method (adm.path_/api/*.method)"
    );
    assert_eq!(lines[4], "  limit: 1 per minute");
    assert!(
        lines[5].starts_with("  counter key: adm_path_/api/v1_method_GET_"),
        "{}",
        lines[5]
    );
    assert!(lines[5].ends_with(" (window of 60 s)"), "{}", lines[5]);
    assert_eq!(lines[6], "  metrics: ratelimit_service_rate_limit_*{domain=\"adm\",key1=\"path_/api/*\",key2=\"method\"}");
    assert_eq!(lines[8], "descriptor 2: path=/web, method=GET");
    assert_eq!(
        lines[9],
        "  level 1: path=/web: no match (tried 'path_/web', 1 wildcard(s), then key-only 'path')"
    );
    assert_eq!(lines[10], "  result: OK, no limit");

    let (_, cli, _) = run_cli(&[
        "explain",
        "--config",
        dir_arg,
        "--domain",
        "adm",
        "api_key=k",
        "extra=1",
    ]);
    assert!(cli.contains("  the config has no level below this one, but the descriptor has 1 more entry: no limit"), "{cli}");
    let (_, cli, _) = run_cli(&[
        "explain",
        "--config",
        dir_arg,
        "--domain",
        "nope",
        "api_key=k",
    ]);
    assert_eq!(
        cli,
        "domain 'nope' is not configured (configured: adm): every descriptor is OK with no limit\n"
    );
    let (_, cli, _) = run_cli(&["explain", "--config", dir_arg, "--domain", "adm", "free=x"]);
    assert!(cli.contains("  unlimited: always OK, no counter"), "{cli}");
    assert_eq!(http_get(&rl.debug, "/explain").0, 400);
}

#[tokio::test]
async fn rule_header_names_the_rule_that_fired() {
    let dir = config_dir(&[("a.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("LIMIT_RULE_HEADER", "x-ratelimit-rule")
        .start();
    let mut c = rl.client().await;
    support::ensure_window_room(60, std::time::Duration::from_secs(5)).await;
    let req = request("adm", &[&[("path", "/api/x"), ("method", "GET")]]);
    let ok = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    assert!(ok.response_headers_to_add.is_empty());
    let over = c.should_rate_limit(req).await.unwrap().into_inner();
    assert_eq!(over.overall_code, Code::OverLimit as i32);
    let rule: Vec<(&str, &str)> = over
        .response_headers_to_add
        .iter()
        .filter(|h| h.key == "x-ratelimit-rule")
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        rule,
        vec![("x-ratelimit-rule", "adm > path=/api/* > method")]
    );
    // current_limit.name keeps the reference's meaning: the configured name only.
    assert_eq!(over.statuses[0].current_limit.as_ref().unwrap().name, "");

    let mut named = request("adm", &[&[("api_key", "vip")]]);
    named.descriptors[0].hits_addend = Some(1001);
    let over = c.should_rate_limit(named).await.unwrap().into_inner();
    assert!(over
        .response_headers_to_add
        .iter()
        .any(|h| h.key == "x-ratelimit-rule" && h.value == "vip-keys"));
    assert_eq!(
        over.statuses[0].current_limit.as_ref().unwrap().name,
        "vip-keys"
    );
}

#[tokio::test]
async fn post_json_answers_like_the_reference() {
    let dir = config_dir(&[("a.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    support::ensure_window_room(60, std::time::Duration::from_secs(5)).await;
    let body = br#"{"domain":"adm","descriptors":[{"entries":[{"key":"path","value":"/api/j"},{"key":"method","value":"GET"}]}]}"#;
    let (status, text) = http_post(&rl.http, "/json", body);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let reset = v["statuses"][0]["durationUntilReset"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reset.ends_with('s'));
    assert_eq!(
        text,
        format!(
            r#"{{"overallCode":"OK","statuses":[{{"code":"OK","currentLimit":{{"requestsPerUnit":1,"unit":"MINUTE"}},"durationUntilReset":"{reset}"}}]}}"#
        )
    );
    let (status, text) = http_post(&rl.http, "/json", body);
    assert_eq!(status, 429, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["overallCode"], "OVER_LIMIT");
    assert_eq!(v["responseHeadersToAdd"][0]["key"], "Retry-After");

    // snake_case names are accepted too, as protojson does.
    let (status, _) = http_post(&rl.http, "/json", br#"{"domain":"adm","hits_addend":0,"descriptors":[{"entries":[{"key":"api_key","value":"j"}]}]}"#);
    assert_eq!(status, 200);

    let (status, text) = http_post(&rl.http, "/json", b"{not json");
    assert_eq!(status, 400);
    assert!(!text.trim().is_empty());
    let (status, text) = http_post(&rl.http, "/json", br#"{"domian":"adm"}"#);
    assert_eq!(status, 400);
    assert!(text.contains("domian"), "{text}");
    let (status, text) = http_post(
        &rl.http,
        "/json",
        br#"{"domain":"","descriptors":[{"entries":[{"key":"k"}]}]}"#,
    );
    assert_eq!(
        (status, text.as_str()),
        (400, "rate limit domain must not be empty\n")
    );
    // A value sent with the wrong type is not echoed: the body names its place.
    let (status, text) = http_post(
        &rl.http,
        "/json",
        br#"{"domain":"adm","descriptors":[{"entries":[{"key":"api_key","value":48151623420815}]}]}"#,
    );
    assert_eq!(
        (status, text.as_str()),
        (400, "descriptors[0].entries[0].value: expected a string, got a number (not shown: it may be a descriptor value)\n")
    );
    let huge = vec![b' '; 100 * 1024];
    assert_eq!(http_post(&rl.http, "/json", &huge).0, 413);
}

#[tokio::test]
async fn oversized_headers_are_refused_and_the_listener_keeps_serving() {
    use std::io::{Read, Write};
    let dir = config_dir(&[("a.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let mut s = std::net::TcpStream::connect(&rl.http).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let big = "x".repeat(1024 * 1024);
    let _ = write!(
        s,
        "GET /healthcheck HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"
    );
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let status = String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    assert_eq!(status, "431", "a 1 MiB header is refused");
    assert_eq!(http_get(&rl.http, "/healthcheck"), (200, "OK".to_owned()));
}
