//! A test xDS management server: ADS state-of-the-world over tonic, serving
//! `RateLimitConfig` resources. It pushes every new snapshot to each open stream, records every
//! request it receives (version, nonce, NACK text, node, headers), can be stopped and started
//! again on the same port (its state survives), and can require mTLS.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use prost::Message;
use ratelimitd::proto::{
    envoy::service::discovery::v3::{
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
        DiscoveryRequest, DiscoveryResponse,
    },
    ratelimit::config::ratelimit::v3::{
        RateLimitConfig, RateLimitDescriptor, RateLimitPolicy, RateLimitUnit,
    },
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{
    transport::{Certificate, Identity, Server, ServerTlsConfig},
    Request, Response, Status, Streaming,
};

pub const TYPE_URL: &str = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig";

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version_info: String,
    pub response_nonce: String,
    pub type_url: String,
    /// The NACK's `error_detail.message`, if it is a NACK.
    pub error: Option<String>,
    pub node_id: String,
    /// Node metadata, string values only.
    pub node_metadata: Vec<(String, String)>,
    /// The stream's gRPC metadata (request headers).
    pub headers: Vec<(String, String)>,
}

/// What the server serves: `None` answers nothing (a server with no snapshot for the node).
type Snapshot = Option<(String, Vec<RateLimitConfig>)>;

struct Shared {
    snapshot: watch::Sender<Snapshot>,
    requests: Mutex<Vec<Recorded>>,
    nonce: AtomicU64,
    /// Responses sent, by nonce: (nonce, version).
    sent: Mutex<Vec<(String, String)>>,
}

/// Files of a test PKI: a CA, the server's certificate (for `xds.test`) and a client's.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: &[&str]| {
            let key = KeyPair::generate().unwrap();
            let params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(&["xds.test"]);
        let (client_cert, client_key) = leaf(&["ratelimitd.test"]);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            dir,
        }
    }
}

/// The running server: its own runtime on a thread of its own, so stopping it (dropping the
/// runtime) closes every stream at once, as a management server that goes away does.
pub struct AdsServer {
    pub port: u16,
    shared: Arc<Shared>,
    /// The serving thread and how to stop it.
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    /// mTLS: (server cert, key, client CA) PEM.
    tls: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
}

impl AdsServer {
    /// Plaintext, on a free port, serving nothing yet.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Requiring a client certificate signed by the PKI's CA.
    pub fn start_mtls(pki: &Pki) -> Self {
        let read = |p: &Path| std::fs::read(p).unwrap();
        Self::start_with(Some((
            read(&pki.server_cert),
            read(&pki.server_key),
            read(&pki.ca),
        )))
    }

