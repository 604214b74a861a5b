//! The caller's deadline, from its `grpc-timeout` header.
//!
//! Envoy sends its filter timeout (20 ms by default) as `grpc-timeout`, and once it passes,
//! Envoy applies `failure_mode_deny` and our answer is wasted. So the store call is bounded by
//! `min(REDIS_TIMEOUT, grpc-timeout − BACKEND_DEADLINE_MARGIN)`: the failure policy answers
//! while Envoy still listens. The margin covers what happens after the store call (building and
//! sending the response, scheduling on a busy host).
//!
//! A top-level module because two layers use it: the failure guard answers for a call given
//! up, and the store gives it up ([`crate::store::Store::decide_by`]): our own Redis
//! connection with one timer for all its calls, where a timer per call cost 1.8% of a Redis
//! call's instructions.

use std::time::{Duration, Instant};

/// When the store call must be given up, and the budget it was given (for the error text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub budget: Duration,
}

impl Deadline {
    /// The deadline of a call received at `now` with `grpc_timeout` (the header's value), less
    /// `margin`; `None` without a valid header. A timeout shorter than the margin leaves a
    /// zero budget: the store is polled once, then the policy answers.
    pub fn from_header(grpc_timeout: Option<&str>, margin: Duration, now: Instant) -> Option<Self> {
        let budget = parse_grpc_timeout(grpc_timeout?)?.saturating_sub(margin);
        Some(Self {
            at: now.checked_add(budget)?,
            budget,
        })
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`),
/// as the gRPC HTTP/2 spec defines it.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..unit_at)?, value.get(unit_at..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_grpc_timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_grpc_timeout("19999u"),
            Some(Duration::from_micros(19_999))
        );
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "20", "20x", "123456789m", "-1m", "1.5S", "２m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_budget_is_the_timeout_less_the_margin_never_negative() {
        let now = Instant::now();
        let d = Deadline::from_header(Some("20m"), Duration::from_millis(5), now).unwrap();
        assert_eq!(d.budget, Duration::from_millis(15));
        assert_eq!(d.at, now + Duration::from_millis(15));
        let d = Deadline::from_header(Some("1m"), Duration::from_millis(5), now).unwrap();
        assert_eq!(d.budget, Duration::ZERO);
        assert_eq!(Deadline::from_header(None, Duration::ZERO, now), None);
        assert_eq!(Deadline::from_header(Some("x"), Duration::ZERO, now), None);
    }
}
