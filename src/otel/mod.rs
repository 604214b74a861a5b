//! OpenTelemetry traces (`TRACING_*`, as the reference): one SERVER span per
//! `ShouldRateLimit` call, named as the reference's otelgrpc interceptor names it, joined to
//! the caller's trace (W3C `traceparent` or B3), with a child span for the call to the
//! counter store ("Redis Pipeline Execution", the reference's name). Spans leave in batches
//! over OTLP, http/protobuf or gRPC.
//!
//! The OpenTelemetry API directly, not `tracing-opentelemetry`: our log subscriber's
//! `LOG_LEVEL` filter would decide which spans exist and every log line would carry span
//! fields. This way, with tracing off, a call pays one `Option` check and nothing else, and a
//! call the sampler would drop (an unsampled caller, or none at `TRACING_SAMPLING_RATE=0`) only
//! the read of its trace headers: no span is made for it.
//!
//! No descriptor value ever goes into a span: values can be user ids or API keys. The domain
//! and counts are there; values stay in debug logs.

mod b3;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use opentelemetry::{
    context::FutureExt as _,
    propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator},
    trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
    Context, InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
    Resource,
};
use tonic::{
    metadata::{KeyRef, MetadataMap},
    transport::ClientTlsConfig,
};

pub use b3::B3;

use crate::{
    proto::envoy::service::ratelimit::v3::{
        rate_limit_response::Code, RateLimitRequest, RateLimitResponse,
    },
    settings::{ExporterProtocol, TracingArgs},
};

/// The server span's name: otelgrpc's `package.Service/Method`.
pub const SERVER_SPAN: &str = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// How long shutdown waits for the last spans to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("cannot set up the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot set up TLS for the OTLP trace exporter: {0}")]
    Tls(#[from] rustls::Error),
}

/// The http/protobuf exporter's client: hyper, over rustls for `https://` endpoints (the
/// exporter's own hyper client speaks plain HTTP only). The SDK still reads the endpoint and
/// headers; the request timeout, which it applies only to its own clients, is read here from
/// the same variables, in milliseconds, 10 s by default.
fn http_client() -> Result<impl opentelemetry_http::HttpClient + 'static, TracingError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
        .https_or_http()
        .enable_http1()
        .build();
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis);
    Ok(opentelemetry_http::hyper::HyperClient::new(
        https, timeout, None,
    ))
}

/// The running pipeline, kept to flush it at shutdown.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// With `TRACING_ENABLED`, builds the exporter (it reads `OTEL_EXPORTER_OTLP_*`), the
    /// batch processor (`OTEL_BSP_*`), the sampler and the resource, and returns the pipeline
    /// and the tracer the service uses; without it, nothing. Call inside the runtime: the
    /// exporters and the batch processor run on it.
    pub fn start(args: &TracingArgs) -> Result<Option<(Tracing, Tracer)>, TracingError> {
        if !args.tracing_enabled {
            return Ok(None);
        }
        let exporter = match args.tracing_exporter_protocol {
            ExporterProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(http_client()?)
                .build()?,
            // Used for https:// endpoints only; without roots of its own a TLS
            // handshake would trust nothing.
            ExporterProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_tls_config(ClientTlsConfig::new().with_webpki_roots())
                .build()?,
        };
        // The batch processor that exports on our runtime: the exporters' HTTP and gRPC
        // clients are tokio's, and the SDK's default one exports from a thread of its own.
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        let instance_id = if args.tracing_service_instance_id.is_empty() {
            random_uuid()
        } else {
            args.tracing_service_instance_id.clone()
        };
        let mut attributes = vec![KeyValue::new("service.instance.id", instance_id.clone())];
        if !args.tracing_service_namespace.is_empty() {
            attributes.push(KeyValue::new(
                "service.namespace",
                args.tracing_service_namespace.clone(),
            ));
        }
        let resource = Resource::builder()
            .with_service_name(args.tracing_service_name.clone())
            .with_attributes(attributes)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                args.tracing_sampling_rate,
            ))))
            .with_resource(resource)
            .build();
        let scope = InstrumentationScope::builder("ratelimitd")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = Tracer {
            inner: provider.tracer_with_scope(scope),
            propagator: Arc::new(TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(B3::default()),
            ])),
            roots_sampled: args.tracing_sampling_rate > 0.0,
        };
        tracing::info!(
            protocol = ?args.tracing_exporter_protocol,
            service_name = %args.tracing_service_name,
            service_namespace = %args.tracing_service_namespace,
            service_instance_id = %instance_id,
            sampling_rate = args.tracing_sampling_rate,
            "tracing enabled"
        );
        Ok(Some((Tracing { provider }, tracer)))
    }

    /// Exports the spans still queued and stops, waiting at most [`FLUSH_TIMEOUT`].
    pub async fn shutdown(self) {
        // The SDK's shutdown blocks until the exporter is done, on our runtime.
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(FLUSH_TIMEOUT, done).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot flush the last spans"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush the last spans"),
            Err(_) => {
                tracing::warn!(timeout = ?FLUSH_TIMEOUT, "the last spans were not flushed in time")
            }
        }
    }
}

/// What the service creates spans with; cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    inner: SdkTracer,
    /// W3C trace context, then B3 (B3 wins when both are present, as in the reference).
    propagator: Arc<TextMapCompositePropagator>,
    /// Whether a call with no parent may be sampled (`TRACING_SAMPLING_RATE` above 0).
    roots_sampled: bool,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracer")
    }
}

