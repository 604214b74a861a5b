//! What a call gets when the counter store cannot answer (`BACKEND_FAILURE_POLICY`), and the
//! guards around the store call that make that answer come in time: the caller's deadline
//! ([`crate::deadline`], kept by the store: [`crate::store::Store::decide_by`]) and a circuit
//! breaker ([`breaker`]).
//!
//! Why: Envoy gives up on us after its filter timeout (20 ms by default) and then applies its
//! own `failure_mode_deny`, while a hung Redis held each call for `REDIS_TIMEOUT` (10 s).
//! Now the store call is bounded by the caller's deadline, repeated failures open the circuit,
//! and the policy answers:
//!
//! - `error` (default, the behaviour before): the call fails with `UNAVAILABLE` and Envoy's
//!   `failure_mode_deny` decides; with the circuit open it fails at once.
//! - `allow`: `OK`. `deny`: `OVER_LIMIT` for every limited descriptor (not shadow ones).
//! - `local`: each limit is enforced by an in-process [`MemoryStore`] running the same
//!   algorithm, with its limit divided by `EXPECTED_REPLICAS` ([`per_replica`]), until the
//!   shared store answers again.
//!
//! The healthy path is unchanged: one store call, and the breaker's two atomic loads.
//!
//! A call given up at its deadline is not retried (a retry could count it twice) and its
//! store request is simply dropped: on a multiplexed Redis connection the command may already
//! be sent and still run, so a timed-out call may have been counted, as one that timed out
//! under `REDIS_TIMEOUT` always could. Giving it up is safe for the connection: our own (and
//! redis-rs's driver task) keeps reading replies in order and drops the ones nobody waits for.

pub mod breaker;
mod respond;
#[cfg(test)]
mod service_tests;

use std::{num::NonZeroUsize, sync::Arc, time::Duration, time::Instant};

use metrics::{counter, Counter};

pub use self::breaker::{Admit, Breaker, BreakerSettings};
pub use self::respond::{fixed_response, mark_refusal};
pub use crate::deadline::Deadline;
use crate::{
    error::ServiceError,
    limiter::{
        algorithm::Quota,
        engine::{Batch, Check, Decided, DecidedList},
        Clock,
    },
    log_throttle::LogThrottle,
    metrics as m,
    store::{MemoryStore, Store, StoreError, StoreErrorKind},
};

/// `BACKEND_FAILURE_POLICY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Error,
    Allow,
    Deny,
    Local,
}

impl Policy {
    /// The setting's value and the metric label.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Error => "error",
            Policy::Allow => "allow",
            Policy::Deny => "deny",
            Policy::Local => "local",
        }
    }

    /// Parses the setting (any case).
    pub fn parse(s: &str) -> Option<Policy> {
        [Policy::Error, Policy::Allow, Policy::Deny, Policy::Local]
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The `LIMIT_RULE_HEADER` value of a refusal this policy made.
    pub fn rule_header_value(self) -> String {
        format!("backend-failure-policy:{}", self.name())
    }
}

/// Why the policy answered (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No answer within the deadline or `REDIS_TIMEOUT`.
    Timeout,
    /// The breaker is open: the store was not called.
    CircuitOpen,
    /// Connection refused, reset or not yet re-established.
    Connection,
    /// Any other store error.
    Error,
}

impl Reason {
    const ALL: [Reason; 4] = [
        Reason::Timeout,
        Reason::CircuitOpen,
        Reason::Connection,
        Reason::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::CircuitOpen => "circuit_open",
            Reason::Connection => "connection",
            Reason::Error => "error",
        }
    }

    fn of(e: &StoreError) -> Reason {
        match e.kind() {
            StoreErrorKind::Timeout => Reason::Timeout,
            StoreErrorKind::CircuitOpen => Reason::CircuitOpen,
            StoreErrorKind::Connection => Reason::Connection,
            StoreErrorKind::Response => Reason::Error,
        }
    }
}

/// The failure settings, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureSettings {
    /// `BACKEND_FAILURE_POLICY`.
    pub policy: Policy,
    /// `EXPECTED_REPLICAS` (at least 1): the `local` policy's divisor.
    pub expected_replicas: u32,
    pub breaker: BreakerSettings,
    /// `BACKEND_DEADLINE_MARGIN`: taken off the caller's `grpc-timeout`.
    pub deadline_margin: Duration,
    /// `MEMORY_MAX_COUNTERS`, for the `local` policy's counters.
    pub local_max_counters: NonZeroUsize,
}

