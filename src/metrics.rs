//! Metric names, the Prometheus recorder, and per-rule counters.
//!
//! Per-rule counters keep the reference's Prometheus names and labels
//! (`ratelimit_service_rate_limit_total_hits{domain, key1[, key2]}` ...) so existing dashboards
//! and alerts keep working. Label values come from the rule's stats key, which holds request
//! values only where the config asks for them (`detailed_metric`, `value_to_metric`, a
//! configured `value`), so cardinality is bounded by the config, never by traffic. Handles are
//! registered once per stats key and cached, so counting a hit costs a map lookup and an
//! atomic add.

use std::sync::Arc;

use dashmap::DashMap;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, Counter, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::statsd::Statsd;

pub const TOTAL_HITS: &str = "ratelimit_service_rate_limit_total_hits";
pub const OVER_LIMIT: &str = "ratelimit_service_rate_limit_over_limit";
pub const NEAR_LIMIT: &str = "ratelimit_service_rate_limit_near_limit";
pub const WITHIN_LIMIT: &str = "ratelimit_service_rate_limit_within_limit";
pub const SHADOW_MODE: &str = "ratelimit_service_rate_limit_shadow_mode";
pub const TOTAL_REQUESTS: &str = "ratelimit_service_total_requests";
pub const RESPONSE_TIME: &str = "ratelimit_service_response_time_seconds";
pub const SHOULD_RATE_LIMIT_ERROR: &str = "ratelimit_service_should_rate_limit_error";
pub const GLOBAL_SHADOW_MODE: &str = "ratelimit_service_global_shadow_mode";
pub const CONFIG_LOAD_SUCCESS: &str = "ratelimit_service_config_load_success";
pub const CONFIG_LOAD_ERROR: &str = "ratelimit_service_config_load_error";
pub const CONFIG_GENERATION: &str = "ratelimitd_config_generation";
pub const CONFIG_INFO: &str = "ratelimitd_config_info";
pub const BACKEND_DURATION: &str = "ratelimitd_backend_request_duration_seconds";
pub const BACKEND_ERRORS: &str = "ratelimitd_backend_errors_total";
pub const BACKEND_CONNECTIONS: &str = "ratelimitd_backend_connections";
pub const BACKEND_IN_FLIGHT: &str = "ratelimitd_backend_requests_in_flight";
pub const HEALTHY: &str = "ratelimitd_healthy";
pub const MEMORY_COUNTERS: &str = "ratelimitd_memory_counters";
pub const MEMORY_EVICTIONS: &str = "ratelimitd_memory_evictions_total";

/// Histogram buckets in seconds: sub-millisecond to one second, dense around Envoy's 20 ms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Installs the global Prometheus recorder and describes every metric. Call once, in `serve`.
pub fn install_prometheus() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| format!("invalid histogram buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    metrics_process::Collector::default().describe();
    Ok(handle)
}

/// Drains histogram samples into their buckets every few seconds. The exporter keeps raw
/// samples until upkeep or a scrape runs, so without this a service nobody scrapes would grow
/// by every request's latency sample.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Renders the Prometheus text format, refreshing process metrics first.
pub fn render(handle: &PrometheusHandle) -> String {
    metrics_process::Collector::default().collect();
    handle.render()
}

