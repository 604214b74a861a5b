//! What operators and tools see of a running ratelimitd: gRPC health, server reflection (so
//! grpcurl and ghz need no proto files), the HTTP healthcheck, start-up logs and settings of
//! the reference that are accepted but not supported yet.
#![allow(clippy::unwrap_used)]
mod support;

use support::*;
use tokio_stream::StreamExt;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

const RULES: &str =
    "domain: ep\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n";

#[tokio::test]
async fn grpc_health_reports_serving_for_the_server_the_rls_service_and_ratelimit() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let mut h = HealthClient::new(rl.channel().await);
    // `ratelimit` is the name the reference's health checker reports under.
    for service in [
        "",
        "envoy.service.ratelimit.v3.RateLimitService",
        "ratelimit",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn reflection_lists_and_describes_the_rls_service_in_v1_and_v1alpha() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(rl.channel().await);
    let reqs = vec![
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "envoy.service.ratelimit.v3.RateLimitService".into(),
                ),
            ),
        },
    ];
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let list = stream.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        list.message_response
    else {
        panic!("expected a service list")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "envoy.service.ratelimit.v3.RateLimitService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]
    );
    let file = stream.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) =
        file.message_response
    else {
        panic!("expected a file descriptor")
    };
    assert!(!fd.file_descriptor_proto.is_empty());

    // ghz speaks v1alpha.
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(rl.channel().await);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "envoy.service.ratelimit.v3.RateLimitService".into(),
            ),
        ),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let r = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        r.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

/// A gRPC call to `path` that the server does not serve: its status.
async fn unserved(rl: &Ratelimitd, path: &'static str) -> tonic::Status {
    use ratelimitd::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
    let mut grpc = tonic::client::Grpc::new(rl.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RateLimitRequest, RateLimitResponse>::default();
    grpc.unary(
        tonic::Request::new(RateLimitRequest::default()),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .unwrap_err()
}

/// RLS calls go straight to the RLS server and the rest through tonic's router
/// (src/rls_route.rs): both answer what they do not serve with UNIMPLEMENTED.
#[tokio::test]
async fn unknown_methods_and_services_are_unimplemented() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    for path in [
        "/envoy.service.ratelimit.v3.RateLimitService/NoSuchMethod",
        "/envoy.service.ratelimit.v3.RateLimitService/",
        "/envoy.service.ratelimit.v2.RateLimitService/ShouldRateLimit",
        "/no.such.Service/ShouldRateLimit",
    ] {
        let status = unserved(&rl, path).await;
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
    }
    // The service itself answers on the direct route: OK, then over the limit of 1/s.
    let mut c = rl.client().await;
    ensure_window_room(1, std::time::Duration::from_millis(400)).await;
    let codes = [
        c.should_rate_limit(request("ep", &[&[("k", "v")]]))
            .await
            .unwrap()
            .into_inner()
            .overall_code,
        c.should_rate_limit(request("ep", &[&[("k", "v")]]))
            .await
            .unwrap()
            .into_inner()
            .overall_code,
    ];
    assert_eq!(codes, [1, 2], "OK, then OVER_LIMIT");
}

#[tokio::test]
async fn http_healthcheck_answers_200_ok() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    assert_eq!(http_get(&rl.http, "/healthcheck"), (200, "OK".to_owned()));
    assert_eq!(http_get(&rl.http, "/nope").0, 404);
}

#[tokio::test]
async fn unsupported_reference_settings_warn_once_and_start() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("MEMCACHE_HOST_PORT", "127.0.0.1:11211")
        .env("USE_DOG_STATSD", "true")
        .start();
    let log = rl.log();
    assert_eq!(
        log.matches("setting is not supported yet and is ignored")
            .count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("setting=\"MEMCACHE_HOST_PORT\"")
            || log.contains("setting=MEMCACHE_HOST_PORT"),
        "{log}"
    );
    assert!(
        log.contains("config OK: 1 file(s), 1 domain(s) [ep], 1 rule(s)"),
        "{log}"
    );
    assert!(log.contains("using the in-memory backend"), "{log}");
}

#[tokio::test]
async fn sigterm_stops_with_exit_code_0() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let mut rl = Ratelimitd::builder(dir.path()).start();
    let status = rl.terminate();
    assert_eq!(status.code(), Some(0));
}
