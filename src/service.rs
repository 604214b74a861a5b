//! `ShouldRateLimit`: request in, rules matched, counters bumped in one store call, answer out.
//!
//! The answer follows envoyproxy/ratelimit field for field (statuses in request order, the
//! same `limit_remaining`, `duration_until_reset`, RateLimit-* headers and shadow/quota
//! rules); where we differ it is on purpose and listed in the README's migration notes:
//! `Retry-After` on OVER_LIMIT, `INVALID_ARGUMENT` instead of `UNKNOWN` for bad requests and
//! `UNAVAILABLE` for backend failures.

use std::{borrow::Cow, collections::HashSet, sync::Arc};

use arc_swap::ArcSwap;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::{
    calls::{BackendCall, Calls, Outcome},
    config::{Limit, Rule, RuleTree},
    error::ServiceError,
    limiter::{decide, CacheKeyBuilder, Clock, Unit},
    log_throttle::LogThrottle,
    matcher,
    metrics::{self as m, HitOutcome, Stats},
    proto::envoy::{
        config::core::v3::HeaderValue,
        service::ratelimit::v3::{
            rate_limit_response::{
                rate_limit::Unit as WireUnit, Code, DescriptorStatus, RateLimit,
            },
            rate_limit_service_server::RateLimitService,
            RateLimitRequest, RateLimitResponse,
        },
    },
    store::{Hit, Store, MAX_COUNT},
};

/// Most descriptors one request may carry (Envoy sends a handful).
pub const MAX_DESCRIPTORS: usize = 256;
/// Most entries one descriptor may carry.
pub const MAX_ENTRIES: usize = 64;
/// Longest descriptor key or value, in bytes.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;

/// Names of the optional RateLimit-* response headers (`LIMIT_*_HEADER`).
#[derive(Debug, Clone)]
pub struct HeaderNames {
    pub limit: String,
    pub remaining: String,
    pub reset: String,
}

/// Service behaviour switches, read once from settings.
#[derive(Debug, Clone, Default)]
pub struct ServiceSettings {
    /// Counter keys: `CACHE_KEY_PREFIX`, and `CACHE_KEY_HASH_SECRET_FILE`'s value hashing.
    pub cache_keys: CacheKeyBuilder,
    /// `SHADOW_MODE`: answer OK overall, still count.
    pub global_shadow_mode: bool,
    /// `QUOTA_MODE`: every limited descriptor is a quota descriptor.
    pub global_quota_mode: bool,
    /// `LIMIT_RESPONSE_HEADERS_ENABLED` with the header names.
    pub response_headers: Option<HeaderNames>,
    /// `EXPIRATION_JITTER_MAX_SECONDS`: random extra TTL so keys do not all expire at once.
    pub expiration_jitter_max_seconds: u64,
    /// `NEAR_LIMIT_RATIO`: share of a limit above which hits count as near the limit.
    pub near_limit_ratio: f32,
    /// `LIMIT_RULE_HEADER`: on OVER_LIMIT, a response header naming the rule that fired.
    pub rule_header: Option<String>,
    /// `MAX_CONCURRENT_CALLS`: calls answered at once; 0 means no bound.
    pub max_concurrent_calls: u64,
}

/// The rate limit service over a store `S`.
pub struct RateLimiter<S> {
    rules: Arc<ArcSwap<RuleTree>>,
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    keys: CacheKeyBuilder,
    settings: ServiceSettings,
    stats: Arc<Stats>,
    /// Handles registered once (the recorder is installed before the service is built).
    global_shadow: Counter,
    backend_duration: Histogram,
    /// Store calls in flight: how busy the shared connections are.
    backend_in_flight: Gauge,
    /// Per-call metrics, and admission under `MAX_CONCURRENT_CALLS`.
    calls: Calls,
    /// Backend failures are logged once per stretch, not once per call.
    backend_log: LogThrottle,
}

/// What applies to one descriptor.
enum Resolved<'a> {
    /// No rule (or replaced, or unknown domain): OK, no current limit.
    Nothing,
    /// `unlimited: true`: OK, remaining u32::MAX, store untouched.
    Unlimited,
    Limited {
        limit: Limit,
        /// `None` for a limit override sent by Envoy.
        rule: Option<&'a Rule>,
        shared: Vec<(usize, &'a str)>,
        /// Key of the per-rule metrics.
        stats_key: Cow<'a, str>,
    },
}

