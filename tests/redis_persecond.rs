//! `REDIS_PERSECOND=true` against two real `redis-server`s: per-second limits counted in the
//! per-second Redis only and the others in the main one, under the reference's key names;
//! the charging policies across both; and a per-second Redis down failing only the requests
//! that need it.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, RateLimitResponse,
};
use support::*;
use tonic::Code as GrpcCode;

const RULES: &str = r#"
domain: ps
descriptors:
  - key: sec
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: min
    rate_limit: {unit: minute, requests_per_unit: 3}
"#;

/// Two Redis servers (main, per-second) and a ratelimitd splitting between them.
fn start(extra: &[(&str, &str)]) -> (tempfile::TempDir, RedisServer, RedisServer, Ratelimitd) {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let main = RedisServer::start();
    let per_second = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&main)
        .env("REDIS_PERSECOND", "true")
        .env("REDIS_PERSECOND_SOCKET_TYPE", "tcp")
        .env("REDIS_PERSECOND_URL", &per_second.addr())
        .envs(extra)
        .start();
    (dir, main, per_second, rl)
}

/// Every key in `redis`, sorted.
fn keys(redis: &RedisServer) -> Vec<String> {
    redis.keys()
}

/// A key's count (`None` when absent).
fn count(redis: &RedisServer, key: &str) -> Option<u64> {
    let reply = redis.command(&["GET", key]);
    reply.split("\r\n").nth(1).map(|v| v.parse().unwrap())
}

/// (code, remaining) of every descriptor, and the overall code.
fn answer(r: &RateLimitResponse) -> Answer {
    (
        Code::try_from(r.overall_code).unwrap(),
        r.statuses
            .iter()
            .map(|s| (Code::try_from(s.code).unwrap(), s.limit_remaining))
            .collect(),
    )
}

/// Three requests carrying `sec=a<n>` and `min=b<n>`, within one second: a per-second
/// limit's counts are only predictable within its second, so an attempt crossing into the
/// next is tried again (up to 5 times, with fresh values so it starts from empty counters).
/// Returns the second, the attempt's `n` and the answers.
async fn three_within_one_second(c: &mut Client) -> (u64, u32, Vec<Answer>) {
    for n in 0..5 {
        ensure_window_room(60, Duration::from_secs(3)).await;
        ensure_window_room(1, Duration::from_millis(700)).await;
        let t = unix_now();
        let (s, m) = (format!("a{n}"), format!("b{n}"));
        let mut answers = Vec::new();
        for _ in 0..3 {
            let r = c
                .should_rate_limit(request("ps", &[&[("sec", &s)], &[("min", &m)]]))
                .await
                .unwrap()
                .into_inner();
            answers.push(answer(&r));
        }
        if unix_now() == t {
            return (t, n, answers);
        }
    }
    panic!("no attempt stayed within one second");
}

