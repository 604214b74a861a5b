//! One metrics pipeline: every event is recorded once, through the `metrics` facade, and the
//! exporters turn it into what each consumer expects.
//!
//! - Prometheus (`/metrics`): the global recorder, plus the per-rule series in a recorder of
//!   their own ([`per_rule`]). Names and labels are the reference's
//!   (`ratelimit_service_rate_limit_total_hits{domain, key1[, key2]}` ...) so existing
//!   dashboards and alerts keep working.
//! - StatsD (`USE_STATSD`): [`crate::statsd`] is one more recorder, fanned out to with
//!   metrics-util's `Fanout` for the global events and teed in [`per_rule`] for the per-rule
//!   ones; it maps these names to the reference's stat names itself.
//!
//! Per-rule label values come from the stats key. A configured rule's own key is bounded by
//! the config, and the rule keeps its counters once registered ([`rule`]);
//! keys built from request values (`detailed_metric`, `value_to_metric`, and limit
//! overrides, whose descriptor keys Envoy chooses) are not, so at most
//! [`StatsSettings::max_dynamic_keys`] of those have a series of their own at a time, and the
//! hits of any further key are counted in one `key1="__overflow"` series per domain. A series
//! not counted for [`StatsSettings::idle_timeout`] leaves `/metrics`, unless it belongs to a
//! rule of the config in force: a passing key frees its place under the cap, and a rule
//! removed by a reload leaves the metrics.

mod config;
mod domains;
pub mod mapper;
mod per_rule;
pub mod reference_names;
mod rule;
pub mod shards;

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;

pub use config::{count_load, ConfigMetrics};
pub use per_rule::{spawn_rule_upkeep, Exporter, Stats, StatsSettings};
pub use rule::{HitOutcome, RuleCounters, RuleSlot};

pub const TOTAL_HITS: &str = "ratelimit_service_rate_limit_total_hits";
pub const OVER_LIMIT: &str = "ratelimit_service_rate_limit_over_limit";
pub const NEAR_LIMIT: &str = "ratelimit_service_rate_limit_near_limit";
pub const WITHIN_LIMIT: &str = "ratelimit_service_rate_limit_within_limit";
pub const SHADOW_MODE: &str = "ratelimit_service_rate_limit_shadow_mode";
pub const OVER_LIMIT_WITH_LOCAL_CACHE: &str =
    "ratelimit_service_rate_limit_over_limit_with_local_cache";
/// The reference's `domain_not_found`, as the StatsD exporter is given it (with the domain in
/// [`STATS_KEY_LABEL`]); its Prometheus series are named per domain (see [`domains`]).
pub const DOMAIN_NOT_FOUND: &str = "ratelimit_service_rate_limit_domain_not_found";
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
pub const BACKEND_POLICY_ANSWERS: &str = "ratelimitd_backend_policy_answers_total";
pub const BACKEND_CIRCUIT_STATE: &str = "ratelimitd_backend_circuit_state";
pub const BACKEND_CIRCUIT_TRANSITIONS: &str = "ratelimitd_backend_circuit_transitions_total";
pub const HEALTHY: &str = "ratelimitd_healthy";
pub const ACCEPT_ERRORS: &str = "ratelimitd_accept_errors_total";
pub const TLS_HANDSHAKE_ERRORS: &str = "ratelimitd_tls_handshake_errors_total";
pub const CALLS_SHED: &str = "ratelimitd_calls_shed_total";
pub const CALLS_IN_FLIGHT: &str = "ratelimitd_calls_in_flight";
pub const DYNAMIC_KEYS: &str = "ratelimitd_metrics_dynamic_keys";
pub const DYNAMIC_KEYS_OVERFLOW: &str = "ratelimitd_metrics_dynamic_keys_overflow_total";
pub const UNKNOWN_DOMAINS_OVERFLOW: &str = "ratelimitd_metrics_unknown_domains_overflow_total";

/// The per-rule label holding the full stats key, given to the StatsD exporter only (stat
/// names hold every level of the key; the Prometheus labels hold two).
pub const STATS_KEY_LABEL: &str = "stats_key";

/// `key1` of the series that counts a domain's request-derived keys beyond the cap (stats key
/// `DOMAIN.__overflow`).
pub const OVERFLOW_KEY: &str = "__overflow";
/// Default of `METRICS_MAX_DYNAMIC_KEYS`.
pub const DEFAULT_MAX_DYNAMIC_KEYS: usize = 2000;
/// Default of `METRICS_IDLE_TIMEOUT`: several scrape and StatsD flush intervals, so a key
/// counted at all is exported before it goes, and short enough that a burst of passing keys
/// frees its places under the cap within minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const MEMORY_COUNTERS: &str = "ratelimitd_memory_counters";
pub const MEMORY_EVICTIONS: &str = "ratelimitd_memory_evictions_total";