impl Default for FailureSettings {
    fn default() -> Self {
        Self {
            policy: Policy::Error,
            expected_replicas: 1,
            breaker: BreakerSettings::default(),
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
            local_max_counters: NonZeroUsize::MIN.saturating_add(999_999),
        }
    }
}

/// Default `BACKEND_DEADLINE_MARGIN`: a healthy Redis answers in about a millisecond, and on a
/// busy host a response can wait a few milliseconds for a thread; 5 ms of Envoy's 20 leaves the
/// store 15.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// How one call may use the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallContext {
    /// From the caller's `grpc-timeout`.
    pub deadline: Option<Deadline>,
    /// Whether the policy may answer (not for `/usage`, which reports the store or fails).
    pub policy: bool,
}

/// Who decided a request's checks.
#[derive(Debug)]
pub enum Decisions {
    /// The shared store (or the local cache of its answers).
    Store(DecidedList),
    /// The `local` policy's in-process limiter.
    Local(DecidedList),
    /// The `allow` or `deny` policy, without deciding any check.
    Fixed(Policy),
}

impl Decisions {
    /// The checks' decisions (none for a fixed answer).
    pub fn decided(&self) -> &[Decided] {
        match self {
            Decisions::Store(d) | Decisions::Local(d) => d,
            Decisions::Fixed(_) => &[],
        }
    }
}

/// The store call with its guards: deadline, breaker, failure policy, and their metrics and
/// logs.
pub struct Guard {
    settings: FailureSettings,
    /// Shared by every call: one store, one circuit.
    breaker: Breaker,
    /// The `local` policy's counters.
    local: Option<MemoryStore>,
    /// Policy answers, by [`Reason::ALL`].
    answers: [Counter; 4],
    /// Store failures are logged once per stretch, not once per call.
    log: LogThrottle,
}

impl Guard {
    /// Builds the guard; with the `local` policy its memory store (and, inside a runtime, the
    /// store's sweeper) too.
    pub fn new(settings: FailureSettings, clock: Arc<dyn Clock>) -> Self {
        let policy = settings.policy.name();
        let local = (settings.policy == Policy::Local).then(|| {
            let store = MemoryStore::new(clock, settings.local_max_counters);
            if tokio::runtime::Handle::try_current().is_ok() {
                store.spawn_sweeper(Duration::from_secs(1));
            }
            store
        });
        Self {
            breaker: Breaker::new(settings.breaker, Instant::now()),
            local,
            answers: Reason::ALL.map(
                |r| counter!(m::BACKEND_POLICY_ANSWERS, "policy" => policy, "reason" => r.label()),
            ),
            log: LogThrottle::default(),
            settings,
        }
    }

