//! The throughput ceiling for docs/benchmarks.md: an RLS v3 server with the same tonic, the
//! same protos, the same runtime and the same allocator as ratelimitd that decodes each request and answers `OK`
//! with one `OK` status per descriptor, doing nothing else. What a load generator gets from it
//! on a machine is the most any RLS server built this way can get there; ratelimitd's figures
//! are reported as fractions of it (bench/compare.sh).
//!
//! cargo run --release --example noop -- --addr 127.0.0.1:0 [--runtime per_core|multi_thread]
//!
//! `--runtime` follows ratelimitd's `RUNTIME_FLAVOR` (default `per_core`, as ratelimitd's):
//! `per_core` hands each connection, round robin, to one of `ratelimitd::workers`'
//! single-threaded runtimes; `multi_thread` serves on tokio's work-stealing runtime.
//!
//! `--route direct` puts ratelimitd's `rls_route` layer in front of tonic's router, as
//! ratelimitd did, so RLS calls skip the router's per-call work; `--route own` also serves
//! each connection with hyper directly, past tonic's transport server and its per-call
//! layers, as ratelimitd does (src/server.rs); the default, `router`, is a plain tonic server.
//!
//! Prints `noop listening grpc=ADDR` once bound, then serves until killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::{Code, DescriptorStatus},
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
    RateLimitRequest, RateLimitResponse,
};
use ratelimitd::rls_route::RlsRouteLayer;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// ratelimitd's allocator, so the ceiling is measured with what ratelimitd runs on.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Where to listen (loopback only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: String,
    /// `per_core` or `multi_thread`, as ratelimitd's RUNTIME_FLAVOR.
    #[arg(long, default_value = "per_core")]
    runtime: String,
    /// `router` (tonic's, for every call), `direct` (RLS calls past it) or `own` (also past
    /// tonic's transport server, as ratelimitd).
    #[arg(long, default_value = "router")]
    route: String,
    /// Runtimes under `per_core`, as ratelimitd's WORKER_THREADS (0: one per CPU).
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0)]
    workers: usize,
}

/// How calls reach the service (`--route`).
#[derive(Clone, Copy)]
enum Route {
    Router,
    Direct,
    Own,
}

#[derive(Clone)]
struct Noop;

/// The gRPC server, with or without ratelimitd's direct route for RLS calls.
async fn serve<S>(route: Route, conns: S)
where
    S: tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    let rls = RateLimitServiceServer::new(Noop);
    let served = match route {
        Route::Direct => {
            tonic::transport::Server::builder()
                .layer(RlsRouteLayer::new(rls.clone()))
                .add_service(rls)
                .serve_with_incoming(conns)
                .await
        }
        Route::Router => {
            tonic::transport::Server::builder()
                .add_service(rls)
                .serve_with_incoming(conns)
                .await
        }
        Route::Own => return serve_own(rls, conns).await,
    };
    served.unwrap();
}

/// Each connection served by hyper (HTTP/2 only) with the direct route, as ratelimitd serves
/// gRPC: none of tonic's transport layers around the calls.
async fn serve_own<S>(rls: RateLimitServiceServer<Noop>, conns: S)
where
    S: tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    use tower::ServiceExt;
    use tower_layer::Layer;
    let routes = tonic::service::Routes::new(rls.clone()).prepare();
    let service = RlsRouteLayer::new(rls)
        .layer(routes)
        .map_request(|r: http::Request<hyper::body::Incoming>| r.map(tonic::body::Body::new));
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .http2_only();
    let mut conns = std::pin::pin!(conns);
    while let Some(conn) = tokio_stream::StreamExt::next(&mut conns).await {
        let Ok(conn) = conn else { continue };
        let (service, builder) = (service.clone(), builder.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(conn);
            let service = hyper_util::service::TowerToHyperService::new(service);
            let _ = builder.serve_connection(io, service).await;
        });
    }
}

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let statuses = request
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses,
            ..Default::default()
        }))
    }
}

fn main() {
    let args = Args::parse();
    assert!(
        args.addr.starts_with("127.") || args.addr.starts_with("[::1]"),
        "the no-op server only listens on loopback"
    );
    let route = match args.route.as_str() {
        "router" => Route::Router,
        "direct" => Route::Direct,
        "own" => Route::Own,
        other => panic!("--route {other}: expected router, direct or own"),
    };
    match args.runtime.as_str() {
        "multi_thread" => {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(&args.addr).await.unwrap();
                println!("noop listening grpc={}", listener.local_addr().unwrap());
                serve(route, TcpListenerStream::new(listener)).await;
            });
        }
        "per_core" => per_core(&args.addr, route, args.workers),
        other => panic!("--runtime {other}: expected per_core or multi_thread"),
    }
}

/// ratelimitd's `per_core`: this thread accepts; each connection is served by one of the
/// per-core runtimes, moved there as a std socket (no ratelimitd connection wrapper).
fn per_core(addr: &str, route: Route, workers: usize) {
    let workers = ratelimitd::workers::Workers::start(ratelimitd::workers::count(workers)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut queues = Vec::new();
        for handle in workers.handles() {
            let (tx, rx) = tokio::sync::mpsc::channel::<std::net::TcpStream>(64);
            queues.push(tx);
            let conns = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                tokio::net::TcpStream::from_std,
            );
            handle.spawn(serve(route, conns));
        }
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        println!("noop listening grpc={}", listener.local_addr().unwrap());
        for queue in queues.iter().cycle() {
            let (conn, _) = listener.accept().await.unwrap();
            conn.set_nodelay(true).unwrap();
            queue.send(conn.into_std().unwrap()).await.unwrap();
        }
    });
}
