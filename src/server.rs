//! Listeners: the gRPC server (RLS v3, grpc.health.v1, server reflection) on TCP (optionally
//! over TLS, see [`crate::tls`]) or a Unix socket, and the HTTP listeners (admin, debug, optional Prometheus), run until a shutdown
//! future resolves. Shutdown turns health off at once, stops accepting, lets in-flight calls
//! finish within the drain timeout, then returns.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::watch,
};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    admin::{self, State},
    conn::{ConnIo, ConnPolicy, Incoming, Listen},
    health::Component,
    proto::{
        envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer,
        FILE_DESCRIPTOR_SET,
    },
    rls_route::{RlsRoute, RlsRouteLayer},
    service::GrpcService,
    store::AnyStore,
    tls::ServerTls,
    workers::Workers,
};

/// Largest accepted gRPC message. Envoy's requests are a few hundred bytes; this bounds what
/// a misbehaving client can make us buffer.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The RLS service's gRPC health name; its health follows ours, as do "" (the whole server)
/// and [`REFERENCE_HEALTH_SERVICE`].
pub const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// The name the reference's health checker reports under (`NewHealthChecker(.., "ratelimit",
/// ..)`), which Kubernetes gRPC probes and Envoy health checks set up for it ask about.
pub const REFERENCE_HEALTH_SERVICE: &str = "ratelimit";

/// Where gRPC listens.
pub enum GrpcListener {
    Tcp(TcpListener),
    /// A Unix socket; its file is removed at shutdown.
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Bound listeners and gRPC connection settings.
pub struct Listeners {
    pub grpc: GrpcListener,
    pub http: TcpListener,
    pub debug: TcpListener,
    /// `USE_PROMETHEUS`: listener and path.
    pub prometheus: Option<(TcpListener, String)>,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
    pub drain_timeout: Duration,
    /// `GRPC_MAX_CONCURRENT_STREAMS`: advertised in HTTP/2 SETTINGS, per connection.
    pub max_concurrent_streams: u32,
    /// `CONNECTION_OPENING_TIMEOUT`: a new connection's first bytes must arrive within this.
    pub opening_timeout: Duration,
    /// `HTTP_HEADER_READ_TIMEOUT`: an HTTP request's headers must arrive within this.
    pub header_read_timeout: Duration,
    /// `GRPC_SERVER_USE_TLS`: the gRPC listener's TLS config (TCP only); the HTTP listeners
    /// stay plaintext, as the reference's do.
    pub tls: Option<Arc<ServerTls>>,
    /// `RUNTIME_FLAVOR=per_core`: the runtimes that serve gRPC connections (this one then
    /// only accepts them).
    pub workers: Option<Workers>,
}

/// Why the servers stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("a per-core runtime's gRPC server failed: {0}")]
    Runtime(#[source] tokio::task::JoinError),
}

/// Serves until `shutdown` resolves, then drains (see the module doc).
pub async fn run(
    listeners: Listeners,
    state: Arc<State>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // ghz and older grpcurl builds speak the v1alpha reflection protocol.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let rls = RateLimitServiceServer::new(GrpcService(state.limiter.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    // One signal fans out to every listener through a watch channel.
    let (tx, rx) = watch::channel(false);
    let health = state.health.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Unhealthy first, so load balancers stop sending before listeners close.
        health.set(Component::Sigterm, false);
        let _ = tx.send(true);
    });

    // RLS calls go straight to their server, past tonic's router (see rls_route).
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(rls.clone())
        .prepare();
    let service = RlsRouteLayer::new(rls).layer(routes);
    let mut h2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    // No HTTP/2 pings (hyper sends none unless asked): dead clients are found by TCP
    // keepalive (see conn).
    h2.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(listeners.max_concurrent_streams);
    let policy = |lifetime: Option<Duration>| ConnPolicy {
        opening_timeout: listeners.opening_timeout,
        lifetime,
        shutdown: rx.clone(),
    };
    let grpc_policy = policy(Some(
        listeners
            .max_connection_age
            .saturating_add(listeners.max_connection_age_grace),
    ));
    let mut uds_path = None;
    let workers = listeners.workers;
    let grpc = async {
        let grpc = Grpc {
            service,
            h2,
            max_connection_age: listeners.max_connection_age,
            peer_info: state.limiter.traced(),
            tls: listeners.tls,
            policy: grpc_policy,
            shutdown: rx.clone(),
        };
        match listeners.grpc {
            GrpcListener::Tcp(l) => grpc.serve(l, workers.as_ref()).await,
            // serve refuses TLS on the Unix socket at start-up.
            GrpcListener::Unix(l, path) => {
                uds_path = Some(path);
                grpc.serve(l, workers.as_ref()).await
            }
        }
    };
    let header_timeout = listeners.header_read_timeout;
    let http = serve_http(
        Incoming::new(listeners.http, "http", policy(None)),
        admin::router(state.clone()),
        header_timeout,
        stopped(rx.clone()),
    );
    let debug = serve_http(
        Incoming::new(listeners.debug, "debug", policy(None)),
        admin::debug_router(state.clone()),
        header_timeout,
        stopped(rx.clone()),
    );
    let prometheus = async {
        if let Some((l, path)) = listeners.prometheus {
            serve_http(
                Incoming::new(l, "prometheus", policy(None)),
                admin::prometheus_router(state.clone(), &path),
                header_timeout,
                stopped(rx.clone()),
            )
            .await;
        }
    };
    let all = async { tokio::join!(grpc, http, debug, prometheus) };
    let drain_limit = {
        let rx = rx.clone();
        let drain = listeners.drain_timeout;
        async move {
            stopped(rx).await;
            tokio::time::sleep(drain).await;
        }
    };
    let result = tokio::select! {
        (g, (), (), ()) = all => g,
        _ = drain_limit => {
            tracing::warn!(timeout = ?listeners.drain_timeout, "drain timeout: closing with calls still in flight");
            Ok(())
        }
    };
    // Stops the other runtimes, dropping what is still open there after a drain timeout.
    drop(workers);
    if let Some(path) = uds_path {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the gRPC socket file");
        }
    }
    result
}

