//! Metric names, the Prometheus recorders, and per-rule counters.
//!
//! Per-rule counters keep the reference's Prometheus names and labels
//! (`ratelimit_service_rate_limit_total_hits{domain, key1[, key2]}` ...) so existing dashboards
//! and alerts keep working. Their label values come from the stats key. A configured rule's own
//! key is bounded by the config; keys built from request values (`detailed_metric`,
//! `value_to_metric`, and limit overrides, whose descriptor keys Envoy chooses) are not, so at
//! most [`StatsSettings::max_dynamic_keys`] of those have a series of their own at a time, and
//! the hits of any further key are counted in one `key1="__overflow"` series per domain. A
//! series not counted for [`StatsSettings::idle_timeout`] leaves `/metrics`, unless it belongs
//! to a rule of the config in force: a passing key frees its place under the cap, and a rule
//! removed by a reload leaves the metrics. (The StatsD sink forgets idle stats on its own.)
//!
//! Per-rule counters live in a Prometheus recorder of their own, rendered after the global one,
//! because the exporter can forget a series only through an idle timeout, and on the global
//! recorder that would also drop service counters that rarely change (`config_load_error`),
//! breaking alerts on them. Handles are registered once per stats key and cached, so counting a
//! hit costs a map lookup and a few atomic adds.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use dashmap::{mapref::entry::Entry, DashMap};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Key, KeyName,
    Level, Metadata, Recorder, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;

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
pub const ACCEPT_ERRORS: &str = "ratelimitd_accept_errors_total";
pub const CALLS_SHED: &str = "ratelimitd_calls_shed_total";
pub const CALLS_IN_FLIGHT: &str = "ratelimitd_calls_in_flight";
pub const DYNAMIC_KEYS: &str = "ratelimitd_metrics_dynamic_keys";
pub const DYNAMIC_KEYS_OVERFLOW: &str = "ratelimitd_metrics_dynamic_keys_overflow_total";

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
    #[error("cannot install the metrics recorder: {0}")]
    Install(#[source] metrics_exporter_prometheus::BuildError),
}

/// Installs the global Prometheus recorder and describes every metric. Call once, in `serve`.
pub fn install_prometheus() -> Result<PrometheusHandle, RecorderError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(RecorderError::Buckets)?
        .install_recorder()
        .map_err(RecorderError::Install)?;
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

/// Renders the Prometheus text format: the global recorder's metrics (process metrics
/// refreshed first), then the per-rule ones.
pub fn render(handle: &PrometheusHandle, rules: &Stats) -> String {
    metrics_process::Collector::default().collect();
    let mut out = handle.render();
    out.push_str(&rules.render());
    out
}

/// Every tick, advances the per-rule clock and drops idle series: `sweep` is called with the
/// stats and returns how many it dropped (see [`Stats::sweep`]; the caller knows the config,
/// this module does not). The tick is a tenth of the idle timeout, between 50 ms and 5 s. Ends
/// when `stats` is dropped.
pub fn spawn_rule_upkeep(
    stats: &Arc<Stats>,
    sweep: impl Fn(&Stats) -> usize + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let every =
        (stats.settings.idle_timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let stats = Arc::downgrade(stats);
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(stats) = stats.upgrade() else {
                return;
            };
            stats.advance(started.elapsed());
            if sweep(&stats) > 0 {
                stats.forget_dropped();
            }
        }
    })
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
    describe_gauge!(HEALTHY, "1 while /healthcheck answers 200.");
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts by listener (e.g. out of file descriptors)."
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
    describe_gauge!(
        MEMORY_COUNTERS,
        "Counters held by the in-memory backend (at most MEMORY_MAX_COUNTERS)."
    );
    describe_counter!(
        MEMORY_EVICTIONS,
        "Live in-memory counters removed to make room for new ones (MEMORY_MAX_COUNTERS reached)."
    );
}

