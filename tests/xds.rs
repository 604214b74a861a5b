//! Rules over xDS (`CONFIG_TYPE=GRPC_XDS_SOTW`) against the real binary and a real ADS
//! management server (`support/xds.rs`): the first config, updates under load, NACKs, a
//! management server that goes away and comes back, serving before the first config or not,
//! and mTLS to the management server.
#![allow(clippy::unwrap_used)]

#[path = "support/xds.rs"]
mod ads;
mod support;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use ads::{rule, AdsServer, Pki, TYPE_URL};
use ratelimitd::proto::{
    envoy::service::ratelimit::v3::{rate_limit_response::Code, RateLimitResponse},
    ratelimit::config::ratelimit::v3::RateLimitUnit,
};
use support::{
    ensure_window_room, http_get, request, sample, serve_expecting_refusal, Ratelimitd,
    RatelimitdBuilder,
};

const WAIT: Duration = Duration::from_secs(20);

/// A ratelimitd taking its rules from `server`, reconnecting quickly. The rules directory does
/// not exist: with xDS it is never read.
fn xds(server: &AdsServer) -> RatelimitdBuilder {
    Ratelimitd::builder(Path::new("/nonexistent/ratelimitd-rules"))
        .env("CONFIG_TYPE", "GRPC_XDS_SOTW")
        .env("CONFIG_GRPC_XDS_SERVER_URL", &server.addr())
        .env("CONFIG_GRPC_XDS_NODE_ID", "envoy-ratelimit")
        .env("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL", "100ms")
        .env("XDS_CLIENT_BACKOFF_MAX_INTERVAL", "500ms")
        .env("CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL", "100ms")
}

/// One call with one descriptor `key=value`.
async fn call(
    rl: &Ratelimitd,
    domain: &str,
    key: &str,
    value: &str,
) -> Result<RateLimitResponse, tonic::Status> {
    let mut client = rl.client().await;
    client
        .should_rate_limit(request(domain, &[&[(key, value)]]))
        .await
        .map(tonic::Response::into_inner)
}

/// (overall code, remaining of the first descriptor).
async fn answer(rl: &Ratelimitd, domain: &str, key: &str, value: &str) -> (Code, u32) {
    let r = call(rl, domain, key, value)
        .await
        .unwrap_or_else(|s| panic!("call failed: {s}\n{}", rl.log()));
    let remaining = r.statuses.first().map_or(0, |s| s.limit_remaining);
    (r.overall_code(), remaining)
}

