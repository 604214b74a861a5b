//! Hardening, against the real binary (and a real redis-server where the defect involves it):
//! counters that saturate instead of failing, every call counted once (cancelled ones too),
//! load shedding, HTTP/2 stream limits, silent connections, slow headers, file-descriptor
//! exhaustion, settings refused at start-up, and backend errors logged once per stretch.
//! docs/resilience.md has the measurements behind each case.
#![allow(clippy::unwrap_used)]
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;
use tonic::Code as GrpcCode;

const RULES: &str = r#"
domain: res
descriptors:
  - key: a
    rate_limit: {unit: hour, requests_per_unit: 5}
  - key: b
    rate_limit: {unit: hour, requests_per_unit: 5}
"#;

fn metrics(rl: &Ratelimitd) -> String {
    let (status, body) = http_get(&rl.http, "/metrics");
    assert_eq!(status, 200);
    body
}

fn value(rl: &Ratelimitd, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&metrics(rl), name, labels).unwrap_or(0.0)
}

/// Polls `/metrics` until `name{labels}` equals `want` (10 s guard), then returns it.
fn wait_metric(rl: &Ratelimitd, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = value(rl, name, labels);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const SRL: &str = "ShouldRateLimit";

async fn oversized_costs(rl: &Ratelimitd) {
    let mut c = rl.client().await;
    let mut req = request("res", &[&[("a", "x")], &[("b", "y")]]);
    // 2^63 + 5: more than a Redis counter can hold.
    req.descriptors[0].hits_addend = Some((1u64 << 63) + 5);
    let r = c.should_rate_limit(req).await.unwrap().into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].limit_remaining, 4);
    // A cost above the limit is refused and consumes nothing: the counter is untouched and
    // every later call is answered from it.
    for remaining in [4, 3, 2] {
        let r = c
            .should_rate_limit(request("res", &[&[("a", "x")]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, remaining);
    }
    // Addends near the top: refused every time, never failing the key.
    let mut req = request("res", &[&[("b", "z")]]);
    req.descriptors[0].hits_addend = Some(i64::MAX as u64 - 1);
    for _ in 0..3 {
        let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
        assert_eq!(r.overall_code, Code::OverLimit as i32);
    }
    let r = c
        .should_rate_limit(request("res", &[&[("b", "y")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 3, "b=y counted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_costs_are_refused_without_charging_in_memory() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    ensure_window_room(3600, Duration::from_secs(10)).await;
    oversized_costs(&rl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_costs_are_refused_without_charging_in_redis() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path()).redis(&redis).start();
    ensure_window_room(3600, Duration::from_secs(10)).await;
    oversized_costs(&rl).await;
    let now = unix_now();
    let key = format!("res_a_x_{}", now / 3600 * 3600);
    // Only the three ordinary hits: the oversized cost was never added.
    assert_eq!(redis.command(&["GET", &key]), "$1\r\n3\r\n");
    let ttl = redis.command(&["TTL", &key]);
    let ttl: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
    assert!(ttl > 0, "the counter expires (TTL {ttl})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_error_text_stays_in_the_log() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path()).redis(&redis).start();
    ensure_window_room(3600, Duration::from_secs(10)).await;
    let now = unix_now();
    // Someone else's list under our key: INCRBY answers WRONGTYPE.
    let key = format!("res_a_w_{}", now / 3600 * 3600);
    redis.command(&["LPUSH", &key, "x"]);
    let mut c = rl.client().await;
    let e = c
        .should_rate_limit(request("res", &[&[("a", "w")]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), GrpcCode::Unavailable);
    assert_eq!(
        e.message(),
        "rate limit backend unavailable (error response)"
    );
    assert!(rl.log().contains("WRONGTYPE"), "{}", rl.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_are_counted_once_and_in_flight_returns_to_zero() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_TIMEOUT", "30s")
        .start();
    let mut c = rl.client().await;
    c.should_rate_limit(request("res", &[&[("a", "warm")]]))
        .await
        .unwrap();
    redis.pause();
    // Envoy's deadline, 100 ms here: the client gives up and resets each stream.
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            let call = c.should_rate_limit(request("res", &[&[("a", &format!("c{i}"))]]));
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err()
        }));
    }
    for call in calls {
        assert!(call.await.unwrap(), "the call was cut off by the deadline");
    }
    let total = wait_metric(
        &rl,
        "ratelimit_service_total_requests",
        &[("grpc_method", SRL)],
        21.0,
    );
    redis.resume();
    assert_eq!(total, 21.0, "the warm-up call and 20 cancelled calls");
    let m = metrics(&rl);
    let get = |name, labels: &[(&str, &str)]| sample(&m, name, labels);
    assert_eq!(
        get(
            "ratelimit_service_should_rate_limit_error",
            &[("err_type", "cancelled")]
        ),
        Some(20.0)
    );
    assert_eq!(get("ratelimitd_backend_requests_in_flight", &[]), Some(0.0));
    assert_eq!(get("ratelimitd_calls_in_flight", &[]), Some(0.0));
    assert_eq!(
        get(
            "ratelimit_service_response_time_seconds_count",
            &[("grpc_method", SRL)]
        ),
        Some(21.0)
    );
    assert_eq!(
        get("ratelimitd_backend_request_duration_seconds_count", &[]),
        Some(21.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_max_concurrent_calls_are_shed_at_once() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_TIMEOUT", "30s")
        .env("MAX_CONCURRENT_CALLS", "4")
        .start();
    let c = rl.client().await;
    ensure_window_room(3600, Duration::from_secs(30)).await;
    redis.pause();
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = c.clone();
        held.push(tokio::spawn(async move {
            c.should_rate_limit(request("res", &[&[("a", &format!("h{i}"))]]))
                .await
        }));
    }
    assert_eq!(
        wait_metric(&rl, "ratelimitd_calls_in_flight", &[], 4.0),
        4.0
    );
    let started = Instant::now();
    let e = c
        .clone()
        .should_rate_limit(request("res", &[&[("a", "late")]]))
        .await
        .unwrap_err();
    eprintln!("shed after {:?}", started.elapsed());
    assert_eq!(e.code(), GrpcCode::ResourceExhausted);
    assert_eq!(
        e.message(),
        "too many calls in flight (MAX_CONCURRENT_CALLS=4); retry later"
    );
    redis.resume();
    for h in held {
        let r = h.await.unwrap().unwrap().into_inner();
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    let m = metrics(&rl);
    assert_eq!(sample(&m, "ratelimitd_calls_shed_total", &[]), Some(1.0));
    assert_eq!(
        sample(
            &m,
            "ratelimit_service_should_rate_limit_error",
            &[("err_type", "overloaded")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&m, "ratelimitd_calls_in_flight", &[]), Some(0.0));
}

/// The server's first SETTINGS frame on a fresh HTTP/2 connection, as (id, value) pairs.
fn server_settings(addr: &str) -> Vec<(u16, u32)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let mut header = [0u8; 9];
    s.read_exact(&mut header).unwrap();
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    assert_eq!(header[3], 0x4, "the server speaks first with SETTINGS");
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

#[test]
fn the_stream_limit_is_advertised() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3; the default is 1024.
    assert!(server_settings(&rl.grpc).contains(&(0x3, 1024)));
    let rl = Ratelimitd::builder(dir.path())
        .env("GRPC_MAX_CONCURRENT_STREAMS", "77")
        .start();
    assert!(server_settings(&rl.grpc).contains(&(0x3, 77)));
}

/// Reads until the peer closes (Ok) or `limit` passes (Err).
fn closed_within(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, std::io::Error> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).map(|_| got)
}

#[test]
fn a_silent_connection_is_closed_after_the_opening_timeout() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("CONNECTION_OPENING_TIMEOUT", "1s")
        .start();
    for addr in [&rl.grpc, &rl.http] {
        let mut s = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        // gRPC's side of the handshake (its SETTINGS frame) may come first; then the close.
        closed_within(&mut s, Duration::from_secs(10)).expect("closed by the server");
        eprintln!("{addr}: closed after {:?}", started.elapsed());
    }
}

#[test]
fn a_silent_connection_does_not_hold_the_drain() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let mut rl = Ratelimitd::builder(dir.path())
        .env("CONNECTION_OPENING_TIMEOUT", "60s")
        .env("DRAIN_TIMEOUT", "60s")
        .start();
    let _grpc = TcpStream::connect(&rl.grpc).unwrap();
    let _http = TcpStream::connect(&rl.http).unwrap();
    // Let both be accepted before the signal.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    rl.signal("TERM");
    let status = rl
        .wait_exit(Duration::from_secs(15))
        .expect("exited long before DRAIN_TIMEOUT");
    assert!(status.success(), "{status}");
    eprintln!("drained in {:?}", started.elapsed());
}

#[test]
fn admin_request_headers_must_arrive_in_time() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("HTTP_HEADER_READ_TIMEOUT", "1s")
        .start();
    let mut s = TcpStream::connect(&rl.http).unwrap();
    // A request line and one header, then nothing: a slow-headers client.
    s.write_all(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let got = closed_within(&mut s, Duration::from_secs(10)).expect("closed by the server");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "closed, or 408: {got}"
    );
    // The listener still serves.
    assert_eq!(http_get(&rl.http, "/healthcheck"), (200, "OK".into()));
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_backs_off_logs_and_recovers() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .nofile_limit(64)
        .env("CONNECTION_OPENING_TIMEOUT", "60s")
        .start();
    let in_use = std::fs::read_dir(format!("/proc/{}/fd", rl.pid()))
        .unwrap()
        .count();
    // Enough silent connections to use every descriptor left, and some to wait in the backlog.
    let held: Vec<TcpStream> = (0..(64 - in_use + 16))
        .map(|_| TcpStream::connect(&rl.grpc).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(rl.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(rl.pid()) - before;
    // A retry loop without pause burns ~200 ticks (one core) in 2 s.
    assert!(
        used < 50,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    let log = rl.log();
    let lines = log.matches("cannot accept connections").count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
    drop(held);
    let mut c = rl.client().await;
    let r = c
        .should_rate_limit(request("res", &[&[("a", "fd")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(
        value(
            &rl,
            "ratelimitd_accept_errors_total",
            &[("listener", "grpc")]
        ) >= 1.0,
        "accept errors counted"
    );
    assert!(
        rl.log().contains("accepting connections again"),
        "{}",
        rl.log()
    );
}

#[test]
fn invalid_settings_refuse_to_start_naming_the_setting() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let cases = [
        (
            "NEAR_LIMIT_RATIO",
            "1.5",
            "NEAR_LIMIT_RATIO must be in (0, 1], got 1.5",
        ),
        (
            "NEAR_LIMIT_RATIO",
            "0",
            "NEAR_LIMIT_RATIO must be in (0, 1], got 0",
        ),
        (
            "NEAR_LIMIT_RATIO",
            "most",
            "NEAR_LIMIT_RATIO must be a number in (0, 1]",
        ),
        (
            "RELOAD_DEBOUNCE",
            "1000000h",
            "RELOAD_DEBOUNCE must be at most 3600s",
        ),
        (
            "REDIS_TIMEOUT",
            "0s",
            "REDIS_TIMEOUT must be greater than zero",
        ),
        (
            "REDIS_TIMEOUT",
            "soon",
            "REDIS_TIMEOUT: invalid number in duration 'soon'",
        ),
        (
            "EXPIRATION_JITTER_MAX_SECONDS",
            "99999999999",
            "EXPIRATION_JITTER_MAX_SECONDS must be an integer from 0 to 31536000",
        ),
        (
            "MAX_CONCURRENT_CALLS",
            "0",
            "MAX_CONCURRENT_CALLS must be an integer of at least 1",
        ),
        (
            "GRPC_MAX_CONCURRENT_STREAMS",
            "-1",
            "GRPC_MAX_CONCURRENT_STREAMS must be an integer of at least 1",
        ),
        (
            "GRPC_MAX_CONNECTION_AGE",
            "0s",
            "GRPC_MAX_CONNECTION_AGE must be greater than zero",
        ),
        (
            "LOG_FORMAT",
            "xml",
            "invalid LOG_FORMAT 'xml' (expected text or json)",
        ),
        (
            "REDIS_SOCKET_TYPE",
            "ftp",
            "invalid REDIS_SOCKET_TYPE 'ftp' (expected tcp or unix)",
        ),
        (
            "STATSD_PROTOCOL",
            "quic",
            "invalid STATSD_PROTOCOL 'quic' (udp or tcp)",
        ),
    ];
    for (name, value, message) in cases {
        let (code, stderr) = serve_expecting_refusal(dir.path(), &[(name, value)]);
        assert_eq!(code, Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(message), "{name}={value}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_are_logged_once_per_stretch() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let mut redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_TIMEOUT", "200ms")
        .start();
    let mut c = rl.client().await;
    c.should_rate_limit(request("res", &[&[("a", "l")]]))
        .await
        .unwrap();
    redis.kill();
    let started = Instant::now();
    for _ in 0..60 {
        let e = c
            .should_rate_limit(request("res", &[&[("a", "l")]]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unavailable);
    }
    // The first failure, then at most one line per 10 s (each call waits for a reconnect
    // attempt here, so the 60 calls take a while).
    let allowed = 1 + started.elapsed().as_secs() / 10;
    let log = rl.log();
    let lines = log.matches("backend error").count() as u64;
    assert!(
        (1..=allowed).contains(&lines),
        "{lines} lines, {allowed} allowed:\n{log}"
    );
    assert_eq!(
        value(
            &rl,
            "ratelimit_service_should_rate_limit_error",
            &[("err_type", "redis_error")]
        ),
        60.0
    );
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .should_rate_limit(request("res", &[&[("a", "l")]]))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "no recovery within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rl.log().matches("backend answering again").count(), 1);
}

#[test]
fn a_routine_start_writes_one_line_at_the_default_level() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let mut rl = Ratelimitd::builder(dir.path())
        .env("LOG_LEVEL", "WARN")
        .start();
    let status = rl.terminate();
    assert!(status.success(), "{status}");
    let log = rl.log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("ratelimitd listening"),
        "{log}"
    );
    // It names the addresses the listeners are on.
    let (grpc, http, debug) = (&rl.grpc, &rl.http, &rl.debug);
    assert!(
        lines[0].contains(&format!(" grpc={grpc} http={http} debug={debug} ")),
        "{log}"
    );
}