/// The per-rule metrics, with their descriptions (they live in their own recorder).
const RULE_METRICS: [(&str, &str); 5] = [
    (TOTAL_HITS, "Hits counted against each rule."),
    (OVER_LIMIT, "Hits over each rule's limit."),
    (
        NEAR_LIMIT,
        "Hits above NEAR_LIMIT_RATIO of each rule's limit, and not over it.",
    ),
    (WITHIN_LIMIT, "Hits within each rule's limit."),
    (
        SHADOW_MODE,
        "Over-limit hits let through by a rule's shadow_mode.",
    ),
];

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
    /// See [`Stats`]: an `increment(0)` changes no value and bumps the exporter's generation.
    fn mark_changed(&self) {
        for c in [
            &self.total_hits,
            &self.over_limit,
            &self.near_limit,
            &self.within_limit,
            &self.shadow_mode,
        ] {
            c.prometheus.increment(0);
        }
    }

    /// Counts one descriptor's hits exactly as the reference's base limiter does: the hits
    /// that crossed a threshold are split between the buckets they fall in.
    pub fn record(&self, o: HitOutcome, near_limit_ratio: f32) {
        let limit = u64::from(o.requests_per_unit);
        let before = o.after.saturating_sub(o.hits);
        // float32 arithmetic, then floor, as the reference computes it.
        let near = (o.requests_per_unit as f32 * near_limit_ratio).floor() as u64;
        // f32 rounding can put the threshold above the limit (2^24 + 3 rounds up); the
        // subtractions below need near <= limit.
        let near = near.min(limit);
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

/// Bounds on the per-rule series (`METRICS_MAX_DYNAMIC_KEYS`, `METRICS_IDLE_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSettings {
    /// Most stats keys built from request values that have a series of their own at a time;
    /// the hits of further keys go to their domain's `__overflow` series.
    pub max_dynamic_keys: usize,
    /// A series not counted for this long goes away, unless its rule is in the config in force.
    pub idle_timeout: Duration,
}

