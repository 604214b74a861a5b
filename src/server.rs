//! Listeners: the gRPC server (RLS v3, grpc.health.v1, server reflection) on TCP (optionally
//! over TLS, see [`crate::tls`]) or a Unix socket, and the HTTP listeners (admin, debug, optional Prometheus), run until a shutdown
//! future resolves. Shutdown turns health off at once, stops accepting, lets in-flight calls
//! finish within the drain timeout, then returns.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

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
use tonic::transport::server::{Connected, Router};
use tower_layer::{Identity, Stack};

use crate::{
    admin::{self, State},
    conn::{ConnIo, ConnPolicy, Incoming, Listen},
    health::Component,
    proto::{
        envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer,
        FILE_DESCRIPTOR_SET,
    },
    rls_route::RlsRouteLayer,
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
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
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

    let router = tonic::transport::Server::builder()
        // GOAWAY at the max age; the close after the grace is ConnIo's (see conn).
        .max_connection_age(listeners.max_connection_age)
        .max_concurrent_streams(listeners.max_concurrent_streams)
        // No HTTP/2 pings: dead clients are found by TCP keepalive (see conn).
        // RLS calls go straight to their server, past tonic's router (see rls_route).
        .layer(RlsRouteLayer::new(rls.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(rls);
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
            router,
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

/// tonic's router behind the layer that sends RLS calls straight to their server.
type GrpcRouter =
    Router<Stack<RlsRouteLayer<RateLimitServiceServer<GrpcService<AnyStore>>>, Identity>>;

/// The gRPC server's parts, for each runtime that serves it.
#[derive(Clone)]
struct Grpc {
    router: GrpcRouter,
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
            return Ok(self.serve_on(incoming).await?);
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
            served.map_err(ServerError::Runtime)??;
        }
        Ok(())
    }

    /// Serves the connections of `conns` on the current runtime until shutdown.
    async fn serve_on<S, T>(self, conns: S) -> Result<(), tonic::transport::Error>
    where
        S: Stream<Item = std::io::Result<ConnIo<T>>> + Unpin + Send + 'static,
        T: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        T::ConnectInfo: Clone + Send + Sync + 'static,
    {
        let stop = stopped(self.shutdown);
        match self.tls {
            Some(tls) => {
                let conns = crate::tls::accept::incoming(conns, tls, self.policy);
                self.router.serve_with_incoming_shutdown(conns, stop).await
            }
            None => self.router.serve_with_incoming_shutdown(conns, stop).await,
        }
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
