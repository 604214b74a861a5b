//! examples/api-key-token-bucket, through the real Envoy, ratelimitd and redis-server with the
//! recipe's own files. It proves:
//! - an unlisted API key gets the default bucket (100 per minute, burst 150), a listed key its
//!   own, each in its own Redis key, each request taking exactly one token (the bucket's state
//!   in Redis is the first request's time plus one refill interval per request);
//! - a trial key's burst of 3 passes, the 4th request is 429 with `Retry-After` equal to the
//!   exact time until the next token (from the bucket's state in Redis), and a problem+json
//!   body naming the rule; a refused request does not move the bucket;
//! - a request without a key is limited per client IP, apart from the keyed requests (an
//!   empty key is a key: the shared key `""`);
//! - with ratelimitd stopped every request passes (fail-open), each counted once in Envoy's
//!   `failure_mode_allowed`, and once it is back the same bucket refuses again.

use crate::support::http_header as header;
use crate::support::{http_request, recipe::Recipe};

const RECIPE: &str = "api-key-token-bucket";
const UPSTREAM: &str = "hello from the upstream\n";
/// Envoy's counter of requests passed because the call to ratelimitd failed (the rate limit
/// filter's stats live under the route's target cluster, `upstream`).
const FAILURE_MODE_ALLOWED: &str = "cluster.upstream.ratelimit.failure_mode_allowed";

/// The trial key's bucket: 10 per hour, so a token every 360 s; burst 3.
const TRIAL_KEY: &str = "key-trial-7f3a";
const TRIAL_BUCKET: &str = "api_keys_api_key_key-trial-7f3a_bucket_1hour_10";
const TRIAL_INTERVAL_MS: u64 = 360_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An HTTP answer: status, lower-cased headers, body.
type Answer = (u16, Vec<(String, String)>, String);

/// A GET of `/` through the recipe's Envoy with `headers`.
fn get(recipe: &Recipe, headers: &[(&str, &str)]) -> Answer {
    http_request(&recipe.envoy.ingress, "GET", "/", headers)
}

/// A GET of `/` through the recipe's Envoy, with the current Unix time in ms before and after.
fn timed_get(recipe: &Recipe, headers: &[(&str, &str)]) -> (u64, Answer, u64) {
    let before = now_ms();
    let answer = get(recipe, headers);
    (before, answer, now_ms())
}

/// A token bucket's state in Redis (`TAT:remainder`): the theoretical arrival time in Unix ms,
/// after checking that the remainder is 0 (every interval here is whole milliseconds).
fn bucket_tat(recipe: &Recipe, key: &str) -> u64 {
    let reply = recipe.redis.command(&["GET", key]);
    let value = reply
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("{key}: {reply:?}"));
    let (tat, remainder) = value.split_once(':').unwrap();
    assert_eq!(remainder, "0", "{key}: {value}");
    tat.parse().unwrap()
}

/// Every key in the recipe's Redis, sorted.
fn redis_keys(recipe: &Recipe) -> Vec<String> {
    let reply = recipe.redis.command(&["KEYS", "*"]);
    let mut keys: Vec<String> = reply
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('$'))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// The problem+json body ratelimitd sends with a 429 (LIMIT_RESPONSE_BODY=problem-json).
fn problem(rule: &str, limit: u32, window: &str, retry_after: u64) -> String {
    format!(
        r#"{{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit of {limit} requests per {window} exceeded (rule {rule}); retry after {retry_after} s","rule":"{rule}","limit":{limit},"window":"{window}","retry_after":{retry_after}}}"#
    )
}

/// Sends the trial key's burst of 3 (each 200, 2, 1 and 0 tokens left) and returns the Unix
/// ms before and after the first request, when the bucket's first token was taken.
fn spend_trial_burst(recipe: &Recipe) -> (u64, u64) {
    let mut first = (0, 0);
    for left in [2, 1, 0] {
        let (before, (status, headers, body), after) =
            timed_get(recipe, &[("x-api-key", TRIAL_KEY)]);
        assert_eq!((status, body.as_str()), (200, UPSTREAM), "{headers:?}");
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
        if left == 2 {
            first = (before, after);
        }
    }
    first
}

