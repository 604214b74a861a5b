//! Errors of the request path and the one place they become gRPC statuses.

use crate::store::StoreError;

/// Why a `ShouldRateLimit` call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is wrong; retrying it unchanged cannot help.
    #[error("{0}")]
    InvalidArgument(String),
    /// The counter store failed or timed out.
    #[error("rate limit backend unavailable: {0}")]
    Store(#[from] StoreError),
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        match &e {
            ServiceError::InvalidArgument(_) => tonic::Status::invalid_argument(e.to_string()),
            // The reference answers UNKNOWN; Envoy treats both as a failed call. UNAVAILABLE
            // says what happened and is the code clients treat as retryable.
            ServiceError::Store(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}
