//! Envoy Gateway's rate-limit deployment, end to end: our binary run bare as `ratelimit`
//! (Envoy Gateway's container command is `/bin/ratelimit`, no arguments) with exactly the
//! environment Envoy Gateway gives that container (envoyproxy/gateway,
//! internal/infrastructure/kubernetes/ratelimit/resource.go), its rules from a test ADS
//! server over mTLS (the `RateLimitConfig` Envoy Gateway's translator makes for a
//! BackendTrafficPolicy), its counters in a redis-server over TLS with a client certificate,
//! and a real Envoy configured as Envoy Gateway configures one (tests/envoy_gateway/
//! envoy.template.yaml) calling it over mTLS.
#![allow(clippy::unwrap_used)]

#[path = "support/xds.rs"]
mod ads;
mod support;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ads::{AdsServer, Pki};
use ratelimitd::proto::ratelimit::config::ratelimit::v3::{
    RateLimitConfig, RateLimitDescriptor, RateLimitPolicy, RateLimitUnit,
};
use support::{
    certs::{Ca, Pair},
    ensure_window_room, envoy_binary, free_port, free_ports, http_get, http_request, sample,
    unix_now, ClientTls, Envoy, Ratelimitd, RedisServer,
};

/// The listener's name, Envoy Gateway's domain for its non-shared rules: `NAMESPACE/GATEWAY/
/// LISTENER`.
const DOMAIN: &str = "default/eg/http";
/// The route's name, the first descriptor entry (a generic key) of each of its rules.
const ROUTE: &str = "httproute/default/backend/rule/0/match/0/*";
/// The first rule's first match, a distinct header: its descriptor key.
const MATCH: &str = "rule-0-match-0";
/// What ratelimitd's gRPC certificate is issued for (Envoy Gateway's certgen names the
/// service), and the name the harness checks it under.
const RATELIMIT_NAME: &str = "envoy-ratelimit.envoy-gateway-system.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(20);

