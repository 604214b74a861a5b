//! The reference's `domain_not_found` stat: one count per descriptor of a request whose domain
//! no config file defines (its src/config/config_impl.go `GetLimit`, called once per
//! descriptor, increments `NewDomainStats(domain).NotFound` before anything else, limit
//! overrides included).
//!
//! Names, as the reference makes them: StatsD `ratelimit.service.rate_limit.<domain>.domain_not_found`
//! (src/stats/manager_impl.go:45, the domain through `SanitizeStatName`); its built-in
//! Prometheus mapping (src/stats/prom/default_mapper.yaml) has no rule for that stat, so
//! statsd_exporter names it by escaping the whole StatsD name
//! (`ratelimit_service_rate_limit_<domain>_domain_not_found`, no labels; pkg/mapper/escape.go
//! `EscapeMetricName`, v0.26.1, the version the reference pins).
//!
//! The domain comes from traffic, so the distinct domains are bounded: the first
//! `max_domains` ([`super::StatsSettings::max_dynamic_keys`], a budget of its own, not shared
//! with the per-rule keys) get a series each, kept for the life of the process as the
//! reference keeps its stats; any further domain is counted in the `__overflow` one, and
//! [`super::UNKNOWN_DOMAINS_OVERFLOW`] counts the descriptors counted there.

use std::sync::{Mutex, MutexGuard, OnceLock};

use dashmap::DashMap;
use metrics::Counter;

use super::OVERFLOW_KEY;

/// The `domain_not_found` counters, by domain as sent.
pub(super) struct UnknownDomains {
    by_domain: DashMap<String, Counter>,
    overflow: OnceLock<Counter>,
    max_domains: usize,
    /// Held while a domain is added, so the cap is exact.
    adding: Mutex<()>,
    folded: Counter,
}

impl UnknownDomains {
    pub(super) fn new(max_domains: usize, folded: Counter) -> Self {
        Self {
            by_domain: DashMap::new(),
            overflow: OnceLock::new(),
            max_domains,
            adding: Mutex::new(()),
            folded,
        }
    }

    /// Counts `n` descriptors of a request for `domain`. `register` makes the counter of a
    /// stat domain (the domain sanitised as the reference does, or `__overflow`).
    pub(super) fn count(&self, domain: &str, n: u64, register: impl Fn(&str) -> Counter) {
        if let Some(c) = self.by_domain.get(domain) {
            c.increment(n);
            return;
        }
        let adding = lock(&self.adding);
        if let Some(c) = self.by_domain.get(domain) {
            c.increment(n);
            return;
        }
        if self.by_domain.len() >= self.max_domains {
            drop(adding);
            self.folded.increment(n);
            self.overflow
                .get_or_init(|| register(OVERFLOW_KEY))
                .increment(n);
            return;
        }
        let counter = register(&crate::stat_name::sanitize(domain));
        counter.increment(n);
        self.by_domain.insert(domain.to_owned(), counter);
    }

    /// An `increment(0)` on every counter, so the per-rule recorder (which forgets series
    /// unchanged between renders) keeps them; see [`super::Stats`].
    pub(super) fn mark_changed(&self) {
        for c in self.by_domain.iter() {
            c.increment(0);
        }
        if let Some(c) = self.overflow.get() {
            c.increment(0);
        }
    }
}

/// The Prometheus name statsd_exporter gives an unmapped StatsD name: every character other
/// than `[A-Za-z0-9_]` becomes `_` (a run of `-` becomes one `_`), and a leading digit gets a
/// `_` before it.
pub(super) fn escape_metric_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    let mut prev = None;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if !(c == '-' && prev == Some('-')) {
            out.push('_');
        }
        prev = Some(c);
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_like_statsd_exporter() {
        assert_eq!(
            escape_metric_name("ratelimit.service.rate_limit.my-app.v2.domain_not_found"),
            "ratelimit_service_rate_limit_my_app_v2_domain_not_found"
        );
        assert_eq!(escape_metric_name("a--b---c-d"), "a_b_c_d");
        assert_eq!(escape_metric_name("1é.x"), "_1__x");
    }

    #[test]
    fn domains_beyond_the_cap_fold_into_overflow() {
        use std::sync::{atomic::Ordering, Arc};
        let made: Arc<DashMap<String, Arc<std::sync::atomic::AtomicU64>>> = Arc::default();
        let register = |name: &str| {
            let c: Arc<std::sync::atomic::AtomicU64> =
                made.entry(name.to_owned()).or_default().clone();
            Counter::from_arc(c)
        };
        let d = UnknownDomains::new(2, Counter::noop());
        for domain in ["a", "b:1", "c", "a", "e"] {
            d.count(domain, 2, register);
        }
        let value = |k: &str| made.get(k).map(|c| c.load(Ordering::Relaxed));
        assert_eq!(value("a"), Some(4));
        assert_eq!(value("b_1"), Some(2), "sanitised as the reference does");
        assert_eq!(value(OVERFLOW_KEY), Some(4));
        assert_eq!(value("c"), None);
    }
}
