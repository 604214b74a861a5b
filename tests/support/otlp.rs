//! OTLP trace receivers on loopback, gRPC (`TraceService/Export`) and http/protobuf (`POST
//! /v1/traces`), recording every span they are sent with its resource. Stopped on drop.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue, KeyValue},
    trace::v1::Span,
};
use prost::Message;
use tokio::sync::oneshot;

/// One received span and the resource attributes it came with.
#[derive(Debug, Clone)]
pub struct Received {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl Received {
    /// The span's trace id, in hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    /// A span attribute's value as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        find(&self.span.attributes, key)
    }
    /// A resource attribute's value as text.
    pub fn resource_attribute(&self, key: &str) -> Option<String> {
        find(&self.resource, key)
    }
    /// Every attribute (span, resource, events), as `key=value` lines, for asserting what
    /// they do not contain.
    pub fn all_attributes(&self) -> String {
        let events = self.span.events.iter().flat_map(|e| &e.attributes);
        self.span
            .attributes
            .iter()
            .chain(&self.resource)
            .chain(events)
            .map(|kv| format!("{}={}\n", kv.key, text(kv.value.as_ref())))
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(kv.value.as_ref()))
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;
/// Every request header (or gRPC metadata entry) of every export, as (name, value).
type Headers = Arc<Mutex<Vec<(String, String)>>>;

fn record_headers(headers: &Headers, map: &http::HeaderMap) {
    let mut all = headers.lock().unwrap();
    for (k, v) in map {
        all.push((k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()));
    }
}

fn record(spans: &Spans, request: ExportTraceServiceRequest) {
    let mut all = spans.lock().unwrap();
    for rs in request.resource_spans {
        let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                all.push(Received {
                    resource: resource.clone(),
                    span,
                });
            }
        }
    }
}

/// A running receiver.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Spans,
    headers: Headers,
    stop: Option<oneshot::Sender<()>>,
}

struct Grpc(Spans, Headers);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record_headers(&self.1, &request.metadata().clone().into_headers());
        record(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// OTLP/gRPC on a free loopback port, plain or gzip.
    pub async fn grpc() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Spans::default();
        let (stop, stopped) = oneshot::channel::<()>();
        // gzip accepted, for OTEL_EXPORTER_OTLP_COMPRESSION=gzip.
        let headers = Headers::default();
        let service = TraceServiceServer::new(Grpc(spans.clone(), headers.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        Self {
            addr,
            spans,
            headers,
            stop: Some(stop),
        }
    }

    /// OTLP http/protobuf on a free loopback port.
    pub async fn http() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Spans::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let recorded = spans.clone();
        let headers = Headers::default();
        let seen = headers.clone();
        let router = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |map: http::HeaderMap, body: bytes::Bytes| {
                let recorded = recorded.clone();
                record_headers(&seen, &map);
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            record(&recorded, request);
                            let reply = ExportTraceServiceResponse {
                                partial_success: None,
                            };
                            (
                                http::StatusCode::OK,
                                [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                                reply.encode_to_vec(),
                            )
                        }
                        Err(e) => (
                            http::StatusCode::BAD_REQUEST,
                            [(http::header::CONTENT_TYPE, "text/plain")],
                            e.to_string().into_bytes(),
                        ),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            spans,
            headers,
            stop: Some(stop),
        }
    }

    /// `http://127.0.0.1:port`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every header of every export so far, as (name, value).
    pub fn headers(&self) -> Vec<(String, String)> {
        self.headers.lock().unwrap().clone()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits up to `limit` until `done` holds for the spans received, and returns them; the
    /// test fails with what was received if it never does.
    pub async fn wait_for(
        &self,
        limit: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans not received within {limit:?}; got {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