#[test]
fn each_key_has_its_own_bucket_and_an_empty_one_answers_429_with_the_exact_wait() {
    let recipe = Recipe::start(RECIPE, &[]);

    // Two unlisted keys: the default bucket each, full (150) before the request.
    let mut defaults = Vec::new();
    for key in ["key-alice", "key-bob"] {
        let (before, (status, headers, body), after) = timed_get(&recipe, &[("x-api-key", key)]);
        assert_eq!(
            (status, body.as_str()),
            (200, UPSTREAM),
            "{key}: {headers:?}"
        );
        assert_eq!(
            header(&headers, "x-ratelimit-limit"),
            Some("100, 100;w=60;name=\"api-key-default\""),
            "{key}"
        );
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            Some("149"),
            "{key}"
        );
        defaults.push((key, before, after));
    }
    // A listed key: its own limit and burst.
    let (status, headers, _) = get(&recipe, &[("x-api-key", "key-partner-acme")]);
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "x-ratelimit-limit"),
        Some("1000, 1000;w=60;name=\"partner-acme\"")
    );
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("1999"));

    // One bucket per key. A token bucket's state is the time it is full again: one request
    // on a full bucket puts it one refill interval (60 s / 100 = 600 ms) after that request.
    assert_eq!(
        redis_keys(&recipe),
        [
            "api_keys_api_key_key-alice_bucket_1minute_100",
            "api_keys_api_key_key-bob_bucket_1minute_100",
            "api_keys_api_key_key-partner-acme_bucket_1minute_1000",
        ]
    );
    for (key, before, after) in defaults {
        let tat = bucket_tat(
            &recipe,
            &format!("api_keys_api_key_{key}_bucket_1minute_100"),
        );
        assert!(
            (before + 600..=after + 600).contains(&tat),
            "{key}: TAT {tat}, request between {before} and {after}"
        );
    }

    // The trial key: its burst of 3 passes, then its bucket is empty.
    let (first_before, first_after) = spend_trial_burst(&recipe);
    let (before, (status, headers, body), after) = timed_get(&recipe, &[("x-api-key", TRIAL_KEY)]);
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/problem+json")
    );
    // Three tokens taken, each pushing the bucket's TAT one interval (360 s) on from the first
    // request's time: exactly one token per request.
    let tat = bucket_tat(&recipe, TRIAL_BUCKET);
    let first = tat - 3 * TRIAL_INTERVAL_MS;
    assert!(
        (first_before..=first_after).contains(&first),
        "TAT {tat}: first token at {first}, request between {first_before} and {first_after}"
    );
    // The next token is back when the bucket holds one again: TAT - (burst - 1) intervals,
    // i.e. one interval after the first request. Retry-After is the wait until then, in whole
    // seconds rounded up, as ratelimitd saw the time while answering (between before and
    // after).
    let next_token = tat - 2 * TRIAL_INTERVAL_MS;
    let retry_after: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    let (low, high) = (
        (next_token - after).div_ceil(1000),
        (next_token - before).div_ceil(1000),
    );
    assert!(
        (low..=high).contains(&retry_after),
        "Retry-After {retry_after}, expected {low}..={high}"
    );
    assert_eq!(body, problem("trial", 10, "1h", retry_after));

    // A refused request takes no token: the bucket, and so the wait, stay as they were.
    let (status, _, _) = get(&recipe, &[("x-api-key", TRIAL_KEY)]);
    assert_eq!(status, 429);
    assert_eq!(bucket_tat(&recipe, TRIAL_BUCKET), tat);
    // Other keys are not affected.
    let (status, _, _) = get(&recipe, &[("x-api-key", "key-bob")]);
    assert_eq!(status, 200);
}