impl Default for StatsSettings {
    fn default() -> Self {
        Self {
            max_dynamic_keys: DEFAULT_MAX_DYNAMIC_KEYS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Where a stats key comes from, which decides whether it counts against the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// A configured rule's own key: as many as the config has rules.
    Config,
    /// Built from request values: capped by `max_dynamic_keys`.
    Traffic,
}

/// One stats key's counters and when they were last counted.
struct Tracked {
    stats: RuleStats,
    /// [`Stats`]' coarse clock when last counted.
    last_used: AtomicU64,
    /// Counts against `max_dynamic_keys`.
    dynamic: bool,
}

impl Tracked {
    fn record(&self, now: u64, o: HitOutcome, near_limit_ratio: f32) {
        // Written only when the clock moved, so a hot key's entry is not rewritten per hit.
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
        self.stats.record(o, near_limit_ratio);
    }
}

/// Per-rule counters by stats key, bounded and expiring as the module documentation says.
///
/// How a series leaves `/metrics`: the per-rule recorder forgets, at each render, every series
/// that did not change since the previous render (an idle timeout of zero), and right before
/// each render every series still cached here is marked changed (an `increment(0)` bumps the
/// generation the exporter compares, metrics-util's `Generational::with_increment`). So
/// exactly the series dropped from this cache go, and a cached handle is never one the
/// exporter has forgotten. Registering and rendering hold the same lock, so a handle cannot be
/// registered between that marking and the render, and counting happens under the cache's
/// read guard, so a sweep (holding the write guard) never drops an entry being counted.
pub struct Stats {
    by_key: DashMap<String, Tracked>,
    /// Each domain's `__overflow` counters.
    overflow: DashMap<String, Tracked>,
    /// The per-rule recorder. A std Mutex: held to register or render, never across an await.
    recorder: Mutex<PrometheusRecorder>,
    statsd: Option<Arc<Statsd>>,
    settings: StatsSettings,
    /// Cached keys with `dynamic` set.
    dynamic: AtomicUsize,
    /// Coarse clock: milliseconds since the upkeep task started, advanced at each of its
    /// ticks, so counting reads an atomic rather than the system clock.
    now_ms: AtomicU64,
    dynamic_gauge: Gauge,
    folded: Counter,
}

impl Stats {
    /// Per-rule counters, mirrored to `statsd` when given. Service metrics about them go to
    /// the global recorder, which must be installed first (it is, in `serve`).
    pub fn new(statsd: Option<Arc<Statsd>>, settings: StatsSettings) -> Self {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::COUNTER, Some(Duration::ZERO))
            .build_recorder();
        for (name, help) in RULE_METRICS {
            recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
        }
        Self {
            by_key: DashMap::new(),
            overflow: DashMap::new(),
            recorder: Mutex::new(recorder),
            statsd,
            settings,
            dynamic: AtomicUsize::new(0),
            now_ms: AtomicU64::new(0),
            dynamic_gauge: metrics::gauge!(DYNAMIC_KEYS),
            folded: counter!(DYNAMIC_KEYS_OVERFLOW),
        }
    }

    /// Counts one descriptor's outcome under `stats_key` (`domain.key1_value1.key2`),
    /// registering its counters on first use; a new `Traffic` key beyond the cap is counted
    /// in `domain`'s overflow series instead. For a known key: a map lookup and atomic adds.
    pub fn record(
        &self,
        domain: &str,
        stats_key: &str,
        origin: KeyOrigin,
        o: HitOutcome,
        near_limit_ratio: f32,
    ) {
        let now = self.now_ms.load(Ordering::Relaxed);
        // Counted while the read guard is held: see the type's documentation.
        if let Some(t) = self.by_key.get(stats_key) {
            t.record(now, o, near_limit_ratio);
            return;
        }
        self.record_new(domain, stats_key, origin, now, o, near_limit_ratio);
    }

    #[cold]
    fn record_new(
        &self,
        domain: &str,
        stats_key: &str,
        origin: KeyOrigin,
        now: u64,
        o: HitOutcome,
        near_limit_ratio: f32,
    ) {
        let dynamic = origin == KeyOrigin::Traffic;
        let full = || self.dynamic.load(Ordering::Relaxed) >= self.settings.max_dynamic_keys;
        if dynamic && full() {
            return self.record_overflow(domain, now, o, near_limit_ratio);
        }
        let recorder = lock(&self.recorder);
        let tracked = match self.by_key.entry(stats_key.to_owned()) {
            Entry::Occupied(e) => e.into_ref().downgrade(),
            Entry::Vacant(e) => {
                if dynamic {
                    // Only registrations add, under the lock, so the cap is exact.
                    if full() {
                        drop(e);
                        drop(recorder);
                        return self.record_overflow(domain, now, o, near_limit_ratio);
                    }
                    let n = self.dynamic.fetch_add(1, Ordering::Relaxed) + 1;
                    self.dynamic_gauge.set(n as f64);
                }
                e.insert(self.track(&recorder, domain, stats_key, now, dynamic))
                    .downgrade()
            }
        };
        drop(recorder);
        tracked.record(now, o, near_limit_ratio);
    }

    fn record_overflow(&self, domain: &str, now: u64, o: HitOutcome, near_limit_ratio: f32) {
        self.folded.increment(1);
        if let Some(t) = self.overflow.get(domain) {
            t.record(now, o, near_limit_ratio);
            return;
        }
        let recorder = lock(&self.recorder);
        let tracked = self
            .overflow
            .entry(domain.to_owned())
            .or_insert_with(|| {
                let key = format!("{domain}.{OVERFLOW_KEY}");
                self.track(&recorder, domain, &key, now, false)
            })
            .downgrade();
        drop(recorder);
        tracked.record(now, o, near_limit_ratio);
    }

    /// Registers the five counters of `stats_key`; the caller holds the recorder lock.
    fn track(
        &self,
        recorder: &PrometheusRecorder,
        domain: &str,
        stats_key: &str,
        now: u64,
        dynamic: bool,
    ) -> Tracked {
        let labels = labels(domain, stats_key);
        let metadata = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
        let dual = |name: &'static str, stat: &str| DualCounter {
            prometheus: recorder
                .register_counter(&Key::from_parts(name, labels.clone()), &metadata),
            statsd: self.statsd.clone().map(|s| {
                (
                    s,
                    format!("ratelimit.service.rate_limit.{stats_key}.{stat}"),
                )
            }),
        };
        Tracked {
            stats: RuleStats {
                total_hits: dual(TOTAL_HITS, "total_hits"),
                over_limit: dual(OVER_LIMIT, "over_limit"),
                near_limit: dual(NEAR_LIMIT, "near_limit"),
                within_limit: dual(WITHIN_LIMIT, "within_limit"),
                shadow_mode: dual(SHADOW_MODE, "shadow_mode"),
            },
            last_used: AtomicU64::new(now),
            dynamic,
        }
    }

    /// The per-rule series in the Prometheus text format.
    pub fn render(&self) -> String {
        let recorder = lock(&self.recorder);
        self.mark_all_changed();
        recorder.handle().render()
    }