    fn start_with(tls: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut server = Self {
            port: 0,
            shared: Arc::new(Shared {
                snapshot: watch::channel(None).0,
                requests: Mutex::new(Vec::new()),
                nonce: AtomicU64::new(0),
                sent: Mutex::new(Vec::new()),
            }),
            running: None,
            tls,
        };
        server.run();
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Binds (the same port after the first time) and serves, on a thread of its own.
    fn run(&mut self) {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service = AggregatedDiscoveryServiceServer::new(Ads {
            shared: self.shared.clone(),
        });
        let mut builder = Server::builder();
        if let Some((cert, key, ca)) = &self.tls {
            builder = builder
                .tls_config(
                    ServerTlsConfig::new()
                        .identity(Identity::from_pem(cert, key))
                        .client_ca_root(Certificate::from_pem(ca)),
                )
                .unwrap();
        }
        let router = builder.add_service(service);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                let listener = loop {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => break l,
                        Err(e) if Instant::now() > deadline => panic!("bind {addr}: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                tokio::select! {
                    _ = router.serve_with_incoming(incoming) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every stream and connection task.
        });
        self.port = port_rx.recv().expect("the ADS server bound its port");
        self.running = Some((stop_tx, thread));
    }

    /// Goes away: every stream and connection closed, the port released.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            thread.join().unwrap();
        }
    }

    /// Serves again on the same port, with the state it had.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Serves `configs` as version `version` from now on, pushed to every open stream.
    pub fn set(&self, version: &str, configs: Vec<RateLimitConfig>) {
        self.shared
            .snapshot
            .send_replace(Some((version.to_owned(), configs)));
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The nonce of the last response sent with `version`.
    pub fn nonce_of(&self, version: &str) -> Option<String> {
        self.shared
            .sent
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, v)| v == version)
            .map(|(n, _)| n.clone())
    }

    /// Waits up to `limit` for a request matching `f`; fails the test with every request
    /// seen if none comes.
    pub fn wait_request(&self, limit: Duration, f: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| f(r)) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "no such request within {limit:?}; got {:#?}",
                    self.requests()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the ACK of the response that carried `version`.
    pub fn wait_ack(&self, version: &str, limit: Duration) -> Recorded {
        self.wait_request(limit, |r| {
            r.error.is_none()
                && r.version_info == version
                && !r.response_nonce.is_empty()
                && self.nonce_of(version).as_deref() == Some(r.response_nonce.as_str())
        })
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Ads {
    shared: Arc<Shared>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let headers: Vec<(String, String)> = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let mut inbound = request.into_inner();
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut snapshots = shared.snapshot.subscribe();
            let mut subscribed = false;
            loop {
                tokio::select! {
                    message = inbound.message() => {
                        let Ok(Some(req)) = message else { return };
                        shared.record(&req, &headers);
                        if !subscribed {
                            subscribed = true;
                            snapshots.mark_changed();
                        }
                    }
                    changed = snapshots.changed(), if subscribed => {
                        if changed.is_err() { return; }
                        let snapshot = snapshots.borrow_and_update().clone();
                        if let Some((version, configs)) = snapshot {
                            let response = shared.response(&version, &configs);
                            if tx.send(Ok(response)).await.is_err() { return; }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Shared {
    fn record(&self, req: &DiscoveryRequest, headers: &[(String, String)]) {
        let node = req.node.clone().unwrap_or_default();
        let node_metadata = node
            .metadata
            .map(|m| {
                m.fields
                    .into_iter()
                    .map(|(k, v)| {
                        let s = match v.kind {
                            Some(prost_types::value::Kind::StringValue(s)) => s,
                            other => format!("{other:?}"),
                        };
                        (k, s)
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.requests.lock().unwrap().push(Recorded {
            version_info: req.version_info.clone(),
            response_nonce: req.response_nonce.clone(),
            type_url: req.type_url.clone(),
            error: req.error_detail.as_ref().map(|e| e.message.clone()),
            node_id: node.id,
            node_metadata,
            headers: headers.to_vec(),
        });
    }

    fn response(&self, version: &str, configs: &[RateLimitConfig]) -> DiscoveryResponse {
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed).to_string();
        self.sent
            .lock()
            .unwrap()
            .push((nonce.clone(), version.to_owned()));
        DiscoveryResponse {
            version_info: version.to_owned(),
            resources: configs
                .iter()
                .map(|c| prost_types::Any {
                    type_url: TYPE_URL.to_owned(),
                    value: c.encode_to_vec(),
                })
                .collect(),
            canary: false,
            type_url: TYPE_URL.to_owned(),
            nonce,
        }
    }
}

/// `domain` with one descriptor `key=value` limited to `n` per `unit`.
pub fn rule(
    name: &str,
    domain: &str,
    key: &str,
    value: &str,
    unit: RateLimitUnit,
    n: u32,
) -> RateLimitConfig {
    RateLimitConfig {
        name: name.to_owned(),
        domain: domain.to_owned(),
        descriptors: vec![RateLimitDescriptor {
            key: key.to_owned(),
            value: value.to_owned(),
            rate_limit: Some(RateLimitPolicy {
                unit: unit as i32,
                requests_per_unit: n,
                ..Default::default()
            }),
            ..Default::default()
        }],
    }
}