#[test]
fn requests_without_a_key_are_limited_per_client_ip() {
    let recipe = Recipe::start(RECIPE, &[]);
    // Envoy sees the test's connections from 127.0.0.1: 5 at once (the burst), then 429.
    for left in [4, 3, 2, 1, 0] {
        let (status, headers, body) = get(&recipe, &[]);
        assert_eq!((status, body.as_str()), (200, UPSTREAM), "{headers:?}");
        assert_eq!(
            header(&headers, "x-ratelimit-limit"),
            Some("60, 60;w=3600;name=\"per-ip-without-key\"")
        );
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
    }
    let (status, headers, body) = get(&recipe, &[]);
    assert_eq!(status, 429, "{headers:?}");
    let retry_after: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    // A token a minute: the next one is less than a minute away.
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(body, problem("per-ip-without-key", 60, "1h", retry_after));
    assert_eq!(
        redis_keys(&recipe),
        ["api_keys_no_api_key_true_remote_address_127.0.0.1_bucket_1hour_60"]
    );

    // The same client with an API key is counted by its key, not its address.
    let (status, _, _) = get(&recipe, &[("x-api-key", "key-carol")]);
    assert_eq!(status, 200);
    assert_eq!(
        redis_keys(&recipe),
        [
            "api_keys_api_key_key-carol_bucket_1minute_100",
            "api_keys_no_api_key_true_remote_address_127.0.0.1_bucket_1hour_60",
        ]
    );

    // An empty x-api-key header is present: it is the key "" (one bucket shared by everyone
    // sending it, the README's caveat), not the per-IP limit.
    let (status, headers, _) = get(&recipe, &[("x-api-key", "")]);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("149"));
    assert_eq!(
        redis_keys(&recipe),
        [
            "api_keys_api_key__bucket_1minute_100",
            "api_keys_api_key_key-carol_bucket_1minute_100",
            "api_keys_no_api_key_true_remote_address_127.0.0.1_bucket_1hour_60",
        ]
    );
}

#[test]
fn requests_pass_while_ratelimitd_is_down_and_envoy_counts_each_one() {
    let mut recipe = Recipe::start(RECIPE, &[]);
    spend_trial_burst(&recipe);
    let (status, _, _) = get(&recipe, &[("x-api-key", TRIAL_KEY)]);
    assert_eq!(status, 429);
    let allowed = |recipe: &Recipe| {
        recipe
            .envoy
            .stats(FAILURE_MODE_ALLOWED)
            .get(FAILURE_MODE_ALLOWED)
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(allowed(&recipe), 0);

    assert_eq!(recipe.rl.terminate().code(), Some(0));
    // failure_mode_deny: false: the empty trial bucket and anonymous clients pass too.
    let requests: [&[(&str, &str)]; 6] = [
        &[("x-api-key", TRIAL_KEY)],
        &[("x-api-key", TRIAL_KEY)],
        &[("x-api-key", TRIAL_KEY)],
        &[("x-api-key", "key-dave")],
        &[],
        &[],
    ];
    for headers in requests {
        let (status, answer_headers, body) = get(&recipe, headers);
        assert_eq!((status, body.as_str()), (200, UPSTREAM), "{headers:?}");
        // No answer from ratelimitd, so no X-RateLimit-* headers.
        assert_eq!(header(&answer_headers, "x-ratelimit-remaining"), None);
    }
    assert_eq!(allowed(&recipe), requests.len() as u64);

    // Back on the same port with the same Redis: the trial bucket is still empty.
    recipe.restart_ratelimitd(&[]);
    let (status, _, _) = get(&recipe, &[("x-api-key", TRIAL_KEY)]);
    assert_eq!(status, 429);
    assert_eq!(allowed(&recipe), requests.len() as u64);
}