/// `f` run on a blocking thread (the server's waits poll with `std::thread::sleep`).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_config_answers_and_an_update_under_load_keeps_counters() {
    ensure_window_room(3600, Duration::from_secs(60)).await;
    let ads = Arc::new(AdsServer::start());
    ads.set(
        "1",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Hour, 1000)],
    );
    let rl = xds(&ads)
        .env(
            "CONFIG_GRPC_XDS_NODE_METADATA",
            "cluster=eg,zone=z1,ignored",
        )
        .env(
            "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS",
            "x-token:abc,X-Team:rl",
        )
        .start();
    let a = ads.clone();
    blocking(move || a.wait_ack("1", WAIT)).await;

    // The subscription: the node, the type, no version and no nonce yet, the extra headers.
    let subscribe = ads.requests().remove(0);
    assert_eq!(subscribe.node_id, "envoy-ratelimit");
    assert_eq!(subscribe.type_url, TYPE_URL);
    assert_eq!(
        (
            subscribe.version_info.as_str(),
            subscribe.response_nonce.as_str()
        ),
        ("", "")
    );
    assert_eq!(subscribe.error, None);
    let mut metadata = subscribe.node_metadata.clone();
    metadata.sort();
    assert_eq!(
        metadata,
        vec![
            ("cluster".into(), "eg".into()),
            ("zone".into(), "z1".into())
        ]
    );
    assert!(
        subscribe
            .headers
            .contains(&("x-token".into(), "abc".into())),
        "{:?}",
        subscribe.headers
    );
    assert!(
        subscribe.headers.contains(&("x-team".into(), "rl".into())),
        "{:?}",
        subscribe.headers
    );

    for i in 1..=3 {
        assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, 1000 - i));
    }
    let rl = Arc::new(rl);

    // Calls in a loop, four at a time, while version 2 lands.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (rl, stop, ok, failed) = (rl.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut client = rl.client().await;
            while !stop.load(Ordering::Relaxed) {
                match client
                    .should_rate_limit(request("d", &[&[("k", "a")]]))
                    .await
                {
                    Ok(r) if r.get_ref().overall_code() == Code::Ok => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ads.set(
        "2",
        vec![
            rule("rl-a", "d", "k", "a", RateLimitUnit::Hour, 2000),
            rule("rl-b", "e", "k", "b", RateLimitUnit::Minute, 1),
        ],
    );
    let a = ads.clone();
    blocking(move || a.wait_ack("2", WAIT)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "calls failed during the update; {ok} succeeded");
    assert!(ok > 10, "too little load to mean anything: {ok}");
    let hits = 3 + u32::try_from(ok).unwrap();
    assert!(hits < 2000, "the test made too many calls: {hits}");
    // The same counter, under the new limit.
    assert_eq!(
        answer(&rl, "d", "k", "a").await,
        (Code::Ok, 2000 - hits - 1)
    );
    assert_eq!(answer(&rl, "e", "k", "b").await, (Code::Ok, 0));
    assert_eq!(answer(&rl, "e", "k", "b").await.0, Code::OverLimit);

    let rlconfig = http_get(&rl.http, "/rlconfig").1;
    assert!(
        rlconfig.contains("d.k_a: unit=HOUR requests_per_unit=2000"),
        "{rlconfig}"
    );
    assert!(
        rlconfig.contains("e.k_b: unit=MINUTE requests_per_unit=1"),
        "{rlconfig}"
    );
    let metrics = http_get(&rl.http, "/metrics").1;
    assert_eq!(
        sample(&metrics, "ratelimitd_config_generation", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, "ratelimit_service_config_load_success", &[]),
        Some(2.0)
    );
    let log = rl.log();
    assert!(
        log.contains("connected to the xDS management server"),
        "{log}"
    );
    assert!(log.contains("xDS config accepted (ACK)"), "{log}");
    assert!(!log.contains("abc"), "a header value was logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_update_is_nacked_and_the_old_rules_keep_answering() {
    ensure_window_room(60, Duration::from_secs(20)).await;
    let ads = Arc::new(AdsServer::start());
    ads.set(
        "1",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Minute, 5)],
    );
    let rl = xds(&ads).start();
    let a = ads.clone();
    blocking(move || a.wait_ack("1", WAIT)).await;
    assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, 4));

    ads.set(
        "2",
        vec![rule("rl-bad", "d", "k", "a", RateLimitUnit::Unknown, 5)],
    );
    let a = ads.clone();
    let nack = blocking(move || a.wait_request(WAIT, |r| r.error.is_some())).await;
    assert_eq!(
        nack.version_info, "1",
        "a NACK carries the version in force"
    );
    assert_eq!(Some(nack.response_nonce.clone()), ads.nonce_of("2"));
    let error = nack.error.unwrap();
    assert!(
        error.starts_with("rl-bad: d > k=a: rate_limit.unit: invalid rate limit unit 'UNKNOWN'"),
        "{error}"
    );
    // Version 1 still answers, its counter going on.
    assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, 3));
    let metrics = http_get(&rl.http, "/metrics").1;
    assert_eq!(
        sample(&metrics, "ratelimit_service_config_load_error", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "ratelimitd_config_generation", &[]),
        Some(1.0)
    );
    assert!(
        rl.log().contains("xDS config refused (NACK)"),
        "{}",
        rl.log()
    );

    // A good version after it is taken.
    ads.set(
        "3",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Minute, 10)],
    );
    let a = ads.clone();
    blocking(move || a.wait_ack("3", WAIT)).await;
    assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, 10 - 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_management_server_restarts_the_new_state_is_taken() {
    ensure_window_room(3600, Duration::from_secs(60)).await;
    let ads = Arc::new(std::sync::Mutex::new(AdsServer::start()));
    ads.lock().unwrap().set(
        "1",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Hour, 100)],
    );
    let rl = xds(&ads.lock().unwrap()).start();
    let a = ads.clone();
    blocking(move || a.lock().unwrap().wait_ack("1", WAIT)).await;
    assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, 99));

    // Gone: the rules in force keep answering.
    ads.lock().unwrap().stop();
    for remaining in [98, 97] {
        assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, remaining));
    }
    let before = ads.lock().unwrap().requests().len();
    {
        let server = ads.lock().unwrap();
        server.set(
            "2",
            vec![
                rule("rl-a", "d", "k", "a", RateLimitUnit::Hour, 200),
                rule("rl-b", "e", "k", "b", RateLimitUnit::Hour, 7),
            ],
        );
    }
    let a = ads.clone();
    blocking(move || {
        let mut server = a.lock().unwrap();
        server.restart();
        server.wait_ack("2", WAIT);
    })
    .await;
    // The new stream started from the version in force, with no nonce.
    let resubscribe = ads.lock().unwrap().requests()[before].clone();
    assert_eq!(
        (
            resubscribe.version_info.as_str(),
            resubscribe.response_nonce.as_str()
        ),
        ("1", "")
    );
    assert_eq!(answer(&rl, "d", "k", "a").await, (Code::Ok, 200 - 4));
    assert_eq!(answer(&rl, "e", "k", "b").await, (Code::Ok, 6));
    let log = rl.log();
    assert!(log.contains("keeping the rules in force"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_force_start_nothing_listens_until_the_first_config() {
    let ads = Arc::new(AdsServer::start());
    let mut rl = xds(&ads).spawn();
    let a = ads.clone();
    blocking(move || a.wait_request(WAIT, |r| r.node_id == "envoy-ratelimit")).await;
    let mut waiting = blocking(move || {
        let ready = rl.ready_within(Duration::from_secs(2));
        (rl, ready)
    })
    .await;
    assert!(
        !waiting.1,
        "listening before the first config:\n{}",
        waiting.0.log()
    );
    assert!(waiting.0.running(), "{}", waiting.0.log());

    ads.set(
        "1",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Minute, 5)],
    );
    let (rl, ready) = blocking(move || {
        let ready = waiting.0.ready_within(WAIT);
        waiting.1 = ready;
        waiting
    })
    .await;
    assert!(ready, "not serving after the first config:\n{}", rl.log());
    assert_eq!(answer(&rl, "d", "k", "a").await.0, Code::Ok);

    // Waiting on a management server that never answers, it still stops on SIGTERM.
    let silent = AdsServer::start();
    let mut stuck = xds(&silent).spawn();
    let a = Arc::new(silent);
    let s = a.clone();
    blocking(move || s.wait_request(WAIT, |r| r.node_id == "envoy-ratelimit")).await;
    stuck.signal("TERM");
    let status = blocking(move || stuck.wait_exit(WAIT)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_message_size_limit_is_not_taken() {
    let ads = Arc::new(AdsServer::start());
    let big: Vec<_> = (0..20)
        .map(|i| {
            rule(
                &format!("rl-{i}"),
                &format!("domain-{i}"),
                "k",
                "a",
                RateLimitUnit::Minute,
                5,
            )
        })
        .collect();
    ads.set("1", big);
    let rl = xds(&ads)
        .env("FORCE_START_WITHOUT_INITIAL_CONFIG", "true")
        .env("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES", "256")
        .start();
    let deadline = std::time::Instant::now() + WAIT;
    while !rl.log().contains("xDS stream failed") {
        assert!(std::time::Instant::now() < deadline, "{}", rl.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ads.requests().iter().all(|r| r.response_nonce.is_empty()),
        "{:?}",
        ads.requests()
    );
    let status = call(&rl, "domain-0", "k", "a")
        .await
        .expect_err("never configured");
    assert_eq!(status.message(), "no rate limit configuration loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_force_start_it_serves_at_once_and_fails_calls_until_the_first_config() {
    let ads = Arc::new(AdsServer::start());
    let rl = xds(&ads)
        .env("FORCE_START_WITHOUT_INITIAL_CONFIG", "true")
        .start();
    let strict = xds(&ads)
        .env("FORCE_START_WITHOUT_INITIAL_CONFIG", "true")
        .env("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true")
        .start();
    // As the reference: no config, no answer.
    let status = call(&rl, "d", "k", "a").await.expect_err("no config yet");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "no rate limit configuration loaded");
    assert_eq!(http_get(&rl.http, "/healthcheck").0, 200);
    assert_eq!(http_get(&strict.http, "/healthcheck").0, 500);

    ads.set(
        "1",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Minute, 5)],
    );
    let deadline = std::time::Instant::now() + WAIT;
    while call(&rl, "d", "k", "a").await.is_err() || http_get(&strict.http, "/healthcheck").0 != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            rl.log(),
            strict.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An unknown domain gets the reference's answer: OK, no limit.
    let unknown = call(&rl, "nope", "k", "a").await.unwrap();
    assert_eq!(unknown.overall_code(), Code::Ok);
    assert!(unknown.statuses.iter().all(|s| s.current_limit.is_none()));
    assert_eq!(http_get(&rl.http, "/healthcheck").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_to_the_management_server_needs_the_right_ca() {
    let pki = Pki::generate();
    let stranger = Pki::generate();
    let ads = Arc::new(AdsServer::start_mtls(&pki));
    ads.set(
        "1",
        vec![rule("rl-a", "d", "k", "a", RateLimitUnit::Minute, 5)],
    );
    let tls = |b: RatelimitdBuilder, ca: &Path| {
        b.env("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true")
            .env("CONFIG_GRPC_XDS_SERVER_TLS_SAN", "xds.test")
            .env(
                "CONFIG_GRPC_XDS_CLIENT_TLS_CERT",
                pki.client_cert.to_str().unwrap(),
            )
            .env(
                "CONFIG_GRPC_XDS_CLIENT_TLS_KEY",
                pki.client_key.to_str().unwrap(),
            )
            .env("CONFIG_GRPC_XDS_SERVER_TLS_CACERT", ca.to_str().unwrap())
    };
    // A CA that did not sign the server's certificate: refused, never configured.
    let wrong = tls(xds(&ads), &stranger.ca)
        .env("FORCE_START_WITHOUT_INITIAL_CONFIG", "true")
        .start();
    let deadline = std::time::Instant::now() + WAIT;
    while !wrong.log().contains("xDS management server not reachable") {
        assert!(std::time::Instant::now() < deadline, "{}", wrong.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        wrong.log().to_lowercase().contains("certificate"),
        "{}",
        wrong.log()
    );
    assert!(ads.requests().is_empty(), "{:?}", ads.requests());
    let status = call(&wrong, "d", "k", "a")
        .await
        .expect_err("never configured");
    assert_eq!(status.message(), "no rate limit configuration loaded");

    // The right one: configured (and it waited for the config before listening).
    let right = tls(xds(&ads), &pki.ca).start();
    assert_eq!(answer(&right, "d", "k", "a").await, (Code::Ok, 4));
    let a = ads.clone();
    blocking(move || a.wait_ack("1", WAIT)).await;
}

#[test]
fn an_unknown_config_type_is_refused_naming_the_setting() {
    let (code, log) = serve_expecting_refusal(
        Path::new("/nonexistent"),
        &[("CONFIG_TYPE", "GRPC_XDS_DELTA")],
    );
    assert_ne!(code, Some(0));
    assert!(
        log.contains(
            "CONFIG_TYPE 'GRPC_XDS_DELTA' is not supported (expected FILE or GRPC_XDS_SOTW)"
        ),
        "{log}"
    );
}