impl<S: Store> RateLimiter<S> {
    /// `stats` holds the per-rule metrics (the rules keep their own counters once counted).
    pub fn new(
        rules: Arc<ArcSwap<RuleTree>>,
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        settings: ServiceSettings,
        stats: Arc<Stats>,
    ) -> Self {
        let calls = Calls::new(settings.max_concurrent_calls);
        Self {
            keys: settings.cache_keys.clone(),
            rules,
            store,
            clock,
            stats,
            global_shadow: counter!(m::GLOBAL_SHADOW_MODE),
            backend_duration: histogram!(m::BACKEND_DURATION),
            backend_in_flight: gauge!(m::BACKEND_IN_FLIGHT),
            calls,
            backend_log: LogThrottle::default(),
            settings,
        }
    }

    /// Answers one call and counts it exactly once, however it ends: answered, refused as
    /// invalid, failed in the backend, shed because `MAX_CONCURRENT_CALLS` calls are in
    /// flight, or cancelled (this future dropped before it finished).
    pub async fn answer(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, ServiceError> {
        let mut call = match self.calls.begin() {
            Ok(call) => call,
            Err(limit) => return Err(ServiceError::Overloaded(limit)),
        };
        let result = self.should_rate_limit(req).await;
        call.outcome = match &result {
            Ok(_) => {
                if self.backend_log.success() {
                    tracing::info!("backend answering again");
                }
                Outcome::Answered
            }
            Err(ServiceError::InvalidArgument(msg)) => {
                tracing::debug!(error = %msg, "invalid request");
                Outcome::Invalid
            }
            Err(ServiceError::Store(e)) => {
                if let Some(suppressed) = self.backend_log.failure() {
                    tracing::warn!(error = %e, transient = e.is_transient(), suppressed, "backend error (repeats are logged every 10 s)");
                }
                Outcome::Backend
            }
            Err(ServiceError::Overloaded(_)) => Outcome::Shed,
        };
        result
    }

    /// The per-rule counters (rendered by `/metrics`).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Expires idle per-rule series, keeping those of the rules in force (see [`Stats`]).
    pub fn spawn_metrics_upkeep(&self) -> tokio::task::JoinHandle<()> {
        let rules = self.rules.clone();
        m::spawn_rule_upkeep(&self.stats, move |stats| {
            let tree = rules.load_full();
            // Built only when an idle entry needs the answer.
            let mut config_keys: Option<HashSet<&str>> = None;
            stats.sweep(
                |key| {
                    config_keys
                        .get_or_insert_with(|| {
                            tree.rules()
                                .into_iter()
                                .map(|r| r.full_key.as_str())
                                .collect()
                        })
                        .contains(key)
                },
                |domain| tree.domains.contains_key(domain),
            )
        })
    }

    /// Answers one request.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, ServiceError> {
        validate(req)?;
        // One atomic load: the whole request sees one rule set even if a reload lands now.
        let tree = self.rules.load_full();
        let now = self.clock.now_unix();
        let resolved = resolve(&tree, req)?;

        let request_hits = u64::from(req.hits_addend.max(1));
        let mut hits = Vec::new();
        for (d, r) in req.descriptors.iter().zip(&resolved) {
            if let Resolved::Limited { limit, shared, .. } = r {
                let entries =
                    d.entries.iter().enumerate().map(|(i, e)| {
                        (e.key.as_str(), matcher::counter_value(shared, i, &e.value))
                    });
                hits.push(Hit {
                    key: self.keys.build(&req.domain, entries, limit.unit, now),
                    // Counters saturate at MAX_COUNT on both backends: a larger addend is
                    // counted as MAX_COUNT (over any limit) instead of failing the counter.
                    hits: d.hits_addend.unwrap_or(request_hits).min(MAX_COUNT),
                    window_secs: limit.unit.seconds(),
                    window_start: limit.unit.window_start(now),
                    ttl_secs: limit.unit.seconds() + self.jitter(),
                });
            }
        }
        let counts = if hits.is_empty() {
            Vec::new()
        } else {
            let _backend = BackendCall::new(&self.backend_in_flight, &self.backend_duration);
            let result = self.store.increment(&hits).await;
            if let Err(e) = &result {
                counter!(m::BACKEND_ERRORS, "kind" => e.kind().label()).increment(1);
            }
            result?
        };
        tracing::debug!(domain = %req.domain, descriptors = req.descriptors.len(), counters = hits.len(), "should_rate_limit");
        Ok(self.respond(req, &resolved, &hits, &counts, now))
    }