fn describe() {
    describe_counter!(TOTAL_HITS, "Hits counted against each rule.");
    describe_counter!(OVER_LIMIT, "Hits over each rule's limit.");
    describe_counter!(
        NEAR_LIMIT,
        "Hits above NEAR_LIMIT_RATIO of each rule's limit, and not over it."
    );
    describe_counter!(WITHIN_LIMIT, "Hits within each rule's limit.");
    describe_counter!(
        SHADOW_MODE,
        "Over-limit hits let through by a rule's shadow_mode."
    );
    describe_counter!(TOTAL_REQUESTS, "gRPC calls by method.");
    describe_histogram!(RESPONSE_TIME, Unit::Seconds, "gRPC call latency by method.");
    describe_counter!(
        SHOULD_RATE_LIMIT_ERROR,
        "Failed ShouldRateLimit calls by error type."
    );
    describe_counter!(
        GLOBAL_SHADOW_MODE,
        "OVER_LIMIT answers turned OK by SHADOW_MODE."
    );
    describe_counter!(CONFIG_LOAD_SUCCESS, "Config loads that were swapped in.");
    describe_counter!(CONFIG_LOAD_ERROR, "Config loads rejected as invalid.");
    describe_gauge!(
        CONFIG_GENERATION,
        "Generation of the config in force (1 at start)."
    );
    describe_gauge!(
        CONFIG_INFO,
        "1, labelled with the hash and generation of the config in force."
    );
    describe_histogram!(
        BACKEND_DURATION,
        Unit::Seconds,
        "Counter store round trips."
    );
    describe_counter!(BACKEND_ERRORS, "Counter store failures by kind.");
    describe_gauge!(BACKEND_CONNECTIONS, "Connections to the counter store.");
    describe_gauge!(BACKEND_IN_FLIGHT, "Counter store requests in flight.");
    describe_gauge!(HEALTHY, "1 while /healthcheck answers 200.");
    describe_gauge!(
        MEMORY_COUNTERS,
        "Counters held by the in-memory backend (at most MEMORY_MAX_COUNTERS)."
    );
    describe_counter!(
        MEMORY_EVICTIONS,
        "Live in-memory counters removed to make room for new ones (MEMORY_MAX_COUNTERS reached)."
    );
}

/// A counter in Prometheus and, with `USE_STATSD`, under the reference's StatsD name.
pub struct DualCounter {
    prometheus: Counter,
    statsd: Option<(Arc<Statsd>, String)>,
}

impl DualCounter {
    pub fn increment(&self, n: u64) {
        self.prometheus.increment(n);
        if let Some((sink, name)) = &self.statsd {
            if n > 0 {
                sink.counter(name, n);
            }
        }
    }
}

/// The five counters of one stats key.
pub struct RuleStats {
    total_hits: DualCounter,
    over_limit: DualCounter,
    near_limit: DualCounter,
    within_limit: DualCounter,
    shadow_mode: DualCounter,
}

/// One limited descriptor's outcome, for counting.
#[derive(Debug, Clone, Copy)]
pub struct HitOutcome {
    pub requests_per_unit: u32,
    pub hits: u64,
    /// Counter value after this request's hits.
    pub after: u64,
    pub shadow_mode: bool,
}

impl RuleStats {
    /// Counts one descriptor's hits exactly as the reference's base limiter does: the hits
    /// that crossed a threshold are split between the buckets they fall in.
    pub fn record(&self, o: HitOutcome, near_limit_ratio: f32) {
        let limit = u64::from(o.requests_per_unit);
        let before = o.after.saturating_sub(o.hits);
        // float32 arithmetic, then floor, as the reference computes it.
        let near = (o.requests_per_unit as f32 * near_limit_ratio).floor() as u64;
        self.total_hits.increment(o.hits);
        if o.after > limit {
            if before >= limit {
                self.over_limit.increment(o.hits);
            } else {
                self.over_limit.increment(o.after - limit);
                self.near_limit.increment(limit - near.max(before));
            }
            if o.shadow_mode {
                let shadowed = if before >= limit {
                    o.hits
                } else {
                    o.after - limit
                };
                self.shadow_mode.increment(shadowed);
            }
        } else {
            if o.after > near {
                let n = if before >= near {
                    o.hits
                } else {
                    o.after - near
                };
                self.near_limit.increment(n);
            }
            self.within_limit.increment(o.hits);
        }
    }
}

/// Cache of per-rule counters by stats key.
#[derive(Default)]
pub struct Stats {
    by_key: DashMap<String, Arc<RuleStats>>,
    statsd: Option<Arc<Statsd>>,
}

