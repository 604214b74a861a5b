//! Counter storage behind one async trait: Redis for fleets, memory for a single instance.
//!
//! A request's checks go to the store in one call, [`Store::decide`] (one Redis round trip):
//! the store runs the counting engine on them atomically (memory: under the locks of every
//! key they touch; Redis: one Lua script, `engine.lua`, or `fixed.lua` for fixed windows
//! alone) and returns every check's decision.
//! With `REDIS_PERSECOND=true`, [`SplitStore`] sends per-second limits to a second Redis.
//! Either Redis may be a single server, a Sentinel-managed master or a cluster (`REDIS_TYPE`,
//! `topology.rs`): `redis.rs`, `sentinel.rs`, `cluster.rs`.

mod cluster;
mod memory;
mod pipe;
mod redis;
mod resp;
mod script;
mod sentinel;
mod slot;
mod split;
mod tls;
mod topology;

use std::future::Future;

pub use self::memory::MemoryStore;
pub use self::redis::{
    connection_count, uses_tls, RedisSettings, RedisStore, RedisTls, SocketType,
};
pub use self::split::SplitStore;
pub use self::topology::{RedisType, UrlError};

pub use crate::deadline::Deadline;
pub use crate::limiter::MAX_COUNT;
use crate::{
    limiter::engine::{Batch, DecidedList},
    otel::StoreSpan,
};

/// Why the store could not answer. Under `BACKEND_FAILURE_POLICY=error` every store error fails
/// the RPC with `UNAVAILABLE` (see [`crate::failure`] for the other policies); the
/// client learns only the [`StoreErrorKind`], the log gets the whole text. A source's text is
/// part of `Display` as well as `source()`: errors are logged with `%e`, one line each.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within `REDIS_TIMEOUT`.
    #[error("redis: no answer within {0:?} (REDIS_TIMEOUT)")]
    Timeout(std::time::Duration),
    /// No answer within the call's own deadline (`grpc-timeout` less
    /// `BACKEND_DEADLINE_MARGIN`); the store call was given up.
    #[error(
        "no answer within the call's deadline ({0:?}: grpc-timeout less BACKEND_DEADLINE_MARGIN)"
    )]
    Deadline(std::time::Duration),
    /// Not called: the circuit breaker is open after repeated failures.
    #[error("not called: the backend circuit is open after repeated failures")]
    CircuitOpen,
    /// Connection refused, reset or not yet re-established.
    #[error("redis connection error: {0}")]
    Connection(#[source] ::redis::RedisError),
    /// The server answered with an error.
    #[error("redis error response: {0}")]
    Response(#[source] ::redis::RedisError),
    /// A reply that the command does not give (e.g. `WRONGTYPE` for a key someone else
    /// wrote, or the wrong number of results).
    #[error("redis error response: unexpected reply: {0}")]
    Reply(String),
    /// `REDIS_URL`/`REDIS_AUTH` cannot be used; only at start-up.
    #[error("invalid Redis settings: {0}")]
    Settings(#[source] ::redis::RedisError),
    /// `REDIS_URL` does not fit `REDIS_TYPE`, or the topology cannot honour a setting; only
    /// at start-up.
    #[error("invalid Redis settings: {0}")]
    Topology(String),
    /// One of the above from the per-second Redis (`REDIS_PERSECOND=true`).
    #[error("per-second Redis (REDIS_PERSECOND_URL): {0}")]
    PerSecond(#[source] Box<StoreError>),
}

impl StoreError {
    /// `e`, as the per-second Redis's.
    pub fn per_second(e: StoreError) -> StoreError {
        StoreError::PerSecond(Box::new(e))
    }

    /// A `REDIS_URL` that does not fit its `REDIS_TYPE`.
    pub fn url(e: UrlError) -> StoreError {
        StoreError::Topology(e.to_string())
    }

    /// The coarse kind, for metric labels and client messages.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::PerSecond(e) => e.kind(),
            StoreError::Timeout(_) | StoreError::Deadline(_) => StoreErrorKind::Timeout,
            StoreError::CircuitOpen => StoreErrorKind::CircuitOpen,
            StoreError::Connection(_) | StoreError::Settings(_) | StoreError::Topology(_) => {
                StoreErrorKind::Connection
            }
            StoreError::Response(_) | StoreError::Reply(_) => StoreErrorKind::Response,
        }
    }

    /// Whether trying again later can help: timeouts and lost connections, not wrong replies
    /// or settings.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::PerSecond(e) => e.is_transient(),
            e => matches!(
                e,
                StoreError::Timeout(_)
                    | StoreError::Deadline(_)
                    | StoreError::Connection(_)
                    | StoreError::CircuitOpen
            ),
        }
    }
}

/// What went wrong, coarse enough for a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// No answer within `REDIS_TIMEOUT`.
    Timeout,
    /// Connection refused, reset or not yet re-established.
    Connection,
    /// The server answered with an error (e.g. a key holding a non-integer).
    Response,
    /// Not called: the circuit breaker is open.
    CircuitOpen,
}

