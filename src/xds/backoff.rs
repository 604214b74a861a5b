//! The waits between attempts to reach the management server.
//!
//! After a stream ends: the reference's `jpillora/backoff` formula with its inputs
//! (`XDS_CLIENT_BACKOFF_*`; the "random factor" is that library's growth factor, so with the
//! default 0.5 every wait is the initial interval). Between failed connection attempts:
//! `CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL` with ±50% jitter, the linear backoff the
//! reference configures for its dial.

use std::time::Duration;

/// `XDS_CLIENT_BACKOFF_*`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub factor: f64,
    pub jitter: bool,
}

impl Backoff {
    /// The wait before reconnect number `attempt` (0 first); `random` is uniform in [0, 1).
    /// Zero settings take the library's defaults (100ms, 10s, factor 2), as there.
    pub fn wait(&self, attempt: u32, random: f64) -> Duration {
        let min = if self.min.is_zero() {
            Duration::from_millis(100)
        } else {
            self.min
        };
        let max = if self.max.is_zero() {
            Duration::from_secs(10)
        } else {
            self.max
        };
        if min >= max {
            return max;
        }
        let factor = if self.factor <= 0.0 { 2.0 } else { self.factor };
        let minf = min.as_secs_f64();
        let mut wait = minf * factor.powf(f64::from(attempt));
        if self.jitter {
            wait = random * (wait - minf) + minf;
        }
        if !wait.is_finite() || wait >= max.as_secs_f64() {
            return max;
        }
        Duration::from_secs_f64(wait.max(0.0)).max(min)
    }
}

/// `interval` scaled by a factor uniform in [0.5, 1.5) (`random` uniform in [0, 1)).
pub fn jitter_linear(interval: Duration, random: f64) -> Duration {
    interval.mul_f64(0.5 + random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_reference_defaults_always_wait_the_initial_interval() {
        let b = Backoff {
            min: secs(10.0),
            max: secs(60.0),
            factor: 0.5,
            jitter: true,
        };
        for attempt in 0..10 {
            for r in [0.0, 0.5, 0.99] {
                assert_eq!(b.wait(attempt, r), secs(10.0));
            }
        }
    }

    #[test]
    fn a_growth_factor_grows_up_to_the_maximum() {
        let b = Backoff {
            min: secs(1.0),
            max: secs(10.0),
            factor: 2.0,
            jitter: false,
        };
        let waits: Vec<Duration> = (0..6).map(|a| b.wait(a, 0.0)).collect();
        assert_eq!(waits, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0].map(secs).to_vec());
        let jittered = Backoff { jitter: true, ..b };
        assert_eq!(jittered.wait(3, 0.0), secs(1.0));
        assert_eq!(jittered.wait(3, 0.5), secs(4.5));
        assert_eq!(jittered.wait(1000, 0.5), secs(10.0));
        let inverted = Backoff {
            min: secs(20.0),
            ..b
        };
        assert_eq!(inverted.wait(0, 0.0), secs(10.0));
    }

    #[test]
    fn connect_retries_are_jittered_by_half() {
        assert_eq!(jitter_linear(secs(3.0), 0.0), secs(1.5));
        assert_eq!(jitter_linear(secs(3.0), 0.5), secs(3.0));
    }
}
