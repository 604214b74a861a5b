//! The counting engine through the real binary over gRPC, on the in-memory backend and on a
//! real Redis: token buckets, sliding windows, several limits per rule, N-unit windows, cost
//! budgets, the three charging policies, exactness under concurrency over two instances, and
//! the usage view (`GET /usage`, `ratelimitd usage`).
//!
//! Where the wall clock matters, a test reads it just before and just after a call: the
//! server decided at some instant between the two, so every expected value is computed for
//! that span (one whole second almost always, hence one exact value) and every waiting time
//! is chosen so that the expected codes and counts hold over hundreds of milliseconds of
//! scheduling delay.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::{rate_limit::Unit, Code, DescriptorStatus},
    rate_limit_service_client::RateLimitServiceClient,
    RateLimitRequest, RateLimitResponse,
};
use serde_json::{json, Value};
use support::*;
use tonic::transport::Channel;

const RULES: &str = r#"
domain: eng
descriptors:
  # A token every 2 s, 3 at once.
  - key: tb
    rate_limit: {unit: minute, requests_per_unit: 30, algorithm: token_bucket, burst: 3}
  - key: sw
    rate_limit: {unit: second, unit_multiplier: 4, requests_per_unit: 4, algorithm: sliding_window}
  - key: multi
    rate_limits:
      - {unit: second, requests_per_unit: 3}
      - {unit: minute, requests_per_unit: 5}
  - key: report
    rate_limit: {unit: second, unit_multiplier: 5, requests_per_unit: 3}
  - key: fixed_budget
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: sliding_budget
    rate_limit: {unit: hour, requests_per_unit: 10, algorithm: sliding_window}
  - key: bucket_budget
    rate_limit: {unit: hour, requests_per_unit: 10, algorithm: token_bucket}
  - key: a
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: b
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: c
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: race_fixed
    rate_limit: {unit: minute, requests_per_unit: 50}
  - key: race_sliding
    rate_limit: {unit: hour, requests_per_unit: 30, algorithm: sliding_window}
  # A token every 90 s: none comes back while the race runs.
  - key: race_bucket
    rate_limit: {unit: hour, requests_per_unit: 40, algorithm: token_bucket, burst: 25}
  - key: u
    rate_limits:
      - {unit: minute, requests_per_unit: 5}
      - {unit: hour, requests_per_unit: 20, algorithm: sliding_window}
"#;

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

/// A running service for one backend with this file's rules.
fn start(backend: &str, env: &[(&str, &str)]) -> Service {
    start_service(backend, RULES, env)
}

/// Unix time in milliseconds, the clock the service decides by.
fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// One answer, and the clock read just before the call and just after the answer.
struct Timed {
    r: RateLimitResponse,
    before_ms: u64,
    after_ms: u64,
}

impl Timed {
    fn status(&self, i: usize) -> &DescriptorStatus {
        &self.r.statuses[i]
    }

    /// The values `f` takes over every whole second the call spanned: the one the server
    /// decided in is among them (and it is the only one when the call stayed in one second).
    fn per_second(&self, f: impl Fn(u64) -> u64) -> Vec<u64> {
        (self.before_ms / 1000..=self.after_ms / 1000)
            .map(f)
            .collect()
    }

    /// Asserts `actual` is `f` of the second the server decided in.
    fn assert_per_second(&self, actual: u64, f: impl Fn(u64) -> u64, what: &str) {
        let expected = self.per_second(f);
        assert!(
            expected.contains(&actual),
            "{what}: {actual}, expected one of {expected:?} (call from {} to {} ms)",
            self.before_ms,
            self.after_ms
        );
    }

    /// Milliseconds from the call's span into a window of `window_ms`: (at the start, at the
    /// end). Panics if the call crossed a window edge, which the tests arrange not to happen.
    fn elapsed_in_window(&self, window_ms: u64) -> (u64, u64) {
        assert_eq!(
            self.before_ms / window_ms,
            self.after_ms / window_ms,
            "the call crossed a window edge"
        );
        (self.before_ms % window_ms, self.after_ms % window_ms)
    }
}

async fn call(c: &mut RateLimitServiceClient<Channel>, req: RateLimitRequest) -> Timed {
    let before_ms = now_ms();
    let r = c.should_rate_limit(req).await.unwrap().into_inner();
    Timed {
        r,
        before_ms,
        after_ms: now_ms(),
    }
}

/// A request with one descriptor of one entry, costing `cost` (its own `hits_addend`).
fn costing(key: &str, value: &str, cost: u64) -> RateLimitRequest {
    let mut req = request("eng", &[&[(key, value)]]);
    req.descriptors[0].hits_addend = Some(cost);
    req
}

fn header_names(r: &RateLimitResponse) -> Vec<&str> {
    r.response_headers_to_add
        .iter()
        .map(|h| h.key.as_str())
        .collect()
}

/// `duration_until_reset` in milliseconds (the service sets it in whole milliseconds).
fn reset_ms(s: &DescriptorStatus) -> u64 {
    let d = s.duration_until_reset.as_ref().unwrap();
    assert_eq!(d.nanos % 1_000_000, 0, "whole milliseconds: {d:?}");
    u64::try_from(d.seconds).unwrap() * 1000 + u64::try_from(d.nanos).unwrap() / 1_000_000
}

