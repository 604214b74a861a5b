//! Listeners: the gRPC server (RLS v3, grpc.health.v1, server reflection) and the HTTP admin
//! listener, run until a shutdown future resolves, then drained.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    admin,
    config::RuleTree,
    proto::{
        envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer,
        FILE_DESCRIPTOR_SET,
    },
    service::{GrpcService, RateLimiter},
    store::{AnyStore, MemoryStore, RedisStore, StoreError},
};

/// Largest accepted gRPC message. Envoy's requests are a few hundred bytes; this bounds what
/// a misbehaving client can make us buffer.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Everything a running server shares.
pub struct State {
    pub rules: Arc<ArcSwap<RuleTree>>,
    pub limiter: Arc<RateLimiter<AnyStore>>,
}

/// Builds the store for `backend`; the memory store also gets its sweeper task.
pub fn build_store(
    backend: crate::settings::Backend,
    redis: &crate::store::RedisSettings,
    clock: Arc<dyn crate::limiter::Clock>,
) -> Result<AnyStore, StoreError> {
    Ok(match backend {
        crate::settings::Backend::Memory => {
            let store = MemoryStore::new(clock);
            store.spawn_sweeper(Duration::from_secs(1));
            AnyStore::Memory(store)
        }
        crate::settings::Backend::Redis => AnyStore::Redis(RedisStore::new(redis)?),
    })
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` resolves; in-flight RPCs finish
/// before it returns.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RateLimitServiceServer<GrpcService<AnyStore>>>()
        .await;
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

    // One signal, two listeners: a watch channel fans the shutdown out.
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let mut grpc_rx = rx.clone();
    let mut http_rx = rx;

    let grpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(rls)
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async move {
            let _ = grpc_rx.wait_for(|v| *v).await;
        });
    let http_server =
        axum::serve(http, admin::router(state.clone())).with_graceful_shutdown(async move {
            let _ = http_rx.wait_for(|v| *v).await;
        });
    let (g, h) = tokio::join!(grpc_server, http_server);
    g?;
    h?;
    Ok(())
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    let addr = format!("{host}:{port}");
    let parsed: SocketAddr = addr
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
        .map_err(|_| format!("invalid listen address {addr}"))?;
    TcpListener::bind(parsed)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}
