//! The counting algorithms, the engine that decides a request's checks, window and key math:
//! pure, with the clock injected.
//!
//! Windows are aligned to the Unix epoch exactly as envoyproxy/ratelimit aligns them
//! (`now / divider * divider`), so a key written by either service names the same window.

pub mod algorithm;
mod clock;
pub mod engine;
mod key;

pub use algorithm::Algorithm;
pub use clock::{Clock, SystemClock};
pub use key::{
    bucket_key, copy_base, recycle_key, window_key, CacheKeyBuilder, SecretError, ValueHasher,
};

/// Largest value a counter holds: Redis counters are signed 64-bit integers. Both stores
/// saturate here instead of failing (an addend this large, or a counter pushed this far, is
/// over any limit, which is what the answer says), so no request can make a counter unusable.
pub const MAX_COUNT: u64 = i64::MAX as u64;

/// Time unit of a limit. Discriminants are the wire values of
/// `RateLimitResponse.RateLimit.Unit` (WEEK is 7 there, after YEAR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl Unit {
    /// Every unit, in the order users read them.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// Parses a config unit, case-insensitively (the reference upper-cases before lookup).
    pub fn parse(s: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.name().eq_ignore_ascii_case(s))
    }

    /// Maps a protobuf enum value; `UNKNOWN` (0) and out-of-range values are `None`.
    pub fn from_wire(v: i32) -> Option<Unit> {
        Unit::ALL.into_iter().find(|u| *u as i32 == v)
    }

    /// Lower-case name as written in config files.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Window length in seconds; a month is 30 days and a year 365, as in the reference.
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 604_800,
            Unit::Month => 2_592_000,
            Unit::Year => 31_536_000,
        }
    }

    /// Start of the window containing `now` (Unix seconds).
    pub fn window_start(self, now: u64) -> u64 {
        now / self.seconds() * self.seconds()
    }

    /// Seconds until the window containing `now` ends; always at least 1.
    pub fn until_reset(self, now: u64) -> u64 {
        self.seconds() - now % self.seconds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_case_insensitively_and_map_to_wire_values() {
        assert_eq!(Unit::parse("SECOND"), Some(Unit::Second));
        assert_eq!(Unit::parse("Week"), Some(Unit::Week));
        assert_eq!(Unit::parse("fortnight"), None);
        assert_eq!(Unit::parse(""), None);
        assert_eq!(Unit::from_wire(7), Some(Unit::Week));
        assert_eq!(Unit::from_wire(5), Some(Unit::Month));
        assert_eq!(Unit::from_wire(0), None);
        assert_eq!(Unit::from_wire(8), None);
        assert_eq!(Unit::from_wire(-1), None);
    }

    #[test]
    fn windows_align_to_the_epoch_and_reset_is_never_zero() {
        assert_eq!(Unit::Minute.window_start(125), 120);
        assert_eq!(Unit::Minute.until_reset(125), 55);
        assert_eq!(Unit::Minute.until_reset(120), 60);
        assert_eq!(Unit::Second.until_reset(7), 1);
        assert_eq!(Unit::Hour.window_start(7_199), 3_600);
        assert_eq!(Unit::Month.seconds(), 30 * 86_400);
        assert_eq!(Unit::Year.seconds(), 365 * 86_400);
    }
}
