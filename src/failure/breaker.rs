//! A circuit breaker in front of the counter store.
//!
//! Why: once Redis hangs, every call waits for its deadline before the failure policy answers,
//! so each call costs the whole budget and keeps a store request in flight. After
//! [`BreakerSettings::failures`] consecutive failures (timeouts, lost connections) the circuit
//! opens and calls are answered by the policy at once, without a store call. After
//! [`BreakerSettings::open_for`] it is half-open: one call per
//! [`BreakerSettings::probe_interval`] goes to the store as a probe, the others are answered by
//! the policy; a success closes the circuit, a failure opens it again.
//!
//! Probes are let through by rate, not one at a time, so a probe whose call is cancelled (the
//! future dropped at its deadline) cannot leave the breaker waiting for it forever.
//!
//! The request path while closed and healthy reads two atomics and takes no lock. Every other
//! path takes a std `Mutex` for a few instructions (no await happens while it is held). The
//! caller passes the time in, so tests drive the state machine with made-up instants.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use metrics::{counter, gauge, Counter, Gauge};

use crate::metrics as m;

/// `BACKEND_CIRCUIT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit; 0 disables the breaker.
    pub failures: u32,
    /// How long it stays open before probing.
    pub open_for: Duration,
    /// While half-open, at most one probe per this.
    pub probe_interval: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(1),
            probe_interval: Duration::from_millis(100),
        }
    }
}

/// The circuit's state; its number is the state gauge's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    /// The transitions counter's `to` label.
    pub fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// What to do with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: call the store.
    Call,
    /// Half-open: call the store as the probe.
    Probe,
    /// Open (or half-open between probes): answer without the store.
    Reject,
}

struct Inner {
    state: State,
    /// Consecutive failures while closed.
    failures: u32,
    /// Open: when it turns half-open.
    open_until: Instant,
    /// Half-open: when the next probe may go.
    next_probe: Instant,
}

/// The breaker of one store.
pub struct Breaker {
    settings: BreakerSettings,
    /// The state for the fast path; `inner` is the truth, and both change under its lock.
    state: AtomicU8,
    /// Closed with failures counted: a success must take the lock to reset them.
    failing: AtomicBool,
    /// The state machine: a std Mutex, held for a few assignments, never across an await.
    inner: Mutex<Inner>,
    /// `ratelimitd_backend_circuit_state`.
    gauge: Gauge,
    /// Transitions, by the state entered (in [`State::ALL`] order).
    transitions: [Counter; 3],
}