type Client = ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>;
type Answer = (Code, Vec<(Code, u32)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_counts_in_its_own_redis_under_the_references_key() {
    let (_dir, main, per_second, rl) = start(&[("EXPIRATION_JITTER_MAX_SECONDS", "0")]);
    let mut c = rl.client().await;
    let (t, n, answers) = three_within_one_second(&mut c).await;
    assert_eq!(
        answers,
        [
            (Code::Ok, vec![(Code::Ok, 1), (Code::Ok, 2)]),
            (Code::Ok, vec![(Code::Ok, 0), (Code::Ok, 1)]),
            (Code::OverLimit, vec![(Code::OverLimit, 0), (Code::Ok, 0)]),
        ]
    );
    // The reference's keys, each in its own Redis only (earlier attempts' keys aside).
    let sec_key = format!("ps_sec_a{n}_{t}");
    let min_key = format!("ps_min_b{n}_{}", t / 60 * 60);
    let per_second_keys = keys(&per_second);
    let main_keys = keys(&main);
    assert!(per_second_keys.contains(&sec_key), "{per_second_keys:?}");
    assert!(main_keys.contains(&min_key), "{main_keys:?}");
    assert!(
        per_second_keys.iter().all(|k| k.starts_with("ps_sec_")),
        "{per_second_keys:?}"
    );
    assert!(
        main_keys.iter().all(|k| k.starts_with("ps_min_")),
        "{main_keys:?}"
    );
    // Fixed windows count over-limit hits, as the reference does.
    assert_eq!(count(&per_second, &sec_key), Some(3));
    assert_eq!(count(&main, &min_key), Some(3));
    let ttl = redis_int(&per_second.command(&["TTL", &sec_key]));
    assert!((0..=1).contains(&ttl), "per-second ttl {ttl}");

    // Requests touching one Redis only: each still answered, from its own Redis.
    let r = c
        .should_rate_limit(request("ps", &[&[("min", "only")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer(&r), (Code::Ok, vec![(Code::Ok, 2)]));
    assert!(!keys(&per_second).iter().any(|k| k.contains("only")));

    // The start-up line names both Redis servers.
    let log = rl.log();
    assert!(
        log.contains("connected to redis")
            && log.contains(&format!("per_second_url={}", per_second.addr())),
        "{log}"
    );
    assert!(!log.contains("REDIS_PERSECOND"), "no warning: {log}");
}

/// Fills the per-minute limit of `min=full` (3 calls), then sends it with a fresh per-second
/// descriptor: the request whose per-minute limit goes over. Its time and answer.
async fn over_the_minute(c: &mut Client) -> (u64, RateLimitResponse) {
    ensure_window_room(60, Duration::from_secs(3)).await;
    for _ in 0..3 {
        c.should_rate_limit(request("ps", &[&[("min", "full")]]))
            .await
            .unwrap();
    }
    let t = unix_now();
    let r = c
        .should_rate_limit(request("ps", &[&[("sec", "fresh")], &[("min", "full")]]))
        .await
        .unwrap()
        .into_inner();
    (t, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_when_over_charges_only_the_over_limits_across_both_redis() {
    let (_dir, main, per_second, rl) =
        start(&[("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true")]);
    let mut c = rl.client().await;
    // The per-second limit goes over: only it is charged.
    let (t, n, answers) = three_within_one_second(&mut c).await;
    assert_eq!(
        answers,
        [
            (Code::Ok, vec![(Code::Ok, 1), (Code::Ok, 2)]),
            (Code::Ok, vec![(Code::Ok, 0), (Code::Ok, 1)]),
            (Code::OverLimit, vec![(Code::OverLimit, 0), (Code::Ok, 1)]),
        ]
    );
    assert_eq!(count(&per_second, &format!("ps_sec_a{n}_{t}")), Some(3));
    assert_eq!(
        count(&main, &format!("ps_min_b{n}_{}", t / 60 * 60)),
        Some(2)
    );

    // The per-minute limit goes over: the per-second one is left alone (no key written).
    let (t, r) = over_the_minute(&mut c).await;
    assert_eq!(
        answer(&r),
        (Code::OverLimit, vec![(Code::Ok, 2), (Code::OverLimit, 0)])
    );
    assert!(
        !keys(&per_second).iter().any(|k| k.contains("fresh")),
        "{:?}",
        keys(&per_second)
    );
    assert_eq!(
        count(&main, &format!("ps_min_full_{}", t / 60 * 60)),
        Some(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_charging_is_all_or_nothing_across_both_redis() {
    let (_dir, main, per_second, rl) = start(&[("STRICT_CHARGING", "true")]);
    let mut c = rl.client().await;
    // The per-second limit would go over: refused, and nothing charged in either Redis.
    let (t, n, answers) = three_within_one_second(&mut c).await;
    assert_eq!(
        answers,
        [
            (Code::Ok, vec![(Code::Ok, 1), (Code::Ok, 2)]),
            (Code::Ok, vec![(Code::Ok, 0), (Code::Ok, 1)]),
            (Code::OverLimit, vec![(Code::OverLimit, 0), (Code::Ok, 1)]),
        ]
    );
    assert_eq!(count(&per_second, &format!("ps_sec_a{n}_{t}")), Some(2));
    assert_eq!(
        count(&main, &format!("ps_min_b{n}_{}", t / 60 * 60)),
        Some(2)
    );

    // The per-minute limit would go over: the per-second one is not charged either.
    let (t, r) = over_the_minute(&mut c).await;
    assert_eq!(
        answer(&r),
        (Code::OverLimit, vec![(Code::Ok, 2), (Code::OverLimit, 0)])
    );
    assert!(!keys(&per_second).iter().any(|k| k.contains("fresh")));
    assert_eq!(
        count(&main, &format!("ps_min_full_{}", t / 60 * 60)),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_second_redis_down_fails_only_the_requests_that_need_it() {
    let (_dir, main, mut per_second, rl) = start(&[("REDIS_PERSECOND_TIMEOUT", "500ms")]);
    let mut c = rl.client().await;
    ensure_window_room(60, Duration::from_secs(10)).await;
    per_second.kill();
    for descriptors in [
        &[&[("sec", "x")][..]][..],
        &[&[("sec", "x")][..], &[("min", "z")][..]][..],
    ] {
        let call = c.should_rate_limit(request("ps", descriptors));
        let e = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("answered within the guard")
            .unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
    }
    // The two servers are asked concurrently: the failed request was still counted in the
    // main one, as the reference (which sends to both) counts it.
    let window = unix_now() / 60 * 60;
    assert_eq!(count(&main, &format!("ps_min_z_{window}")), Some(1));
    for remaining in [2, 1] {
        let r = c
            .should_rate_limit(request("ps", &[&[("min", "y")]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer(&r), (Code::Ok, vec![(Code::Ok, remaining)]));
    }
    // The log names which Redis failed.
    let log = rl.log();
    assert!(
        log.contains("per-second Redis (REDIS_PERSECOND_URL): "),
        "{log}"
    );
}

/// Parses a RESP integer reply (`:42\r\n`).
fn redis_int(reply: &str) -> i64 {
    reply.trim_start_matches(':').trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_follows_both_redis() {
    let (_dir, _main, mut per_second, rl) = start(&[
        ("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "true"),
        ("REDIS_PERSECOND_TIMEOUT", "300ms"),
    ]);
    assert_eq!(http_get(&rl.http, "/healthcheck"), (200, "OK".to_owned()));
    per_second.kill();
    wait_for_health(&rl, 500).await;
    per_second.restart();
    wait_for_health(&rl, 200).await;
}

#[test]
fn the_memory_backend_ignores_it_with_a_warning() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("BACKEND_TYPE", "memory")
        .env("REDIS_PERSECOND", "true")
        .start();
    let log = rl.log();
    assert!(
        log.contains(
            "REDIS_PERSECOND applies to the redis backend only; ignored by the in-memory one"
        ),
        "{log}"
    );
}

/// Waits up to 10 s for `/healthcheck` to answer `status`.
async fn wait_for_health(rl: &Ratelimitd, status: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(&rl.http, "/healthcheck").0 != status {
        assert!(
            std::time::Instant::now() < deadline,
            "/healthcheck not {status} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