    /// Drops the series not counted for `idle_timeout`, except those whose stats key is
    /// `in_config` (the config in force has that rule) and the overflow series of domains
    /// `domain_in_config`. Returns how many it dropped; they leave `/metrics` at the next
    /// render, or at once with [`Stats::forget_dropped`].
    pub fn sweep(
        &self,
        mut in_config: impl FnMut(&str) -> bool,
        domain_in_config: impl Fn(&str) -> bool,
    ) -> usize {
        let now = self.now_ms.load(Ordering::Relaxed);
        let timeout = u64::try_from(self.settings.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle = |t: &Tracked| now.saturating_sub(t.last_used.load(Ordering::Relaxed)) > timeout;
        let (mut dropped, mut dropped_dynamic) = (0, 0);
        // `retain` holds each shard's write guard while it decides, so nothing is counted in an
        // entry between the check and its removal.
        self.by_key.retain(|key, t| {
            let keep = !idle(t) || in_config(key);
            if !keep {
                dropped += 1;
                dropped_dynamic += usize::from(t.dynamic);
            }
            keep
        });
        self.overflow.retain(|domain, t| {
            let keep = !idle(t) || domain_in_config(domain);
            dropped += usize::from(!keep);
            keep
        });
        let n = self.dynamic.fetch_sub(dropped_dynamic, Ordering::Relaxed) - dropped_dynamic;
        self.dynamic_gauge.set(n as f64);
        dropped
    }

    /// Makes the recorder forget the series [`Stats::sweep`] dropped now rather than at the
    /// next scrapes, so its memory stays bounded when nobody scrapes: a series rendered
    /// unchanged once is forgotten at the next render, so two renders are enough.
    pub fn forget_dropped(&self) {
        let recorder = lock(&self.recorder);
        for _ in 0..2 {
            self.mark_all_changed();
            // Writing into io::sink cannot fail.
            let _ = recorder.handle().render_to_write(&mut std::io::sink());
        }
    }

    /// Moves the coarse clock to `since_start` (it never goes back).
    pub fn advance(&self, since_start: Duration) {
        let ms = u64::try_from(since_start.as_millis()).unwrap_or(u64::MAX);
        self.now_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Cached keys that count against `max_dynamic_keys`.
    pub fn dynamic_keys(&self) -> usize {
        self.dynamic.load(Ordering::Relaxed)
    }

    /// Bumps the generation of every cached series without changing its value; called with
    /// the recorder lock held, right before a render.
    fn mark_all_changed(&self) {
        for t in self.by_key.iter() {
            t.stats.mark_changed();
        }
        for t in self.overflow.iter() {
            t.stats.mark_changed();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    const IDLE: Duration = Duration::from_secs(10);

    fn stats(max_dynamic_keys: usize) -> Stats {
        Stats::new(
            None,
            StatsSettings {
                max_dynamic_keys,
                idle_timeout: IDLE,
            },
        )
    }

    fn hit(s: &Stats, domain: &str, key: &str, origin: KeyOrigin) {
        let o = HitOutcome {
            requests_per_unit: 100,
            hits: 1,
            after: 1,
            shadow_mode: false,
        };
        s.record(domain, key, origin, o, 0.8);
    }

    /// `total_hits` of each per-rule series, as `domain/key1` -> value.
    fn totals(text: &str) -> std::collections::BTreeMap<String, u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("ratelimit_service_rate_limit_total_hits{"))
            .map(|l| {
                let (labels, value) = l.rsplit_once("} ").unwrap();
                let label = |k: &str| {
                    let from = labels.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
                    labels[from..].split('"').next().unwrap().to_owned()
                };
                (
                    format!("{}/{}", label("domain"), label("key1")),
                    value.parse().unwrap(),
                )
            })
            .collect()
    }

    fn keys(text: &str) -> Vec<String> {
        totals(text).into_keys().collect()
    }

    #[test]
    fn traffic_keys_beyond_the_cap_share_one_overflow_series_per_domain() {
        let s = stats(2);
        hit(&s, "d", "d.k", KeyOrigin::Config);
        for key in ["d.a", "d.b", "d.c", "d.e", "d.a"] {
            hit(&s, "d", key, KeyOrigin::Traffic);
        }
        hit(&s, "x", "x.f", KeyOrigin::Traffic);
        // Config keys are never capped, even when the cap is reached.
        hit(&s, "d", "d.k2", KeyOrigin::Config);
        let text = s.render();
        let want: Vec<(String, u64)> = [
            ("d/__overflow", 2),
            ("d/a", 2),
            ("d/b", 1),
            ("d/k", 1),
            ("d/k2", 1),
            ("x/__overflow", 1),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(
            totals(&text).into_iter().collect::<Vec<_>>(),
            want,
            "{text}"
        );
        assert_eq!(s.dynamic_keys(), 2);
        // All five counters of the overflow series, under the reference's label mapping.
        assert!(text.contains(
            "ratelimit_service_rate_limit_near_limit{domain=\"d\",key1=\"__overflow\"} 0"
        ));
        assert!(text.contains("# TYPE ratelimit_service_rate_limit_total_hits counter"));
    }

    #[test]
    fn idle_series_expire_unless_their_rule_is_in_the_config() {
        let s = stats(10);
        hit(&s, "d", "d.kept", KeyOrigin::Config);
        hit(&s, "d", "d.removed", KeyOrigin::Config);
        hit(&s, "d", "d.t", KeyOrigin::Traffic);
        assert_eq!(keys(&s.render()), ["d/kept", "d/removed", "d/t"]);
        let in_config = |k: &str| k == "d.kept";
        s.advance(IDLE);
        assert_eq!(
            s.sweep(in_config, |_| true),
            0,
            "idle for exactly the timeout"
        );
        s.advance(IDLE + Duration::from_millis(1));
        assert_eq!(s.sweep(in_config, |_| true), 2);
        assert_eq!(s.dynamic_keys(), 0);
        // Every render after the sweep: the kept rule's series, idle and unchanged, stays.
        for _ in 0..3 {
            let text = s.render();
            assert_eq!(
                totals(&text).into_iter().collect::<Vec<_>>(),
                [("d/kept".to_owned(), 1)],
                "{text}"
            );
        }
    }

    #[test]
    fn dropped_series_leave_the_recorder_even_if_never_rendered() {
        let s = stats(10);
        hit(&s, "d", "d.t", KeyOrigin::Traffic);
        hit(&s, "d", "d.k", KeyOrigin::Config);
        s.advance(IDLE * 2);
        assert_eq!(s.sweep(|k| k == "d.k", |_| true), 1);
        s.forget_dropped();
        assert_eq!(keys(&s.render()), ["d/k"]);
    }

    #[test]
    fn an_expired_traffic_key_comes_back_as_a_fresh_series_and_frees_its_place() {
        let s = stats(1);
        for _ in 0..3 {
            hit(&s, "d", "d.t", KeyOrigin::Traffic);
        }
        hit(&s, "d", "d.u", KeyOrigin::Traffic);
        assert_eq!(
            totals(&s.render()).into_iter().collect::<Vec<_>>(),
            [("d/__overflow".to_owned(), 1), ("d/t".to_owned(), 3)]
        );
        s.advance(IDLE * 2);
        // The overflow series of a domain in force stays; of a removed domain, it goes.
        assert_eq!(s.sweep(|_| false, |d| d == "d"), 1);
        s.forget_dropped();
        assert_eq!(keys(&s.render()), ["d/__overflow"]);
        hit(&s, "d", "d.t", KeyOrigin::Traffic);
        hit(&s, "d", "d.u", KeyOrigin::Traffic);
        assert_eq!(
            totals(&s.render()).into_iter().collect::<Vec<_>>(),
            [("d/__overflow".to_owned(), 2), ("d/t".to_owned(), 1)],
            "counted from zero again"
        );
        s.advance(IDLE * 4);
        assert_eq!(s.sweep(|_| false, |_| false), 2);
        s.forget_dropped();
        assert_eq!(keys(&s.render()), Vec::<String>::new());
    }

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
    fn a_near_limit_threshold_rounded_above_the_limit_does_not_underflow() {
        let quiet = || DualCounter {
            prometheus: Counter::noop(),
            statsd: None,
        };
        let stats = RuleStats {
            total_hits: quiet(),
            over_limit: quiet(),
            near_limit: quiet(),
            within_limit: quiet(),
            shadow_mode: quiet(),
        };
        // 2^24 + 3 as f32 rounds up to 2^24 + 4: the threshold would be above the limit.
        let limit = (1u32 << 24) + 3;
        for (hits, after) in [(1, 1), (5, u64::from(limit) + 2), (1, u64::from(limit))] {
            let o = HitOutcome {
                requests_per_unit: limit,
                hits,
                after,
                shadow_mode: false,
            };
            stats.record(o, 1.0);
        }
    }
}
