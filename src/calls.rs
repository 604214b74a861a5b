//! Accounting for `ShouldRateLimit` calls: admission under `MAX_CONCURRENT_CALLS`, and each
//! call counted exactly once, however it ends.
//!
//! When Envoy's deadline passes (or a stream is reset), the handler future is dropped at its
//! `await`: code after it never runs. Counting there lost every cancelled call (a Redis stall
//! showed as traffic falling with no errors) and left the in-flight gauge raised for good. So
//! the counting lives in `Drop` impls: [`CallGuard`] for the call, [`BackendCall`] for the
//! store round trip.
//!
//! The metrics every call updates (the total, the call's and the store's latency and
//! in-flight counts) go into this thread's slot, folded into their handles when read
//! ([`crate::metrics::shards`]): no cache line is shared by every call on every core.

use std::{
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::{
    error::ServiceError,
    metrics::{
        self as m,
        shards::{self, Fold, Samples, Shards},
    },
};

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

/// The per-call metrics (handles registered once, updated through per-thread slots) and the
/// admission count.
pub struct Calls {
    metrics: Arc<CallMetrics>,
    /// `ratelimit_service_should_rate_limit_error`, one per [`Outcome::ERR_TYPES`] label:
    /// only failed calls count here, so these stay plain handles.
    errors: [Counter; Outcome::ERR_TYPES.len()],
    shed: Counter,
    /// Under `MAX_CONCURRENT_CALLS`, the calls being answered, admitted or not, and the bound:
    /// admission needs one count shared by every thread. Without a bound, none is kept.
    admission: Option<(AtomicU64, u64)>,
}

/// The metrics every call updates, in per-thread slots ([`shards`]), and the handles they
/// are folded into.
struct CallMetrics {
    slots: Shards<Slot>,
    total_requests: Counter,
    response_time: Histogram,
    in_flight: Gauge,
    backend_in_flight: Gauge,
    backend_duration: Histogram,
}

/// One thread's share of [`CallMetrics`]. The in-flight counts are deltas (a call may end on
/// another thread than it began on, under `multi_thread`): only their sum means anything.
#[derive(Default)]
struct Slot {
    total_requests: AtomicU64,
    in_flight: AtomicI64,
    backend_in_flight: AtomicI64,
    response_time: Samples,
    backend_duration: Samples,
}

impl Fold for CallMetrics {
    fn fold(&self) {
        let (mut total, mut in_flight, mut backend_in_flight) = (0, 0, 0);
        for slot in self.slots.iter() {
            total += slot.total_requests.swap(0, Ordering::Relaxed);
            in_flight += slot.in_flight.load(Ordering::Relaxed);
            backend_in_flight += slot.backend_in_flight.load(Ordering::Relaxed);
            slot.response_time.fold(&self.response_time);
            slot.backend_duration.fold(&self.backend_duration);
        }
        self.total_requests.increment(total);
        // A call's two updates may land on two slots, read a moment apart: never below 0.
        self.in_flight.set(in_flight.max(0) as f64);
        self.backend_in_flight.set(backend_in_flight.max(0) as f64);
    }
}

/// What the slots still hold reaches the handles.
impl Drop for CallMetrics {
    fn drop(&mut self) {
        self.fold();
    }
}

impl Calls {
    /// `max_concurrent_calls`: 0 means no bound.
    pub fn new(max_concurrent_calls: u64) -> Self {
        let metrics = Arc::new(CallMetrics {
            slots: Shards::default(),
            total_requests: counter!(m::TOTAL_REQUESTS, "grpc_method" => "ShouldRateLimit"),
            response_time: histogram!(m::RESPONSE_TIME, "grpc_method" => "ShouldRateLimit"),
            in_flight: gauge!(m::CALLS_IN_FLIGHT),
            backend_in_flight: gauge!(m::BACKEND_IN_FLIGHT),
            backend_duration: histogram!(m::BACKEND_DURATION),
        });
        let fold: Arc<dyn Fold> = metrics.clone();
        shards::register(Arc::downgrade(&fold));
        Self {
            metrics,
            errors: Outcome::ERR_TYPES
                .map(|t| counter!(m::SHOULD_RATE_LIMIT_ERROR, "err_type" => t)),
            shed: counter!(m::CALLS_SHED),
            admission: (max_concurrent_calls > 0)
                .then(|| (AtomicU64::new(0), max_concurrent_calls)),
        }
    }

    /// Starts a call received at `started`: its guard, or `Err(MAX_CONCURRENT_CALLS)` when
    /// that many are already in flight (the refused call is counted as shed).
    pub fn begin(&self, started: Instant) -> Result<CallGuard<'_>, u64> {
        let slot = self.metrics.slots.local();
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut call = CallGuard {
            calls: self,
            slot,
            started,
            outcome: Outcome::Cancelled,
        };
        match &self.admission {
            Some((in_flight, max)) if in_flight.fetch_add(1, Ordering::Relaxed) >= *max => {
                call.outcome = Outcome::Shed;
                Err(*max)
            }
            _ => Ok(call),
        }
    }

    /// A store round trip starting now: the backend's in-flight gauge and duration, counted
    /// until the value is dropped.
    pub fn backend_call(&self) -> BackendCall<'_> {
        let slot = self.metrics.slots.local();
        slot.backend_in_flight.fetch_add(1, Ordering::Relaxed);
        BackendCall {
            metrics: &self.metrics,
            slot,
            started: Instant::now(),
        }
    }
}