/// `(requests_per_unit, unit)` of a status's `current_limit`.
fn limit_of(s: &DescriptorStatus) -> (u32, i32) {
    let l = s.current_limit.as_ref().unwrap();
    (l.requests_per_unit, l.unit)
}

/// The Retry-After header as a number.
fn retry_after(r: &RateLimitResponse) -> u64 {
    header(r, "Retry-After").unwrap().parse().unwrap()
}

/// Seconds from `now` to the end of its window of `window` seconds (the reference's
/// `duration_until_reset` for a fixed window).
fn to_window_end(window: u64, now: u64) -> u64 {
    window - now % window
}

/// Sleeps until the Unix time `ms` (at once if it has passed).
async fn sleep_until_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms.saturating_sub(now_ms()))).await;
}

/// A Redis counter's value; an absent key is `None`.
fn redis_get(redis: &RedisServer, key: &str) -> Option<String> {
    let reply = redis.command(&["GET", key]);
    if reply == "$-1\r\n" {
        return None;
    }
    let (len, rest) = reply
        .strip_prefix('$')
        .and_then(|r| r.split_once("\r\n"))
        .unwrap_or_else(|| panic!("not a bulk string reply: {reply:?}"));
    let len: usize = len.parse().unwrap();
    Some(rest[..len].to_owned())
}

/// The usage view of one descriptor in domain `eng` as JSON (`GET /usage`).
fn usage(rl: &Ratelimitd, descriptor: &str) -> Value {
    let (code, body) = http_get(
        &rl.http,
        &format!("/usage?domain=eng&descriptor={descriptor}"),
    );
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// What a fixed window's counter holds, read through the usage view (either backend) and,
/// with Redis, from the key itself: both must agree.
fn fixed_count(s: &Service, entry: (&str, &str), hour_start: u64) -> u64 {
    let (k, v) = entry;
    let view = usage(&s.rl, &format!("{k}={v}"));
    let used = view["descriptors"][0]["limits"][0]["used"]
        .as_u64()
        .unwrap();
    if let Some(redis) = &s.redis {
        let stored = redis_get(redis, &format!("eng_{k}_{v}_{hour_start}"));
        assert_eq!(
            stored.as_deref().map_or(0, |c| c.parse().unwrap()),
            used,
            "Redis and the usage view agree on {k}={v}"
        );
    }
    used
}

/// 30 per minute with a burst of 3: a token every 2 s.
async fn token_bucket_burst_then_exact_retry_after_then_one_per_refill(backend: &'static str) {
    let s = start(backend, &[("LIMIT_RESPONSE_HEADERS_ENABLED", "true")]);
    let mut c = s.rl.client().await;
    const INTERVAL_MS: u64 = 2_000;
    let burst_start = now_ms();
    // The first request finds a full bucket: it is full again one interval later, exactly.
    let r = call(&mut c, request("eng", &[&[("tb", "v")]])).await;
    assert_eq!(r.r.overall_code, OK);
    assert_eq!(limit_of(r.status(0)), (30, Unit::Minute as i32));
    assert_eq!((r.status(0).code, r.status(0).limit_remaining), (OK, 2));
    assert_eq!(reset_ms(r.status(0)), INTERVAL_MS);
    assert_eq!(
        header_names(&r.r),
        ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]
    );
    assert_eq!(header(&r.r, "RateLimit-Limit"), Some("30"));
    assert_eq!(header(&r.r, "RateLimit-Remaining"), Some("2"));
    assert_eq!(header(&r.r, "RateLimit-Reset"), Some("2"));
    for (n, remaining) in [(2u64, 1u32), (3, 0)] {
        let r = call(&mut c, request("eng", &[&[("tb", "v")]])).await;
        let elapsed = r.after_ms - burst_start;
        assert!(elapsed < 1_000, "the burst took {elapsed} ms");
        assert_eq!(
            (r.r.overall_code, r.status(0).limit_remaining),
            (OK, remaining)
        );
        // Full again n intervals after the first request.
        let reset = reset_ms(r.status(0));
        assert!(
            (n * INTERVAL_MS - elapsed..=n * INTERVAL_MS).contains(&reset),
            "reset {reset} ms, {elapsed} ms after the first"
        );
        let full_in = n * INTERVAL_MS / 1000;
        assert_eq!(
            header(&r.r, "RateLimit-Reset"),
            Some(full_in.to_string().as_str())
        );
    }
    // Empty: the next token comes one interval after the first request.
    let r = call(&mut c, request("eng", &[&[("tb", "v")]])).await;
    let elapsed = r.after_ms - burst_start;
    assert!(elapsed < 1_000, "the burst took {elapsed} ms");
    assert_eq!(r.r.overall_code, OVER);
    assert_eq!((r.status(0).code, r.status(0).limit_remaining), (OVER, 0));
    let wait = reset_ms(r.status(0));
    assert!(
        (INTERVAL_MS - elapsed..=INTERVAL_MS).contains(&wait),
        "wait {wait} ms, {elapsed} ms after the first"
    );
    assert_eq!(
        header_names(&r.r),
        [
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
            "Retry-After"
        ]
    );
    // The refill interval in whole seconds.
    assert_eq!(header(&r.r, "Retry-After"), Some("2"));
    assert_eq!(header(&r.r, "RateLimit-Remaining"), Some("0"));
    // Over the limit, RateLimit-Reset is the status' duration, as in the reference: the wait
    // for the next token (more than 1 s, at most 2 s), in whole seconds rounded up.
    assert_eq!(header(&r.r, "RateLimit-Reset"), Some("2"));
    if let Some(redis) = &s.redis {
        let state = redis_get(redis, "eng_tb_v_bucket_1minute_30").unwrap();
        let (tat, rest) = state.split_once(':').unwrap();
        assert_eq!(rest, "0", "2 s per token: no fraction of a millisecond");
        let tat: u64 = tat.parse().unwrap();
        // Three tokens taken from a full bucket: the TAT is three intervals after the first
        // request (the refused fourth charged nothing).
        assert!(
            (burst_start + 3 * INTERVAL_MS..=r.before_ms + 3 * INTERVAL_MS).contains(&tat),
            "TAT {tat}"
        );
    }
    // One interval later, one more is allowed and the bucket is empty again.
    tokio::time::sleep(Duration::from_millis(INTERVAL_MS)).await;
    let r = call(&mut c, request("eng", &[&[("tb", "v")]])).await;
    assert_eq!((r.r.overall_code, r.status(0).limit_remaining), (OK, 0));
    let r = call(&mut c, request("eng", &[&[("tb", "v")]])).await;
    let elapsed = r.after_ms - burst_start;
    assert!(elapsed < 3_000, "{elapsed} ms since the first");
    assert_eq!(r.r.overall_code, OVER);
    // The next token: two intervals after the first request.
    assert_eq!(header(&r.r, "Retry-After"), Some("2"));
}

