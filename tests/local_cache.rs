//! `LOCAL_CACHE_SIZE_IN_BYTES` against a real `redis-server` and the real binary: a fixed
//! window over its limit is answered locally for the rest of its window (no Redis round trip:
//! its count stays put, and it is answered while Redis is frozen), counted in the reference's
//! `over_limit_with_local_cache` (Prometheus and StatsD), and the rest of a request is charged
//! as the reference charges it.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, RateLimitResponse,
};
use support::*;

const RULES: &str = r#"
domain: lc
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: other
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: sec
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: shadowed
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

fn start(redis: &RedisServer, dir: &tempfile::TempDir, env: &[(&str, &str)]) -> Ratelimitd {
    Ratelimitd::builder(dir.path())
        .redis(redis)
        .env("EXPIRATION_JITTER_MAX_SECONDS", "0")
        .env("REDIS_TIMEOUT", "300ms")
        .envs(env)
        .start()
}

async fn ask(rl: &Ratelimitd, descriptors: &[&[(&str, &str)]]) -> RateLimitResponse {
    let mut c = rl.client().await;
    c.should_rate_limit(request("lc", descriptors))
        .await
        .unwrap()
        .into_inner()
}

/// `(code, remaining)` of each descriptor.
fn statuses(r: &RateLimitResponse) -> Vec<(i32, u32)> {
    r.statuses
        .iter()
        .map(|s| (s.code, s.limit_remaining))
        .collect()
}

