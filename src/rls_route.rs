//! The rate-limit service's calls go straight to its tonic server; every other gRPC path
//! (health, reflection, unknown services) through tonic's router, as before.
//!
//! Why: tonic routes with axum. Per call that router matches the path into URL parameters,
//! percent-decodes them into request extensions, clones the route's boxed service and boxes
//! the body into axum's type and back into tonic's: ten allocations and about 2,200
//! instructions per call on the one path that sits in front of every API request
//! (docs/benchmarks.md, "The RLS route"). A layer around the router sees each request first and
//! hands the service's own paths to its server, which answers unknown methods with
//! `UNIMPLEMENTED` as the router's route would.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures_util::future::Either;
use http::{Request, Response};
use tonic::{body::Body, server::NamedService};
use tower_layer::Layer;
use tower_service::Service;

/// Puts [`RlsRoute`] in front of tonic's router (`Server::builder().layer(..)`).
#[derive(Clone)]
pub struct RlsRouteLayer<S> {
    rls: S,
}

impl<S> RlsRouteLayer<S> {
    /// `rls` answers its service's paths (`/<NamedService::NAME>/<method>`).
    pub fn new(rls: S) -> Self {
        Self { rls }
    }
}

impl<S: Clone, R> Layer<R> for RlsRouteLayer<S> {
    type Service = RlsRoute<S, R>;

    fn layer(&self, rest: R) -> Self::Service {
        RlsRoute {
            rls: self.rls.clone(),
            rest,
        }
    }
}

/// `rls` for its own service's paths, `rest` (tonic's router) for the others.
#[derive(Clone)]
pub struct RlsRoute<S, R> {
    rls: S,
    rest: R,
}

/// Whether `path` is `/<service>/<method>` for a non-empty method: the paths tonic's router
/// sends to `service` (`/<service>/{*rest}`).
fn is_service_path(path: &str, service: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(service))
        .and_then(|p| p.strip_prefix('/'))
        .is_some_and(|method| !method.is_empty())
}

impl<S, R> Service<Request<Body>> for RlsRoute<S, R>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + NamedService,
    R: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, R::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (tonic's generated servers and its router); asked anyway, so
        // a service that someday is not keeps its contract.
        match self.rls.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.rest.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if is_service_path(req.uri().path(), S::NAME) {
            Either::Left(self.rls.call(req))
        } else {
            Either::Right(self.rest.call(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RLS: &str = "envoy.service.ratelimit.v3.RateLimitService";

    /// Answers every request with its own name in an `x-served-by` header.
    #[derive(Clone)]
    struct Named(&'static str);

    impl NamedService for Named {
        const NAME: &'static str = RLS;
    }

    impl Service<Request<Body>> for Named {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert("x-served-by", http::HeaderValue::from_static(self.0));
            std::future::ready(Ok(response))
        }
    }

    #[tokio::test]
    async fn rls_paths_reach_the_rls_server_and_the_rest_the_router() {
        let mut route = RlsRouteLayer::new(Named("rls")).layer(Named("router"));
        for (path, served_by) in [
            (
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                "rls",
            ),
            ("/grpc.health.v1.Health/Check", "router"),
            ("/envoy.service.ratelimit.v3.RateLimitService/", "router"),
        ] {
            std::future::poll_fn(|cx| route.poll_ready(cx))
                .await
                .unwrap();
            let req = Request::post(path).body(Body::empty()).unwrap();
            let response = route.call(req).await.unwrap();
            assert_eq!(response.headers()["x-served-by"], served_by, "{path}");
        }
    }

    #[test]
    fn only_the_services_own_methods_take_the_direct_route() {
        let direct = |p: &str| is_service_path(p, RLS);
        assert!(direct(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
        ));
        assert!(direct("/envoy.service.ratelimit.v3.RateLimitService/Other"));
        for other in [
            "/envoy.service.ratelimit.v3.RateLimitService/",
            "/envoy.service.ratelimit.v3.RateLimitService",
            "/envoy.service.ratelimit.v3.RateLimitServiceX/ShouldRateLimit",
            "/envoy.service.ratelimit.v2.RateLimitService/ShouldRateLimit",
            "/grpc.health.v1.Health/Check",
            "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            "/",
            "",
        ] {
            assert!(!direct(other), "{other}");
        }
    }
}
