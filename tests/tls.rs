//! TLS, against real processes with certificates made in the test: gRPC over TLS and mTLS
//! (client CA, SAN), certificate rotation (in place and by a Kubernetes-style symlink swap)
//! with open connections kept, bad files at start-up, and Redis over TLS with a client
//! certificate, the per-second Redis included (Debian's redis-server, built with TLS).
#![allow(clippy::unwrap_used)]
mod support;

use std::{
    os::unix::fs::symlink,
    path::Path,
    time::{Duration, Instant},
};

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient,
};
use support::{certs::*, *};
use tonic::transport::Channel;

const RULES: &str = r#"
domain: tls
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: s
    rate_limit: {unit: second, requests_per_unit: 100}
"#;

/// One call for descriptor `k=v`: its code and the limit's remaining, or the gRPC status.
/// Four calls for one `k` value within a minute: three allowed (`k` is 3 a minute), then over.
const THREE_THEN_OVER: [(Code, u32); 4] = [
    (Code::Ok, 2),
    (Code::Ok, 1),
    (Code::Ok, 0),
    (Code::OverLimit, 0),
];

async fn call(channel: Channel, v: &str) -> Result<(Code, u32), tonic::Status> {
    call_key(channel, "k", v).await
}

/// [`call`] for descriptor `key=v`.
async fn call_key(channel: Channel, key: &str, v: &str) -> Result<(Code, u32), tonic::Status> {
    let reply = RateLimitServiceClient::new(channel)
        .should_rate_limit(request("tls", &[&[(key, v)]]))
        .await?
        .into_inner();
    Ok((reply.overall_code(), reply.statuses[0].limit_remaining))
}

/// Whether a call over a fresh [`tls_channel`] succeeds within 5 s.
async fn accepted(addr: &str, ca: &Ca, identity: Option<&Pair>) -> bool {
    let (channel, _) = tls_channel(addr, &ca.pem, identity);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), call(channel, "probe")).await,
        Ok(Ok(_))
    )
}

/// The harness's client settings for a server whose certificate `ca` issued.
fn client_tls(ca: &Ca, identity: Option<&Pair>) -> ClientTls {
    ClientTls {
        ca: ca.pem.clone(),
        identity: identity.map(|p| (p.cert.clone(), p.key.clone())),
        domain: "localhost".into(),
    }
}

/// Starts ratelimitd serving TLS with `dir/server.crt` and `dir/server.key` plus `env`.
fn start_tls(
    rules: &Path,
    dir: &Path,
    ca: &Ca,
    identity: Option<&Pair>,
    env: &[(&str, &str)],
) -> Ratelimitd {
    Ratelimitd::builder(rules)
        .env("GRPC_SERVER_USE_TLS", "true")
        .env(
            "GRPC_SERVER_TLS_CERT",
            dir.join("server.crt").to_str().unwrap(),
        )
        .env(
            "GRPC_SERVER_TLS_KEY",
            dir.join("server.key").to_str().unwrap(),
        )
        .client_tls(client_tls(ca, identity))
        .envs(env)
        .start()
}

