//! HTTP listeners. Admin (`HOST:PORT`): `/healthcheck`, `/json`, `/metrics`, `/rlconfig`.
//! Debug (`DEBUG_HOST:DEBUG_PORT`): `/rlconfig`, `/explain`, `/metrics`. Prometheus
//! (`USE_PROMETHEUS`): `PROMETHEUS_PATH`. They run as their own tasks on the shared runtime
//! and only read shared state, so they never hold up the gRPC path; request bodies are capped
//! at [`MAX_BODY_BYTES`].

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{DefaultBodyLimit, Query, State as AxumState},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    config::RuleTree,
    health::Health,
    limiter::{CacheKeyBuilder, Clock},
    service::RateLimiter,
    store::AnyStore,
};

/// Everything the listeners share (the gRPC server takes the limiter and health from it).
pub struct State {
    pub rules: Arc<ArcSwap<RuleTree>>,
    pub limiter: Arc<RateLimiter<AnyStore>>,
    pub health: Arc<Health>,
    /// Set when a Prometheus recorder is installed (always in `serve`).
    pub prometheus: Option<PrometheusHandle>,
    /// For `/explain`.
    pub keys: CacheKeyBuilder,
    pub clock: Arc<dyn Clock>,
    /// For `/json`.
    pub json: crate::json::Codec,
}

/// Largest accepted request body (`POST /json`).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

type Shared = AxumState<Arc<State>>;

/// Routes of the admin listener.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/json", post(json))
        .route("/metrics", get(metrics))
        .route("/rlconfig", get(rlconfig))
        .route("/usage", get(usage))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Routes of the debug listener.
pub fn debug_router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(debug_index))
        .route("/rlconfig", get(rlconfig))
        .route("/explain", get(explain))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The `USE_PROMETHEUS` listener: metrics at `path`.
pub fn prometheus_router(state: Arc<State>, path: &str) -> Router {
    Router::new().route(path, get(metrics)).with_state(state)
}

/// 200 `OK` while healthy, 500 otherwise (as the reference answers).
async fn healthcheck(AxumState(s): Shared) -> Response {
    if s.health.is_healthy() {
        "OK".into_response()
    } else {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

/// `ShouldRateLimit` over HTTP with proto3 JSON, like the reference's `/json`: 200 with the
/// response when OK, 429 when OVER_LIMIT, 400 for a malformed body or an invalid request,
/// 503 when the backend failed (the reference answers 400 there too), 500 for a response
/// with no proto3 JSON form (as the reference).
async fn json(AxumState(s): Shared, body: axum::body::Bytes) -> Response {
    let req = match s.json.parse_request(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match s.limiter.answer(&req).await {
        Ok(resp) => {
            let status = if resp.overall_code
                == crate::proto::envoy::service::ratelimit::v3::rate_limit_response::Code::OverLimit
                    as i32
            {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            };
            match s.json.render_response(&resp) {
                Ok(json) => {
                    (status, [(header::CONTENT_TYPE, "application/json")], json).into_response()
                }
                // As the reference: a response protojson cannot marshal is a 500.
                Err(e) => {
                    tracing::warn!(error = %e, "POST /json: response not written");
                    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
                }
            }
        }
        Err(e @ crate::error::ServiceError::InvalidArgument(_)) => {
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", e.client_message()),
        )
            .into_response(),
    }
}

async fn metrics(AxumState(s): Shared) -> Response {
    match &s.prometheus {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            crate::metrics::render(handle, s.limiter.stats()),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

/// One line per rule, in the reference's dump format.
async fn rlconfig(AxumState(s): Shared) -> String {
    let tree = s.rules.load();
    let mut out = String::new();
    for rule in tree.rules() {
        out.push_str(&rule.dump_line());
        out.push('\n');
    }
    out
}

/// `GET /explain?domain=D&descriptor=k1=v1,k2=v2[&descriptor=...]`.
async fn explain(AxumState(s): Shared, Query(params): Query<Vec<(String, String)>>) -> Response {
    let map: HashMap<&str, &str> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let Some(domain) = map.get("domain") else {
        return (
            StatusCode::BAD_REQUEST,
            "usage: /explain?domain=D&descriptor=k1=v1,k2=v2[&descriptor=...]\n",
        )
            .into_response();
    };
    let descriptors: Vec<Vec<(String, String)>> = params
        .iter()
        .filter(|(k, _)| k == "descriptor")
        .map(|(_, d)| {
            d.split(',')
                .filter(|e| !e.is_empty())
                .map(|e| match e.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (e.to_owned(), String::new()),
                })
                .collect()
        })
        .collect();
    let tree = s.rules.load();
    crate::explain::explain(&tree, &s.keys, domain, &descriptors, s.clock.now_unix())
        .into_response()
}

/// `GET /usage?domain=D&descriptor=k1=v1,k2=v2[&descriptor=...]`: every limit of each
/// descriptor as it stands, charging nothing (see `crate::usage`). 400 for a bad request, 503
/// when the backend failed.
async fn usage(AxumState(s): Shared, Query(params): Query<Vec<(String, String)>>) -> Response {
    let domain = params
        .iter()
        .find(|(k, _)| k == "domain")
        .map(|(_, v)| v.as_str());
    let descriptors: Vec<Vec<(String, String)>> = params
        .iter()
        .filter(|(k, _)| k == "descriptor")
        .map(|(_, d)| crate::usage::parse_descriptor(d))
        .collect();
    let Some(domain) = domain.filter(|_| !descriptors.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "usage: /usage?domain=D&descriptor=k1=v1,k2=v2[&descriptor=...]\n",
        )
            .into_response();
    };
    match s.limiter.usage(domain, &descriptors).await {
        Ok(usage) => {
            let body = crate::usage::to_json(domain, &descriptors, &usage);
            (
                [(header::CONTENT_TYPE, "application/json")],
                format!("{body:#}\n"),
            )
                .into_response()
        }
        Err(e @ crate::error::ServiceError::InvalidArgument(_)) => {
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        // As /json and gRPC answer: the kind of failure only; Redis's own text goes to the log.
        Err(e) => {
            tracing::warn!(error = %e, "GET /usage: backend failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", e.client_message()),
            )
                .into_response()
        }
    }
}

async fn debug_index() -> &'static str {
    "ratelimitd debug endpoints:\n  /rlconfig   the rules in force, one per line\n  /explain?domain=D&descriptor=k1=v1,k2=v2   which rule matches and why\n  /metrics    Prometheus metrics\n"
}