impl StoreErrorKind {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::Connection => "connection",
            StoreErrorKind::Response => "response",
            StoreErrorKind::CircuitOpen => "circuit_open",
        }
    }
}

impl std::fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::Connection => "connection error",
            StoreErrorKind::Response => "error response",
            StoreErrorKind::CircuitOpen => "circuit open",
        })
    }
}

/// The span of a call to Redis, named as the reference names it.
const REDIS_SPAN: StoreSpan = StoreSpan {
    name: "Redis Pipeline Execution",
    system: Some("redis"),
};
/// The span of a call to the in-memory store.
const MEMORY_SPAN: StoreSpan = StoreSpan {
    name: "Memory Store Execution",
    system: None,
};

/// Counter storage.
pub trait Store: Send + Sync + 'static {
    /// Decides every check of `batch` atomically, as [`crate::limiter::engine::decide`] does
    /// from the keys' states at one instant, stores the charged states, and returns the
    /// decisions in order. Never retried by the caller: a retry after an ambiguous failure
    /// could charge twice.
    fn decide(
        &self,
        batch: &Batch<'_>,
    ) -> impl Future<Output = Result<DecidedList, StoreError>> + Send;

    /// [`Store::decide`], given up at the call's `deadline` with [`StoreError::Deadline`]. By
    /// default with a timer of its own ([`within`]); a store that can bound the call itself
    /// does it there (our own Redis connection: one timer for every call on it).
    fn decide_by(
        &self,
        batch: &Batch<'_>,
        deadline: Option<Deadline>,
    ) -> impl Future<Output = Result<DecidedList, StoreError>> + Send {
        within(deadline, self.decide(batch))
    }

    /// A [`Store::decide`] call's trace span.
    fn span(&self) -> StoreSpan {
        MEMORY_SPAN
    }
}

/// `call`, given up at `deadline` (if any) with [`StoreError::Deadline`]: a tokio timer for
/// this call alone, armed only if it is not answered on its first poll.
pub async fn within<T>(
    deadline: Option<Deadline>,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match deadline {
        None => call.await,
        Some(d) => tokio::time::timeout_at(d.at.into(), call)
            .await
            .unwrap_or(Err(StoreError::Deadline(d.budget))),
    }
}

/// Which counter store to run (`BACKEND_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

/// The store chosen at start-up.
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
    /// `REDIS_PERSECOND=true`: per-second limits in a Redis of their own.
    Split(SplitStore),
}

impl AnyStore {
    /// Builds the store for `backend`, with a per-second Redis when `per_second` is given (the
    /// memory backend ignores it, as the reference's does); the memory store also gets its
    /// sweeper task (so call this inside the runtime). Redis connects lazily: an error here is
    /// a settings error.
    pub fn new(
        backend: Backend,
        redis: &RedisSettings,
        per_second: Option<&RedisSettings>,
        memory_max_counters: std::num::NonZeroUsize,
        clock: std::sync::Arc<dyn crate::limiter::Clock>,
    ) -> Result<Self, StoreError> {
        Ok(match (backend, per_second) {
            (Backend::Memory, _) => {
                let store = MemoryStore::new(clock, memory_max_counters);
                store.spawn_sweeper(std::time::Duration::from_secs(1));
                AnyStore::Memory(store)
            }
            (Backend::Redis, None) => AnyStore::Redis(RedisStore::new(redis)?),
            (Backend::Redis, Some(per_second)) => {
                AnyStore::Split(SplitStore::connect(redis, per_second)?)
            }
        })
    }

    /// Short backend name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            AnyStore::Memory(_) => "memory",
            AnyStore::Redis(_) | AnyStore::Split(_) => "redis",
        }
    }

    /// `PING` on every Redis (none for memory), bounded by `REDIS_TIMEOUT`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(_) => Ok(()),
            AnyStore::Redis(s) => s.ping().await,
            AnyStore::Split(s) => s.ping().await,
        }
    }
}

impl Store for AnyStore {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        self.decide_by(batch, None).await
    }

    async fn decide_by(
        &self,
        batch: &Batch<'_>,
        deadline: Option<Deadline>,
    ) -> Result<DecidedList, StoreError> {
        match self {
            AnyStore::Memory(s) => s.decide_by(batch, deadline).await,
            // Inline: `RedisStore` boxes the sentinel and cluster futures (redis-rs's, large)
            // itself, and the single topology's on our own connection is small.
            AnyStore::Redis(s) => s.decide_by(batch, deadline).await,
            AnyStore::Split(s) => Box::pin(s.decide_by(batch, deadline)).await,
        }
    }

    fn span(&self) -> StoreSpan {
        match self {
            AnyStore::Memory(_) => MEMORY_SPAN,
            AnyStore::Redis(_) | AnyStore::Split(_) => REDIS_SPAN,
        }
    }
}
