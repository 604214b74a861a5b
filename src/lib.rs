//! ratelimitd: an Envoy rate limit service (RLS v3), drop-in compatible with
//! envoyproxy/ratelimit.
//!
//! - [`config`]: the reference's YAML rules, validated and compiled into an immutable tree.
//! - [`matcher`]: descriptor to rule, level by level, pure.
//! - [`limiter`]: the counting algorithms, the engine deciding a request's checks, counter
//!   keys; pure, clock injected.
//! - [`store`]: the engine run atomically on counters in Redis or in memory, behind one async
//!   trait (a single Redis, a Sentinel-managed master or a cluster; per-second limits
//!   optionally in a second one); [`local_cache`]: fixed windows
//!   known to be over, answered without the store.
//! - [`service`]: `ShouldRateLimit`, protobuf in and out ([`resolve`]: the request checked and
//!   each descriptor matched to its limits); [`answer`] builds the response from
//!   the store's decisions ([`metadata`]: its `dynamic_metadata`; [`body`]: an OVER_LIMIT
//!   answer's body); [`calls`] counts each call once.
//! - [`error`]: the request path's errors and their one mapping to gRPC statuses.
//! - [`failure`]: what a call gets when the store fails (`BACKEND_FAILURE_POLICY`), with the
//!   caller's deadline ([`deadline`]) and a circuit breaker bounding the store call.
//! - [`server`] and [`admin`]: the gRPC and HTTP listeners; [`conn`] accepts their
//!   connections (TCP_NODELAY, accept backoff, silent-connection timeout);
//!   [`h2_authority`] lets gRPC C-core clients' `:authority` through on the Unix socket;
//!   [`tls`]: TLS (and mTLS) on the gRPC listener, its files reloaded when they change.
//!   [`workers`]: `RUNTIME_FLAVOR=per_core`, one single-threaded runtime per core serving
//!   the gRPC connections handed to it.
//! - [`health`]: the health state behind `/healthcheck` and `grpc.health.v1`.
//! - [`otel`]: OpenTelemetry spans of calls and store calls (`TRACING_*`), OTLP export.
//! - [`metrics`]: one metrics pipeline, each event recorded once through the `metrics` facade
//!   and rendered for Prometheus; [`statsd`] exports the same events under the reference's
//!   StatsD names.
//! - [`json`]: proto3 JSON for `POST /json`; [`explain`]: which rule matches and why;
//!   [`usage`]: every limit of a descriptor as it stands (`/usage`, `ratelimitd usage`).
//! - [`settings`]: flags with the reference's environment variable names; [`serve`]: builds
//!   each part and wires them; [`cli`]: the other subcommands and logging.
//! - [`log_throttle`]: one log line per stretch of repeated failures; [`log_json`]: the
//!   reference's JSON log lines; [`stat_name`]: the reference's stat-name sanitising.
//! - [`xds`]: rules over xDS (`CONFIG_TYPE=GRPC_XDS_SOTW`): the ADS client and the
//!   conversion of `RateLimitConfig` resources into rules.
//! - [`proto`]: the generated Envoy RLS v3 types, and the xDS ones.

pub mod admin;
pub mod answer;
pub mod body;
pub mod calls;
pub mod cli;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod error;
pub mod explain;
pub mod failure;
pub mod h2_authority;
pub mod health;
pub mod json;
pub mod limiter;
pub mod local_cache;
pub mod log_json;
pub mod log_throttle;
pub mod matcher;
pub mod metadata;
pub mod metrics;
pub mod otel;
pub mod proto;
pub mod resolve;
pub mod rls_route;
pub mod serve;
pub mod server;
pub mod service;
pub mod settings;
pub mod spares;
pub mod stat_name;
pub mod statsd;
pub mod store;
pub mod tls;
pub mod usage;
pub mod workers;
pub mod xds;