/// One call in flight; counted when dropped, as [`CallGuard::outcome`] says by then.
pub struct CallGuard<'a> {
    calls: &'a Calls,
    slot: &'a Slot,
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
        let (c, slot) = (self.calls, self.slot);
        slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some((in_flight, _)) = &c.admission {
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        slot.total_requests.fetch_add(1, Ordering::Relaxed);
        let took = self.started.elapsed().as_secs_f64();
        slot.response_time.push(took, &c.metrics.response_time);
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
    metrics: &'a CallMetrics,
    slot: &'a Slot,
    started: Instant,
}

impl Drop for BackendCall<'_> {
    fn drop(&mut self) {
        self.slot.backend_in_flight.fetch_sub(1, Ordering::Relaxed);
        let took = self.started.elapsed().as_secs_f64();
        self.slot
            .backend_duration
            .push(took, &self.metrics.backend_duration);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use metrics::{HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;

    /// Latency samples recorded into a histogram handle.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<f64>>);

    impl HistogramFn for Recorded {
        fn record(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    /// Handles by metric name (labels ignored: each name is registered once here).
    #[derive(Default)]
    struct Handles {
        counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
        gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
        histograms: Mutex<HashMap<String, Arc<Recorded>>>,
    }

    impl Handles {
        fn count(&self, name: &str) -> u64 {
            self.counters.lock().unwrap()[name].load(Ordering::Relaxed)
        }
        fn gauge(&self, name: &str) -> f64 {
            f64::from_bits(self.gauges.lock().unwrap()[name].load(Ordering::Relaxed))
        }
        fn samples(&self, name: &str) -> usize {
            self.histograms.lock().unwrap()[name]
                .0
                .lock()
                .unwrap()
                .len()
        }
    }

    impl Recorder for Handles {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let mut c = self.counters.lock().unwrap();
            Counter::from_arc(c.entry(key.name().to_owned()).or_default().clone())
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            let mut g = self.gauges.lock().unwrap();
            Gauge::from_arc(g.entry(key.name().to_owned()).or_default().clone())
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            let mut h = self.histograms.lock().unwrap();
            Histogram::from_arc(h.entry(key.name().to_owned()).or_default().clone())
        }
    }

    #[test]
    fn a_fold_brings_every_call_and_store_call_to_the_handles_exactly() {
        let handles = Handles::default();
        let calls = metrics::with_local_recorder(&handles, || Calls::new(0));
        let started = Instant::now();
        let (a, b, c) = (
            calls.begin(started),
            calls.begin(started),
            calls.begin(started),
        );
        let backend = calls.backend_call();
        // Counted on another thread too: its own slot.
        std::thread::scope(|s| {
            s.spawn(|| drop(calls.begin(started)));
        });
        drop((a, b));
        calls.metrics.fold();
        assert_eq!(handles.count(m::TOTAL_REQUESTS), 3);
        assert_eq!(handles.samples(m::RESPONSE_TIME), 3);
        assert_eq!(handles.gauge(m::CALLS_IN_FLIGHT), 1.0);
        assert_eq!(handles.gauge(m::BACKEND_IN_FLIGHT), 1.0);
        assert_eq!(handles.samples(m::BACKEND_DURATION), 0);
        drop((c, backend));
        calls.metrics.fold();
        assert_eq!(handles.count(m::TOTAL_REQUESTS), 4, "each call once");
        assert_eq!(handles.samples(m::RESPONSE_TIME), 4);
        assert_eq!(handles.gauge(m::CALLS_IN_FLIGHT), 0.0);
        assert_eq!(handles.gauge(m::BACKEND_IN_FLIGHT), 0.0);
        assert_eq!(handles.samples(m::BACKEND_DURATION), 1);
        // What the slots hold reaches the handles when the calls' metrics go.
        drop(calls.begin(started));
        drop(calls);
        assert_eq!(handles.count(m::TOTAL_REQUESTS), 5);
        assert_eq!(handles.samples(m::RESPONSE_TIME), 5);
    }

    #[test]
    fn a_thread_records_its_samples_itself_when_its_slot_is_full() {
        let handles = Handles::default();
        let calls = metrics::with_local_recorder(&handles, || Calls::new(0));
        for _ in 0..Samples::CAP - 1 {
            drop(calls.begin(Instant::now()));
        }
        assert_eq!(handles.samples(m::RESPONSE_TIME), 0, "waiting in the slot");
        drop(calls.begin(Instant::now()));
        assert_eq!(handles.samples(m::RESPONSE_TIME), Samples::CAP);
    }

    #[test]
    fn calls_over_the_bound_are_shed_and_still_counted_once() {
        let handles = Handles::default();
        let calls = metrics::with_local_recorder(&handles, || Calls::new(1));
        let first = calls.begin(Instant::now()).ok();
        assert!(first.is_some());
        assert_eq!(calls.begin(Instant::now()).err(), Some(1));
        drop(first);
        assert!(calls.begin(Instant::now()).is_ok(), "room again");
        calls.metrics.fold();
        assert_eq!(handles.count(m::TOTAL_REQUESTS), 3);
        assert_eq!(handles.count(m::CALLS_SHED), 1);
        assert_eq!(handles.gauge(m::CALLS_IN_FLIGHT), 0.0);
    }
}
