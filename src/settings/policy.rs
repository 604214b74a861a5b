//! `BACKEND_FAILURE_POLICY` and its guards: what a call gets when the counter store fails,
//! the circuit breaker, and the margin kept from the caller's deadline (see
//! [`crate::failure`]). New settings, not the reference's; the defaults keep its behaviour
//! (a failed store fails the call).

use std::{num::NonZeroUsize, time::Duration};

use clap::Args;

use super::values::{at_least, duration, Bound, HOUR};
use crate::failure::{BreakerSettings, FailureSettings, Policy};

/// `BACKEND_FAILURE_POLICY`, any case.
fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::parse(s).ok_or_else(|| {
        format!(
            "BACKEND_FAILURE_POLICY '{s}' is not supported (expected error, allow, deny or local)"
        )
    })
}

/// The failure policy's settings.
#[derive(Debug, Clone, Args)]
pub struct FailureArgs {
    /// What a call gets when the counter store fails or the circuit is open: error (fail the
    /// call with UNAVAILABLE; Envoy's failure_mode_deny decides), allow (OK), deny (OVER_LIMIT)
    /// or local (each limit enforced in this process, divided by EXPECTED_REPLICAS).
    #[arg(long, env = "BACKEND_FAILURE_POLICY", default_value = "error", value_parser = parse_policy)]
    pub backend_failure_policy: Policy,
    /// Instances sharing the limits (e.g. the HPA's replica count); under the local policy each
    /// enforces ceil(limit / EXPECTED_REPLICAS).
    #[arg(long, env = "EXPECTED_REPLICAS", default_value_t = 1, value_parser = at_least("EXPECTED_REPLICAS", 1u32))]
    pub expected_replicas: u32,
    /// Consecutive store failures (timeouts, lost connections) that open the circuit; 0
    /// disables the breaker.
    #[arg(long, env = "BACKEND_CIRCUIT_FAILURES", default_value_t = 5, value_parser = at_least("BACKEND_CIRCUIT_FAILURES", 0u32))]
    pub backend_circuit_failures: u32,
    /// How long an open circuit answers every call by the policy before probing (Go duration).
    #[arg(long, env = "BACKEND_CIRCUIT_OPEN_DURATION", default_value = "1s", value_parser = duration("BACKEND_CIRCUIT_OPEN_DURATION", Bound::Positive, HOUR))]
    pub backend_circuit_open_duration: Duration,
    /// Half-open: one call per this goes to the store as a probe (Go duration).
    #[arg(long, env = "BACKEND_CIRCUIT_PROBE_INTERVAL", default_value = "100ms", value_parser = duration("BACKEND_CIRCUIT_PROBE_INTERVAL", Bound::Positive, HOUR))]
    pub backend_circuit_probe_interval: Duration,
    /// Taken off the call's grpc-timeout to bound the store call, so the policy answers
    /// before the caller gives up (Go duration).
    #[arg(long, env = "BACKEND_DEADLINE_MARGIN", default_value = "5ms", value_parser = duration("BACKEND_DEADLINE_MARGIN", Bound::Zero, HOUR))]
    pub backend_deadline_margin: Duration,
}

impl FailureArgs {
    /// The service's failure settings; the `local` policy's counters are bounded by
    /// `MEMORY_MAX_COUNTERS`.
    pub fn settings(&self, local_max_counters: NonZeroUsize) -> FailureSettings {
        FailureSettings {
            policy: self.backend_failure_policy,
            expected_replicas: self.expected_replicas,
            breaker: BreakerSettings {
                failures: self.backend_circuit_failures,
                open_for: self.backend_circuit_open_duration,
                probe_interval: self.backend_circuit_probe_interval,
            },
            deadline_margin: self.backend_deadline_margin,
            local_max_counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Cli, Command};
    use clap::Parser;

    fn serve(extra: &[&str]) -> Result<FailureSettings, String> {
        let mut argv = vec!["ratelimitd", "serve", "--config", "x"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(Cli::into_command) {
            Ok(Ok(Command::Serve(a))) => Ok(a.failure.settings(a.memory_max_counters)),
            Ok(_) => panic!("serve expected"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn failure_settings_parse_and_default_to_the_old_behaviour() {
        if std::env::vars().all(|(k, _)| !k.starts_with("BACKEND_") && k != "EXPECTED_REPLICAS") {
            let d = serve(&[]).unwrap();
            assert_eq!(d.policy, Policy::Error);
            assert_eq!(d.expected_replicas, 1);
            assert_eq!(d.breaker, BreakerSettings::default());
            assert_eq!(d.deadline_margin, Duration::from_millis(5));
        }
        let s = serve(&[
            "--backend-failure-policy",
            "Local",
            "--expected-replicas",
            "3",
            "--backend-circuit-failures",
            "0",
            "--backend-circuit-open-duration",
            "250ms",
            "--backend-deadline-margin",
            "0",
        ])
        .unwrap();
        assert_eq!(s.policy, Policy::Local);
        assert_eq!(s.expected_replicas, 3);
        assert_eq!(s.breaker.failures, 0);
        assert_eq!(s.breaker.open_for, Duration::from_millis(250));
        assert_eq!(s.deadline_margin, Duration::ZERO);
        let e = serve(&["--backend-failure-policy", "open"]).unwrap_err();
        assert!(e.contains("BACKEND_FAILURE_POLICY 'open' is not supported (expected error, allow, deny or local)"), "{e}");
        let e = serve(&["--expected-replicas", "0"]).unwrap_err();
        assert!(
            e.contains("EXPECTED_REPLICAS must be an integer of at least 1"),
            "{e}"
        );
    }
}
