//! The Redis backend against a real `redis-server`: the reference's key layout and TTLs,
//! authentication and URL forms, and failure handling (Redis killed, hung, or not up yet:
//! UNAVAILABLE within REDIS_TIMEOUT, then recovery once it is back).
#![allow(clippy::unwrap_used)]
mod support;

use std::time::{Duration, Instant};

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use support::*;
use tonic::transport::Channel;
use tonic::Code as GrpcCode;

const RULES: &str = r#"
domain: rd
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: files
    value: /public/*
    share_threshold: true
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 2}
"#;

/// A Redis and a ratelimitd using it with the given `REDIS_TIMEOUT`.
fn with_redis_timeout(timeout: &str) -> (tempfile::TempDir, RedisServer, Ratelimitd) {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_TIMEOUT", timeout)
        .start();
    (dir, redis, rl)
}

/// Parses a RESP integer reply (`:42\r\n`).
fn int(reply: &str) -> i64 {
    reply
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an integer reply: {reply:?}"))
}

#[tokio::test]
async fn keys_and_ttls_are_the_references() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("CACHE_KEY_PREFIX", "pre:")
        .env("EXPIRATION_JITTER_MAX_SECONDS", "0")
        .start();
    ensure_window_room(60, Duration::from_secs(5)).await;
    let mut c = rl.client().await;
    c.should_rate_limit(request("rd", &[&[("k", "v")]]))
        .await
        .unwrap();
    c.should_rate_limit(request("rd", &[&[("k", "v")]]))
        .await
        .unwrap();
    let key = format!("pre:rd_k_v_{}", unix_now() / 60 * 60);
    assert_eq!(redis.command(&["GET", &key]), "$1\r\n2\r\n");
    let ttl = int(&redis.command(&["TTL", &key]));
    assert!(
        (1..=60).contains(&ttl),
        "ttl {ttl} without jitter is at most the window"
    );

    // share_threshold: every value under the wildcard shares one counter, keyed by pattern.
    for file in ["/public/a.txt", "/public/b.txt"] {
        c.should_rate_limit(request("rd", &[&[("files", file), ("user", "alice")]]))
            .await
            .unwrap();
    }
    let shared = format!(
        "pre:rd_files_/public/*_user_alice_{}",
        unix_now() / 3600 * 3600
    );
    assert_eq!(redis.command(&["GET", &shared]), "$1\r\n2\r\n");
    let r = c
        .should_rate_limit(request(
            "rd",
            &[&[("files", "/public/c.txt"), ("user", "alice")]],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
}

/// `CACHE_KEY_HASH_SECRET_FILE`: the value is written as its keyed hash (the one pinned in
/// `limiter::key`'s unit tests for this secret and value), the rest of the key stays readable,
/// and counting is unchanged.
#[tokio::test]
async fn hashed_values_keep_secrets_out_of_redis_keys() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let secret_dir = tempfile::TempDir::new().unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef-test-secret\n").unwrap();
    let secret = secret.to_str().unwrap();
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("CACHE_KEY_PREFIX", "pre:")
        .env("CACHE_KEY_HASH_SECRET_FILE", secret)
        .start();
    ensure_window_room(60, Duration::from_secs(5)).await;
    let mut c = rl.client().await;
    // Rule `k`: 3 per minute.
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = c
            .should_rate_limit(request("rd", &[&[("k", "sk_live_SECRET123")]]))
            .await
            .unwrap()
            .into_inner();
        codes.push(Code::try_from(r.overall_code).unwrap());
    }
    assert_eq!(
        codes,
        [Code::Ok, Code::Ok, Code::Ok, Code::OverLimit],
        "limits still apply"
    );

    let key = format!(
        "pre:rd_k_693b4e4066a440e2bae1744c814b3c6d_{}",
        unix_now() / 60 * 60
    );
    assert_eq!(
        redis.command(&["KEYS", "*"]),
        format!("*1\r\n${}\r\n{key}\r\n", key.len()),
        "exactly one key, hashed"
    );
    assert_eq!(redis.command(&["KEYS", "*SECRET123*"]), "*0\r\n");
    assert_eq!(redis.command(&["GET", &key]), "$1\r\n4\r\n");
    assert!(!rl.log().contains("SECRET123"), "{}", rl.log());

    // /explain and `ratelimitd explain` with the same settings print the key the server wrote.
    let (status, body) = http_get(
        &rl.debug,
        "/explain?domain=rd&descriptor=k=sk_live_SECRET123",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("counter key: {key} ")), "{body}");
    let config = dir.path().to_str().unwrap();
    let (code, out, err) = run_cli(&[
        "explain",
        "--config",
        config,
        "--domain",
        "rd",
        "--cache-key-prefix",
        "pre:",
        "--cache-key-hash-secret-file",
        secret,
        "k=sk_live_SECRET123",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("counter key: {key} ")), "{out}");
}

#[tokio::test]
async fn expiration_jitter_extends_ttl_by_at_most_the_setting() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path()).redis(&redis).start(); // default jitter: 300 s
    let mut c = rl.client().await;
    let mut ttls = Vec::new();
    for v in 0..20 {
        c.should_rate_limit(request("rd", &[&[("k", &v.to_string())]]))
            .await
            .unwrap();
        let key = format!("rd_k_{v}_{}", unix_now() / 60 * 60);
        ttls.push(int(&redis.command(&["TTL", &key])));
    }
    assert!(ttls.iter().all(|t| (1..=360).contains(t)), "{ttls:?}");
    assert!(ttls.iter().any(|t| *t > 60), "jitter applied: {ttls:?}");
}

#[tokio::test]
async fn auth_and_url_forms() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_AUTH", "s3cret")
        .start();
    let r = rl
        .client()
        .await
        .should_rate_limit(request("rd", &[&[("k", "a")]]))
        .await;
    assert_eq!(r.unwrap().into_inner().statuses[0].limit_remaining, 2);

    let url = format!("redis://:s3cret@127.0.0.1:{}/0", redis.port);
    let rl = Ratelimitd::builder(dir.path())
        .env("REDIS_URL", &url)
        .start();
    let r = rl
        .client()
        .await
        .should_rate_limit(request("rd", &[&[("k", "a")]]))
        .await;
    assert_eq!(
        r.unwrap().into_inner().statuses[0].limit_remaining,
        1,
        "REDIS_URL alone selects redis"
    );

    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_AUTH", "wrong")
        .env("REDIS_TIMEOUT", "1s")
        .start();
    let e = rl
        .client()
        .await
        .should_rate_limit(request("rd", &[&[("k", "a")]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
}

/// The first status's remaining count for `k=value` in domain `rd`.
async fn remaining(rl: &Ratelimitd, value: &str) -> Result<u32, tonic::Status> {
    let r = rl
        .client()
        .await
        .should_rate_limit(request("rd", &[&[("k", value)]]))
        .await?;
    Ok(r.into_inner().statuses[0].limit_remaining)
}

/// An ACL user (`user:password` in REDIS_AUTH or the URL), a database other than 0 (the URL's
/// path) and a Unix socket: what ratelimitd says when it opens a connection, and where.
#[tokio::test]
async fn acl_users_databases_and_unix_sockets() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let sockets = tempfile::TempDir::new().unwrap();
    let socket = sockets.path().join("redis.sock");
    let socket = socket.to_str().unwrap();
    let redis = RedisServer::start_with(&[
        "--requirepass",
        "admin-pw",
        "--unixsocket",
        socket,
        "--unixsocketperm",
        "700",
        "--user",
        "alice",
        "on",
        ">alice-pw",
        "~*",
        "&*",
        "+@all",
    ]);
    let over_socket = Ratelimitd::builder(dir.path())
        .env("BACKEND_TYPE", "redis")
        .env("REDIS_SOCKET_TYPE", "unix")
        .env("REDIS_URL", socket)
        .env("REDIS_AUTH", "alice:alice-pw")
        .start();
    assert_eq!(remaining(&over_socket, "unix").await.unwrap(), 2);
    assert_eq!(remaining(&over_socket, "unix").await.unwrap(), 1);

    let url = format!("redis://alice:alice-pw@127.0.0.1:{}/2", redis.port);
    let in_db2 = Ratelimitd::builder(dir.path())
        .env("REDIS_URL", &url)
        .start();
    assert_eq!(remaining(&in_db2, "db2").await.unwrap(), 2);
    let keyspace = redis.command(&["INFO", "keyspace"]);
    assert!(keyspace.contains("db0:keys=1,"), "{keyspace}");
    assert!(keyspace.contains("db2:keys=1,"), "{keyspace}");

    // A user Redis does not know: every call fails, none is counted.
    let stranger = Ratelimitd::builder(dir.path())
        .env(
            "REDIS_URL",
            &format!("redis://bob:pw@127.0.0.1:{}/0", redis.port),
        )
        .env("REDIS_TIMEOUT", "1s")
        .start();
    for _ in 0..3 {
        let e = remaining(&stranger, "bob").await.unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
    }
    assert!(
        stranger.log().contains("WRONGPASS"),
        "the server's refusal is logged:\n{}",
        stranger.log()
    );
    assert_eq!(remaining(&in_db2, "db2").await.unwrap(), 1);
}

/// A frozen Redis (SIGSTOP): calls fail UNAVAILABLE after REDIS_TIMEOUT, the connection they
/// were waiting on is closed rather than waited on, and once Redis thaws calls are served
/// again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_fails_calls_at_the_timeout_then_a_new_connection_serves() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_TIMEOUT", "300ms")
        .env("REDIS_POOL_SIZE", "1")
        .start();
    let mut c = rl.client().await;
    let call = |c: &mut RateLimitServiceClient<Channel>, v: &'static str| {
        let mut c = c.clone();
        async move { c.should_rate_limit(request("rd", &[&[("k", v)]])).await }
    };
    assert!(call(&mut c, "f").await.is_ok());
    let before = redis.scripting_clients();
    assert_eq!(before.len(), 1, "{before:?}");

    redis.pause();
    let started = Instant::now();
    let calls: Vec<_> = (0..8).map(|_| tokio::spawn(call(&mut c, "f"))).collect();
    for task in calls {
        let e = task.await.unwrap().unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "every call failed at REDIS_TIMEOUT (300 ms), not later: {waited:?}"
    );
    redis.resume();

    let deadline = Instant::now() + Duration::from_secs(5);
    while call(&mut c, "g").await.is_err() {
        assert!(Instant::now() < deadline, "no recovery:\n{}", rl.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = redis.scripting_clients();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(
        after, before,
        "the frozen connection was closed, a new one serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let (_dir, mut redis, rl) = with_redis_timeout("500ms");
    let mut c = rl.client().await;
    ensure_window_room(60, Duration::from_secs(15)).await;
    let ok = c
        .should_rate_limit(request("rd", &[&[("k", "x")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.statuses[0].limit_remaining, 2);

    redis.kill();
    for _ in 0..3 {
        // Bounded by REDIS_TIMEOUT: a 5 s guard turns a hang into a failure.
        let call = c.should_rate_limit(request("rd", &[&[("k", "x")]]));
        let e = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("answered within the guard")
            .unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
        // Redis's own error text stays in our log; the client gets the kind only.
        assert!(
            [
                "rate limit backend unavailable (connection error)",
                "rate limit backend unavailable (timeout)"
            ]
            .contains(&e.message()),
            "{}",
            e.message()
        );
    }

    redis.restart();
    let back = Instant::now();
    let recovered = loop {
        let call = c.should_rate_limit(request("rd", &[&[("k", "x")]]));
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => break r.into_inner(),
            _ if back.elapsed() > Duration::from_secs(10) => panic!("no recovery within 10 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    eprintln!("recovered {:?} after redis restart", back.elapsed());
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "recovery took {:?}",
        back.elapsed()
    );
    // The restarted Redis lost the counter (no persistence): counting starts again, once.
    assert_eq!(recovered.statuses[0].limit_remaining, 2);
    let key = format!("rd_k_x_{}", unix_now() / 60 * 60);
    assert_eq!(redis.command(&["GET", &key]), "$1\r\n1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_bounded_by_redis_timeout() {
    // Accepts connections and never answers: the failure REDIS_TIMEOUT exists for.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in hung.incoming().take(8) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_URL", &format!("127.0.0.1:{port}"))
        .env("REDIS_TIMEOUT", "300ms")
        .start();
    let mut c = rl.client().await;
    let started = Instant::now();
    let call = c.should_rate_limit(request("rd", &[&[("k", "h")]]));
    let e = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("answered within the guard")
        .unwrap_err();
    assert_eq!(e.code(), GrpcCode::Unavailable, "{e:?}");
    eprintln!(
        "hung redis answered UNAVAILABLE after {:?}",
        started.elapsed()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_redis_and_serves_once_it_arrives() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let port = free_port();
    let rl = Ratelimitd::builder(dir.path())
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_URL", &format!("127.0.0.1:{port}"))
        .env("REDIS_TIMEOUT", "500ms")
        .start();
    let mut c = rl.client().await;
    let e = c
        .should_rate_limit(request("rd", &[&[("k", "s")]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), GrpcCode::Unavailable);
    assert!(rl.log().contains("redis not reachable yet"), "{}", rl.log());
    let redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = c.should_rate_limit(request("rd", &[&[("k", "s")]])).await {
            assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served after redis came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_connects_over_tls() {
    let certs = tempfile::TempDir::new().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let openssl = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl not found: install it with `apt-get install -y openssl`");
    assert!(
        openssl.status.success(),
        "{}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    let tls_port = free_port();
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let tls_port_s = tls_port.to_string();
    let _redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port_s,
        "--tls-cert-file",
        cert_s,
        "--tls-key-file",
        key_s,
        "--tls-ca-cert-file",
        cert_s,
        "--tls-auth-clients",
        "no",
    ]);
    let dir = config_dir(&[("r.yaml", RULES)]);
    // A self-signed test certificate: verification is switched off with redis-rs's #insecure.
    let rl = Ratelimitd::builder(dir.path())
        .env(
            "REDIS_URL",
            &format!("rediss://127.0.0.1:{tls_port}/#insecure"),
        )
        .env("REDIS_TIMEOUT", "2s")
        .start();
    let r = rl
        .client()
        .await
        .should_rate_limit(request("rd", &[&[("k", "tls")]]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().statuses[0].limit_remaining, 2);
    assert!(rl.log().contains("connected to redis"), "{}", rl.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_with_traffic_and_an_idle_one_both_recover() {
    let (_dir, mut redis, rl) = with_redis_timeout("500ms");
    let mut c = rl.client().await;

    // Down for 6 s under steady traffic: long enough to exhaust redis-rs's reconnect retries
    // several times over. Every call fails fast with UNAVAILABLE.
    redis.kill();
    let down = Instant::now();
    let mut failures = 0;
    while down.elapsed() < Duration::from_secs(6) {
        let call = c.should_rate_limit(request("rd", &[&[("k", "long")]]));
        let e = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("bounded")
            .unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unavailable);
        failures += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failures >= 10, "{failures} calls during the outage");
    redis.restart();
    let took = first_success_after_restart(&mut c).await;
    eprintln!("recovered {took:?} after a 6 s outage under traffic");
    assert!(took < Duration::from_secs(3), "recovery took {took:?}");

    // Down and idle: nobody calls, so nothing notices until Redis is back.
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart();
    let took = first_success_after_restart(&mut c).await;
    eprintln!("recovered {took:?} after an idle 3 s outage");
    assert!(took < Duration::from_secs(3), "recovery took {took:?}");
}

async fn first_success_after_restart(
    c: &mut ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>,
) -> Duration {
    let back = Instant::now();
    loop {
        let call = c.should_rate_limit(request("rd", &[&[("k", "long")]]));
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => {
                assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
                return back.elapsed();
            }
            _ if back.elapsed() > Duration::from_secs(10) => panic!("no recovery within 10 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