#[tokio::test]
async fn grpc_over_tls_answers_exactly_and_plaintext_is_refused() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    ca.server(1).write(certs.path(), "server");
    let rl = start_tls(
        rules.path(),
        certs.path(),
        &ca,
        None,
        &[("CONNECTION_OPENING_TIMEOUT", "1500ms")],
    );

    ensure_window_room(60, Duration::from_secs(5)).await;
    // A client that connects and stays silent, and one that stalls in mid-handshake, hold
    // up no one else's handshake, and are closed after the opening timeout.
    let mut silent = tokio::net::TcpStream::connect(&rl.grpc).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(&rl.grpc).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        // The first bytes of a TLS ClientHello record, and no more.
        stalled
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
    }
    let started = Instant::now();
    let (channel, seen) = tls_channel(&rl.grpc, &ca.pem, None);
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(call(channel.clone(), "a").await.unwrap());
    }
    assert_eq!(answers, THREE_THEN_OVER);
    assert_eq!(*seen.lock().unwrap(), [vec![1]], "one connection, serial 1");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "served while two handshakes were pending, not after their timeout"
    );
    for conn in [&mut silent, &mut stalled] {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "closed after the opening timeout"
        );
    }
    // tonic's own TLS client (the harness's) as well.
    let mut c = rl.client().await;
    let r = c
        .should_rate_limit(request("tls", &[&[("k", "b")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), Code::Ok);

    // Plaintext gRPC to the TLS port fails.
    let plain = async {
        let channel = grpc_connect(&rl.grpc, None).await?;
        call(channel, "c").await.map_err(Into::into)
    };
    let plain: Result<_, Box<dyn std::error::Error>> =
        tokio::time::timeout(Duration::from_secs(5), plain)
            .await
            .unwrap();
    assert!(plain.is_err(), "a plaintext client must not be served");

    // The admin listener stays plain HTTP; the refused handshake is counted. The client may
    // read the server's alert before the server has counted the failure, so the count is
    // awaited (bounded), not sampled once.
    let refused_by = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let (status, metrics) = http_get(&rl.http, "/metrics");
        assert_eq!(status, 200);
        let refused = sample(
            &metrics,
            "ratelimitd_tls_handshake_errors_total",
            &[("reason", "refused")],
        );
        if refused.unwrap_or(0.0) >= 1.0 {
            break metrics;
        }
        assert!(Instant::now() < refused_by, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let timeouts = sample(
        &metrics,
        "ratelimitd_tls_handshake_errors_total",
        &[("reason", "timeout")],
    );
    assert_eq!(timeouts, Some(2.0), "{metrics}");

    // SIGTERM drains and exits as without TLS, with idle connections still open (their
    // clients keep running here, to answer the server's GOAWAY).
    let mut rl = rl;
    let stopped = Instant::now();
    let status = tokio::task::spawn_blocking(move || rl.terminate())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(stopped.elapsed() < Duration::from_secs(10));
    drop((channel, c));
}

/// ratelimitd requiring client certificates from `ca`; `good` is one it accepts.
struct Mtls {
    rl: Ratelimitd,
    ca: Ca,
    good: Pair,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Starts [`Mtls`] with `env` added.
fn start_mtls(env: &[(&str, &str)]) -> Mtls {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    ca.server(1).write(certs.path(), "server");
    let good = ca.client(&["envoy.example.com"]);
    let ca_file = ca.write(certs.path(), "ca.crt");
    let mut env = env.to_vec();
    env.push(("GRPC_CLIENT_TLS_CACERT", ca_file.to_str().unwrap()));
    let rl = start_tls(rules.path(), certs.path(), &ca, Some(&good), &env);
    Mtls {
        rl,
        ca,
        good,
        _dirs: (rules, certs),
    }
}

#[tokio::test]
async fn mtls_accepts_only_current_client_certificates_from_the_ca() {
    let Mtls {
        rl,
        ca,
        good,
        _dirs,
    } = start_mtls(&[]);
    assert!(accepted(&rl.grpc, &ca, Some(&good)).await);
    assert!(
        !accepted(&rl.grpc, &ca, None).await,
        "no client certificate"
    );
    let stranger = Ca::new("other CA").client(&["envoy.example.com"]);
    assert!(
        !accepted(&rl.grpc, &ca, Some(&stranger)).await,
        "a certificate from another CA"
    );
    let expired = ca.expired_client(&["envoy.example.com"]);
    assert!(
        !accepted(&rl.grpc, &ca, Some(&expired)).await,
        "an expired certificate"
    );
    let (_, metrics) = http_get(&rl.http, "/metrics");
    let refused = sample(
        &metrics,
        "ratelimitd_tls_handshake_errors_total",
        &[("reason", "refused")],
    );
    assert!(refused.unwrap_or(0.0) >= 3.0, "{metrics}");
}

#[tokio::test]
async fn per_core_runtimes_each_handshake_and_count_together() {
    let Mtls {
        rl,
        ca,
        good,
        _dirs,
    } = start_mtls(&[("RUNTIME_FLAVOR", "per_core"), ("WORKER_THREADS", "2")]);
    ensure_window_room(60, Duration::from_secs(5)).await;
    // Four connections, handed to the two runtimes in turn, share one counter (3 a minute).
    let mut answers = Vec::new();
    for _ in 0..4 {
        let (channel, _) = tls_channel(&rl.grpc, &ca.pem, Some(&good));
        answers.push(call(channel, "per-core").await.unwrap());
    }
    assert_eq!(answers, THREE_THEN_OVER);
    // Clients without a certificate are refused on each runtime, and counted.
    for _ in 0..2 {
        assert!(
            !accepted(&rl.grpc, &ca, None).await,
            "no client certificate"
        );
    }
    let (_, metrics) = http_get(&rl.http, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "ratelimitd_tls_handshake_errors_total",
            &[("reason", "refused")],
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_client_san_is_required_and_envoy_gateways_ca_setting_is_accepted() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    ca.server(1).write(certs.path(), "server");
    let good = ca.client(&["envoy.example.com"]);
    let ca_path = ca.write(certs.path(), "ca.crt");
    let rl = start_tls(
        rules.path(),
        certs.path(),
        &ca,
        Some(&good),
        &[
            ("GRPC_SERVER_TLS_CA_CERT", ca_path.to_str().unwrap()),
            // The same file under both names is fine.
            ("GRPC_CLIENT_TLS_CACERT", ca_path.to_str().unwrap()),
            ("GRPC_CLIENT_TLS_SAN", "envoy.example.com"),
        ],
    );
    assert!(accepted(&rl.grpc, &ca, Some(&good)).await);
    let other = ca.client(&["other.example.com"]);
    assert!(!accepted(&rl.grpc, &ca, Some(&other)).await, "SAN mismatch");
    assert!(
        !accepted(&rl.grpc, &ca, None).await,
        "no client certificate"
    );
}

/// Waits until a new connection is served the certificate with `serial`.
async fn wait_for_serial(addr: &str, ca: &Ca, serial: u8, rl: &Ratelimitd) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (channel, seen) = tls_channel(addr, &ca.pem, None);
        let _ = tokio::time::timeout(Duration::from_secs(5), call(channel, "probe")).await;
        if seen.lock().unwrap().last() == Some(&vec![serial]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serial {serial} not served within 20 s; log:\n{}",
            rl.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces `path` with `contents` atomically (write beside, rename over).
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rotated_files_serve_new_connections_and_open_ones_keep_working() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    ca.server(1).write(certs.path(), "server");
    let rl = start_tls(rules.path(), certs.path(), &ca, None, &[]);
    let (open, seen) = tls_channel(&rl.grpc, &ca.pem, None);
    call(open.clone(), "open").await.unwrap();

    // Key first, then certificate: between the two the pair does not match, which must be
    // logged and leave serial 1 in force, not break anything.
    let second = ca.server(2);
    replace(&certs.path().join("server.key"), &second.key);
    replace(&certs.path().join("server.crt"), &second.cert);
    wait_for_serial(&rl.grpc, &ca, 2, &rl).await;
    // The connection opened before the rotation still serves calls, on the old certificate.
    for _ in 0..3 {
        call(open.clone(), "open").await.unwrap();
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [vec![1]],
        "the open connection was kept"
    );

    // An invalid replacement is refused; the last good certificate stays.
    replace(
        &certs.path().join("server.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rl.log().contains("new gRPC TLS files do not load") {
        assert!(Instant::now() < deadline, "no error logged:\n{}", rl.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_serial(&rl.grpc, &ca, 2, &rl).await;
    call(open, "open").await.unwrap();
}

#[tokio::test]
async fn a_kubernetes_style_symlink_swap_is_followed() {
    // mount/server.crt -> ..data/server.crt, mount/..data -> ..v1; a rotation makes ..v2 and
    // renames a new ..data symlink over the old one, as the kubelet does for secrets.
    let rules = config_dir(&[("r.yaml", RULES)]);
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    let ca = Ca::new("test CA");
    std::fs::create_dir(m.join("..v1")).unwrap();
    ca.server(1).write(&m.join("..v1"), "server");
    symlink("..v1", m.join("..data")).unwrap();
    for f in ["server.crt", "server.key"] {
        symlink(format!("..data/{f}"), m.join(f)).unwrap();
    }
    let rl = start_tls(rules.path(), m, &ca, None, &[]);
    let (open, seen) = tls_channel(&rl.grpc, &ca.pem, None);
    call(open.clone(), "open").await.unwrap();

    std::fs::create_dir(m.join("..v2")).unwrap();
    ca.server(2).write(&m.join("..v2"), "server");
    symlink("..v2", m.join("..data_tmp")).unwrap();
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    std::fs::remove_dir_all(m.join("..v1")).unwrap();
    wait_for_serial(&rl.grpc, &ca, 2, &rl).await;
    call(open, "open").await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [vec![1]],
        "the open connection was kept"
    );
}

#[test]
fn bad_tls_settings_stop_start_up_naming_the_setting() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.server(1).write(certs.path(), "server");
    let junk = certs.path().join("junk.pem");
    std::fs::write(&junk, "not PEM").unwrap();
    let missing = certs.path().join("missing.pem");
    let (cert, key, junk, missing) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        junk.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    let tls = [("GRPC_SERVER_USE_TLS", "true")];
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("GRPC_SERVER_TLS_KEY", key)],
            "GRPC_SERVER_USE_TLS is true but GRPC_SERVER_TLS_CERT is not set".into(),
        ),
        (
            vec![("GRPC_SERVER_TLS_CERT", cert), ("GRPC_SERVER_TLS_KEY", missing)],
            format!("GRPC_SERVER_TLS_KEY: cannot read {missing}: "),
        ),
        (
            vec![("GRPC_SERVER_TLS_CERT", junk), ("GRPC_SERVER_TLS_KEY", key)],
            format!("GRPC_SERVER_TLS_CERT: {junk}: no certificate"),
        ),
        (
            vec![
                ("GRPC_SERVER_TLS_CERT", cert),
                ("GRPC_SERVER_TLS_KEY", key),
                ("GRPC_CLIENT_TLS_CACERT", junk),
            ],
            format!("GRPC_CLIENT_TLS_CACERT: {junk}: no certificate"),
        ),
        (
            vec![
                ("GRPC_SERVER_TLS_CERT", cert),
                ("GRPC_SERVER_TLS_KEY", key),
                ("GRPC_CLIENT_TLS_CACERT", cert),
                ("GRPC_SERVER_TLS_CA_CERT", junk),
            ],
            format!("GRPC_CLIENT_TLS_CACERT ({cert}) and GRPC_SERVER_TLS_CA_CERT ({junk}) name different files; set only one of them"),
        ),
        (
            vec![
                ("GRPC_SERVER_TLS_CERT", cert),
                ("GRPC_SERVER_TLS_KEY", key),
                ("GRPC_CLIENT_TLS_CACERT", cert),
                ("GRPC_CLIENT_TLS_SAN", "not a name!"),
            ],
            "GRPC_CLIENT_TLS_SAN 'not a name!' is neither a DNS name nor an IP address".into(),
        ),
    ];
    for (env, expected) in cases {
        let mut all = tls.to_vec();
        all.extend(env.iter().copied());
        let (code, log) = serve_expecting_refusal(rules.path(), &all);
        assert_eq!(code, Some(1), "{env:?}: {log}");
        assert!(
            log.contains(&expected),
            "{env:?}: expected {expected:?} in:\n{log}"
        );
    }
    // Redis TLS files are read at start-up when a Redis connection uses TLS (even one not
    // reachable yet), and ignored otherwise, as in the reference.
    let redis_tls = [
        ("BACKEND_TYPE", "redis"),
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", "127.0.0.1:1"),
        ("REDIS_TLS", "true"),
    ];
    let redis_cases = [
        (
            vec![("REDIS_TLS_CACERT", missing)],
            format!("REDIS_TLS_CACERT: cannot read {missing}: "),
        ),
        (
            vec![("REDIS_TLS_CLIENT_CERT", cert)],
            "REDIS_TLS_CLIENT_CERT is set but REDIS_TLS_CLIENT_KEY is not; set both or neither"
                .into(),
        ),
        (
            vec![
                ("REDIS_TLS_CLIENT_CERT", cert),
                ("REDIS_TLS_CLIENT_KEY", junk),
            ],
            format!("REDIS_TLS_CLIENT_KEY: {junk}: no usable private key"),
        ),
    ];
    for (env, expected) in redis_cases {
        let mut all = redis_tls.to_vec();
        all.extend(env.iter().copied());
        let (code, log) = serve_expecting_refusal(rules.path(), &all);
        assert_eq!(code, Some(1), "{env:?}: {log}");
        assert!(
            log.contains(&expected),
            "{env:?}: expected {expected:?} in:\n{log}"
        );
    }
}

/// A redis-server answering TLS (client certificates required) on `tls_port`, with `server`
/// as its certificate, and plaintext on its usual port (for the harness and for reading keys).
fn tls_redis(dir: &Path, ca: &Ca, server: &Pair) -> (RedisServer, u16) {
    assert_redis_has_tls();
    let (cert, key) = server.write(dir, "redis");
    let ca_path = ca.write(dir, "redis-ca.crt");
    let tls_port = free_port().to_string();
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca_path.to_str().unwrap(),
        "--tls-auth-clients",
        "yes",
    ]);
    (redis, tls_port.parse().unwrap())
}