    fn jitter(&self) -> u64 {
        match self.settings.expiration_jitter_max_seconds {
            0 => 0,
            max => fastrand::u64(0..max),
        }
    }

    fn respond(
        &self,
        req: &RateLimitRequest,
        resolved: &[Resolved<'_>],
        hits: &[Hit],
        counts: &[u64],
        now: u64,
    ) -> RateLimitResponse {
        let mut counts = counts.iter().zip(hits);
        // The first over-limit descriptor's rule, for LIMIT_RULE_HEADER.
        let mut fired: Option<&str> = None;
        let mut statuses = Vec::with_capacity(resolved.len());
        let (mut failed, mut failed_quota, mut total_quota) = (0usize, 0usize, 0usize);
        // The descriptor closest to its limit, for the RateLimit-* headers (as the reference
        // picks it: lowest remaining, and any non-quota OVER_LIMIT wins).
        let (mut header_source, mut min_remaining): (Option<Limit>, u32) = (None, u32::MAX);
        let mut retry_after = 0u64;
        for r in resolved {
            let status = match r {
                Resolved::Nothing => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Resolved::Unlimited => DescriptorStatus {
                    code: Code::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..Default::default()
                },
                Resolved::Limited {
                    limit,
                    rule,
                    stats_key,
                    ..
                } => {
                    let (after, hit) = counts.next().map_or((0, 0), |(c, h)| (*c, h.hits));
                    let d = decide(limit.requests_per_unit, after);
                    let shadow = rule.is_some_and(|r| r.shadow_mode);
                    let over = d.over_limit && !shadow;
                    let outcome = HitOutcome {
                        requests_per_unit: limit.requests_per_unit,
                        hits: hit,
                        after,
                        shadow_mode: shadow,
                    };
                    let ratio = self.settings.near_limit_ratio;
                    match (rule, stats_key) {
                        // The rule's own key: its counters, registered with the config.
                        (Some(rule), Cow::Borrowed(key)) => {
                            self.stats
                                .record_rule(&req.domain, key, &rule.counters, outcome, ratio)
                        }
                        // A key holding request data (bounded by the stats).
                        _ => self.stats.record(&req.domain, stats_key, outcome, ratio),
                    }
                    if over && fired.is_none() {
                        fired = Some(rule.map_or("limit override", |r| {
                            if r.name.is_empty() {
                                &r.path
                            } else {
                                &r.name
                            }
                        }));
                    }
                    let reset = limit.unit.until_reset(now);
                    DescriptorStatus {
                        code: if over { Code::OverLimit } else { Code::Ok } as i32,
                        current_limit: Some(RateLimit {
                            name: rule.map(|r| r.name.clone()).unwrap_or_default(),
                            requests_per_unit: limit.requests_per_unit,
                            unit: wire_unit(limit.unit) as i32,
                        }),
                        limit_remaining: d.remaining,
                        duration_until_reset: Some(prost_types::Duration {
                            seconds: i64::try_from(reset).unwrap_or(i64::MAX),
                            nanos: 0,
                        }),
                        quota: None,
                    }
                }
            };
            if let Resolved::Limited { limit, rule, .. } = r {
                let quota = self.settings.global_quota_mode || rule.is_some_and(|r| r.quota_mode);
                if status.limit_remaining < min_remaining {
                    header_source = Some(*limit);
                    min_remaining = status.limit_remaining;
                }
                if status.code == Code::OverLimit as i32 {
                    retry_after = retry_after.max(limit.unit.until_reset(now));
                    if quota {
                        failed_quota += 1;
                    } else {
                        failed += 1;
                        header_source = Some(*limit);
                        min_remaining = 0;
                    }
                }
                total_quota += usize::from(quota);
            } else if matches!(r, Resolved::Nothing) && self.settings.global_quota_mode {
                total_quota += 1;
            }
            statuses.push(status);
        }

        let mut overall = if failed > 0 || (total_quota > 0 && total_quota == failed_quota) {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let mut headers = Vec::new();
        if let (Some(names), Some(limit)) = (&self.settings.response_headers, header_source) {
            headers.push(header(&names.limit, limit.requests_per_unit.to_string()));
            headers.push(header(&names.remaining, min_remaining.to_string()));
            headers.push(header(
                &names.reset,
                limit.unit.until_reset(now).to_string(),
            ));
        }
        if overall == Code::OverLimit && self.settings.global_shadow_mode {
            overall = Code::Ok;
            self.global_shadow.increment(1);
        }
        if overall == Code::OverLimit {
            headers.push(header("Retry-After", retry_after.max(1).to_string()));
            if let (Some(name), Some(rule)) = (&self.settings.rule_header, fired) {
                tracing::debug!(domain = %req.domain, rule, "over limit");
                headers.push(header(name, rule.to_owned()));
            }
        }
        RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add: headers,
            ..Default::default()
        }
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value,
        raw_value: Vec::new(),
    }
}

fn wire_unit(u: Unit) -> WireUnit {
    match u {
        Unit::Second => WireUnit::Second,
        Unit::Minute => WireUnit::Minute,
        Unit::Hour => WireUnit::Hour,
        Unit::Day => WireUnit::Day,
        Unit::Week => WireUnit::Week,
        Unit::Month => WireUnit::Month,
        Unit::Year => WireUnit::Year,
    }
}

/// Rejects requests the service cannot answer meaningfully, with a message saying why.
fn validate(req: &RateLimitRequest) -> Result<(), ServiceError> {
    let bad = |m: String| Err(ServiceError::InvalidArgument(m));
    if req.domain.is_empty() {
        return bad("rate limit domain must not be empty".into());
    }
    if req.domain.len() > MAX_ENTRY_BYTES {
        return bad(format!("domain is longer than {MAX_ENTRY_BYTES} bytes"));
    }
    if req.descriptors.is_empty() {
        return bad("rate limit descriptor list must not be empty".into());
    }
    if req.descriptors.len() > MAX_DESCRIPTORS {
        return bad(format!(
            "{} descriptors in one request; at most {MAX_DESCRIPTORS} are accepted",
            req.descriptors.len()
        ));
    }
    for (i, d) in req.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return bad(format!("descriptor {i} has no entries"));
        }
        if d.entries.len() > MAX_ENTRIES {
            return bad(format!(
                "descriptor {i} has {} entries; at most {MAX_ENTRIES} are accepted",
                d.entries.len()
            ));
        }
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() {
                return bad(format!("descriptor {i} entry {j} has an empty key"));
            }
            if e.key.len() > MAX_ENTRY_BYTES || e.value.len() > MAX_ENTRY_BYTES {
                return bad(format!(
                    "descriptor {i} entry {j} is longer than {MAX_ENTRY_BYTES} bytes"
                ));
            }
        }
    }
    Ok(())
}