    pub fn settings(&self) -> &FailureSettings {
        &self.settings
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Whether a call made now goes to the store: not while the circuit is open.
    pub fn admit(&self) -> bool {
        self.breaker.admit_now() != Admit::Reject
    }

    /// Takes the store call's result into the breaker, the metrics and the log (by reference:
    /// the decisions are not moved through it); an error is then for [`Guard::fallback`].
    ///
    /// The caller awaits the store itself, between [`Guard::admit`] and this: a guard future
    /// around the store's would be one more future built per call and copied whole into the
    /// call's (docs/benchmarks.md, "One async level per call").
    pub fn settle(&self, result: &Result<DecidedList, StoreError>) {
        match result {
            Ok(_) => {
                self.breaker.success();
                if self.log.success() {
                    tracing::info!("backend answering again");
                }
            }
            Err(e) => {
                counter!(m::BACKEND_ERRORS, "kind" => e.kind().label()).increment(1);
                if e.is_transient() {
                    self.breaker.failure(Instant::now());
                } else {
                    // The store is up: it answered, with an error about this request.
                    self.breaker.success();
                }
                if let Some(suppressed) = self.log.failure() {
                    tracing::warn!(error = %e, transient = e.is_transient(), policy = self.settings.policy.name(), suppressed, "backend error (repeats are logged every 10 s)");
                }
            }
        }
    }

    /// The policy's answer for `batch`, which the store could not decide because of `e` (or
    /// did not get: [`StoreError::CircuitOpen`]). Callers box its future: the failure path's
    /// (the local policy's store call) stays out of every call's.
    pub async fn fallback(
        &self,
        batch: &Batch<'_>,
        ctx: CallContext,
        e: StoreError,
    ) -> Result<Decisions, ServiceError> {
        if !ctx.policy {
            return Err(e.into());
        }
        let reason = Reason::of(&e);
        if let Some(c) = self.answers.get(reason as usize) {
            c.increment(1);
        }
        match (self.settings.policy, &self.local) {
            (Policy::Allow, _) => Ok(Decisions::Fixed(Policy::Allow)),
            (Policy::Deny, _) => Ok(Decisions::Fixed(Policy::Deny)),
            (Policy::Local, Some(local)) => {
                let checks = per_replica(batch.checks, self.settings.expected_replicas);
                let scaled = Batch {
                    checks: &checks,
                    ..batch.clone()
                };
                Ok(Decisions::Local(local.decide(&scaled).await?))
            }
            (Policy::Error | Policy::Local, _) => Err(e.into()),
        }
    }
}

/// `checks` with each limit divided among `replicas` instances ([`per_replica_limit`]).
pub fn per_replica(checks: &[Check], replicas: u32) -> Vec<Check> {
    checks
        .iter()
        .map(|c| Check {
            quota: Quota {
                limit: per_replica_limit(c.quota.limit, replicas),
                capacity: per_replica_limit(c.quota.capacity, replicas),
                ..c.quota
            },
            ..c.clone()
        })
        .collect()
}

/// One instance's share of `limit` when `replicas` share it: rounded up, so it is never 0
/// unless the limit is, and the fleet admits at least the limit in all (at most `replicas − 1`
/// more), never fewer: an outage of the shared store should not refuse traffic the limit
/// allows.
pub fn per_replica_limit(limit: u64, replicas: u32) -> u64 {
    limit.div_ceil(u64::from(replicas.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{algorithm::Algorithm, Unit};

    #[test]
    fn per_replica_limits_round_up_and_are_never_zero_unless_the_limit_is() {
        assert_eq!(per_replica_limit(10, 1), 10);
        assert_eq!(per_replica_limit(10, 2), 5);
        assert_eq!(per_replica_limit(5, 2), 3);
        assert_eq!(per_replica_limit(10, 3), 4);
        assert_eq!(per_replica_limit(1, 8), 1);
        assert_eq!(per_replica_limit(0, 3), 0);
        assert_eq!(per_replica_limit(7, 0), 7, "0 replicas reads as 1");
        assert_eq!(per_replica_limit(u64::MAX, 2), u64::MAX / 2 + 1);
    }

    #[test]
    fn per_replica_checks_scale_limit_and_burst_and_keep_the_rest() {
        let check = |quota| Check {
            descriptor: 0,
            quota,
            key: "k".into(),
            previous: None,
            cost: 1,
            jitter_secs: 0,
            per_second: false,
        };
        let checks = [
            check(Quota::new(Algorithm::FixedWindow, 5, Unit::Minute, 1, None)),
            check(Quota::new(
                Algorithm::TokenBucket,
                10,
                Unit::Second,
                1,
                Some(30),
            )),
        ];
        let scaled = per_replica(&checks, 2);
        assert_eq!((scaled[0].quota.limit, scaled[0].quota.capacity), (3, 3));
        assert_eq!((scaled[1].quota.limit, scaled[1].quota.capacity), (5, 15));
        assert_eq!(scaled[1].quota.window_ms, 1000);
        assert_eq!(scaled[0].key, "k");
    }

    #[test]
    fn policies_parse_in_any_case() {
        assert_eq!(Policy::parse("LOCAL"), Some(Policy::Local));
        assert_eq!(Policy::parse("deny"), Some(Policy::Deny));
        assert_eq!(Policy::parse("open"), None);
        assert_eq!(
            Policy::Deny.rule_header_value(),
            "backend-failure-policy:deny"
        );
    }
}