/// Resolves when shutdown begins.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Connections a per-core runtime has been handed and has not yet taken; beyond this the
/// acceptor waits (and the kernel's backlog holds new connections).
const HANDED_QUEUE: usize = 64;

/// The gRPC service: RLS calls straight to their server, the rest (health, reflection)
/// through tonic's routes.
type GrpcRoutes = RlsRoute<RateLimitServiceServer<GrpcService<AnyStore>>, tonic::service::Routes>;

/// The gRPC server's parts, for each runtime that serves it.
///
/// Connections are served by our own loop over hyper, not by tonic's transport server, which
/// wraps every call in layers of its own: a timer for each call that carries `grpc-timeout`
/// (Envoy's every call) with a clock read and the time driver's lock, a boxed future, and the
/// peer's address put in the request's extensions; together about 1,900 instructions (2,300
/// with `grpc-timeout`) and 6 allocations per call (docs/benchmarks.md, "Our own gRPC serve
/// loop"). The deadline is kept by ours ([`crate::deadline`]: the failure policy answers
/// before it), and a client that gives up resets its stream, which drops the call.
#[derive(Clone)]
struct Grpc {
    service: GrpcRoutes,
    /// HTTP/2 only, `GRPC_MAX_CONCURRENT_STREAMS`.
    h2: auto::Builder<TokioExecutor>,
    /// A GOAWAY at this age; the close after the grace is ConnIo's (see conn).
    max_connection_age: Duration,
    /// Put the peer's address in each request, for trace spans: only when tracing, as it
    /// costs allocations per call.
    peer_info: bool,
    tls: Option<Arc<ServerTls>>,
    policy: ConnPolicy,
    shutdown: watch::Receiver<bool>,
}

impl Grpc {
    /// Serves gRPC on `listener` until shutdown: here, or with `workers` on those runtimes,
    /// each new connection handed to the next in turn (see [`crate::workers`]).
    async fn serve<L: Listen>(
        self,
        listener: L,
        workers: Option<&Workers>,
    ) -> Result<(), ServerError>
    where
        L::Io: Connected,
        <L::Io as Connected>::ConnectInfo: Clone + Send + Sync + 'static,
    {
        let mut incoming = Incoming::new(listener, "grpc", self.policy.clone());
        let Some(workers) = workers else {
            self.serve_on(incoming).await;
            return Ok(());
        };
        let mut queues = Vec::new();
        let mut servers = tokio::task::JoinSet::new();
        for runtime in workers.handles() {
            let (tx, rx) = tokio::sync::mpsc::channel(HANDED_QUEUE);
            queues.push(tx);
            let conns = crate::conn::attached::<L>(rx, self.policy.clone());
            servers.spawn_on(self.clone().serve_on(conns), runtime);
        }
        let mut stop = std::pin::pin!(stopped(self.shutdown.clone()));
        for queue in queues.iter().cycle() {
            let conn = tokio::select! {
                conn = incoming.next_detached() => conn,
                () = &mut stop => break,
            };
            tokio::select! {
                // A runtime's server only ends early by failing: stop, and report it below.
                sent = queue.send(conn) => if sent.is_err() { break },
                () = &mut stop => break,
            }
        }
        // Stop listening; each runtime's server drains its connections. The first to fail
        // (in the order they end) is the error.
        drop((incoming, queues));
        while let Some(served) = servers.join_next().await {
            served.map_err(ServerError::Runtime)?;
        }
        Ok(())
    }