/// Fails the test, saying what to install, when redis-server was built without TLS (a build
/// with it links OpenSSL, as Debian's does).
fn assert_redis_has_tls() {
    let bin = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v redis-server"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let bin = bin.trim();
    assert!(
        !bin.is_empty(),
        "redis-server not found; install it with: apt-get update && apt-get install -y redis-server"
    );
    let ldd = std::process::Command::new("ldd").arg(bin).output().unwrap();
    assert!(
        String::from_utf8_lossy(&ldd.stdout).contains("libssl"),
        "{bin} was built without TLS (it does not link OpenSSL); install Debian's, which has it: \
         apt-get update && apt-get install -y redis-server"
    );
}

/// ratelimitd using the Redis at 127.0.0.1:`port` over TLS, with `env` added.
fn redis_tls_client(rules: &Path, port: u16, env: &[(&str, &str)]) -> Ratelimitd {
    Ratelimitd::builder(rules)
        .env("BACKEND_TYPE", "redis")
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_URL", &format!("127.0.0.1:{port}"))
        .env("REDIS_TLS", "true")
        .env("REDIS_TIMEOUT", "2s")
        .envs(env)
        .start()
}

#[tokio::test]
async fn redis_over_tls_with_a_client_certificate() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis CA");
    let (redis, tls_port) = tls_redis(dir.path(), &ca, &ca.client(&["127.0.0.1", "localhost"]));
    let ca_path = ca.write(dir.path(), "ca.crt");
    let (cert, key) = ca.client(&["ratelimitd"]).write(dir.path(), "client");
    let with = |extra: &[(&str, &str)]| {
        let mut env = vec![
            ("REDIS_TLS_CLIENT_CERT", cert.to_str().unwrap()),
            ("REDIS_TLS_CLIENT_KEY", key.to_str().unwrap()),
        ];
        env.extend_from_slice(extra);
        redis_tls_client(rules.path(), tls_port, &env)
    };

    // The per-second Redis over TLS too, with the same files (as in the reference).
    let ps_dir = tempfile::tempdir().unwrap();
    let (per_second, ps_port) =
        tls_redis(ps_dir.path(), &ca, &ca.client(&["127.0.0.1", "localhost"]));
    let ps_url = format!("127.0.0.1:{ps_port}");
    let rl = with(&[
        ("REDIS_TLS_CACERT", ca_path.to_str().unwrap()),
        ("REDIS_PERSECOND", "true"),
        ("REDIS_PERSECOND_SOCKET_TYPE", "tcp"),
        ("REDIS_PERSECOND_URL", &ps_url),
        ("REDIS_PERSECOND_TLS", "true"),
    ]);
    let (code, remaining) = call_key(rl.channel().await, "s", "fast").await.unwrap();
    assert_eq!((code, remaining), (Code::Ok, 99));
    let keys = per_second.command(&["KEYS", "tls_s_fast_*"]);
    assert!(keys.contains("tls_s_fast_"), "{keys}");
    assert_eq!(redis.command(&["KEYS", "tls_s_*"]), "*0\r\n");
    ensure_window_room(60, Duration::from_secs(5)).await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(call(rl.channel().await, "redis").await.unwrap());
    }
    assert_eq!(answers, THREE_THEN_OVER);
    // Counted in that Redis (read over its plaintext port).
    let keys = redis.command(&["KEYS", "tls_k_redis_*"]);
    assert!(keys.contains("tls_k_redis_"), "{keys}");

    // A CA that did not issue Redis's certificate: UNAVAILABLE.
    let other_ca = Ca::new("other CA").write(dir.path(), "other-ca.crt");
    let wrong = with(&[("REDIS_TLS_CACERT", other_ca.to_str().unwrap())]);
    let e = call(wrong.channel().await, "redis").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // Without a client certificate Redis refuses the connection: UNAVAILABLE.
    let anonymous = redis_tls_client(
        rules.path(),
        tls_port,
        &[("REDIS_TLS_CACERT", ca_path.to_str().unwrap())],
    );
    let e = call(anonymous.channel().await, "redis").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}