/// 4 per 4 seconds, sliding: the previous window still counts just after an edge.
async fn sliding_window_counts_the_previous_window_after_an_edge(backend: &'static str) {
    let s = start(backend, &[]);
    let mut c = s.rl.client().await;
    const W: u64 = 4_000;
    // Window A: four fit, the fifth is refused until this window's count has faded enough
    // in the next one: (W − elapsed) + W / 4.
    ensure_window_room(4, Duration::from_millis(1_500)).await;
    for remaining in [3, 2, 1, 0] {
        let r = call(&mut c, request("eng", &[&[("sw", "v")]])).await;
        assert_eq!(r.r.overall_code, OK);
        assert_eq!(limit_of(r.status(0)), (4, Unit::Second as i32));
        assert_eq!(r.status(0).limit_remaining, remaining);
        r.assert_per_second(
            reset_ms(r.status(0)),
            |s| to_window_end(4, s) * 1000,
            "reset",
        );
    }
    let r = call(&mut c, request("eng", &[&[("sw", "v")]])).await;
    let window_a = r.before_ms / W * W / 1000;
    let (from, to) = r.elapsed_in_window(W);
    assert_eq!((r.r.overall_code, r.status(0).limit_remaining), (OVER, 0));
    let wait = reset_ms(r.status(0));
    assert!(
        (W + W / 4 - to..=W + W / 4 - from).contains(&wait),
        "wait {wait} ms, {from}..{to} ms into the window"
    );
    assert_eq!(retry_after(&r.r), wait.div_ceil(1000));
    if let Some(redis) = &s.redis {
        let key = format!("eng_sw_v_{window_a}_4second");
        assert_eq!(
            redis_get(redis, &key).as_deref(),
            Some("4"),
            "the refused fifth uncharged"
        );
    }

    // Window B, just after its edge: 4 × (W − elapsed) / W + 1 > 4 until 1 s in. A fixed
    // window would allow it.
    align_to_window(4, Duration::from_millis(50)).await;
    let r = call(&mut c, request("eng", &[&[("sw", "v")]])).await;
    let window_b = r.before_ms / W * W / 1000;
    assert_eq!(window_b, window_a + 4);
    let (from, to) = r.elapsed_in_window(W);
    assert!(to < 1_000, "{to} ms into the window");
    assert_eq!((r.r.overall_code, r.status(0).limit_remaining), (OVER, 0));
    let wait = reset_ms(r.status(0));
    assert!(
        (1_000 - to..=1_000 - from).contains(&wait),
        "wait {wait} ms, {from}..{to} ms into the window"
    );
    assert_eq!(header(&r.r, "Retry-After"), Some("1"));
    if let Some(redis) = &s.redis {
        let current = format!("eng_sw_v_{window_b}_4second");
        assert_eq!(
            redis_get(redis, &current),
            None,
            "a refusal charges nothing"
        );
    }

    // 2.1 s in: the previous window weighs 4 × (4 − 2.1) / 4 = 1.9, so two more fit (1.9 + 1
    // leaves 1, 1.9 + 2 leaves 0) and a third does not.
    sleep_until_ms(window_b * 1000 + 2_100).await;
    let mut rs = Vec::new();
    for _ in 0..3 {
        rs.push(call(&mut c, request("eng", &[&[("sw", "v")]])).await);
    }
    for r in &rs {
        let (from, to) = r.elapsed_in_window(W);
        assert_eq!(r.before_ms / W * W / 1000, window_b, "still window B");
        assert!((2_000..3_000).contains(&from) && to < 3_000, "{from}..{to}");
    }
    let got: Vec<(i32, u32)> = rs
        .iter()
        .map(|r| (r.status(0).code, r.status(0).limit_remaining))
        .collect();
    assert_eq!(got, [(OK, 1), (OK, 0), (OVER, 0)]);
    for r in &rs[..2] {
        r.assert_per_second(
            reset_ms(r.status(0)),
            |s| to_window_end(4, s) * 1000,
            "reset",
        );
    }
    // Fits again at 3 s in: 4 × 1/4 + 2 + 1 = 4.
    let (from, to) = rs[2].elapsed_in_window(W);
    let wait = reset_ms(rs[2].status(0));
    assert!(
        (3_000 - to..=3_000 - from).contains(&wait),
        "wait {wait} ms, {from}..{to} ms into the window"
    );
    assert_eq!(header(&rs[2].r, "Retry-After"), Some("1"));
    if let Some(redis) = &s.redis {
        let current = format!("eng_sw_v_{window_b}_4second");
        assert_eq!(redis_get(redis, &current).as_deref(), Some("2"));
    }
}

