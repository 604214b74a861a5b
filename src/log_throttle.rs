//! One log line per stretch of repeated failures, not one per failure.
//!
//! During a Redis outage every call fails; logging each one wrote ~600 WARN lines a second,
//! which buries everything else and costs more than the failing calls. A [`LogThrottle`]
//! lets the first failure through, then one line per [`PERIOD`] carrying how many were
//! suppressed, and reports the recovery once. Lock-free: it sits on the request path.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// At most one line per this while failures continue.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Tracks one kind of repeated failure.
#[derive(Debug)]
pub struct LogThrottle {
    origin: Instant,
    period: Duration,
    failing: AtomicBool,
    /// When the last line was let through, in ms since `origin`, plus one (0: never).
    last_logged: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::with_period(PERIOD)
    }
}

impl LogThrottle {
    pub fn with_period(period: Duration) -> Self {
        Self {
            origin: Instant::now(),
            period,
            failing: AtomicBool::new(false),
            last_logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Records a failure. `Some(n)` means: log it now, noting `n` failures left unlogged
    /// since the previous line.
    pub fn failure(&self) -> Option<u64> {
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_logged.load(Ordering::Relaxed);
        let period = u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX);
        let newly_failing = !self.failing.swap(true, Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= period;
        if (newly_failing || due)
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Records a success; true when it ends a stretch of failures (log the recovery once).
    pub fn success(&self) -> bool {
        self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_failure_logs_then_one_line_per_period_then_recovery_once() {
        let t = LogThrottle::with_period(Duration::from_secs(3600));
        assert_eq!(t.failure(), Some(0));
        for _ in 0..599 {
            assert_eq!(t.failure(), None);
        }
        assert!(t.success());
        assert!(!t.success(), "the recovery is reported once");
        // A new stretch logs at once, carrying the count suppressed meanwhile.
        assert_eq!(t.failure(), Some(599));
        assert_eq!(t.failure(), None);
    }

    #[test]
    fn a_lasting_failure_logs_again_after_the_period() {
        let t = LogThrottle::with_period(Duration::from_millis(1));
        assert_eq!(t.failure(), Some(0));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.failure(), Some(0));
    }
}