/// Finds what applies to each descriptor, then drops limits other matched rules replace.
fn resolve<'a>(
    tree: &'a RuleTree,
    req: &RateLimitRequest,
) -> Result<Vec<Resolved<'a>>, ServiceError> {
    let known_domain = tree.domains.contains_key(&req.domain);
    let mut scratch = String::new();
    let mut replaced: Vec<&'a str> = Vec::new();
    let mut out = Vec::with_capacity(req.descriptors.len());
    for (i, d) in req.descriptors.iter().enumerate() {
        out.push(if !known_domain {
            Resolved::Nothing
        } else if let Some(o) = &d.limit {
            override_limit(i, &req.domain, d, o.requests_per_unit, o.unit)?
        } else {
            match matcher::find(tree, &req.domain, &d.entries, &mut scratch) {
                None => Resolved::Nothing,
                Some(m) => {
                    let rule: &'a Rule = m.rule;
                    replaced.extend(rule.replaces.iter().map(String::as_str));
                    match rule.limits.first().copied() {
                        None => Resolved::Unlimited,
                        Some(limit) => Resolved::Limited {
                            limit,
                            rule: Some(rule),
                            shared: m.shared,
                            stats_key: m.stats_key,
                        },
                    }
                }
            }
        });
    }
    if !replaced.is_empty() {
        for r in &mut out {
            if let Resolved::Limited {
                rule: Some(rule), ..
            } = r
            {
                if !rule.name.is_empty() && replaced.contains(&rule.name.as_str()) {
                    *r = Resolved::Nothing;
                }
            }
        }
    }
    Ok(out)
}