/// `rate_limits: [3 per second, 5 per minute]`.
async fn several_limits_report_the_most_restrictive_and_wait_for_the_longest(
    backend: &'static str,
) {
    let s = start(backend, &[("LIMIT_RESPONSE_HEADERS_ENABLED", "true")]);
    let mut c = s.rl.client().await;
    let req = || request("eng", &[&[("multi", "m")]]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    align_to_window(1, Duration::from_millis(10)).await;
    // The second's limit has the fewest left: it is reported.
    for remaining in [2u32, 1, 0] {
        let r = call(&mut c, req()).await;
        assert_eq!(r.r.overall_code, OK);
        assert_eq!(limit_of(r.status(0)), (3, Unit::Second as i32));
        assert_eq!(r.status(0).limit_remaining, remaining);
        assert_eq!(reset_ms(r.status(0)), 1_000);
        assert_eq!(header(&r.r, "RateLimit-Limit"), Some("3, 3;w=1, 5;w=60"));
        assert_eq!(
            header(&r.r, "RateLimit-Remaining"),
            Some(remaining.to_string().as_str())
        );
        assert_eq!(header(&r.r, "RateLimit-Reset"), Some("1"));
    }
    // The fourth in this second: over the second's limit, not the minute's.
    let r = call(&mut c, req()).await;
    let second = r.before_ms / 1000;
    assert_eq!(r.after_ms / 1000, second, "four calls within one second");
    assert_eq!(r.r.overall_code, OVER);
    assert_eq!(limit_of(r.status(0)), (3, Unit::Second as i32));
    assert_eq!((r.status(0).code, r.status(0).limit_remaining), (OVER, 0));
    assert_eq!(reset_ms(r.status(0)), 1_000);
    assert_eq!(header(&r.r, "RateLimit-Limit"), Some("3, 3;w=1, 5;w=60"));
    assert_eq!(header(&r.r, "Retry-After"), Some("1"));
    if let Some(redis) = &s.redis {
        // Fixed windows count over-limit hits (the reference's default): 4 in each.
        let minute = second / 60 * 60;
        assert_eq!(
            redis_get(redis, &format!("eng_multi_m_{second}_1second")).as_deref(),
            Some("4")
        );
        assert_eq!(
            redis_get(redis, &format!("eng_multi_m_{minute}_1minute")).as_deref(),
            Some("4")
        );
    }

    // The next second: the minute's limit (4 of 5 used) is now the most restrictive.
    align_to_window(1, Duration::from_millis(10)).await;
    let r = call(&mut c, req()).await;
    let now = r.before_ms / 1000;
    assert_eq!(r.r.overall_code, OK);
    assert_eq!(limit_of(r.status(0)), (5, Unit::Minute as i32));
    assert_eq!(r.status(0).limit_remaining, 0);
    assert_eq!(reset_ms(r.status(0)), to_window_end(60, now) * 1000);
    assert_eq!(header(&r.r, "RateLimit-Limit"), Some("5, 3;w=1, 5;w=60"));
    assert_eq!(header(&r.r, "RateLimit-Remaining"), Some("0"));
    assert_eq!(
        header(&r.r, "RateLimit-Reset"),
        Some(to_window_end(60, now).to_string().as_str())
    );
    // Over the minute only (the second has 1 left): reported with the minute's wait.
    let r = call(&mut c, req()).await;
    assert_eq!(r.r.overall_code, OVER);
    assert_eq!(limit_of(r.status(0)), (5, Unit::Minute as i32));
    assert_eq!((r.status(0).code, r.status(0).limit_remaining), (OVER, 0));
    assert_eq!(reset_ms(r.status(0)), to_window_end(60, now) * 1000);
    assert_eq!(retry_after(&r.r), to_window_end(60, now));
    // Over both (second: 3 then 4 of 3): the first limit it is over is reported, and the
    // wait is the longest of the two, the minute's.
    let r = call(&mut c, req()).await;
    assert_eq!(r.r.overall_code, OVER);
    assert_eq!(r.status(0).limit_remaining, 0);
    let r = call(&mut c, req()).await;
    assert_eq!(r.after_ms / 1000, now, "four calls within one second");
    assert_eq!(r.r.overall_code, OVER);
    assert_eq!(limit_of(r.status(0)), (3, Unit::Second as i32));
    assert_eq!((r.status(0).code, r.status(0).limit_remaining), (OVER, 0));
    assert_eq!(reset_ms(r.status(0)), to_window_end(60, now) * 1000);
    assert_eq!(retry_after(&r.r), to_window_end(60, now));
    assert!(
        to_window_end(60, now) > 1,
        "the minute's wait is the longer"
    );
    assert_eq!(header(&r.r, "RateLimit-Limit"), Some("3, 3;w=1, 5;w=60"));
    assert_eq!(header(&r.r, "RateLimit-Remaining"), Some("0"));
    if let Some(redis) = &s.redis {
        let minute = now / 60 * 60;
        assert_eq!(
            redis_get(redis, &format!("eng_multi_m_{now}_1second")).as_deref(),
            Some("4")
        );
        assert_eq!(
            redis_get(redis, &format!("eng_multi_m_{minute}_1minute")).as_deref(),
            Some("8")
        );
    }
}

/// 3 per 5 seconds: windows of 5 s aligned to the Unix epoch, keyed with their tag.
async fn unit_multiplier_windows_are_epoch_aligned_and_tagged(backend: &'static str) {
    let s = start(
        backend,
        &[
            ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
            ("EXPIRATION_JITTER_MAX_SECONDS", "0"),
        ],
    );
    let mut c = s.rl.client().await;
    let req = || request("eng", &[&[("report", "r")]]);
    ensure_window_room(5, Duration::from_millis(1_500)).await;
    for remaining in [2u32, 1, 0] {
        let r = call(&mut c, req()).await;
        assert_eq!(r.r.overall_code, OK);
        // Envoy's current_limit has no multiplier: the unit is reported.
        assert_eq!(limit_of(r.status(0)), (3, Unit::Second as i32));
        assert_eq!(r.status(0).limit_remaining, remaining);
        r.assert_per_second(
            reset_ms(r.status(0)),
            |s| to_window_end(5, s) * 1000,
            "reset",
        );
        assert_eq!(header(&r.r, "RateLimit-Limit"), Some("3, 3;w=5"));
    }
    let r = call(&mut c, req()).await;
    r.elapsed_in_window(5_000);
    let start_a = r.before_ms / 5_000 * 5;
    assert_eq!((r.r.overall_code, r.status(0).limit_remaining), (OVER, 0));
    r.assert_per_second(retry_after(&r.r), |s| to_window_end(5, s), "Retry-After");
    if let Some(redis) = &s.redis {
        let key = format!("eng_report_r_{start_a}_5second");
        assert_eq!(redis_get(redis, &key).as_deref(), Some("4"));
        let ttl: u64 = redis.command(&["TTL", &key])[1..].trim().parse().unwrap();
        assert!((1..=5).contains(&ttl), "TTL {ttl}: the window, no jitter");
    }
    // At the next edge (a multiple of 5 s since the epoch) the count starts again.
    align_to_window(5, Duration::from_millis(20)).await;
    let r = call(&mut c, req()).await;
    let start_b = r.before_ms / 5_000 * 5;
    assert_eq!(start_b, start_a + 5);
    assert_eq!((r.r.overall_code, r.status(0).limit_remaining), (OK, 2));
    r.assert_per_second(
        reset_ms(r.status(0)),
        |s| to_window_end(5, s) * 1000,
        "reset",
    );
    if let Some(redis) = &s.redis {
        let key = format!("eng_report_r_{start_b}_5second");
        assert_eq!(redis_get(redis, &key).as_deref(), Some("1"));
    }
}

/// A per-descriptor `hits_addend` is the cost in every algorithm; a cost above the capacity
/// is refused and consumes nothing.
async fn cost_budgets_and_costs_above_the_capacity(backend: &'static str) {
    let s = start(backend, &[]);
    let mut c = s.rl.client().await;
    ensure_window_room(3600, Duration::from_secs(10)).await;
    for key in ["fixed_budget", "sliding_budget", "bucket_budget"] {
        let r = call(&mut c, costing(key, "x", 4)).await;
        let first = r.before_ms;
        assert_eq!(
            (r.r.overall_code, r.status(0).limit_remaining),
            (OK, 6),
            "{key}"
        );
        // 11 > 10: refused, whatever is left.
        let r = call(&mut c, costing(key, "x", 11)).await;
        assert_eq!(
            (r.r.overall_code, r.status(0).limit_remaining),
            (OVER, 0),
            "{key}"
        );
        let wait = reset_ms(r.status(0));
        if key == "bucket_budget" {
            // Until the bucket is full again: 4 tokens of 6 minutes after the first request.
            let elapsed = r.after_ms - first;
            assert!(
                (1_440_000 - elapsed..=1_440_000).contains(&wait),
                "{key}: wait {wait}"
            );
            assert_eq!(retry_after(&r.r), 1_440, "{key}");
        } else {
            // Until the window ends.
            r.assert_per_second(wait.div_ceil(1000), |s| to_window_end(3600, s), key);
            r.assert_per_second(retry_after(&r.r), |s| to_window_end(3600, s), key);
        }
        if let Some(redis) = &s.redis {
            let hour = r.before_ms / 3_600_000 * 3600;
            match key {
                // 4 tokens of 6 minutes from a full bucket: the TAT is 24 minutes after the
                // first request, the refused 11 added nothing.
                "bucket_budget" => {
                    let state = redis_get(redis, "eng_bucket_budget_x_bucket_1hour_10").unwrap();
                    let (tat, rest) = state.split_once(':').unwrap();
                    let tat: u64 = tat.parse().unwrap();
                    let span = first + 1_440_000..=r.before_ms + 1_440_000;
                    assert!(span.contains(&tat), "TAT {tat}, expected in {span:?}");
                    assert_eq!(rest, "0");
                }
                _ => assert_eq!(
                    redis_get(redis, &format!("eng_{key}_x_{hour}")).as_deref(),
                    Some("4"),
                    "{key}: the refused 11 consumed nothing"
                ),
            }
        }
        // So 6 still fit, exactly.
        let r = call(&mut c, costing(key, "x", 6)).await;
        assert_eq!(
            (r.r.overall_code, r.status(0).limit_remaining),
            (OK, 0),
            "{key}"
        );
        let r = call(&mut c, costing(key, "x", 1)).await;
        let elapsed = r.after_ms - first;
        assert_eq!(
            (r.r.overall_code, r.status(0).limit_remaining),
            (OVER, 0),
            "{key}"
        );
        match key {
            "fixed_budget" => {
                r.assert_per_second(retry_after(&r.r), |s| to_window_end(3600, s), key)
            }
            // 10 counted in this window: 1 fits once they weigh 9, a tenth of a window
            // into the next one.
            "sliding_budget" => {
                r.assert_per_second(retry_after(&r.r), |s| to_window_end(3600, s) + 360, key)
            }
            // One token: 6 minutes after the first request.
            _ => {
                assert!(elapsed < 1_000, "{elapsed} ms");
                assert_eq!(retry_after(&r.r), 360, "{key}");
            }
        }
        // A cost of 0 checks without charging: the fixed window, which counted the refused
        // hit, stands over its limit (as the reference's does); the others at it.
        let r = call(&mut c, costing(key, "x", 0)).await;
        let code = if key == "fixed_budget" { OVER } else { OK };
        assert_eq!(
            (r.r.overall_code, r.status(0).limit_remaining),
            (code, 0),
            "{key}"
        );
        if let Some(redis) = &s.redis {
            let hour = r.before_ms / 3_600_000 * 3600;
            let count = redis_get(redis, &format!("eng_{key}_x_{hour}"));
            match key {
                // Over-limit hits count in a fixed window (the reference's default)...
                "fixed_budget" => assert_eq!(count.as_deref(), Some("11")),
                // ...not in a sliding one, whose Retry-After stays true.
                "sliding_budget" => assert_eq!(count.as_deref(), Some("10")),
                _ => {}
            }
        }
    }
}

/// `STRICT_CHARGING=true`: a request refused by one descriptor charges nothing anywhere;
/// without it the fitting descriptor is charged.
async fn strict_charging_charges_all_or_nothing(backend: &'static str) {
    ensure_window_room(3600, Duration::from_secs(10)).await;
    let hour = unix_now() / 3600 * 3600;
    for strict in [true, false] {
        let env: &[(&str, &str)] = if strict {
            // The other policy explicitly off, as a deployment listing every setting has it.
            &[
                ("STRICT_CHARGING", "true"),
                ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "false"),
            ]
        } else {
            &[]
        };
        let s = start(backend, env);
        let mut c = s.rl.client().await;
        for remaining in [1u32, 0] {
            let r = call(&mut c, request("eng", &[&[("a", "x")]])).await;
            assert_eq!(
                (r.r.overall_code, r.status(0).limit_remaining),
                (OK, remaining)
            );
        }
        let r = call(&mut c, request("eng", &[&[("a", "x")], &[("b", "x")]])).await;
        assert_eq!(r.r.overall_code, OVER);
        assert_eq!((r.status(0).code, r.status(0).limit_remaining), (OVER, 0));
        if strict {
            // b fits, but the request is refused: b as it stands, charged nothing.
            assert_eq!((r.status(1).code, r.status(1).limit_remaining), (OK, 10));
            assert_eq!(fixed_count(&s, ("a", "x"), hour), 2);
            assert_eq!(fixed_count(&s, ("b", "x"), hour), 0);
            if let Some(redis) = &s.redis {
                assert_eq!(redis_get(redis, &format!("eng_b_x_{hour}")), None);
            }
        } else {
            // The reference's default: both charged, the over-limit hit included.
            assert_eq!((r.status(1).code, r.status(1).limit_remaining), (OK, 9));
            assert_eq!(fixed_count(&s, ("a", "x"), hour), 3);
            assert_eq!(fixed_count(&s, ("b", "x"), hour), 1);
        }
        // A request that fits is charged everywhere.
        let r = call(&mut c, request("eng", &[&[("b", "x")], &[("c", "x")]])).await;
        assert_eq!(r.r.overall_code, OK);
        let remaining_b = if strict { 9 } else { 8 };
        assert_eq!(
            (r.status(0).limit_remaining, r.status(1).limit_remaining),
            (remaining_b, 0)
        );
        assert_eq!(fixed_count(&s, ("c", "x"), hour), 1);
        assert_eq!(r.before_ms / 3_600_000 * 3600, hour, "one hour");
    }
}