impl Tracer {
    /// Runs `call`, one `ShouldRateLimit` call, inside its SERVER span, a child of the
    /// caller's span when `request`'s metadata carries one, and ends the span with the
    /// outcome.
    pub async fn server_call(
        &self,
        request: &tonic::Request<RateLimitRequest>,
        call: impl Future<Output = Result<RateLimitResponse, tonic::Status>>,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let parent = self
            .propagator
            .extract_with_context(&Context::new(), &Metadata(request.metadata()));
        if !self.may_sample(&parent) {
            // The sampler would say no: skip making a span nobody will see.
            return call.await;
        }
        let req = request.get_ref();
        let cx = self.server_span(
            &parent,
            request.remote_addr(),
            &req.domain,
            req.descriptors.len(),
        );
        let result = call.with_context(cx.clone()).await;
        let overall = |r: &RateLimitResponse| {
            Code::try_from(r.overall_code).map_or("UNKNOWN", |c| c.as_str_name())
        };
        end_server_span(&cx, result.as_ref().map(overall));
        result
    }

    /// Starts the SERVER span of one `ShouldRateLimit` call (see [`Tracer::server_call`]).
    fn server_span(
        &self,
        parent: &Context,
        peer: Option<SocketAddr>,
        domain: &str,
        descriptors: usize,
    ) -> Context {
        let mut attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", "envoy.service.ratelimit.v3.RateLimitService"),
            KeyValue::new("rpc.method", "ShouldRateLimit"),
            KeyValue::new("ratelimit.domain", domain.to_owned()),
            KeyValue::new(
                "ratelimit.descriptors",
                i64::try_from(descriptors).unwrap_or(i64::MAX),
            ),
        ];
        if let Some(peer) = peer {
            attributes.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
            attributes.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
        }
        let span = self
            .inner
            .span_builder(SERVER_SPAN)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.inner, parent);
        parent.with_span(span)
    }

    /// What ParentBased(TraceIdRatioBased) can sample: a caller's sampled span, or, with no
    /// caller's span, a new trace when the rate is above 0 (the ratio itself is the SDK's).
    fn may_sample(&self, parent: &Context) -> bool {
        let span = parent.span();
        let caller = span.span_context();
        if caller.is_valid() {
            caller.is_sampled()
        } else {
            self.roots_sampled
        }
    }

    /// Starts a CLIENT span for one store call, child of the current context's server span,
    /// and returns its context; none outside a traced call (`/json`, `/usage`), which would
    /// only make orphan spans.
    fn backend_span(&self, span: StoreSpan, checks: usize) -> Option<Context> {
        let parent = Context::current();
        if !parent.has_active_span() {
            return None;
        }
        let mut attributes = vec![KeyValue::new(
            "ratelimit.checks",
            i64::try_from(checks).unwrap_or(i64::MAX),
        )];
        if let Some(system) = span.system {
            attributes.push(KeyValue::new("db.system.name", system));
        }
        let span = self
            .inner
            .span_builder(span.name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.inner, &parent);
        Some(parent.with_span(span))
    }
}

/// A store call's span: its name and the `db.system.name` of the store, if it is a database.
#[derive(Debug, Clone, Copy)]
pub struct StoreSpan {
    pub name: &'static str,
    pub system: Option<&'static str>,
}

/// The CLIENT span of one store call deciding `checks` checks, when `tracer` is set and the
/// call is traced (see [`Tracer::backend_span`]): run the call in it with [`in_store_span`].
pub fn store_span(tracer: Option<&Tracer>, span: StoreSpan, checks: usize) -> Option<Context> {
    tracer.and_then(|t| t.backend_span(span, checks))
}

/// Runs `call`, one store call, inside the span `cx` ([`store_span`]); `kind` names a failure
/// for the span's status (its kind, not the backend's text, which may name counter keys).
pub async fn in_store_span<T, E>(
    cx: Context,
    call: impl Future<Output = Result<T, E>>,
    kind: impl Fn(&E) -> String,
) -> Result<T, E> {
    let result = call.with_context(cx.clone()).await;
    let span = cx.span();
    if let Err(e) = &result {
        span.set_status(Status::error(kind(e)));
    }
    span.end();
    result
}

/// Ends a server span with the call's gRPC status code and overall answer. Server errors
/// (UNAVAILABLE, INTERNAL, ...) mark the span as failed; a client's mistake
/// (INVALID_ARGUMENT) or our load shedding (RESOURCE_EXHAUSTED) does not, as the OpenTelemetry
/// RPC conventions say for servers.
fn end_server_span(cx: &Context, outcome: Result<&str, &tonic::Status>) {
    let span = cx.span();
    match outcome {
        Ok(overall) => {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", 0_i64));
            span.set_attribute(KeyValue::new("ratelimit.overall_code", overall.to_owned()));
        }
        Err(status) => {
            let code = status.code();
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            if matches!(
                code,
                tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unimplemented
                    | tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::DataLoss
            ) {
                // The client's message: a backend's own text may name counter keys.
                span.set_status(Status::error(status.message().to_owned()));
            }
        }
    }
    span.end();
}

/// gRPC metadata as the propagators read it (ASCII entries only).
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// A random (version 4) UUID, for `service.instance.id` when none is set, as the reference.
fn random_uuid() -> String {
    let mut b: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_uuids_are_version_4() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
        assert!(matches!(u.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{u}");
        assert_ne!(u, random_uuid());
    }

    #[test]
    fn metadata_is_read_by_both_propagators() {
        let mut md = MetadataMap::new();
        md.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let propagator = TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(B3::default()),
        ]);
        let cx = propagator.extract_with_context(&Context::new(), &Metadata(&md));
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled());
    }
}
