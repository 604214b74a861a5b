//! `TRACING_*` against the real binary and real OTLP receivers (tests/support/otlp.rs), over
//! both protocols, with a real `redis-server`: a `ShouldRateLimit` call's SERVER span joins
//! the caller's W3C or B3 trace, the Redis call is its child, the resource names the service,
//! sampling follows the caller or `TRACING_SAMPLING_RATE`, no descriptor value reaches an
//! attribute, queued spans leave at SIGTERM, and with tracing off nothing is sent.
#![allow(clippy::unwrap_used)]
mod support;

use std::time::Duration;

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, RateLimitResponse,
};
use support::{otlp::OtlpReceiver, otlp::Received, *};

const RULES: &str = r#"
domain: traced
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

const SERVER_SPAN: &str = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const REDIS_SPAN: &str = "Redis Pipeline Execution";
/// OTLP's span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
/// A descriptor value that must never appear in a span.
const SECRET: &str = "sk_live_TRACESECRET42";

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A ratelimitd on `redis`, tracing to `receiver` over `protocol`, with `extra` settings.
fn start(
    dir: &tempfile::TempDir,
    redis: &RedisServer,
    receiver: &OtlpReceiver,
    protocol: &str,
    extra: &[(&str, &str)],
) -> Ratelimitd {
    Ratelimitd::builder(dir.path())
        .redis(redis)
        .env("TRACING_ENABLED", "true")
        .env("TRACING_EXPORTER_PROTOCOL", protocol)
        .env("TRACING_SERVICE_NAME", "rl-under-test")
        .env("TRACING_SERVICE_NAMESPACE", "edge")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .envs(extra)
        .start()
}

/// One call for user `value`, with `headers` as gRPC metadata.
async fn call(rl: &Ratelimitd, value: &str, headers: &[(&str, &str)]) -> RateLimitResponse {
    let mut req = tonic::Request::new(request("traced", &[&[("user", value)]]));
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap();
        req.metadata_mut()
            .insert(key, tonic::metadata::MetadataValue::try_from(*v).unwrap());
    }
    let r = rl
        .client()
        .await
        .should_rate_limit(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    r
}

/// The server span of trace `trace` and its backend child, once both arrived.
async fn server_and_child(receiver: &OtlpReceiver, trace: &str) -> (Received, Received) {
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.trace_id() == trace).count() >= 2
        })
        .await;
    let of_trace = |name: &str| {
        spans
            .iter()
            .find(|s| s.trace_id() == trace && s.span.name == name)
            .unwrap_or_else(|| panic!("no {name} span in trace {trace}: {spans:#?}"))
            .clone()
    };
    let server = of_trace(SERVER_SPAN);
    let child = of_trace(REDIS_SPAN);
    assert_eq!(server.span.kind, SERVER);
    assert_eq!(child.span.kind, CLIENT);
    assert_eq!(child.parent_span_id(), server.span_id());
    (server, child)
}

/// What every exported span must carry, and must not.
fn assert_common(spans: &[Received]) {
    for s in spans {
        assert_eq!(
            s.resource_attribute("service.name").as_deref(),
            Some("rl-under-test")
        );
        assert_eq!(
            s.resource_attribute("service.namespace").as_deref(),
            Some("edge")
        );
        let instance = s.resource_attribute("service.instance.id").unwrap();
        assert_eq!(instance.len(), 36, "a UUID: {instance}");
        let all = s.all_attributes();
        assert!(!all.contains("TRACESECRET"), "descriptor value in {all}");
        assert!(!s.span.name.contains("TRACESECRET"));
    }
}