/// `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT=true`, the reference's semantics: when any
/// counter would go over, only the counters that would go over are incremented.
async fn stop_increment_when_over_limit_is_the_references(backend: &'static str) {
    ensure_window_room(3600, Duration::from_secs(10)).await;
    let hour = unix_now() / 3600 * 3600;
    let s = start(
        backend,
        &[
            ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true"),
            ("STRICT_CHARGING", "false"),
        ],
    );
    let mut c = s.rl.client().await;
    // Nothing would go over: everything is charged.
    let r = call(&mut c, request("eng", &[&[("a", "x")], &[("b", "x")]])).await;
    assert_eq!(r.r.overall_code, OK);
    let remaining: Vec<u32> = r.r.statuses.iter().map(|s| s.limit_remaining).collect();
    assert_eq!(remaining, [1, 9]);
    call(&mut c, request("eng", &[&[("a", "x")]])).await;
    assert_eq!(fixed_count(&s, ("a", "x"), hour), 2);
    assert_eq!(fixed_count(&s, ("b", "x"), hour), 1);
    // a would go over: only a is incremented; b reports its count as it stands.
    let r = call(&mut c, request("eng", &[&[("a", "x")], &[("b", "x")]])).await;
    assert_eq!(r.r.overall_code, OVER);
    let got: Vec<(i32, u32)> =
        r.r.statuses
            .iter()
            .map(|s| (s.code, s.limit_remaining))
            .collect();
    assert_eq!(got, [(OVER, 0), (OK, 9)]);
    assert_eq!(fixed_count(&s, ("a", "x"), hour), 3);
    assert_eq!(fixed_count(&s, ("b", "x"), hour), 1);
    // Both would go over (c: 1 of 1 used): both are incremented.
    call(&mut c, request("eng", &[&[("c", "x")]])).await;
    let r = call(&mut c, request("eng", &[&[("a", "x")], &[("c", "x")]])).await;
    let codes: Vec<i32> = r.r.statuses.iter().map(|s| s.code).collect();
    assert_eq!(codes, [OVER, OVER]);
    assert_eq!(fixed_count(&s, ("a", "x"), hour), 4);
    assert_eq!(fixed_count(&s, ("c", "x"), hour), 2);
    // b was charged only once: one more leaves 8.
    let r = call(&mut c, request("eng", &[&[("b", "x")]])).await;
    assert_eq!((r.r.overall_code, r.status(0).limit_remaining), (OK, 8));
    assert_eq!(fixed_count(&s, ("b", "x"), hour), 2);
    assert_eq!(r.before_ms / 3_600_000 * 3600, hour, "one hour");
}