fn minute_key(rest: &str) -> String {
    format!("lc_{rest}_{}", unix_now() / 60 * 60)
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn a_key_over_its_limit_is_answered_locally_until_its_window_ends() {
    let statsd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let statsd_port = statsd.local_addr().unwrap().port().to_string();
    let dir = config_dir(&[("lc.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = start(
        &redis,
        &dir,
        &[
            ("LOCAL_CACHE_SIZE_IN_BYTES", "1048576"),
            ("USE_STATSD", "true"),
            ("STATSD_HOST", "127.0.0.1"),
            ("STATSD_PORT", &statsd_port),
            ("STATSD_PROTOCOL", "udp"),
            ("STATS_FLUSH_INTERVAL", "100ms"),
        ],
    );
    ensure_window_room(60, Duration::from_secs(20)).await;
    let k: &[&[(&str, &str)]] = &[&[("k", "v")]];
    let mut got = Vec::new();
    for _ in 0..3 {
        got.extend(statuses(&ask(&rl, k).await));
    }
    assert_eq!(got, [(OK, 1), (OK, 0), (OVER, 0)]);
    let key = minute_key("k_v");
    assert_eq!(redis.command(&["GET", &key]), "$1\r\n3\r\n");

    // From now on the key is answered here: refused, its count in Redis unchanged.
    for _ in 0..2 {
        let r = ask(&rl, k).await;
        assert_eq!(r.overall_code, OVER);
        assert_eq!(statuses(&r), [(OVER, 0)]);
        let reset = r.statuses[0].duration_until_reset.unwrap().seconds;
        assert!((1..=60).contains(&reset), "resets with its window: {reset}");
        assert_eq!(header(&r, "Retry-After"), Some(&*reset.to_string()));
    }
    assert_eq!(redis.command(&["GET", &key]), "$1\r\n3\r\n");

    // Even with Redis frozen: answered without it. A key not cached needs Redis.
    redis.pause();
    let r = ask(&rl, k).await;
    let frozen = rl
        .client()
        .await
        .should_rate_limit(request("lc", &[&[("other", "x")]]))
        .await;
    redis.resume();
    assert_eq!(statuses(&r), [(OVER, 0)]);
    assert_eq!(frozen.unwrap_err().code(), tonic::Code::Unavailable);

    // The reference's stats: every locally answered hit is over the limit, and counted in
    // over_limit_with_local_cache as well.
    let text = http_get(&rl.http, "/metrics").1;
    let labels = [("domain", "lc"), ("key1", "k")];
    let series = |name: &str| sample(&text, name, &labels);
    assert_eq!(
        series("ratelimit_service_rate_limit_over_limit_with_local_cache"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(series("ratelimit_service_rate_limit_over_limit"), Some(4.0));
    assert_eq!(series("ratelimit_service_rate_limit_total_hits"), Some(6.0));
    let want = [
        (
            "ratelimit.service.rate_limit.lc.k.over_limit_with_local_cache",
            3,
        ),
        ("ratelimit.service.rate_limit.lc.k.over_limit", 4),
        ("ratelimit.service.rate_limit.lc.k.total_hits", 6),
    ];
    let totals = statsd_totals(&statsd, &want);
    for (name, n) in want {
        assert_eq!(totals.get(name), Some(&n), "{name}: {totals:?}");
    }
}

#[tokio::test]
async fn without_the_cache_every_hit_goes_to_redis() {
    let dir = config_dir(&[("lc.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = start(&redis, &dir, &[]);
    ensure_window_room(60, Duration::from_secs(10)).await;
    for _ in 0..5 {
        ask(&rl, &[&[("k", "v")]]).await;
    }
    assert_eq!(redis.command(&["GET", &minute_key("k_v")]), "$1\r\n5\r\n");
    let text = http_get(&rl.http, "/metrics").1;
    assert_eq!(
        sample(
            &text,
            "ratelimit_service_rate_limit_over_limit_with_local_cache",
            &[("domain", "lc"), ("key1", "k")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_new_window_is_asked_of_redis_again() {
    let dir = config_dir(&[("lc.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = start(&redis, &dir, &[("LOCAL_CACHE_SIZE_IN_BYTES", "1048576")]);
    let sec: &[&[(&str, &str)]] = &[&[("sec", "s")]];
    let key = |t: u64| format!("lc_sec_s_{t}");
    align_to_window(1, Duration::from_millis(50)).await;
    let first = unix_now();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.extend(statuses(&ask(&rl, sec).await));
    }
    assert_eq!(got, [(OK, 0), (OVER, 0), (OVER, 0)]);
    // The third was answered here: Redis saw two.
    assert_eq!(redis.command(&["GET", &key(first)]), "$1\r\n2\r\n");
    align_to_window(1, Duration::from_millis(50)).await;
    let next = unix_now();
    assert_eq!(statuses(&ask(&rl, sec).await), [(OK, 0)]);
    assert_eq!(
        redis.command(&["GET", &key(next)]),
        "$1\r\n1\r\n",
        "counted in Redis"
    );
}

/// The reference with STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT: once a key of the request is
/// over in the local cache, no key of the request is incremented. Without it, the others are.
#[tokio::test]
async fn the_rest_of_the_request_is_charged_as_the_reference_charges_it() {
    for (stop, charged) in [("true", false), ("false", true)] {
        let dir = config_dir(&[("lc.yaml", RULES)]);
        let redis = RedisServer::start();
        let rl = start(
            &redis,
            &dir,
            &[
                ("LOCAL_CACHE_SIZE_IN_BYTES", "1048576"),
                ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", stop),
            ],
        );
        ensure_window_room(60, Duration::from_secs(10)).await;
        for _ in 0..3 {
            ask(&rl, &[&[("k", "v")]]).await;
        }
        assert_eq!(redis.command(&["GET", &minute_key("k_v")]), "$1\r\n3\r\n");
        let r = ask(&rl, &[&[("k", "v")], &[("other", "x")]]).await;
        assert_eq!(r.overall_code, OVER);
        let other = minute_key("other_x");
        if charged {
            assert_eq!(statuses(&r), [(OVER, 0), (OK, 4)], "stop={stop}");
            assert_eq!(redis.command(&["GET", &other]), "$1\r\n1\r\n");
        } else {
            assert_eq!(statuses(&r), [(OVER, 0), (OK, 5)], "stop={stop}");
            assert_eq!(redis.command(&["GET", &other]), "$-1\r\n");
        }
        assert_eq!(redis.command(&["GET", &minute_key("k_v")]), "$1\r\n3\r\n");
    }
}

/// As the reference: a shadow_mode rule's key over its limit is cached too; its hits are
/// answered OK, counted as over the limit, shadowed and answered locally.
#[tokio::test]
async fn a_shadowed_key_is_answered_locally_and_let_through() {
    let dir = config_dir(&[("lc.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = start(&redis, &dir, &[("LOCAL_CACHE_SIZE_IN_BYTES", "1048576")]);
    ensure_window_room(60, Duration::from_secs(10)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = ask(&rl, &[&[("shadowed", "s")]]).await;
        assert_eq!(r.overall_code, OK);
        got.extend(statuses(&r));
    }
    assert_eq!(got, [(OK, 0), (OK, 0), (OK, 0)]);
    let key = minute_key("shadowed_s");
    assert_eq!(
        redis.command(&["GET", &key]),
        "$1\r\n2\r\n",
        "third hit answered locally"
    );
    let text = http_get(&rl.http, "/metrics").1;
    let labels = [("domain", "lc"), ("key1", "shadowed")];
    let series = |name: &str| sample(&text, name, &labels);
    assert_eq!(
        series("ratelimit_service_rate_limit_shadow_mode"),
        Some(2.0)
    );
    assert_eq!(series("ratelimit_service_rate_limit_over_limit"), Some(2.0));
    assert_eq!(
        series("ratelimit_service_rate_limit_over_limit_with_local_cache"),
        Some(1.0)
    );
}

/// STRICT_CHARGING never stores a count above its limit, so nothing is cached: every refusal
/// is the store's, and a refused request charges nothing.
#[tokio::test]
async fn strict_charging_leaves_nothing_to_cache() {
    let dir = config_dir(&[("lc.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = start(
        &redis,
        &dir,
        &[
            ("LOCAL_CACHE_SIZE_IN_BYTES", "1048576"),
            ("STRICT_CHARGING", "true"),
        ],
    );
    ensure_window_room(60, Duration::from_secs(10)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.extend(statuses(&ask(&rl, &[&[("k", "v")]]).await));
    }
    assert_eq!(got, [(OK, 1), (OK, 0), (OVER, 0)]);
    assert_eq!(redis.command(&["GET", &minute_key("k_v")]), "$1\r\n2\r\n");
    let r = ask(&rl, &[&[("k", "v")], &[("other", "x")]]).await;
    assert_eq!(statuses(&r), [(OVER, 0), (OK, 5)]);
    assert_eq!(redis.command(&["GET", &minute_key("other_x")]), "$-1\r\n");
    let text = http_get(&rl.http, "/metrics").1;
    assert_eq!(
        sample(
            &text,
            "ratelimit_service_rate_limit_over_limit_with_local_cache",
            &[("domain", "lc"), ("key1", "k")]
        ),
        Some(0.0)
    );
}