/// Over http/protobuf: W3C `traceparent`, single `b3` and multiple `x-b3-*` callers each get
/// a SERVER span in their trace, under their span, with the Redis call as its child; spans
/// leave on the batch timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_spans_join_w3c_and_b3_traces_with_a_redis_child() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let receiver = OtlpReceiver::http().await;
    let rl = start(
        &dir,
        &redis,
        &receiver,
        "http",
        &[("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=t0k3n")],
    );

    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    call(&rl, SECRET, &[("traceparent", &traceparent)]).await;
    let (server, _) = server_and_child(&receiver, TRACE).await;
    assert_eq!(server.parent_span_id(), PARENT);
    assert_eq!(server.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        server.attribute("rpc.service").as_deref(),
        Some("envoy.service.ratelimit.v3.RateLimitService")
    );
    assert_eq!(
        server.attribute("rpc.method").as_deref(),
        Some("ShouldRateLimit")
    );
    assert_eq!(
        server.attribute("rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert_eq!(
        server.attribute("ratelimit.domain").as_deref(),
        Some("traced")
    );
    assert_eq!(
        server.attribute("ratelimit.descriptors").as_deref(),
        Some("1")
    );
    assert_eq!(
        server.attribute("ratelimit.overall_code").as_deref(),
        Some("OK")
    );

    let b3_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let b3_parent = "e457b5a2e4d86bd1";
    call(
        &rl,
        SECRET,
        &[("b3", &format!("{b3_trace}-{b3_parent}-1-05e3ac9a4f6e3b90"))],
    )
    .await;
    let (server, _) = server_and_child(&receiver, b3_trace).await;
    assert_eq!(server.parent_span_id(), b3_parent);

    let multi_trace = "0000000000000000a3ce929d0e0e4736";
    call(
        &rl,
        SECRET,
        &[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", b3_parent),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let (server, _) = server_and_child(&receiver, multi_trace).await;
    assert_eq!(server.parent_span_id(), b3_parent);

    // POST /json is not a gRPC call: no span, not even an orphan Redis one. A traced call
    // after it shows the exporter has sent everything before.
    let body = format!(
        r#"{{"domain":"traced","descriptors":[{{"entries":[{{"key":"user","value":"{SECRET}"}}]}}]}}"#
    );
    assert_eq!(http_post(&rl.http, "/json", body.as_bytes()).0, 200);
    let last = "5a3ce929d0e0e47364bf92f3577b34da";
    call(
        &rl,
        SECRET,
        &[("traceparent", &format!("00-{last}-{PARENT}-01"))],
    )
    .await;
    server_and_child(&receiver, last).await;
    let spans = receiver.spans();
    assert_eq!(spans.len(), 8, "two spans for each of 4 calls: {spans:#?}");

    assert_common(&spans);
    assert!(rl.log().contains("tracing enabled"), "{}", rl.log());
    let headers = receiver.headers();
    assert!(
        headers.contains(&("x-collector-token".into(), "t0k3n".into())),
        "OTEL_EXPORTER_OTLP_HEADERS sent: {headers:?}"
    );
}

/// Over gRPC (gzip), with a batch delay far beyond the test: the spans arrive because
/// SIGTERM flushes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_spans_are_flushed_at_shutdown() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let receiver = OtlpReceiver::grpc().await;
    let mut rl = start(
        &dir,
        &redis,
        &receiver,
        "grpc",
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("TRACING_SERVICE_INSTANCE_ID", "instance-7"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "x-collector-token=grpc",
            ),
        ],
    );
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    call(&rl, SECRET, &[("traceparent", &traceparent)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.spans().is_empty(), "exported before shutdown");

    let status = rl.terminate();
    assert!(status.success(), "{status}; log:\n{}", rl.log());
    let (server, child) = server_and_child(&receiver, TRACE).await;
    assert_eq!(server.parent_span_id(), PARENT);
    for s in [&server, &child] {
        assert_eq!(
            s.resource_attribute("service.instance.id").as_deref(),
            Some("instance-7")
        );
    }
    assert_eq!(child.attribute("db.system.name").as_deref(), Some("redis"));
    let headers = receiver.headers();
    assert!(
        headers.contains(&("x-collector-token".into(), "grpc".into())),
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS sent: {headers:?}"
    );
}

/// `TRACING_SAMPLING_RATE=0`: a call with no parent makes no span; a caller's sampled parent
/// is still followed (ParentBased), and an unsampled one is too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_rate_zero_samples_only_what_the_caller_sampled() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let receiver = OtlpReceiver::http().await;
    let mut rl = start(
        &dir,
        &redis,
        &receiver,
        "http",
        &[("TRACING_SAMPLING_RATE", "0")],
    );
    call(&rl, "no-parent", &[]).await;
    let unsampled = "11111111111111111111111111111111";
    call(
        &rl,
        "unsampled-parent",
        &[("traceparent", &format!("00-{unsampled}-{PARENT}-00"))],
    )
    .await;
    call(
        &rl,
        "sampled-parent",
        &[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))],
    )
    .await;
    let status = rl.terminate();
    assert!(status.success());
    server_and_child(&receiver, TRACE).await;
    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s.trace_id() == TRACE),
        "only the sampled parent's trace: {spans:#?}"
    );
    assert_eq!(spans.len(), 2, "{spans:#?}");
}

/// Tracing off (the default), even with an endpoint set: nothing is sent, and setting
/// `TRACING_ENABLED` no longer draws the "not supported" warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_tracing_sends_nothing() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let redis = RedisServer::start();
    let receiver = OtlpReceiver::http().await;
    let mut rl = start(
        &dir,
        &redis,
        &receiver,
        "http",
        &[("TRACING_ENABLED", "false")],
    );
    call(
        &rl,
        SECRET,
        &[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))],
    )
    .await;
    let status = rl.terminate();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());
    let log = rl.log();
    assert!(!log.contains("tracing enabled"), "{log}");
    assert!(!log.contains("TRACING_ENABLED"), "{log}");
}

/// A backend failure marks both spans as failed, with the gRPC code and the failure's kind,
/// never the backend's own text (it may name counter keys, which hold descriptor values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failure_marks_the_spans_as_errors() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let mut redis = RedisServer::start();
    let receiver = OtlpReceiver::grpc().await;
    let rl = start(
        &dir,
        &redis,
        &receiver,
        "grpc",
        &[("REDIS_TIMEOUT", "500ms")],
    );
    redis.kill();
    let mut req = tonic::Request::new(request("traced", &[&[("user", SECRET)]]));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{PARENT}-01").parse().unwrap(),
    );
    let status = rl.client().await.should_rate_limit(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let (server, child) = server_and_child(&receiver, TRACE).await;
    assert_eq!(
        server.attribute("rpc.grpc.status_code").as_deref(),
        Some("14")
    );
    // OTLP's STATUS_CODE_ERROR.
    for s in [&server, &child] {
        let st = s.span.status.clone().unwrap();
        assert_eq!(st.code, 2, "{s:#?}");
        assert!(!st.message.contains("TRACESECRET"), "{st:?}");
    }
    assert_common(&receiver.spans());
}

/// A protocol the reference does not know stops start-up, as it does there.
#[test]
fn an_unknown_exporter_protocol_refuses_to_start() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let (code, log) = serve_expecting_refusal(
        dir.path(),
        &[
            ("TRACING_ENABLED", "true"),
            ("TRACING_EXPORTER_PROTOCOL", "zipkin"),
        ],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("invalid TRACING_EXPORTER_PROTOCOL 'zipkin' (expected http or grpc)"),
        "{log}"
    );
}