impl Stats {
    /// Per-rule counters, mirrored to `statsd` when given.
    pub fn new(statsd: Option<Arc<Statsd>>) -> Self {
        Self {
            by_key: DashMap::new(),
            statsd,
        }
    }

    /// The counters for `stats_key` (`domain.key1_value1.key2`), registered on first use.
    pub fn rule(&self, domain: &str, stats_key: &str) -> Arc<RuleStats> {
        if let Some(s) = self.by_key.get(stats_key) {
            return s.clone();
        }
        let labels = labels(domain, stats_key);
        let dual = |prometheus: Counter, stat: &str| DualCounter {
            prometheus,
            statsd: self.statsd.clone().map(|s| {
                (
                    s,
                    format!("ratelimit.service.rate_limit.{stats_key}.{stat}"),
                )
            }),
        };
        let stats = Arc::new(RuleStats {
            total_hits: dual(counter!(TOTAL_HITS, labels.clone()), "total_hits"),
            over_limit: dual(counter!(OVER_LIMIT, labels.clone()), "over_limit"),
            near_limit: dual(counter!(NEAR_LIMIT, labels.clone()), "near_limit"),
            within_limit: dual(counter!(WITHIN_LIMIT, labels.clone()), "within_limit"),
            shadow_mode: dual(counter!(SHADOW_MODE, labels), "shadow_mode"),
        });
        self.by_key
            .entry(stats_key.to_owned())
            .or_insert(stats)
            .clone()
    }
}

/// `domain`, `key1` and (for nested rules) `key2`, as the reference's Prometheus mapping
/// derives them from `ratelimit.service.rate_limit.DOMAIN.KEY1.KEY2...`.
pub fn labels(domain: &str, stats_key: &str) -> Vec<metrics::Label> {
    let path = stats_key
        .strip_prefix(domain)
        .and_then(|p| p.strip_prefix('.'))
        .unwrap_or(stats_key);
    let mut parts = path.split('.');
    let mut labels = vec![metrics::Label::new("domain", domain.to_owned())];
    if let Some(k1) = parts.next() {
        labels.push(metrics::Label::new("key1", k1.to_owned()));
    }
    if let Some(k2) = parts.next() {
        labels.push(metrics::Label::new("key2", k2.to_owned()));
    }
    labels
}

/// The reference's stat-name sanitising: `:` and `|` become `_`, and the dots of IPv4
/// addresses become `_`, so an address is one path element.
pub fn sanitize(key: &str) -> String {
    let replaced: String = key
        .chars()
        .map(|c| if c == ':' || c == '|' { '_' } else { c })
        .collect();
    let bytes = replaced.as_bytes();
    let mut out = String::with_capacity(replaced.len());
    let mut i = 0;
    while i < replaced.len() {
        match ipv4_at(bytes, i) {
            Some(len) => {
                for c in replaced[i..i + len].chars() {
                    out.push(if c == '.' { '_' } else { c });
                }
                i += len;
            }
            None => {
                let c = replaced[i..].chars().next().unwrap_or('_');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// Length of the leftmost match of `\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}` starting at `at`.
fn ipv4_at(b: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    for group in 0..4 {
        let start = i;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        if group < 3 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    Some(i - at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_reference_mapping() {
        let l = labels("d", "d.key_value");
        assert_eq!(l.len(), 2);
        assert_eq!((l[1].key(), l[1].value()), ("key1", "key_value"));
        let l = labels("d", "d.a.b_x.c");
        assert_eq!(l.len(), 3);
        assert_eq!((l[2].key(), l[2].value()), ("key2", "b_x"));
    }

    #[test]
    fn sanitize_like_the_reference() {
        assert_eq!(
            sanitize("d.remote_address_10.0.0.1"),
            "d.remote_address_10_0_0_1"
        );
        assert_eq!(sanitize("d.k_a:b|c"), "d.k_a_b_c");
        assert_eq!(sanitize("d.version_1.2.3"), "d.version_1.2.3");
        assert_eq!(sanitize("d.ip_1234.5.6.7"), "d.ip_1234_5_6_7");
    }
}