/// Histogram buckets in seconds: sub-millisecond to one second, dense around Envoy's 20 ms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Why the Prometheus recorder could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("invalid histogram buckets: {0}")]
    Buckets(#[source] metrics_exporter_prometheus::BuildError),
    #[error("cannot install the metrics recorder: one is already installed")]
    Install,
}

/// Installs the global recorder, Prometheus and (when given) `exporter` fanned out to, and
/// describes every metric. Call once, in `serve`. Returns the Prometheus handle for `/metrics`.
///
/// With a `mapper` (`PROMETHEUS_MAPPER_YAML`), the reference's series are renamed by it on
/// their way to Prometheus ([`mapper`]); the StatsD exporter is not affected.
pub fn install(
    exporter: Option<Exporter>,
    mapper: Option<std::sync::Arc<mapper::Mapper>>,
) -> Result<PrometheusHandle, RecorderError> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(RecorderError::Buckets)?
        .build_recorder();
    let handle = prometheus.handle();
    let prometheus: Box<dyn metrics::Recorder + Send + Sync> = match mapper {
        Some(mapper) => Box::new(mapper::MappedRecorder::new(prometheus, mapper)),
        None => Box::new(prometheus),
    };
    let installed = match exporter {
        None => metrics::set_global_recorder(prometheus).map_err(|_| ()),
        Some(exporter) => metrics::set_global_recorder(
            FanoutBuilder::default()
                .add_recorder(prometheus)
                .add_recorder(exporter)
                .build(),
        )
        .map_err(|_| ()),
    };
    installed.map_err(|()| RecorderError::Install)?;
    describe();
    metrics_process::Collector::default().describe();
    Ok(handle)
}

/// Folds the per-thread slots ([`shards`]) and drains histogram samples into their buckets
/// every few seconds. The exporter keeps raw samples until upkeep or a scrape runs, so
/// without this a service nobody scrapes would grow by every request's latency sample.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            shards::fold_all();
            handle.run_upkeep();
        }
    })
}

/// Renders the Prometheus text format: the global recorder's metrics (the per-thread slots
/// folded and process metrics refreshed first), then the per-rule ones.
pub fn render(handle: &PrometheusHandle, rules: &Stats) -> String {
    shards::fold_all();
    metrics_process::Collector::default().collect();
    let mut out = handle.render();
    out.push_str(&rules.render());
    out
}

fn describe() {
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
    describe_counter!(
        BACKEND_POLICY_ANSWERS,
        "Calls answered by BACKEND_FAILURE_POLICY, by policy and reason (timeout, circuit_open, connection, error)."
    );
    describe_gauge!(
        BACKEND_CIRCUIT_STATE,
        "Backend circuit breaker: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        BACKEND_CIRCUIT_TRANSITIONS,
        "Backend circuit breaker transitions, by the state entered (to)."
    );
    describe_gauge!(HEALTHY, "1 while /healthcheck answers 200.");
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts by listener (e.g. out of file descriptors)."
    );
    describe_counter!(
        TLS_HANDSHAKE_ERRORS,
        "gRPC TLS handshakes that did not finish, by reason (refused, timeout, closed)."
    );
    describe_counter!(
        CALLS_SHED,
        "Calls refused with RESOURCE_EXHAUSTED because MAX_CONCURRENT_CALLS were in flight."
    );
    describe_gauge!(CALLS_IN_FLIGHT, "ShouldRateLimit calls being answered.");
    describe_gauge!(
        DYNAMIC_KEYS,
        "Per-rule stats keys built from request values that have their own series now."
    );
    describe_counter!(
        DYNAMIC_KEYS_OVERFLOW,
        "Descriptors counted in a domain's __overflow series because METRICS_MAX_DYNAMIC_KEYS was reached."
    );
    describe_counter!(
        UNKNOWN_DOMAINS_OVERFLOW,
        "Descriptors of unknown domains counted in the __overflow domain_not_found series because METRICS_MAX_DYNAMIC_KEYS domains have their own."
    );
    describe_gauge!(
        MEMORY_COUNTERS,
        "Counters held by the in-memory backend (at most MEMORY_MAX_COUNTERS)."
    );
    describe_counter!(
        MEMORY_EVICTIONS,
        "Live in-memory counters removed to make room for new ones (MEMORY_MAX_COUNTERS reached)."
    );
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
}