/// For each algorithm, 32 concurrent clients (over two instances sharing one Redis; over one
/// instance in memory) are admitted exactly as many times as the algorithm allows.
async fn concurrent_clients_are_admitted_exactly(backend: &'static str) {
    let dir = config_dir(&[("rules.yaml", RULES)]);
    let redis = (backend == "redis").then(RedisServer::start);
    let instances: Vec<Ratelimitd> = match &redis {
        Some(r) => vec![
            Ratelimitd::builder(dir.path()).redis(r).start(),
            Ratelimitd::builder(dir.path()).redis(r).start(),
        ],
        None => vec![Ratelimitd::builder(dir.path()).start()],
    };
    const CLIENTS: usize = 32;
    const EACH: usize = 5;
    // (key, window in seconds to stay inside, admitted)
    let cases = [
        ("race_fixed", 60, 50),
        ("race_sliding", 3600, 30),
        ("race_bucket", 3600, 25),
    ];
    for (key, window, allowed) in cases {
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            clients.push(instances[i % instances.len()].client().await);
        }
        ensure_window_room(window, Duration::from_secs(8)).await;
        let start_ms = now_ms();
        let start = start_ms / 1000;
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..EACH {
                        let r = client
                            .should_rate_limit(request("eng", &[&[(key, "shared")]]))
                            .await
                            .unwrap()
                            .into_inner();
                        ok += usize::from(r.overall_code == OK);
                    }
                    ok
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        let end_ms = now_ms();
        assert_eq!(unix_now() / window, start / window, "{key}: one window");
        assert_eq!(
            admitted,
            allowed,
            "{key}: {} requests from {CLIENTS} clients",
            CLIENTS * EACH
        );
        if let Some(r) = &redis {
            let window_start = start / window * window;
            match key {
                // Every hit counted once, over-limit ones included.
                "race_fixed" => assert_eq!(
                    redis_get(r, &format!("eng_race_fixed_shared_{window_start}")),
                    Some((CLIENTS * EACH).to_string())
                ),
                // Refused hits are not counted.
                "race_sliding" => assert_eq!(
                    redis_get(r, &format!("eng_race_sliding_shared_{window_start}")),
                    Some(allowed.to_string())
                ),
                // 25 tokens of 90 s taken from a full bucket: the TAT is 25 intervals after
                // the first admitted request, with no remainder.
                _ => {
                    let state = redis_get(r, "eng_race_bucket_shared_bucket_1hour_40").unwrap();
                    let (tat, rest) = state.split_once(':').unwrap();
                    let tat: u64 = tat.parse().unwrap();
                    let span = start_ms + 2_250_000..=end_ms + 2_250_000;
                    assert!(span.contains(&tat), "TAT {tat}, expected in {span:?}");
                    assert_eq!(rest, "0");
                }
            }
        }
    }
}