/// A limit sent by Envoy in the descriptor. Its metrics go under the descriptor's keys only
/// (`domain.key1.key2`), not their values; Envoy chooses the keys too, so the stats key counts
/// against `METRICS_MAX_DYNAMIC_KEYS` (see [`crate::metrics`]).
fn override_limit<'a>(
    i: usize,
    domain: &str,
    d: &crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor,
    requests_per_unit: u32,
    unit: i32,
) -> Result<Resolved<'a>, ServiceError> {
    match Unit::from_wire(unit) {
        Some(unit) => Ok(Resolved::Limited {
            limit: Limit::fixed(requests_per_unit, unit),
            rule: None,
            shared: Vec::new(),
            stats_key: Cow::Owned(d.entries.iter().fold(domain.to_owned(), |mut k, e| {
                k.push('.');
                k.push_str(&e.key);
                k
            })),
        }),
        None => Err(ServiceError::InvalidArgument(format!(
            "descriptor {i} has a limit override with unknown unit {unit}"
        ))),
    }
}

/// The tonic service: owns a [`RateLimiter`].
pub struct GrpcService<S>(pub Arc<RateLimiter<S>>);

#[tonic::async_trait]
impl<S: Store> RateLimitService for GrpcService<S> {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        self.0
            .answer(request.get_ref())
            .await
            .map(tonic::Response::new)
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).to_owned(),
                    value: (*v).to_owned(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// INVALID_ARGUMENT texts go back to clients: they name descriptors and entries by index
    /// and never carry a value, which may be a secret.
    #[test]
    fn invalid_argument_messages_name_indexes_not_values() {
        let secret = "sk_live_SECRET123";
        let long = format!("{secret}{}", "x".repeat(MAX_ENTRY_BYTES));
        let many = vec![descriptor(&[("k", secret)]); MAX_DESCRIPTORS + 1];
        let cases = [
            (
                vec![descriptor(&[("k", secret)]), descriptor(&[])],
                "descriptor 1 has no entries",
            ),
            (
                vec![descriptor(&[("k", secret), ("", secret)])],
                "descriptor 0 entry 1 has an empty key",
            ),
            (
                vec![descriptor(&[("k", secret)]), descriptor(&[("k", &long)])],
                "descriptor 1 entry 0 is longer than 8192 bytes",
            ),
            (
                vec![descriptor(&vec![("k", secret); MAX_ENTRIES + 1])],
                "descriptor 0 has 65 entries; at most 64 are accepted",
            ),
            (
                many,
                "257 descriptors in one request; at most 256 are accepted",
            ),
        ];
        for (descriptors, want) in cases {
            let req = RateLimitRequest {
                domain: "d".into(),
                descriptors,
                hits_addend: 0,
            };
            let e = validate(&req).unwrap_err().to_string();
            assert_eq!(e, want);
            assert!(!e.contains("SECRET"), "{e}");
        }

        // A limit override with an unknown unit, found while resolving.
        let d = descriptor(&[("k", secret)]);
        let e = override_limit(0, "d", &d, 1, 99).err().unwrap().to_string();
        assert_eq!(e, "descriptor 0 has a limit override with unknown unit 99");
    }

    mod answers {
        use std::{
            num::NonZeroUsize,
            sync::atomic::{AtomicU64, Ordering},
        };

        use super::*;
        use crate::{
            config::{compile, parse},
            metrics::StatsSettings,
            store::MemoryStore,
        };

        struct FakeClock(AtomicU64);
        impl Clock for FakeClock {
            fn now_unix(&self) -> u64 {
                self.0.load(Ordering::SeqCst)
            }
        }

        const RULES: &str = "
domain: d
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 3}
";

        fn limiter(clock: Arc<FakeClock>) -> RateLimiter<MemoryStore> {
            let raw = parse("rules.yaml", RULES).unwrap();
            let tree = compile(&[("rules.yaml".to_owned(), raw)], false).unwrap();
            let stats = Arc::new(Stats::new(None, StatsSettings::default()));
            let store = MemoryStore::new(clock.clone(), NonZeroUsize::MIN.saturating_add(999));
            RateLimiter::new(
                Arc::new(ArcSwap::from_pointee(tree)),
                Arc::new(store),
                clock,
                ServiceSettings {
                    near_limit_ratio: 0.8,
                    ..ServiceSettings::default()
                },
                stats,
            )
        }

        fn request(hits: u32) -> RateLimitRequest {
            RateLimitRequest {
                domain: "d".into(),
                descriptors: vec![descriptor(&[("k", "v")])],
                hits_addend: hits,
            }
        }

        /// (code, remaining, seconds until reset, Retry-After) of a one-descriptor answer.
        async fn ask(l: &RateLimiter<MemoryStore>, hits: u32) -> (i32, u32, i64, Option<String>) {
            let r = l.should_rate_limit(&request(hits)).await.unwrap();
            let s = &r.statuses[0];
            let retry = r
                .response_headers_to_add
                .iter()
                .find(|h| h.key == "Retry-After")
                .map(|h| h.value.clone());
            assert_eq!(r.overall_code, s.code);
            let reset = s.duration_until_reset.as_ref().unwrap();
            assert_eq!(reset.nanos, 0);
            (s.code, s.limit_remaining, reset.seconds, retry)
        }

        const OK: i32 = Code::Ok as i32;
        const OVER: i32 = Code::OverLimit as i32;

        #[tokio::test]
        async fn reset_and_remaining_are_exact_at_and_across_a_window_boundary() {
            let clock = Arc::new(FakeClock(AtomicU64::new(1_000_019)));
            let l = limiter(clock.clone());
            // Minutes align to the epoch: 1_000_019 is the last second of 999_960..1_000_020.
            assert_eq!(
                ask(&l, 1).await,
                (OK, 2, 1, None),
                "last second of the window"
            );
            clock.0.store(1_000_020, Ordering::SeqCst);
            assert_eq!(
                ask(&l, 1).await,
                (OK, 2, 60, None),
                "first second: a fresh window"
            );
            clock.0.store(1_000_050, Ordering::SeqCst);
            assert_eq!(ask(&l, 1).await, (OK, 1, 30, None));
            clock.0.store(1_000_079, Ordering::SeqCst);
            assert_eq!(
                ask(&l, 1).await,
                (OK, 0, 1, None),
                "at the limit is still OK"
            );
            assert_eq!(
                ask(&l, 1).await,
                (OVER, 0, 1, Some("1".into())),
                "one more is over, with Retry-After"
            );
            clock.0.store(1_000_080, Ordering::SeqCst);
            assert_eq!(
                ask(&l, 1).await,
                (OK, 2, 60, None),
                "the next window starts over"
            );
        }

        #[tokio::test]
        async fn remaining_counts_follow_hits_addend_exactly() {
            let clock = Arc::new(FakeClock(AtomicU64::new(600)));
            let l = limiter(clock);
            assert_eq!(ask(&l, 2).await, (OK, 1, 60, None));
            assert_eq!(ask(&l, 1).await, (OK, 0, 60, None));
            assert_eq!(ask(&l, 5).await, (OVER, 0, 60, Some("60".into())));
        }

        #[tokio::test]
        async fn a_rule_counts_into_the_counters_registered_with_its_config() {
            let clock = Arc::new(FakeClock(AtomicU64::new(600)));
            let l = limiter(clock);
            for hits in [2, 1, 5] {
                ask(&l, hits).await;
            }
            let text = l.stats().render();
            let value = |name: &str| {
                let series = format!("{name}{{domain=\"d\",key1=\"k\"}} ");
                text.lines()
                    .find_map(|line| line.strip_prefix(&series))
                    .unwrap_or_else(|| panic!("no {series}in\n{text}"))
                    .to_owned()
            };
            // 8 hits against a limit of 3: 3 within, 5 over; near (above 80% of 3 = 2): the
            // third hit.
            assert_eq!(value(m::TOTAL_HITS), "8");
            assert_eq!(value(m::WITHIN_LIMIT), "3");
            assert_eq!(value(m::OVER_LIMIT), "5");
            assert_eq!(value(m::NEAR_LIMIT), "1");
            assert_eq!(value(m::SHADOW_MODE), "0");
            assert_eq!(l.stats().dynamic_keys(), 0);
        }
    }
}