#[tokio::test]
async fn redis_tls_skip_hostname_verification_accepts_a_certificate_for_another_name() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis CA");
    let (_redis, tls_port) = tls_redis(dir.path(), &ca, &ca.client(&["redis.invalid"]));
    let ca_path = ca.write(dir.path(), "ca.crt");
    let (cert, key) = ca.client(&["ratelimitd"]).write(dir.path(), "client");
    let other_ca = Ca::new("other CA").write(dir.path(), "other-ca.crt");
    let env = |skip: &'static str, ca: &Path| {
        vec![
            ("REDIS_TLS_CACERT", ca.to_str().unwrap().to_owned()),
            ("REDIS_TLS_CLIENT_CERT", cert.to_str().unwrap().to_owned()),
            ("REDIS_TLS_CLIENT_KEY", key.to_str().unwrap().to_owned()),
            ("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", skip.to_owned()),
        ]
    };
    let start = |skip, ca: &Path| {
        let env = env(skip, ca);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        redis_tls_client(rules.path(), tls_port, &env)
    };
    let strict = start("false", &ca_path);
    let e = call(strict.channel().await, "skip").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let lenient = start("true", &ca_path);
    let (code, _) = call(lenient.channel().await, "skip").await.unwrap();
    assert_eq!(code, Code::Ok);
    // The name is not checked, the chain still is: a CA that did not issue Redis's
    // certificate is refused.
    let wrong_ca = start("true", &other_ca);
    let e = call(wrong_ca.channel().await, "skip").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let log = wrong_ca.log();
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
}