/// The usage view: every limit with used, remaining and reset, charging nothing.
async fn usage_view_over_http_and_the_cli(backend: &'static str) {
    let mut s = start(backend, &[]);
    let mut c = s.rl.client().await;
    ensure_window_room(60, Duration::from_secs(5)).await;
    for _ in 0..3 {
        let r = call(&mut c, request("eng", &[&[("u", "alice")]])).await;
        assert_eq!(r.r.overall_code, OK);
    }
    let expected = |now: u64| {
        json!({"domain": "eng", "descriptors": [{
        "entries": [["u", "alice"]],
        "rule": "eng > u",
        "limits": [
            {"requests_per_unit": 5, "unit": "minute", "unit_multiplier": 1,
             "algorithm": "fixed_window", "capacity": 5, "used": 3, "remaining": 2,
             "reset_seconds": to_window_end(60, now) as f64, "over_limit": false},
            {"requests_per_unit": 20, "unit": "hour", "unit_multiplier": 1,
             "algorithm": "sliding_window", "capacity": 20, "used": 3, "remaining": 17,
             "reset_seconds": to_window_end(3600, now) as f64, "over_limit": false},
        ]}]})
    };
    let matches = |body: &str, before: u64, after: u64| {
        let got: Value = serde_json::from_str(body).unwrap();
        assert!(
            (before / 1000..=after / 1000).any(|s| got == expected(s)),
            "{got:#}\nexpected {:#}",
            expected(before / 1000)
        );
    };
    // Twice in a row: nothing is charged.
    for _ in 0..2 {
        let before = now_ms();
        let (code, body) = http_get(&s.rl.http, "/usage?domain=eng&descriptor=u=alice");
        assert_eq!(code, 200, "{body}");
        matches(&body, before, now_ms());
    }
    // The CLI prints the same view.
    let before = now_ms();
    let (code, out, err) = run_cli(&["usage", "--admin", &s.rl.http, "--domain", "eng", "u=alice"]);
    assert_eq!((code, err.as_str()), (0, ""));
    matches(&out, before, now_ms());
    if let Some(redis) = &s.redis {
        let now = unix_now();
        assert_eq!(
            redis_get(redis, &format!("eng_u_alice_{}_1minute", now / 60 * 60)).as_deref(),
            Some("3")
        );
        assert_eq!(
            redis_get(redis, &format!("eng_u_alice_{}_1hour", now / 3600 * 3600)).as_deref(),
            Some("3")
        );
    }
    // The next request is the fourth.
    let r = call(&mut c, request("eng", &[&[("u", "alice")]])).await;
    assert_eq!(r.status(0).limit_remaining, 1);

    // A missing domain is the caller's error.
    let (code, body) = http_get(&s.rl.http, "/usage?descriptor=u=alice");
    assert_eq!(
        (code, body.as_str()),
        (
            400,
            "usage: /usage?domain=D&descriptor=k1=v1,k2=v2[&descriptor=...]\n"
        )
    );

    if let Some(redis) = &mut s.redis {
        // Without its backend the view is unavailable, and says only that.
        redis.kill();
        let (code, body) = http_get(&s.rl.http, "/usage?domain=eng&descriptor=u=alice");
        assert_eq!(code, 503, "{body}");
        assert!(
            [
                "rate limit backend unavailable (connection error)\n",
                "rate limit backend unavailable (timeout)\n"
            ]
            .contains(&body.as_str()),
            "{body:?}"
        );
        let (code, out, err) =
            run_cli(&["usage", "--admin", &s.rl.http, "--domain", "eng", "u=alice"]);
        assert_eq!((code, out.as_str()), (1, ""));
        assert_eq!(
            err,
            format!(
                "ratelimitd: {} answered 503: {}\n",
                s.rl.http,
                body.trim_end()
            )
        );
    }
}

both_backends! {
    token_bucket => token_bucket_burst_then_exact_retry_after_then_one_per_refill;
    sliding_window => sliding_window_counts_the_previous_window_after_an_edge;
    several_limits => several_limits_report_the_most_restrictive_and_wait_for_the_longest;
    unit_multiplier => unit_multiplier_windows_are_epoch_aligned_and_tagged;
    cost_budgets => cost_budgets_and_costs_above_the_capacity;
    strict_charging => strict_charging_charges_all_or_nothing;
    stop_increment_when_over_limit => stop_increment_when_over_limit_is_the_references;
    concurrent_exact => concurrent_clients_are_admitted_exactly;
    usage_view => usage_view_over_http_and_the_cli;
}

/// The two charging policies contradict each other: the service refuses to start, naming
/// both.
#[test]
fn strict_charging_and_stop_increment_together_are_refused() {
    let dir = config_dir(&[("rules.yaml", RULES)]);
    let (code, log) = serve_expecting_refusal(
        dir.path(),
        &[
            ("STRICT_CHARGING", "true"),
            ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true"),
        ],
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.lines().any(|l| l
            == "ratelimitd: STRICT_CHARGING and STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT \
                cannot both be true; set one of them"),
        "{log}"
    );
}
