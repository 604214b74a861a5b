//! ratelimitd: an Envoy rate limit service (RLS v3), drop-in compatible with
//! envoyproxy/ratelimit.
//!
//! - [`config`]: the reference's YAML rules, validated and compiled into an immutable tree.
//! - [`matcher`]: descriptor to rule, level by level, pure.
//! - [`limiter`]: fixed windows, counter keys and the OK/OVER_LIMIT decision, clock injected.
//! - [`store`]: counters in Redis or in memory behind one async trait.
//! - [`service`]: `ShouldRateLimit`, protobuf in and out.
//! - [`server`] and [`admin`]: the gRPC and HTTP listeners.
//! - [`settings`]: flags with the reference's environment variable names.

pub mod admin;
pub mod cli;
pub mod config;
pub mod conn;
pub mod error;
pub mod explain;
pub mod health;
pub mod json;
pub mod limiter;
pub mod log_throttle;
pub mod matcher;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod service;
pub mod settings;
pub mod statsd;
pub mod store;