#[tokio::test]
async fn a_restarted_tls_redis_is_used_again() {
    let rules = config_dir(&[("r.yaml", RULES)]);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis CA");
    let (mut redis, tls_port) = tls_redis(dir.path(), &ca, &ca.client(&["127.0.0.1"]));
    let ca_path = ca.write(dir.path(), "ca.crt");
    let (cert, key) = ca.client(&["ratelimitd"]).write(dir.path(), "client");
    let rl = redis_tls_client(
        rules.path(),
        tls_port,
        &[
            ("REDIS_TLS_CACERT", ca_path.to_str().unwrap()),
            ("REDIS_TLS_CLIENT_CERT", cert.to_str().unwrap()),
            ("REDIS_TLS_CLIENT_KEY", key.to_str().unwrap()),
        ],
    );
    let channel = rl.channel().await;
    assert_eq!(call(channel.clone(), "again").await.unwrap(), (Code::Ok, 2));

    // Its connection is gone with it: a call fails UNAVAILABLE at most until a new TLS
    // connection is up (the reconnect backoff is at most 500 ms).
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    let answer = loop {
        match call(channel.clone(), "again").await {
            Ok(answer) => break answer,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(Instant::now() < deadline, "no answer 5 s after the restart");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // A fresh Redis (nothing saved): the count starts again, so the old connection was not
    // answering from anywhere else.
    assert_eq!(answer, (Code::Ok, 2));
}
