//! Parsers for setting values: Go durations, ranges, ratios. Each error names the setting, so
//! a bad value stops start-up with a message saying which one and why.

use std::{num::NonZeroUsize, time::Duration};

pub(super) const HOUR: Duration = Duration::from_secs(3_600);
pub(super) const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// Smallest value a duration setting accepts.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    Zero,
    Positive,
}

/// A Go-duration parser for the setting `name`, accepting `min..=max`. The upper bounds
/// keep the arithmetic done with each value (deadlines, `debounce * 10`) from overflowing,
/// which would panic a task or silently stop it (`RELOAD_DEBOUNCE=1000000h` once did).
pub fn duration(
    name: &'static str,
    min: Bound,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let d = parse_go_duration(s).map_err(|e| format!("{name}: {e}"))?;
        if matches!(min, Bound::Positive) && d.is_zero() {
            return Err(format!("{name} must be greater than zero"));
        }
        if d > max {
            return Err(format!("{name} must be at most {max:?}"));
        }
        Ok(d)
    }
}

/// A ratio in (0, 1], as `NEAR_LIMIT_RATIO` must be.
pub fn ratio(
    name: &'static str,
) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    move |s| {
        let v: f32 = s
            .trim()
            .parse()
            .map_err(|_| format!("{name} must be a number in (0, 1]"))?;
        if v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(format!("{name} must be in (0, 1], got {v}"))
        }
    }
}

/// An integer setting that must be at least `min`.
pub fn at_least<T>(
    name: &'static str,
    min: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s| match s.trim().parse::<T>() {
        Ok(v) if v >= min => Ok(v),
        _ => Err(format!("{name} must be an integer of at least {min}")),
    }
}

/// An integer setting that must be at most `max`.
pub fn at_most(
    name: &'static str,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| match s.trim().parse::<u64>() {
        Ok(v) if v <= max => Ok(v),
        _ => Err(format!("{name} must be an integer from 0 to {max}")),
    }
}

/// Parses `MEMORY_MAX_COUNTERS`: a whole number of at least 1 (a store that can hold no
/// counter could not limit anything).
pub fn parse_max_counters(s: &str) -> Result<NonZeroUsize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| "MEMORY_MAX_COUNTERS is not a whole number".to_owned())?;
    NonZeroUsize::new(n).ok_or_else(|| {
        "MEMORY_MAX_COUNTERS must be at least 1 (0 would hold no counter)".to_owned()
    })
}

/// Parses a Go `time.Duration` string (`300ms`, `10s`, `1m30s`, `1.5h`); a bare number is
/// seconds.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration '{s}'"))?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid number in duration '{s}'"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit '{unit}' in duration '{s}'")),
        };
        total += n * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}
