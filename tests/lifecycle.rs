//! Lifecycle: health transitions (shutdown, backend reachability, first config), SIGTERM with
//! calls in flight, and gRPC on a Unix socket.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::{Duration, Instant};

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient,
};
use support::*;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const RULES: &str = "domain: lc\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 1000}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_health_off_at_once_and_lets_calls_in_flight_finish() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let mut rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("DRAIN_TIMEOUT", "10s")
        .start();
    let channel = rl.channel().await;

    // Watches opened before the signal see SERVING, then NOT_SERVING as soon as it arrives:
    // for the server as a whole and for `ratelimit`, the name the reference reports under.
    let mut health = HealthClient::new(channel.clone());
    let mut watches = Vec::new();
    for service in ["", "ratelimit"] {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            watch.message().await.unwrap().unwrap().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
        watches.push((service, watch));
    }

    // Redis stalls (SIGSTOP), so the next calls are in flight when SIGTERM arrives.
    redis.pause();
    let mut calls = Vec::new();
    for _ in 0..5 {
        let mut c = RateLimitServiceClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            c.should_rate_limit(request("lc", &[&[("k", "inflight")]]))
                .await
        }));
    }
    wait_for(
        || {
            let (_, m) = http_get(&rl.http, "/metrics");
            sample(&m, "ratelimitd_calls_in_flight", &[]) == Some(5.0)
        },
        "5 calls in flight",
    )
    .await;
    let signalled = Instant::now();
    rl.signal("TERM");
    for (service, watch) in &mut watches {
        let status = tokio::time::timeout(Duration::from_secs(2), watch.message())
            .await
            .unwrap();
        assert_eq!(
            status.unwrap().unwrap().status,
            ServingStatus::NotServing as i32,
            "{service:?}"
        );
    }
    assert!(
        signalled.elapsed() < Duration::from_secs(1),
        "health turned off before the calls finished"
    );
    drop(watches);

    redis.resume();
    for call in calls {
        let r = call.await.unwrap().expect("an in-flight call completes");
        assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
    }
    let exit = rl
        .wait_exit(Duration::from_secs(10))
        .expect("exits after draining");
    assert_eq!(exit.code(), Some(0));
    assert!(
        rl.log().contains("shutdown signal received; draining"),
        "{}",
        rl.log()
    );
    assert!(rl.log().contains("ratelimitd stopped"), "{}", rl.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_health_follows_redis_when_the_active_check_is_on() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let mut redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "true")
        .env("REDIS_TIMEOUT", "300ms")
        .start();
    let mut health = HealthClient::new(rl.channel().await);
    assert_eq!(http_get(&rl.http, "/healthcheck"), (200, "OK".to_owned()));
    assert_grpc_health(&mut health, ServingStatus::Serving).await;

    redis.kill();
    wait_for(
        || http_get(&rl.http, "/healthcheck").0 == 500,
        "unhealthy after redis died",
    )
    .await;
    assert_grpc_health(&mut health, ServingStatus::NotServing).await;

    redis.restart();
    wait_for(
        || http_get(&rl.http, "/healthcheck").0 == 200,
        "healthy after redis came back",
    )
    .await;
    assert_grpc_health(&mut health, ServingStatus::Serving).await;
}

/// The gRPC health service names whose status follows ours: the server as a whole, the RLS
/// service, and `ratelimit`, the name the reference's health checker reports under.
const HEALTH_SERVICES: [&str; 3] = [
    "",
    "envoy.service.ratelimit.v3.RateLimitService",
    "ratelimit",
];

/// `grpc.health.v1.Health/Check` for `service`: its status.
async fn grpc_status(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check for {service:?}: {e}"))
        .into_inner()
        .status
}

