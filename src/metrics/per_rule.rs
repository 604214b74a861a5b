//! The per-rule series: registered, bounded and expired as [`super`]'s documentation says.
//!
//! They live in a Prometheus recorder of their own, rendered after the global one, because
//! the exporter can forget a series only through an idle timeout, and on the global recorder
//! that would also drop service counters that rarely change (`config_load_error`), breaking
//! alerts on them. With `USE_STATSD`, each handle also counts into the StatsD exporter, which
//! names the stat from the `stats_key` label it is given ([`super::STATS_KEY_LABEL`]); the
//! Prometheus series carries the reference's `domain`, `key1`, `key2` labels only.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use dashmap::{mapref::entry::Entry, DashMap};
use metrics::{Counter, CounterFn, Gauge, Key, KeyName, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use metrics_util::MetricKindMask;

use super::{
    domains::{escape_metric_name, UnknownDomains},
    labels,
    mapper::{Kind as MapKind, Mapper},
    reference_names::counter_name,
    rule::{HitOutcome, RuleCounters, RuleSlot},
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_DYNAMIC_KEYS, DOMAIN_NOT_FOUND, DYNAMIC_KEYS,
    DYNAMIC_KEYS_OVERFLOW, NEAR_LIMIT, OVERFLOW_KEY, OVER_LIMIT, OVER_LIMIT_WITH_LOCAL_CACHE,
    SHADOW_MODE, STATS_KEY_LABEL, TOTAL_HITS, UNKNOWN_DOMAINS_OVERFLOW, WITHIN_LIMIT,
};

/// The per-rule metrics, with their descriptions (they live in their own recorder).
const RULE_METRICS: [(&str, &str); 6] = [
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
    (
        OVER_LIMIT_WITH_LOCAL_CACHE,
        "Over-limit hits answered from the local cache (LOCAL_CACHE_SIZE_IN_BYTES).",
    ),
];

/// Bounds on the per-rule series (`METRICS_MAX_DYNAMIC_KEYS`, `METRICS_IDLE_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSettings {
    /// Most stats keys built from request values that have a series of their own at a time;
    /// the hits of further keys go to their domain's `__overflow` series.
    pub max_dynamic_keys: usize,
    /// A series not counted for this long goes away, unless a rule of a config still in use
    /// holds it.
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

/// Where else the per-rule events go (the StatsD exporter, with `USE_STATSD`).
pub type Exporter = Arc<dyn Recorder + Send + Sync>;

/// One stats key's counters.
struct Tracked {
    counters: Arc<RuleCounters>,
    /// Built from request values: counts against `max_dynamic_keys`.
    dynamic: bool,
}

/// Per-rule counters by stats key.
///
/// How a series leaves `/metrics`: the per-rule recorder forgets, at each render, every series
/// that did not change since the previous render (an idle timeout of zero), and right before
/// each render every series still registered here is marked changed (an `increment(0)` bumps
/// the generation the exporter compares, metrics-util's `Generational::with_increment`). So
/// exactly the series dropped from here go, and a handle still held (by a rule, or here) is
/// never one the exporter has forgotten. Registering and rendering hold the same lock, so a
/// handle cannot be registered between that marking and the render; counting a request-built
/// key happens under the map's read guard, so a sweep (holding the write guard) never drops
/// an entry being counted; and a configured rule's counters stay registered while a rule
/// holds them (a sweep keeps an entry whose `Arc` is shared).
pub struct Stats {
    by_key: DashMap<String, Tracked>,
    /// Each domain's `__overflow` counters.
    overflow: DashMap<String, Arc<RuleCounters>>,
    /// The per-rule recorder. A std Mutex: held to register or render, never across an await.
    recorder: Mutex<PrometheusRecorder>,
    exporter: Option<Exporter>,
    settings: StatsSettings,
    /// Registered keys with `dynamic` set.
    dynamic: AtomicUsize,
    /// Coarse clock: milliseconds since the upkeep task started, advanced at each of its
    /// ticks, so counting reads an atomic rather than the system clock.
    now_ms: AtomicU64,
    dynamic_gauge: Gauge,
    folded: Counter,
    /// `domain_not_found`, by unknown domain (see [`super::domains`]).
    unknown_domains: UnknownDomains,
    /// `PROMETHEUS_MAPPER_YAML`: renames the series on their way to Prometheus.
    mapper: Option<Arc<Mapper>>,
}

impl Stats {
    /// Per-rule counters, also counted into `exporter` when given. Service metrics about them
    /// go to the global recorder, which must be installed first (it is, in `serve`).
    pub fn new(exporter: Option<Exporter>, settings: StatsSettings) -> Self {
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
            exporter,
            settings,
            dynamic: AtomicUsize::new(0),
            now_ms: AtomicU64::new(0),
            dynamic_gauge: metrics::gauge!(DYNAMIC_KEYS),
            folded: metrics::counter!(DYNAMIC_KEYS_OVERFLOW),
            unknown_domains: UnknownDomains::new(
                settings.max_dynamic_keys,
                metrics::counter!(UNKNOWN_DOMAINS_OVERFLOW),
            ),
            mapper: None,
        }
    }

    /// Renames the series with `mapper` (`PROMETHEUS_MAPPER_YAML`); StatsD is not affected.
    pub fn with_mapper(mut self, mapper: Option<Arc<Mapper>>) -> Self {
        self.mapper = mapper;
        self
    }

    /// Registers a per-rule series in `recorder` under `key`, or under what the mapper makes
    /// of it.
    fn register_prometheus(
        &self,
        recorder: &PrometheusRecorder,
        key: &Key,
        statsd: impl FnOnce() -> Option<String>,
        metadata: &Metadata<'_>,
    ) -> Counter {
        let mapped = self.mapper.as_ref().and_then(|m| Some((m, statsd()?)));
        match mapped {
            Some((mapper, name)) => mapper
                .map(&name, MapKind::Counter)
                .register(|k| recorder.register_counter(k, metadata), Counter::noop),
            None => recorder.register_counter(key, metadata),
        }
    }

    /// Counts the `descriptors` of a request for `domain`, which no config defines, in the
    /// reference's `domain_not_found` stat.
    pub fn domain_not_found(&self, domain: &str, descriptors: u64) {
        self.unknown_domains
            .count(domain, descriptors, |stat_domain| {
                let recorder = lock(&self.recorder);
                let metadata = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
                let name = format!("ratelimit.service.rate_limit.{stat_domain}.domain_not_found");
                let key = Key::from_name(escape_metric_name(&name));
                let prometheus =
                    self.register_prometheus(&recorder, &key, || Some(name.clone()), &metadata);
                let Some(exporter) = &self.exporter else {
                    return prometheus;
                };
                let labels = vec![metrics::Label::new(STATS_KEY_LABEL, stat_domain.to_owned())];
                let exported = exporter
                    .register_counter(&Key::from_parts(DOMAIN_NOT_FOUND, labels), &metadata);
                Counter::from_arc(Arc::new(Tee(prometheus, exported)))
            });
    }

    /// Counts one descriptor's outcome with a configured rule's counters, kept in its `slot`:
    /// atomic adds only, once the rule's first hit has registered them.
    pub fn record_rule(
        &self,
        domain: &str,
        stats_key: &str,
        slot: &RuleSlot,
        o: HitOutcome,
        near_limit_ratio: f32,
    ) {
        let counters = match slot.get() {
            Some(c) => c,
            None => slot.get_or_init(|| self.rule_counters(domain, stats_key)),
        };
        counters.record(self.now(), o, near_limit_ratio);
    }

    /// A configured rule's counters: the same ones for the same stats key while they are
    /// registered (a reloaded rule counts on in its series). A request-built key that happens
    /// to be the same stats key becomes a configured one (it no longer counts against the cap).
    #[cold]
    fn rule_counters(&self, domain: &str, stats_key: &str) -> Arc<RuleCounters> {
        let recorder = lock(&self.recorder);
        match self.by_key.entry(stats_key.to_owned()) {
            Entry::Occupied(mut e) => {
                let t = e.get_mut();
                if std::mem::take(&mut t.dynamic) {
                    let n = self.dynamic.fetch_sub(1, Ordering::Relaxed) - 1;
                    self.dynamic_gauge.set(n as f64);
                }
                t.counters.clone()
            }
            Entry::Vacant(e) => {
                let counters = Arc::new(self.register(&recorder, domain, stats_key));
                e.insert(Tracked {
                    counters: counters.clone(),
                    dynamic: false,
                });
                counters
            }
        }
    }

    /// Counts one descriptor's outcome under a stats key built from request values
    /// (`domain.key1_value1.key2`), registering its counters on first use; a new key beyond
    /// the cap is counted in `domain`'s overflow series instead. For a known key: a map
    /// lookup and atomic adds.
    pub fn record(&self, domain: &str, stats_key: &str, o: HitOutcome, near_limit_ratio: f32) {
        let now = self.now();
        // Counted while the read guard is held: see the type's documentation.
        if let Some(t) = self.by_key.get(stats_key) {
            t.counters.record(now, o, near_limit_ratio);
            return;
        }
        self.record_new(domain, stats_key, now, o, near_limit_ratio);
    }

    fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    #[cold]
    fn record_new(
        &self,
        domain: &str,
        stats_key: &str,
        now: u64,
        o: HitOutcome,
        near_limit_ratio: f32,
    ) {
        let full = || self.dynamic.load(Ordering::Relaxed) >= self.settings.max_dynamic_keys;
        if full() {
            return self.record_overflow(domain, now, o, near_limit_ratio);
        }
        let recorder = lock(&self.recorder);
        let tracked = match self.by_key.entry(stats_key.to_owned()) {
            Entry::Occupied(e) => e.into_ref().downgrade(),
            Entry::Vacant(e) => {
                // Only registrations add, under the lock, so the cap is exact.
                if full() {
                    drop(e);
                    drop(recorder);
                    return self.record_overflow(domain, now, o, near_limit_ratio);
                }
                let n = self.dynamic.fetch_add(1, Ordering::Relaxed) + 1;
                self.dynamic_gauge.set(n as f64);
                let counters = Arc::new(self.register(&recorder, domain, stats_key));
                e.insert(Tracked {
                    counters,
                    dynamic: true,
                })
                .downgrade()
            }
        };
        drop(recorder);
        tracked.counters.record(now, o, near_limit_ratio);
    }

    fn record_overflow(&self, domain: &str, now: u64, o: HitOutcome, near_limit_ratio: f32) {
        self.folded.increment(1);
        if let Some(t) = self.overflow.get(domain) {
            t.record(now, o, near_limit_ratio);
            return;
        }
        let recorder = lock(&self.recorder);
        let counters = self
            .overflow
            .entry(domain.to_owned())
            .or_insert_with(|| {
                let key = format!("{domain}.{OVERFLOW_KEY}");
                Arc::new(self.register(&recorder, domain, &key))
            })
            .downgrade();
        drop(recorder);
        counters.record(now, o, near_limit_ratio);
    }

    /// Registers the five counters of `stats_key`; the caller holds the recorder lock.
    fn register(
        &self,
        recorder: &PrometheusRecorder,
        domain: &str,
        stats_key: &str,
    ) -> RuleCounters {
        let labels = labels(domain, stats_key);
        let metadata = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
        RuleCounters::new(
            |name| {
                let mut named = labels.clone();
                named.push(metrics::Label::new(STATS_KEY_LABEL, stats_key.to_owned()));
                let named = Key::from_parts(name, named);
                let prometheus = self.register_prometheus(
                    recorder,
                    &Key::from_parts(name, labels.clone()),
                    || counter_name(&named),
                    &metadata,
                );
                let Some(exporter) = &self.exporter else {
                    return prometheus;
                };
                let exported = exporter.register_counter(&named, &metadata);
                Counter::from_arc(Arc::new(Tee(prometheus, exported)))
            },
            self.now(),
        )
    }

    /// The per-rule series in the Prometheus text format.
    pub fn render(&self) -> String {
        let recorder = lock(&self.recorder);
        self.mark_all_changed();
        recorder.handle().render()
    }

    /// Drops the series not counted for `idle_timeout`, except those whose stats key is
    /// `in_config` (the config in force has that rule), those a rule still holds, and the
    /// overflow series of domains `domain_in_config`. Returns how many it dropped; they leave
    /// `/metrics` at the next render, or at once with [`Stats::forget_dropped`].
    pub fn sweep(
        &self,
        mut in_config: impl FnMut(&str) -> bool,
        domain_in_config: impl Fn(&str) -> bool,
    ) -> usize {
        let now = self.now();
        let timeout = u64::try_from(self.settings.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle = |c: &RuleCounters| now.saturating_sub(c.last_used()) > timeout;
        let (mut dropped, mut dropped_dynamic) = (0, 0);
        // `retain` holds each shard's write guard while it decides, so nothing is counted in an
        // entry between the check and its removal. Counters a rule holds are never dropped,
        // or the rule would count into a series no longer rendered.
        self.by_key.retain(|key, t| {
            let keep = !idle(&t.counters) || Arc::strong_count(&t.counters) > 1 || in_config(key);
            if !keep {
                dropped += 1;
                dropped_dynamic += usize::from(t.dynamic);
            }
            keep
        });
        self.overflow.retain(|domain, c| {
            let keep = !idle(c) || domain_in_config(domain);
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

    /// Registered keys that count against `max_dynamic_keys`.
    pub fn dynamic_keys(&self) -> usize {
        self.dynamic.load(Ordering::Relaxed)
    }

    /// Bumps the generation of every registered series without changing its value; called
    /// with the recorder lock held, right before a render.
    fn mark_all_changed(&self) {
        for t in self.by_key.iter() {
            t.counters.mark_changed();
        }
        for c in self.overflow.iter() {
            c.mark_changed();
        }
        self.unknown_domains.mark_changed();
    }
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

/// One per-rule handle counting into both the Prometheus series and the exporter's stat.
struct Tee(Counter, Counter);

impl CounterFn for Tee {
    fn increment(&self, value: u64) {
        self.0.increment(value);
        self.1.increment(value);
    }

    fn absolute(&self, value: u64) {
        self.0.absolute(value);
        self.1.absolute(value);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    const ONE: HitOutcome = HitOutcome {
        requests_per_unit: 100,
        hits: 1,
        after: 1,
        shadow_mode: false,
        local_cache: false,
    };

    /// One hit under a request-built stats key.
    fn hit(s: &Stats, domain: &str, key: &str) {
        s.record(domain, key, ONE, 0.8);
    }

    /// One hit with a configured rule's slot, which the caller keeps (as a rule does).
    fn rule(s: &Stats, domain: &str, key: &str) -> RuleSlot {
        let slot = RuleSlot::new();
        s.record_rule(domain, key, &slot, ONE, 0.8);
        slot
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
        let _k = rule(&s, "d", "d.k");
        for key in ["d.a", "d.b", "d.c", "d.e", "d.a"] {
            hit(&s, "d", key);
        }
        hit(&s, "x", "x.f");
        // Config keys are never capped, even when the cap is reached.
        let _k2 = rule(&s, "d", "d.k2");
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
    fn idle_series_expire_unless_their_rule_is_in_the_config_or_holds_them() {
        let s = stats(10);
        let held = rule(&s, "d", "d.held");
        drop(rule(&s, "d", "d.kept"));
        drop(rule(&s, "d", "d.removed"));
        hit(&s, "d", "d.t");
        assert_eq!(keys(&s.render()), ["d/held", "d/kept", "d/removed", "d/t"]);
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
        // Every render after the sweep: the kept rules' series, idle and unchanged, stay.
        for _ in 0..3 {
            let text = s.render();
            assert_eq!(
                totals(&text).into_iter().collect::<Vec<_>>(),
                [("d/held".to_owned(), 1), ("d/kept".to_owned(), 1)],
                "{text}"
            );
        }
        // The same rule in a new tree (a reload: an empty slot) counts on in the same series.
        let again = rule(&s, "d", "d.held");
        assert!(Arc::ptr_eq(held.get().unwrap(), again.get().unwrap()));
        assert_eq!(totals(&s.render())["d/held"], 2);
    }

    #[test]
    fn a_configured_rule_takes_over_a_request_built_key_and_frees_its_place() {
        let s = stats(1);
        hit(&s, "d", "d.k");
        assert_eq!(s.dynamic_keys(), 1);
        let _k = rule(&s, "d", "d.k");
        assert_eq!(s.dynamic_keys(), 0);
        hit(&s, "d", "d.t");
        assert_eq!(
            totals(&s.render()).into_iter().collect::<Vec<_>>(),
            [("d/k".to_owned(), 2), ("d/t".to_owned(), 1)]
        );
    }

    #[test]
    fn dropped_series_leave_the_recorder_even_if_never_rendered() {
        let s = stats(10);
        hit(&s, "d", "d.t");
        drop(rule(&s, "d", "d.k"));
        s.advance(IDLE * 2);
        assert_eq!(s.sweep(|k| k == "d.k", |_| true), 1);
        s.forget_dropped();
        assert_eq!(keys(&s.render()), ["d/k"]);
    }

    #[test]
    fn an_expired_traffic_key_comes_back_as_a_fresh_series_and_frees_its_place() {
        let s = stats(1);
        for _ in 0..3 {
            hit(&s, "d", "d.t");
        }
        hit(&s, "d", "d.u");
        assert_eq!(
            totals(&s.render()).into_iter().collect::<Vec<_>>(),
            [("d/__overflow".to_owned(), 1), ("d/t".to_owned(), 3)]
        );
        s.advance(IDLE * 2);
        // The overflow series of a domain in force stays; of a removed domain, it goes.
        assert_eq!(s.sweep(|_| false, |d| d == "d"), 1);
        s.forget_dropped();
        assert_eq!(keys(&s.render()), ["d/__overflow"]);
        hit(&s, "d", "d.t");
        hit(&s, "d", "d.u");
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
}
