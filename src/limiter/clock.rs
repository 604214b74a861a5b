//! The wall clock that names windows, injected so tests can pin it.
//!
//! A call reads the monotonic clock once when it starts (its deadline and its duration are
//! measured from that reading) and needs the wall clock too, for its windows. Reading both
//! costs two clock reads per call; [`SystemClock::millis_at`] instead derives the wall clock
//! from the monotonic reading and the offset between the two clocks, read again once it is a
//! second old. Between those reads the two clocks advance together (Linux slews
//! `CLOCK_REALTIME` and `CLOCK_MONOTONIC` alike); a step of the wall clock (set by hand, or by
//! NTP at boot) is followed within a second.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        LazyLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Source of the current Unix time in seconds; injected so tests can pin it.
pub trait Clock: Send + Sync + 'static {
    fn now_unix(&self) -> u64;

    /// The same clock in milliseconds (sliding windows and token buckets need them). A clock
    /// that only keeps seconds reports whole seconds.
    fn now_millis(&self) -> u64 {
        self.now_unix().saturating_mul(1000)
    }

    /// The clock in milliseconds at `at`, a monotonic reading just taken (a call's start).
    /// A clock that cannot tell reads itself.
    fn millis_at(&self, at: Instant) -> u64 {
        let _ = at;
        self.now_millis()
    }
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        wall_micros() / 1_000_000
    }

    fn now_millis(&self) -> u64 {
        wall_micros() / 1000
    }

    fn millis_at(&self, at: Instant) -> u64 {
        WALL.micros_at(at, || (Instant::now(), wall_micros())) / 1000
    }
}

/// Microseconds since the Unix epoch. A clock before 1970 is a broken host; it reads as the
/// epoch rather than panic.
fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How long an offset between the clocks is used before it is read again.
const REREAD: Duration = Duration::from_secs(1);

static WALL: LazyLock<Anchor> = LazyLock::new(|| Anchor::new(Instant::now(), wall_micros()));

/// The wall clock as an offset from a monotonic instant.
struct Anchor {
    base: Instant,
    /// Wall-clock microseconds at `base`, as of the last reading.
    wall_at_base: AtomicU64,
    /// Microseconds after `base` from which the offset is read again.
    reread_at: AtomicU64,
}

impl Anchor {
    fn new(base: Instant, wall: u64) -> Self {
        Self {
            base,
            wall_at_base: AtomicU64::new(wall),
            reread_at: AtomicU64::new(micros(REREAD)),
        }
    }

    /// Wall-clock microseconds at `at`; `read` gives both clocks now, when the offset is due
    /// to be read again. Calls racing to read it each store a reading: any is right.
    fn micros_at(&self, at: Instant, read: impl FnOnce() -> (Instant, u64)) -> u64 {
        let since = micros(at.saturating_duration_since(self.base));
        if since >= self.reread_at.load(Ordering::Relaxed) {
            let (mono, wall) = read();
            let mono = micros(mono.saturating_duration_since(self.base));
            self.wall_at_base
                .store(wall.saturating_sub(mono), Ordering::Relaxed);
            self.reread_at
                .store(mono.saturating_add(micros(REREAD)), Ordering::Relaxed);
        }
        self.wall_at_base
            .load(Ordering::Relaxed)
            .saturating_add(since)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_wall_clock_agrees_with_reading_it() {
        let clock = SystemClock;
        for _ in 0..3 {
            let before = clock.now_millis();
            let derived = clock.millis_at(Instant::now());
            let after = clock.now_millis();
            // Within the microsecond rounding of the offset, and whatever ran in between.
            assert!(
                before.saturating_sub(1) <= derived && derived <= after + 1,
                "{before} <= {derived} <= {after}"
            );
        }
    }

    #[test]
    fn the_offset_is_read_again_after_a_second_and_follows_a_step() {
        let base = Instant::now();
        let anchor = Anchor::new(base, 5_000_000);
        let never = || -> (Instant, u64) { panic!("read again too early") };
        assert_eq!(anchor.micros_at(base, never), 5_000_000);
        let half = base + Duration::from_millis(500);
        assert_eq!(anchor.micros_at(half, never), 5_500_000);
        // A second on, the clocks are read again: the wall clock was stepped back 2 s (at
        // that reading, 1.2 s after base).
        let reading = base + Duration::from_millis(1200);
        let later = base + Duration::from_millis(1000);
        assert_eq!(
            anchor.micros_at(later, || (reading, 4_200_000)),
            3_000_000 + 1_000_000
        );
        // And not again for another second after that reading.
        let soon = base + Duration::from_millis(2100);
        assert_eq!(anchor.micros_at(soon, never), 3_000_000 + 2_100_000);
        assert_eq!(
            anchor.micros_at(base + Duration::from_millis(2200), || (
                base + Duration::from_millis(2200),
                9_000_000
            )),
            9_000_000
        );
    }

    #[test]
    fn an_instant_before_the_anchor_reads_as_the_anchor() {
        let earlier = Instant::now();
        let anchor = Anchor::new(earlier + Duration::from_millis(3), 7_000);
        assert_eq!(anchor.micros_at(earlier, || unreachable!()), 7_000);
    }
}