/// The `RateLimitConfig` Envoy Gateway's translator serves for this BackendTrafficPolicy
/// (as its testdata out/ratelimit-config/distinct-match.yaml, with the names a cluster has):
///
/// ```yaml
/// apiVersion: gateway.envoyproxy.io/v1alpha1
/// kind: BackendTrafficPolicy
/// metadata: {name: backend-policy, namespace: default}
/// spec:
///   targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: backend}]
///   rateLimit:
///     type: Global
///     global:
///       rules:
///         - clientSelectors: [{headers: [{name: x-user-id, type: Distinct}]}]
///           limit: {requests: 3, unit: Hour}
/// ```
fn eg_rate_limit_config() -> RateLimitConfig {
    RateLimitConfig {
        name: DOMAIN.into(),
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            key: ROUTE.into(),
            value: ROUTE.into(),
            descriptors: vec![RateLimitDescriptor {
                key: MATCH.into(),
                rate_limit: Some(RateLimitPolicy {
                    unit: RateLimitUnit::Hour as i32,
                    requests_per_unit: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The certificates, laid out as Envoy Gateway mounts them: `certs/` (the `envoy-rate-limit`
/// secret: ca.crt, tls.crt, tls.key; its tls.crt is both ratelimitd's server certificate and
/// its xDS client certificate), `redis-certs/` (the Redis client certificate), plus what the
/// other ends present: Envoy's client certificate, the ADS server's, Redis's.
struct Certs {
    dir: tempfile::TempDir,
    /// Envoy Gateway's CA: it issued ratelimitd's, Envoy's and the ADS server's certificates.
    ca: Ca,
    envoy: Pair,
    /// The CA that issued Redis's certificate and the Redis client certificate.
    redis_ca: PathBuf,
}

impl Certs {
    fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sub = |name: &str| {
            let p = dir.path().join(name);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let (certs, redis_certs, others) = (sub("certs"), sub("redis-certs"), sub("others"));
        let ca = Ca::new("envoy-gateway");
        ca.write(&certs, "ca.crt");
        // Server and client use (ratelimitd serves gRPC with it and presents it to the ADS
        // server), for the service's names.
        ca.client(&[
            "envoy-ratelimit",
            "envoy-ratelimit.envoy-gateway-system",
            "envoy-ratelimit.envoy-gateway-system.svc",
            RATELIMIT_NAME,
        ])
        .write(&certs, "tls");
        let envoy = ca.client(&["envoy"]);
        envoy.write(&others, "envoy");
        // The ADS server: Envoy Gateway's xDS server is `envoy-gateway:18001`; ours is on
        // 127.0.0.1, the host ratelimitd checks (Envoy Gateway sets no
        // CONFIG_GRPC_XDS_SERVER_TLS_SAN).
        ca.server_for(&["envoy-gateway", "127.0.0.1"], 2)
            .write(&others, "ads");
        let redis_ca = Ca::new("redis");
        redis_ca
            .client(&["127.0.0.1", "localhost"])
            .write(&others, "redis");
        redis_ca
            .client(&["envoy-ratelimit"])
            .write(&redis_certs, "tls");
        let redis_ca = redis_ca.write(&others, "redis-ca.crt");
        Self {
            dir,
            ca,
            envoy,
            redis_ca,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn str(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    /// The ADS server's files, as its harness takes them.
    fn ads_pki(&self) -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: self.path("certs/ca.crt"),
            server_cert: self.path("others/ads.crt"),
            server_key: self.path("others/ads.key"),
            client_cert: self.path("certs/tls.crt"),
            client_key: self.path("certs/tls.key"),
        }
    }
}

/// A redis-server answering TLS on its second port, client certificates required (signed by
/// `redis_ca`); its plaintext port is for the harness's readiness check and for reading keys.
fn tls_redis(certs: &Certs) -> (RedisServer, u16) {
    assert_redis_has_tls();
    let tls_port = free_port().to_string();
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &certs.str("others/redis.crt"),
        "--tls-key-file",
        &certs.str("others/redis.key"),
        "--tls-ca-cert-file",
        certs.redis_ca.to_str().unwrap(),
        "--tls-auth-clients",
        "yes",
    ]);
    (redis, tls_port.parse().unwrap())
}

/// Fails the test, saying what to install, when redis-server was built without TLS (a build
/// with it links OpenSSL, as Debian's does).
fn assert_redis_has_tls() {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .unwrap();
    let bin = String::from_utf8(out.stdout).unwrap();
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

/// tests/envoy_gateway/envoy.template.yaml with its placeholders filled in.
fn envoy_config(certs: &Certs, ports: [(&str, u16); 4]) -> String {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/envoy_gateway/envoy.template.yaml"),
    )
    .unwrap();
    let mut config = template
        .replace("{{ENVOY_CERT}}", &certs.str("others/envoy.crt"))
        .replace("{{ENVOY_KEY}}", &certs.str("others/envoy.key"))
        .replace("{{CA_CERT}}", &certs.str("certs/ca.crt"));
    for (name, port) in ports {
        config = config.replace(&format!("{{{{{name}}}}}"), &port.to_string());
    }
    assert!(!config.contains("{{"), "a placeholder left:\n{config}");
    config
}

#[test]
fn the_envoy_gateway_style_envoy_config_validates() {
    let certs = Certs::generate();
    let [a, b, c, d] = free_ports();
    let config = envoy_config(
        &certs,
        [
            ("INGRESS_PORT", a),
            ("BACKEND_PORT", b),
            ("RATELIMIT_PORT", c),
            ("ADMIN_PORT", d),
        ],
    );
    let path = certs.path("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(envoy_binary())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("OK"), "{text}");
}

/// A response header's value.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `f` run on a blocking thread (the ADS server's waits poll with `std::thread::sleep`).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gateway_environment_limits_per_user_through_envoy() {
    // The three requests allowed and the fourth refused must share one hour window.
    ensure_window_room(3600, Duration::from_secs(120)).await;
    let certs = Certs::generate();
    let ads = Arc::new(AdsServer::start_mtls(&certs.ads_pki()));
    ads.set("1", vec![eg_rate_limit_config()]);
    let (redis, redis_tls_port) = tls_redis(&certs);

    // Envoy Gateway's RUNTIME_ROOT is /data, an empty directory: the rules come over xDS.
    let data = tempfile::tempdir().unwrap();
    // The container command, `/bin/ratelimit`: our binary through a link of that name.
    let bin = tempfile::tempdir().unwrap();
    let program = bin.path().join("ratelimit");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ratelimitd"), &program).unwrap();
    let mapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/envoy_gateway/statsd_conf.yaml");
    let prometheus = format!("127.0.0.1:{}", free_port());
    let ads_url = ads.addr();
    let redis_url = format!("127.0.0.1:{redis_tls_port}");
    let (ca, cert, key) = (
        certs.str("certs/ca.crt"),
        certs.str("certs/tls.crt"),
        certs.str("certs/tls.key"),
    );
    let (redis_cert, redis_key) = (
        certs.str("redis-certs/tls.crt"),
        certs.str("redis-certs/tls.key"),
    );
    // In the order resource.go lists them, each value Envoy Gateway's but for paths and
    // addresses: the xDS server's (envoy-gateway:18001), Redis's, PROMETHEUS_ADDR (:19001;
    // loopback here), and the files under /certs, /redis-certs and /etc/statsd-exporter.
    let eg_env: [(&str, &str); 25] = [
        ("RUNTIME_ROOT", data.path().to_str().unwrap()),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("RUNTIME_IGNOREDOTFILES", "true"),
        ("RUNTIME_WATCH_ROOT", "false"),
        ("LOG_LEVEL", "info"),
        ("USE_STATSD", "false"),
        ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
        ("CONFIG_GRPC_XDS_SERVER_URL", &ads_url),
        ("CONFIG_GRPC_XDS_NODE_ID", "envoy-ratelimit"),
        ("GRPC_SERVER_USE_TLS", "true"),
        ("GRPC_SERVER_TLS_CERT", &cert),
        ("GRPC_SERVER_TLS_KEY", &key),
        ("GRPC_SERVER_TLS_CA_CERT", &ca),
        ("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true"),
        ("CONFIG_GRPC_XDS_CLIENT_TLS_CERT", &cert),
        ("CONFIG_GRPC_XDS_CLIENT_TLS_KEY", &key),
        ("CONFIG_GRPC_XDS_SERVER_TLS_CACERT", &ca),
        ("FORCE_START_WITHOUT_INITIAL_CONFIG", "true"),
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", &redis_url),
        ("REDIS_TLS", "true"),
        ("REDIS_TLS_CLIENT_CERT", &redis_cert),
        ("REDIS_TLS_CLIENT_KEY", &redis_key),
        ("USE_PROMETHEUS", "true"),
        ("PROMETHEUS_ADDR", &prometheus),
    ];
    let mut rl = Ratelimitd::from_runtime_root()
        .bare(&program)
        .envs(&eg_env)
        .env("PROMETHEUS_MAPPER_YAML", mapper.to_str().unwrap())
        // Not Envoy Gateway's: it sets no Redis CA, so the reference checks Redis's
        // certificate against the system's roots. Ours come from the test's CA.
        .env("REDIS_TLS_CACERT", certs.redis_ca.to_str().unwrap())
        // The harness also sets GRPC_PORT, PORT and DEBUG_PORT (Envoy Gateway's 8081, its
        // probe's 8080, and 6070: the defaults) to free ports, and every *_HOST to 127.0.0.1,
        // and reaches gRPC as Envoy does: with a client certificate from Envoy Gateway's CA.
        .client_tls(ClientTls {
            ca: certs.ca.pem.clone(),
            identity: Some((certs.envoy.cert.clone(), certs.envoy.key.clone())),
            domain: RATELIMIT_NAME.into(),
        })
        .start();

    // The rules arrived: the management server saw ratelimitd's node ACK version 1.
    let a = ads.clone();
    let ack = blocking(move || a.wait_ack("1", WAIT)).await;
    assert_eq!(ack.node_id, "envoy-ratelimit");
    let rlconfig = http_get(&rl.debug, "/rlconfig").1;
    assert!(rlconfig.contains(DOMAIN), "{rlconfig}\n{}", rl.log());
    // Envoy Gateway's startup, readiness and liveness probe.
    assert_eq!(http_get(&rl.http, "/healthcheck").0, 200, "{}", rl.log());

    let [ingress, backend, admin] = free_ports();
    let rls_port = rl.grpc.rsplit_once(':').unwrap().1.parse().unwrap();
    let envoy = Envoy::start_config(
        &envoy_config(
            &certs,
            [
                ("INGRESS_PORT", ingress),
                ("BACKEND_PORT", backend),
                ("RATELIMIT_PORT", rls_port),
                ("ADMIN_PORT", admin),
            ],
        ),
        ingress,
        admin,
    );
    let get = |user: &str| http_request(&envoy.ingress, "GET", "/", &[("x-user-id", user)]);

    for i in 1..=3 {
        let (status, headers, body) = get("user-a");
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from the backend\n"),
            "request {i}: {headers:?}\nenvoy:\n{}\nratelimitd:\n{}",
            envoy.log(),
            rl.log()
        );
        // DRAFT_VERSION_03, as Envoy Gateway enables them (a call that failed open would
        // have none).
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            Some((3 - i).to_string().as_str()),
            "request {i}: {headers:?}"
        );
        assert!(
            header(&headers, "x-ratelimit-limit").is_some_and(|l| l.starts_with("3, 3;w=3600")),
            "request {i}: {headers:?}"
        );
    }
    let (status, headers, _) = get("user-a");
    assert_eq!(status, 429, "{headers:?}");
    let retry_after: u64 = header(&headers, "retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {headers:?}"))
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    // Envoy Gateway disables it unless Envoy's headers are enabled on the listener.
    assert_eq!(header(&headers, "x-envoy-ratelimited"), None);

    // Another user has a budget of their own; no header, no descriptor, no limit.
    let (status, headers, _) = get("user-b");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("2"));
    let (status, _, _) = http_request(&envoy.ingress, "GET", "/", &[]);
    assert_eq!(status, 200);

    // Every call reached ratelimitd over mTLS: none failed open (the filter counts under the
    // route's cluster).
    let rl_stats = envoy.stats("ratelimit");
    let sum = |suffix: &str| -> u64 {
        rl_stats
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(_, v)| *v)
            .sum()
    };
    assert_eq!(
        (
            sum("ratelimit.ok"),
            sum("ratelimit.over_limit"),
            sum("ratelimit.error") + sum("ratelimit.failure_mode_allowed")
        ),
        (4, 1, 0),
        "{rl_stats:?}"
    );

    // Counted in the TLS Redis, under the reference's key: domain, entries, window start.
    let window = unix_now() / 3600 * 3600;
    let key = format!("{DOMAIN}_{ROUTE}_{ROUTE}_{MATCH}_user-a_{window}");
    assert_eq!(
        redis.command(&["GET", &key]),
        "$1\r\n4\r\n",
        "{}",
        redis.command(&["KEYS", "*"])
    );

    // Prometheus, renamed by a mapping file like Envoy Gateway's (tests/envoy_gateway/statsd_conf.yaml): labelled with its domain.
    let (status, metrics) = http_get(&prometheus, "/metrics");
    assert_eq!(status, 200);
    let route_key = format!("{ROUTE}_{ROUTE}");
    let labels = [
        ("domain", DOMAIN),
        ("key1", route_key.as_str()),
        ("key2", MATCH),
    ];
    for (series, want) in [
        ("ratelimit_service_rate_limit_total_hits", 5.0),
        ("ratelimit_service_rate_limit_over_limit", 1.0),
        ("ratelimit_service_rate_limit_within_limit", 4.0),
    ] {
        assert_eq!(
            sample(&metrics, series, &labels),
            Some(want),
            "{series}:\n{metrics}"
        );
    }

    // Still healthy, and nothing went wrong on the way (the start-up line naming the
    // listeners is logged at WARN on purpose, to be seen at any level).
    assert_eq!(http_get(&rl.http, "/healthcheck").0, 200);
    assert!(rl.running(), "{}", rl.log());
    let log = rl.log();
    let trouble: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .filter(|l| !l.contains("ratelimitd listening"))
        .collect();
    assert!(trouble.is_empty(), "{log}");
}