/// Locks `m`; the sections only assign fields, so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Breaker {
    pub fn new(settings: BreakerSettings, now: Instant) -> Self {
        let gauge = gauge!(m::BACKEND_CIRCUIT_STATE);
        gauge.set(0.0);
        Self {
            settings,
            state: AtomicU8::new(State::Closed as u8),
            failing: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                state: State::Closed,
                failures: 0,
                open_until: now,
                next_probe: now,
            }),
            gauge,
            transitions: State::ALL
                .map(|s| counter!(m::BACKEND_CIRCUIT_TRANSITIONS, "to" => s.label())),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        lock(&self.inner).state
    }

    /// Whether a call made now goes to the store: [`Breaker::admit`], reading the clock only
    /// when the circuit is not plainly closed (a closed circuit costs one atomic load).
    pub fn admit_now(&self) -> Admit {
        if self.plainly_closed() {
            return Admit::Call;
        }
        self.admit(Instant::now())
    }

    /// No breaker (`failures` 0), or a closed circuit.
    fn plainly_closed(&self) -> bool {
        self.settings.failures == 0 || self.state.load(Ordering::Acquire) == State::Closed as u8
    }

    /// Whether a call at `now` goes to the store.
    pub fn admit(&self, now: Instant) -> Admit {
        if self.plainly_closed() {
            return Admit::Call;
        }
        let mut inner = lock(&self.inner);
        match inner.state {
            State::Closed => Admit::Call,
            State::Open if now < inner.open_until => Admit::Reject,
            State::Open | State::HalfOpen => {
                if inner.state == State::Open {
                    self.enter(&mut inner, State::HalfOpen);
                    inner.next_probe = now;
                }
                if now >= inner.next_probe {
                    inner.next_probe = now + self.settings.probe_interval;
                    Admit::Probe
                } else {
                    Admit::Reject
                }
            }
        }
    }

    /// The store answered: the circuit closes (if it was not).
    pub fn success(&self) {
        if self.state.load(Ordering::Acquire) == State::Closed as u8
            && !self.failing.load(Ordering::Acquire)
        {
            return;
        }
        let mut inner = lock(&self.inner);
        inner.failures = 0;
        self.failing.store(false, Ordering::Release);
        if inner.state != State::Closed {
            self.enter(&mut inner, State::Closed);
        }
    }

    /// The store failed (timeout or lost connection) at `now`.
    pub fn failure(&self, now: Instant) {
        if self.settings.failures == 0 {
            return;
        }
        let mut inner = lock(&self.inner);
        match inner.state {
            State::Closed => {
                inner.failures = inner.failures.saturating_add(1);
                self.failing.store(true, Ordering::Release);
                if inner.failures >= self.settings.failures {
                    inner.open_until = now + self.settings.open_for;
                    self.enter(&mut inner, State::Open);
                }
            }
            State::HalfOpen => {
                inner.open_until = now + self.settings.open_for;
                self.enter(&mut inner, State::Open);
            }
            // A call let through before the circuit opened: it is open already.
            State::Open => {}
        }
    }

    /// Moves to `to`, publishing and logging the transition (the outage's first opening at
    /// WARN and the recovery at INFO; the open/half-open cycle of a lasting outage at DEBUG).
    fn enter(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        inner.state = to;
        inner.failures = 0;
        self.state.store(to as u8, Ordering::Release);
        self.gauge.set(f64::from(to as u8));
        if let Some(c) = self.transitions.get(to as usize) {
            c.increment(1);
        }
        match (from, to) {
            (State::Closed, State::Open) => tracing::warn!(
                failures = self.settings.failures,
                open_for = ?self.settings.open_for,
                "backend circuit opened: calls are answered by BACKEND_FAILURE_POLICY without the backend"
            ),
            (_, State::Closed) => {
                tracing::info!("backend circuit closed: the backend answers again")
            }
            _ => tracing::debug!(from = from.label(), to = to.label(), "backend circuit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn breaker(t0: Instant) -> Breaker {
        Breaker::new(
            BreakerSettings {
                failures: 3,
                open_for: 1000 * MS,
                probe_interval: 100 * MS,
            },
            t0,
        )
    }

    #[test]
    fn admit_now_calls_while_closed_and_rejects_while_open() {
        let t0 = Instant::now();
        let b = breaker(t0);
        assert_eq!(b.admit_now(), Admit::Call, "closed");
        for _ in 0..3 {
            b.failure(Instant::now());
        }
        assert_eq!(b.state(), State::Open);
        // Opened for a second just now: still open when read a moment later.
        assert_eq!(b.admit_now(), Admit::Reject);
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let b = breaker(t0);
        b.failure(t0);
        b.failure(t0);
        b.success();
        b.failure(t0);
        b.failure(t0);
        assert_eq!(b.state(), State::Closed, "a success resets the count");
        assert_eq!(b.admit(t0), Admit::Call);
        b.failure(t0);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t0 + 999 * MS), Admit::Reject);
        // A late failure of a call let through before does not extend the opening.
        b.failure(t0 + 500 * MS);
        assert_eq!(b.admit(t0 + 999 * MS), Admit::Reject);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn half_open_lets_one_probe_through_per_interval_then_closes_on_success() {
        let t0 = Instant::now();
        let b = breaker(t0);
        for _ in 0..3 {
            b.failure(t0);
        }
        let t1 = t0 + 1000 * MS;
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(t1), Admit::Reject);
        assert_eq!(b.admit(t1 + 99 * MS), Admit::Reject);
        // The probe was cancelled: another goes after the interval anyway.
        assert_eq!(b.admit(t1 + 100 * MS), Admit::Probe);
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(t1 + 101 * MS), Admit::Call);
        // Closing forgot the failures: it takes 3 new ones to open again.
        b.failure(t1);
        b.failure(t1);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failed_probe_opens_it_again_for_the_whole_duration() {
        let t0 = Instant::now();
        let b = breaker(t0);
        for _ in 0..3 {
            b.failure(t0);
        }
        let t1 = t0 + 1500 * MS;
        assert_eq!(b.admit(t1), Admit::Probe);
        b.failure(t1 + 20 * MS);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t1 + 1019 * MS), Admit::Reject);
        assert_eq!(b.admit(t1 + 1020 * MS), Admit::Probe);
    }

    #[test]
    fn zero_failures_disables_it() {
        let t0 = Instant::now();
        let b = Breaker::new(
            BreakerSettings {
                failures: 0,
                ..BreakerSettings::default()
            },
            t0,
        );
        for _ in 0..100 {
            b.failure(t0);
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(t0), Admit::Call);
    }
}
