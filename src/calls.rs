//! Accounting for `ShouldRateLimit` calls: admission under `MAX_CONCURRENT_CALLS`, and each
//! call counted exactly once, however it ends.
//!
//! When Envoy's deadline passes (or a stream is reset), the handler future is dropped at its
//! `await`: code after it never runs. Counting there lost every cancelled call (a Redis stall
//! showed as traffic falling with no errors) and left the in-flight gauge raised for good. So
//! the counting lives in `Drop` impls: [`CallGuard`] for the call, [`BackendCall`] for the
//! store round trip.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::{error::ServiceError, metrics as m};

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Invalid,
    Backend,
    /// Refused because `MAX_CONCURRENT_CALLS` calls were in flight.
    Shed,
    /// The client went away (Envoy's deadline, a reset stream) before the answer: the handler
    /// future was dropped. A call's outcome until it says otherwise.
    Cancelled,
}

impl Outcome {
    /// `err_type` label values: the reference's two, then ours.
    pub const ERR_TYPES: [&'static str; 4] =
        ["service_error", "redis_error", "overloaded", "cancelled"];

    fn err_index(self) -> Option<usize> {
        match self {
            Outcome::Answered => None,
            Outcome::Invalid => Some(0),
            Outcome::Backend => Some(1),
            Outcome::Shed => Some(2),
            Outcome::Cancelled => Some(3),
        }
    }
}

/// The per-call metrics (handles registered once) and the in-flight count.
pub struct Calls {
    total_requests: Counter,
    response_time: Histogram,
    /// `ratelimit_service_should_rate_limit_error`, one per [`Outcome::ERR_TYPES`] label.
    errors: [Counter; Outcome::ERR_TYPES.len()],
    /// Calls being answered, admitted or not.
    in_flight: AtomicU64,
    max_in_flight: u64,
    in_flight_gauge: Gauge,
    shed: Counter,
}

impl Calls {
    /// `max_concurrent_calls`: 0 means no bound.
    pub fn new(max_concurrent_calls: u64) -> Self {
        Self {
            total_requests: counter!(m::TOTAL_REQUESTS, "grpc_method" => "ShouldRateLimit"),
            response_time: histogram!(m::RESPONSE_TIME, "grpc_method" => "ShouldRateLimit"),
            errors: Outcome::ERR_TYPES
                .map(|t| counter!(m::SHOULD_RATE_LIMIT_ERROR, "err_type" => t)),
            in_flight: AtomicU64::new(0),
            max_in_flight: match max_concurrent_calls {
                0 => u64::MAX,
                n => n,
            },
            in_flight_gauge: gauge!(m::CALLS_IN_FLIGHT),
            shed: counter!(m::CALLS_SHED),
        }
    }

    /// Starts a call received at `started`: its guard, or `Err(MAX_CONCURRENT_CALLS)` when
    /// that many are already in flight (the refused call is counted as shed).
    pub fn begin(&self, started: Instant) -> Result<CallGuard<'_>, u64> {
        let admitted = self.in_flight.fetch_add(1, Ordering::Relaxed) < self.max_in_flight;
        self.in_flight_gauge.increment(1.0);
        let mut call = CallGuard {
            calls: self,
            started,
            outcome: Outcome::Cancelled,
        };
        if admitted {
            Ok(call)
        } else {
            call.outcome = Outcome::Shed;
            Err(self.max_in_flight)
        }
    }
}

/// One call in flight; counted when dropped, as [`CallGuard::outcome`] says by then.
pub struct CallGuard<'a> {
    calls: &'a Calls,
    started: Instant,
    pub outcome: Outcome,
}

impl CallGuard<'_> {
    /// Records that the call ends with `error`, and gives it back.
    pub fn ends(&mut self, error: ServiceError) -> ServiceError {
        self.outcome = match &error {
            ServiceError::InvalidArgument(msg) => {
                tracing::debug!(error = %msg, "invalid request");
                Outcome::Invalid
            }
            // Logged once per stretch where it happened (failure::Guard).
            ServiceError::Store(_) => Outcome::Backend,
            ServiceError::Overloaded(_) => Outcome::Shed,
            // The reference counts it as a service error.
            ServiceError::NoConfig => Outcome::Invalid,
        };
        error
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let c = self.calls;
        c.in_flight.fetch_sub(1, Ordering::Relaxed);
        c.in_flight_gauge.decrement(1.0);
        c.total_requests.increment(1);
        c.response_time.record(self.started.elapsed().as_secs_f64());
        if let Some(errors) = self.outcome.err_index().and_then(|i| c.errors.get(i)) {
            errors.increment(1);
        }
        if self.outcome == Outcome::Shed {
            c.shed.increment(1);
        }
    }
}

/// A store round trip in flight and its duration, recorded when dropped (so a call cancelled
/// while Redis hangs still lowers the gauge and shows in the histogram).
pub struct BackendCall<'a> {
    in_flight: &'a Gauge,
    duration: &'a Histogram,
    started: Instant,
}

impl<'a> BackendCall<'a> {
    pub fn new(in_flight: &'a Gauge, duration: &'a Histogram) -> Self {
        in_flight.increment(1.0);
        Self {
            in_flight,
            duration,
            started: Instant::now(),
        }
    }
}

impl Drop for BackendCall<'_> {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
        self.duration.record(self.started.elapsed().as_secs_f64());
    }
}
