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
    /// Rules over xDS, serving before the first config arrived: no rules to answer with.
    #[error("no rate limit configuration loaded")]
    NoConfig,
    /// `MAX_CONCURRENT_CALLS` calls were already in flight.
    #[error("too many calls in flight (MAX_CONCURRENT_CALLS={0}); retry later")]
    Overloaded(u64),
}

impl ServiceError {
    /// What the client is told. A backend's own error text stays in our logs: it can name
    /// keys, addresses or internals, and clients can do nothing with it.
    pub fn client_message(&self) -> String {
        match self {
            ServiceError::Store(e) => format!("rate limit backend unavailable ({})", e.kind()),
            other => other.to_string(),
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        let message = e.client_message();
        match e {
            ServiceError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            // The reference answers UNKNOWN; Envoy treats both as a failed call. UNAVAILABLE
            // says what happened and is the code clients treat as retryable.
            ServiceError::Store(_) => tonic::Status::unavailable(message),
            ServiceError::Overloaded(_) => tonic::Status::resource_exhausted(message),
            // The reference answers UNKNOWN with these words; the state is transient.
            ServiceError::NoConfig => tonic::Status::unavailable(message),
        }
    }
}