    /// Serves the connections of `conns` on the current runtime until shutdown.
    async fn serve_on<S, T>(self, conns: S)
    where
        S: Stream<Item = std::io::Result<ConnIo<T>>> + Unpin + Send + 'static,
        T: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        T::ConnectInfo: Clone + Send + Sync + 'static,
    {
        match self.tls.clone() {
            Some(tls) => {
                let conns = crate::tls::accept::incoming(conns, tls, self.policy.clone());
                self.serve_conns(std::pin::pin!(conns)).await;
            }
            None => self.serve_conns(conns).await,
        }
    }

    /// Serves each connection of `conns` in a task of its own until shutdown; then stops
    /// accepting, sends every connection a GOAWAY and waits for their calls to finish.
    async fn serve_conns<S, IO>(self, mut conns: S)
    where
        S: Stream<Item = std::io::Result<IO>> + Unpin,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
    {
        // Each connection's task holds a receiver: all are gone once every one has ended.
        let (open_tx, open_rx) = watch::channel(());
        let mut stop = std::pin::pin!(stopped(self.shutdown.clone()));
        loop {
            let io = tokio::select! {
                io = conns.next() => io,
                () = &mut stop => break,
            };
            match io {
                Some(Ok(io)) => {
                    tokio::spawn(self.clone().serve_conn(io, open_rx.clone()));
                }
                // Already logged and counted where it was accepted (see conn).
                Some(Err(e)) => tracing::debug!(error = %e, "gRPC connection not served"),
                None => break,
            }
        }
        drop((conns, open_rx));
        open_tx.closed().await;
    }

    /// Serves one connection until it ends: a GOAWAY at its max age or at shutdown, after
    /// which the client's calls in flight finish.
    async fn serve_conn<IO>(self, io: IO, open: watch::Receiver<()>)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
    {
        let service = PerConnection {
            inner: self.service,
            peer: self.peer_info.then(|| io.connect_info()),
        };
        let conn = self
            .h2
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let mut conn = std::pin::pin!(conn);
        let mut aged = std::pin::pin!(tokio::time::sleep(self.max_connection_age));
        let mut stop = std::pin::pin!(stopped(self.shutdown));
        let mut closing = false;
        loop {
            tokio::select! {
                served = &mut conn => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "gRPC connection ended with an error");
                    }
                    break;
                }
                () = &mut aged, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = &mut stop, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        drop(open);
    }
}

/// One connection's service: each request's body as tonic's, and the peer's address in the
/// request when trace spans need it.
#[derive(Clone)]
struct PerConnection<S, P> {
    inner: S,
    peer: Option<P>,
}

impl<S, P> Service<http::Request<hyper::body::Incoming>> for PerConnection<S, P>
where
    S: Service<http::Request<tonic::body::Body>>,
    P: Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<hyper::body::Incoming>) -> S::Future {
        let mut req = req.map(tonic::body::Body::new);
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        self.inner.call(req)
    }
}

/// Serves HTTP/1 and HTTP/2 on `incoming` until `stopped`, then lets open requests finish.
/// Our own loop rather than `axum::serve`, which sets no timer and so no header-read
/// timeout: a client trickling headers could hold a connection forever.
async fn serve_http(
    mut incoming: Incoming<TcpListener>,
    router: axum::Router,
    header_read_timeout: Duration,
    stopped: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let io = tokio::select! {
            io = incoming.next() => io,
            () = &mut stopped => break,
        };
        let Some(Ok(io)) = io else { break };
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    // Stop listening now, then wait for open connections to finish their requests.
    drop(incoming);
    graceful.shutdown().await;
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("invalid listen address {0}")]
    Address(String),
    #[error("invalid listen address {0} (expected host:port or :port)")]
    NoPort(String),
    #[error("invalid port in listen address {0}")]
    Port(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove stale socket {path}: {source}")]
    StaleSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a TCP listener on `host:port` (an empty host means all interfaces).
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, BindError> {
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let addr = format!("{host}:{port}");
    let parsed: SocketAddr = addr
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
        .map_err(|_| BindError::Address(addr.clone()))?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| BindError::Listen { addr, source })
}

/// Binds `host:port` written as one address, as `PROMETHEUS_ADDR` is (`:9090`).
pub async fn bind_addr(addr: &str) -> Result<TcpListener, BindError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| BindError::NoPort(addr.to_owned()))?;
    let port = port.parse().map_err(|_| BindError::Port(addr.to_owned()))?;
    bind(host.trim_start_matches('[').trim_end_matches(']'), port).await
}

/// Binds the gRPC Unix socket, replacing a stale socket file left by a previous run.
pub fn bind_uds(path: &std::path::Path) -> Result<GrpcListener, BindError> {
    let shown = || path.display().to_string();
    if path.exists() {
        std::fs::remove_file(path).map_err(|source| BindError::StaleSocket {
            path: shown(),
            source,
        })?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| BindError::Listen {
        addr: shown(),
        source,
    })?;
    Ok(GrpcListener::Unix(l, path.to_owned()))
}