/// Every name in [`HEALTH_SERVICES`] reports `want`. The gRPC statuses are published right
/// after the state changes, so a test that saw `/healthcheck` change waits briefly for them.
async fn assert_grpc_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    want: ServingStatus,
) {
    for service in HEALTH_SERVICES {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let got = grpc_status(health, service).await;
            if got == want as i32 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{service:?}: {got} instead of {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_on_a_unix_socket_and_the_file_is_removed_at_shutdown() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let sock_dir = tempfile::TempDir::new().unwrap();
    let sock = sock_dir.path().join("rl.sock");
    let mut rl = Ratelimitd::builder(dir.path())
        .env("GRPC_UDS", sock.to_str().unwrap())
        .start();
    assert_eq!(rl.grpc, format!("unix:{}", sock.display()));
    // The start-up line names the socket as the gRPC address.
    assert!(
        rl.log().contains(&format!("grpc=unix:{} ", sock.display())),
        "{}",
        rl.log()
    );
    assert!(sock.exists());

    // rl.channel() dials the socket (a connector over tokio's UnixStream).
    let r = RateLimitServiceClient::new(rl.channel().await)
        .should_rate_limit(request("lc", &[&[("k", "uds")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 999);

    let status = rl.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket file removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_healthy_with_at_least_one_config_health_follows_the_loaded_domains() {
    let dir = tempfile::TempDir::new().unwrap();
    let rl = Ratelimitd::builder(dir.path())
        .env("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true")
        .start();
    let mut health = HealthClient::new(rl.channel().await);
    assert_eq!(
        http_get(&rl.http, "/healthcheck").0,
        500,
        "no domain loaded yet"
    );
    assert_grpc_health(&mut health, ServingStatus::NotServing).await;
    std::fs::write(dir.path().join("r.yaml"), RULES).unwrap();
    wait_for(
        || http_get(&rl.http, "/healthcheck").0 == 200,
        "healthy once a domain is loaded",
    )
    .await;
    assert_grpc_health(&mut health, ServingStatus::Serving).await;
    std::fs::remove_file(dir.path().join("r.yaml")).unwrap();
    wait_for(
        || http_get(&rl.http, "/healthcheck").0 == 500,
        "unhealthy again with no domain",
    )
    .await;
    assert_grpc_health(&mut health, ServingStatus::NotServing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_get_goaway_at_max_age_and_close_after_the_grace() {
    use std::io::{Read, Write};
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("GRPC_MAX_CONNECTION_AGE", "500ms")
        .env("GRPC_MAX_CONNECTION_AGE_GRACE", "500ms")
        .start();
    // A raw HTTP/2 connection: preface and an empty SETTINGS frame, then read frames.
    let mut s = std::net::TcpStream::connect(&rl.grpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let opened = Instant::now();
    let (mut goaway_at, mut buf) = (None, Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no close within 5 s: {e}"),
        }
        // Walk complete frames: 3 bytes length, 1 byte type (0x7 = GOAWAY), 1 flags, 4 stream.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            if buf[at + 3] == 0x7 && goaway_at.is_none() {
                goaway_at = Some(opened.elapsed());
            }
            if buf[at + 3] == 0x4 && buf[at + 4] & 0x1 == 0 {
                // Acknowledge the server's SETTINGS, as a client must.
                s.write_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                    .unwrap();
            }
            at += 9 + len;
        }
        buf.drain(..at.min(buf.len()));
    }
    let closed = opened.elapsed();
    let goaway = goaway_at.expect("a GOAWAY frame before the close");
    assert!(
        goaway >= Duration::from_millis(400),
        "GOAWAY after the max age, got {goaway:?}"
    );
    assert!(
        closed >= goaway && closed < Duration::from_secs(4),
        "closed after the grace: {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_move_to_new_connections_at_max_age_and_no_accepted_call_fails() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("GRPC_MAX_CONNECTION_AGE", "300ms")
        .env("GRPC_MAX_CONNECTION_AGE_GRACE", "300ms")
        .start();
    let mut c = rl.client().await;
    let started = Instant::now();
    let (mut answered, mut unsent) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(3) {
        let r = c.should_rate_limit(request("lc", &[&[("k", "age")]])).await;
        match r {
            Ok(_) => answered += 1,
            // tonic's client can hand a call to a connection it has just been told (GOAWAY) to
            // leave; the call then fails in the client before it is sent: "connection closed",
            // or h2 refusing to open a stream after the GOAWAY.
            // gRPC calls that never reached the server are safe to retry, and Envoy does not
            // do this (envoy_e2e: envoy_follows_connection_rotation_without_failed_calls).
            // That the server never saw such a call is checked below, by its own count.
            Err(e)
                if (e.code() == tonic::Code::Cancelled
                    && format!("{e:?}").contains("connection closed"))
                    || (e.code() == tonic::Code::Internal
                        && format!("{e:?}").contains("GoAway(b\"\", NO_ERROR, Remote)")) =>
            {
                unsent += 1
            }
            Err(e) => panic!("call {answered} failed across a connection rotation: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(answered > 100, "{answered} calls over about 10 rotations");
    assert!(
        unsent <= 10,
        "{unsent} calls refused in the client, for ~10 rotations"
    );
    // Every call the server took was answered: none failed after reaching it.
    let (_, metrics) = http_get(&rl.http, "/metrics");
    let counted = sample(
        &metrics,
        "ratelimit_service_total_requests",
        &[("grpc_method", "ShouldRateLimit")],
    );
    assert_eq!(
        counted,
        Some(answered as f64),
        "answered {answered}, unsent {unsent}"
    );
}

#[tokio::test]
async fn json_logs_and_no_descriptor_values_above_debug() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "info")
        .start();
    let mut c = rl.client().await;
    c.should_rate_limit(request("lc", &[&[("k", "alice@example.com")]]))
        .await
        .unwrap();
    c.should_rate_limit(request("", &[&[("k", "bob@example.com")]]))
        .await
        .unwrap_err();
    let log = rl.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l["@message"]
            .as_str()
            .is_some_and(|m| m.starts_with("config OK"))),
        "{log}"
    );
    let listening = lines
        .iter()
        .find(|l| l["@message"] == "ratelimitd listening");
    assert!(listening.is_some(), "{log}");
    // The reference's keys (logrus' JSONFormatter as its runner sets it up), sorted as Go
    // writes a map, with the event's fields at the top level naming the listeners' addresses.
    let listening = listening.unwrap().as_object().unwrap();
    let keys: Vec<&str> = listening.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "@message",
            "@timestamp",
            "backend",
            "debug",
            "grpc",
            "http",
            "level",
            "prometheus"
        ],
        "{log}"
    );
    assert_eq!(listening["level"], "warning", "{log}");
    assert_eq!(
        (&listening["grpc"], &listening["http"], &listening["debug"]),
        (
            &serde_json::json!(rl.grpc),
            &serde_json::json!(rl.http),
            &serde_json::json!(rl.debug)
        ),
        "{log}"
    );
    // Go's time.RFC3339Nano, in UTC: 2026-11-29T15:52:07.123456789Z, trailing zeros dropped.
    let ts = listening["@timestamp"].as_str().unwrap();
    let (whole, fraction) = ts.strip_suffix('Z').unwrap().split_at(19);
    assert!(
        whole.len() == 19
            && whole.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                10 => b == b'T',
                13 | 16 => b == b':',
                _ => b.is_ascii_digit(),
            })
            && (fraction.is_empty()
                || (fraction.len() <= 10
                    && fraction.starts_with('.')
                    && fraction[1..].bytes().all(|b| b.is_ascii_digit())
                    && !fraction.ends_with('0'))),
        "{ts}"
    );
    let now = unix_now();
    let logged = unix_of(whole);
    assert!(logged.abs_diff(now) < 120, "{ts} vs now {now}");
    // Every line carries the same three keys, and levels in logrus' names.
    for line in &lines {
        assert!(
            line["@timestamp"].is_string() && line["@message"].is_string(),
            "{line}"
        );
        assert!(
            ["debug", "info", "warning", "error"].contains(&line["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(
            line.get("fields").is_none() && line.get("timestamp").is_none(),
            "{line}"
        );
    }
    assert!(
        !log.contains("alice@example.com") && !log.contains("bob@example.com"),
        "{log}"
    );
}

/// Seconds since the epoch of a UTC `YYYY-MM-DDTHH:MM:SS` (Howard Hinnant's
/// `days_from_civil`), to check a logged time against the clock.
fn unix_of(datetime: &str) -> u64 {
    let n = |range: std::ops::Range<usize>| datetime[range].parse::<u64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let y = if m <= 2 { y - 1 } else { y };
    let (era, yoe) = (y / 400, y % 400);
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3_600 + n(14..16) * 60 + n(17..19)
}
