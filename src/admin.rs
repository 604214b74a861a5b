//! HTTP admin listener (`HOST:PORT`, default 0.0.0.0:8080): `GET /healthcheck`.

use std::sync::Arc;

use axum::{routing::get, Router};

use crate::server::State;

/// Routes of the admin listener.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .with_state(state)
}

/// 200 `OK` while serving, as the reference answers it.
async fn healthcheck() -> &'static str {
    "OK"
}
