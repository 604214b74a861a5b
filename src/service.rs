//! `ShouldRateLimit`: request in, rules matched, every limit decided in one store call,
//! answer out ([`crate::answer`]).
//!
//! Where we differ from envoyproxy/ratelimit it is on purpose and listed in the README's
//! migration notes: `Retry-After` on OVER_LIMIT, `INVALID_ARGUMENT` instead of `UNKNOWN` for
//! bad requests and `UNAVAILABLE` for backend failures.

use std::{borrow::Cow, collections::HashSet, sync::Arc};

use arc_swap::ArcSwap;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::{
    answer::{self, Resolved},
    calls::{BackendCall, Calls, Outcome},
    config::{Limit, Rule, RuleTree},
    error::ServiceError,
    limiter::{
        algorithm::window_start_ms,
        algorithm::Verdict,
        bucket_key, copy_base,
        engine::{Batch, Charging, Check, Decided, Role},
        window_key, Algorithm, CacheKeyBuilder, Clock, Unit,
    },
    local_cache::LocalCache,
    log_throttle::LogThrottle,
    matcher,
    metrics::{self as m, Stats},
    otel::{self, Tracer},
    proto::envoy::service::ratelimit::v3::{
        rate_limit_service_server::RateLimitService, RateLimitRequest, RateLimitResponse,
    },
    store::{Store, StoreError, MAX_COUNT},
};

/// One request's checks, before the store decides them.
#[derive(Default)]
struct Plan {
    checks: Vec<Check>,
    roles: Vec<Role>,
    quota_total: usize,
}

/// One descriptor's limits as they stand (`/usage`).
#[derive(Debug, Clone, PartialEq)]
pub enum Usage {
    /// No rule matches (or the domain is unknown).
    NoRule,
    /// `unlimited: true`.
    Unlimited,
    Limited {
        /// The rule's path (`domain > key=value`).
        rule: String,
        /// Each limit with its verdict for a cost of 0.
        limits: Vec<(Limit, Verdict)>,
    },
}

/// Most descriptors one request may carry (Envoy sends a handful).
pub const MAX_DESCRIPTORS: usize = 256;
/// Most entries one descriptor may carry.
pub const MAX_ENTRIES: usize = 64;
/// Longest descriptor key or value, in bytes.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;

/// Names of the optional RateLimit-* headers (`LIMIT_*_HEADER` toward the client,
/// `LIMIT_REQUEST_*_HEADER` toward the upstream).
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
    /// `RESPONSE_DYNAMIC_METADATA`: set the response's `dynamic_metadata`.
    pub dynamic_metadata: bool,
    /// `LIMIT_RESPONSE_HEADERS_ENABLED` with the header names.
    pub response_headers: Option<HeaderNames>,
    /// `LIMIT_REQUEST_HEADERS_ENABLED` with the header names: the same values in
    /// `request_headers_to_add`.
    pub request_headers: Option<HeaderNames>,
    /// `EXPIRATION_JITTER_MAX_SECONDS`: random extra TTL so keys do not all expire at once.
    pub expiration_jitter_max_seconds: u64,
    /// `NEAR_LIMIT_RATIO`: share of a limit above which hits count as near the limit.
    pub near_limit_ratio: f32,
    /// `LIMIT_RULE_HEADER`: on OVER_LIMIT, a response header naming the rule that fired.
    pub rule_header: Option<String>,
    /// `MAX_CONCURRENT_CALLS`: calls answered at once; 0 means no bound.
    pub max_concurrent_calls: u64,
    /// `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`, `STRICT_CHARGING`: which checks a request
    /// charges.
    pub charging: Charging,
    /// `DEFAULT_ALGORITHM`, for limits sent by Envoy (rules get it when compiled).
    pub default_algorithm: Algorithm,
    /// `LOCAL_CACHE_SIZE_IN_BYTES`: over-limit fixed windows answered locally; 0 disables.
    pub local_cache_bytes: u64,
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
    /// `LOCAL_CACHE_SIZE_IN_BYTES`.
    local_cache: Option<LocalCache>,
    /// `TRACING_ENABLED`: spans for calls and store calls; none means none are made.
    tracer: Option<Tracer>,
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
            local_cache: LocalCache::new(settings.local_cache_bytes),
            settings,
            tracer: None,
        }
    }

    /// Traces calls with `tracer`, if any (`TRACING_ENABLED`).
    pub fn with_tracer(mut self, tracer: Option<Tracer>) -> Self {
        self.tracer = tracer;
        self
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
            // The reference counts it as a service error.
            Err(ServiceError::NoConfig) => Outcome::Invalid,
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
        if tree.awaiting_first_config {
            return Err(ServiceError::NoConfig);
        }
        // One clock read: every key and every decision of the request uses it.
        let now_ms = self.clock.now_millis();
        if !tree.domains.contains_key(&req.domain) {
            // As the reference: once per descriptor (its GetLimit's first step).
            let descriptors = u64::try_from(req.descriptors.len()).unwrap_or(u64::MAX);
            self.stats.domain_not_found(&req.domain, descriptors);
        }
        let resolved = resolve(&tree, req, self.settings.default_algorithm)?;

        let plan = self.plan(req, &resolved, now_ms);
        let decided = self.run(&plan, self.settings.charging, now_ms).await?;
        tracing::debug!(domain = %req.domain, descriptors = req.descriptors.len(), checks = plan.checks.len(), "should_rate_limit");
        Ok(answer::respond(
            &self.settings,
            &self.stats,
            req,
            &resolved,
            &decided,
            &self.global_shadow,
        ))
    }

    /// Every limit of `descriptors` in `domain` as it stands, charging nothing: for each
    /// descriptor, the matched rule (if any) and each limit's verdict for a cost of 0.
    pub async fn usage(
        &self,
        domain: &str,
        descriptors: &[Vec<(String, String)>],
    ) -> Result<Vec<Usage>, ServiceError> {
        use crate::proto::envoy::extensions::common::ratelimit::v3::{
            rate_limit_descriptor::Entry, RateLimitDescriptor,
        };
        let req = RateLimitRequest {
            domain: domain.to_owned(),
            descriptors: descriptors
                .iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .iter()
                        .map(|(key, value)| Entry {
                            key: key.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    limit: None,
                    hits_addend: Some(0),
                })
                .collect(),
            hits_addend: 0,
        };
        validate(&req)?;
        let tree = self.rules.load_full();
        let now_ms = self.clock.now_millis();
        let resolved = resolve(&tree, &req, self.settings.default_algorithm)?;
        let plan = self.plan(&req, &resolved, now_ms);
        let decided = self.run(&plan, Charging::Never, now_ms).await?;
        let mut decided = decided.iter();
        Ok(resolved
            .iter()
            .map(|r| match r {
                Resolved::Nothing => Usage::NoRule,
                Resolved::Unlimited => Usage::Unlimited,
                Resolved::Limited { limits, rule, .. } => Usage::Limited {
                    rule: rule.map_or_else(|| "limit override".to_owned(), |r| r.path.clone()),
                    limits: limits
                        .iter()
                        .zip(decided.by_ref())
                        .map(|(limit, d)| (*limit, d.verdict))
                        .collect(),
                },
            })
            .collect())
    }

    /// The checks of a request's limited descriptors, each descriptor's role, and how many
    /// quota descriptors the request has.
    fn plan(&self, req: &RateLimitRequest, resolved: &[Resolved<'_>], now_ms: u64) -> Plan {
        let mut plan = Plan::default();
        for (d, r) in req.descriptors.iter().zip(resolved) {
            match r {
                Resolved::Limited {
                    limits,
                    rule,
                    shared,
                    cost,
                    ..
                } => {
                    let entries = d.entries.iter().enumerate().map(|(i, e)| {
                        (e.key.as_str(), matcher::counter_value(shared, i, &e.value))
                    });
                    let mut base = self.keys.base(&req.domain, entries);
                    let quota =
                        self.settings.global_quota_mode || rule.is_some_and(|r| r.quota_mode);
                    plan.quota_total += usize::from(quota);
                    let descriptor = plan.roles.len();
                    plan.roles.push(Role {
                        shadow: rule.is_some_and(|r| r.shadow_mode),
                        quota,
                    });
                    let single = limits.len() == 1;
                    for (i, limit) in limits.iter().enumerate() {
                        // The last limit takes the base itself: one allocation per key.
                        let own = if i + 1 < limits.len() {
                            copy_base(&base)
                        } else {
                            std::mem::take(&mut base)
                        };
                        let check = self.check(descriptor, own, limit, single, *cost, now_ms);
                        plan.checks.push(check);
                    }
                }
                Resolved::Nothing => {
                    plan.quota_total += usize::from(self.settings.global_quota_mode);
                }
                Resolved::Unlimited => {}
            }
        }
        plan
    }

    /// Decides `plan` in one store call (none when nothing is limited).
    async fn run(
        &self,
        plan: &Plan,
        charging: Charging,
        now_ms: u64,
    ) -> Result<Vec<Decided>, ServiceError> {
        if plan.checks.is_empty() {
            return Ok(Vec::new());
        }
        let batch = Batch {
            checks: &plan.checks,
            roles: &plan.roles,
            quota_total: plan.quota_total,
            charging,
            never_refuse: self.settings.global_shadow_mode,
            now_ms,
        };
        let Some(cache) = &self.local_cache else {
            return self.decide(&batch).await;
        };
        let Some(local) = cache.answer(&batch) else {
            let decided = self.decide(&batch).await?;
            cache.remember(batch.checks, &decided, now_ms);
            return Ok(decided);
        };
        // Some checks answered locally: the store decides the others, if any.
        let rest: Vec<Check> = plan
            .checks
            .iter()
            .zip(&local.decided)
            .filter(|(_, d)| d.is_none())
            .map(|(c, _)| c.clone())
            .collect();
        let from_store = if rest.is_empty() {
            Vec::new()
        } else {
            let decided = self
                .decide(&Batch {
                    checks: &rest,
                    charging: local.charging,
                    ..batch
                })
                .await?;
            cache.remember(&rest, &decided, now_ms);
            decided
        };
        let mut from_store = from_store.into_iter();
        Ok(local
            .decided
            .into_iter()
            .filter_map(|d| d.or_else(|| from_store.next()))
            .collect())
    }

    /// One store call, timed and counted.
    async fn decide(&self, batch: &Batch<'_>) -> Result<Vec<Decided>, ServiceError> {
        let _backend = BackendCall::new(&self.backend_in_flight, &self.backend_duration);
        let result = otel::store_call(
            self.tracer.as_ref(),
            self.store.span(),
            batch.checks.len(),
            self.store.decide(batch),
            |e: &StoreError| e.kind().to_string(),
        )
        .await;
        if let Err(e) = &result {
            counter!(m::BACKEND_ERRORS, "kind" => e.kind().label()).increment(1);
        }
        Ok(result?)
    }

    /// One limit's check: its keys (the reference's for a rule's single one-unit fixed
    /// window, tagged with the window otherwise, see `limiter::key`), quota and cost.
    fn check(
        &self,
        descriptor: usize,
        base: String,
        limit: &Limit,
        single: bool,
        cost: u64,
        now_ms: u64,
    ) -> Check {
        let (key, previous) = limit_keys(base, limit, single, now_ms);
        Check {
            descriptor,
            quota: limit.quota(),
            key,
            previous,
            cost,
            jitter_secs: self.jitter(),
            per_second: limit.unit == Unit::Second,
        }
    }

    fn jitter(&self) -> u64 {
        match self.settings.expiration_jitter_max_seconds {
            0 => 0,
            max => fastrand::u64(0..max),
        }
    }
}

/// A limit's keys at `now_ms` for a descriptor whose keys start with `base`: the state's key
/// and, for a sliding window, the previous window's. The reference's key for a rule's
/// `single` one-unit fixed window; the window appended as a tag otherwise; a bucket's own key.
pub fn limit_keys(
    base: String,
    limit: &Limit,
    single: bool,
    now_ms: u64,
) -> (String, Option<String>) {
    let window_ms = limit.quota().window_ms;
    let tag = (!single || limit.multiplier != 1).then_some((limit.multiplier, limit.unit));
    let start_ms = window_start_ms(window_ms, now_ms);
    match limit.algorithm {
        Algorithm::FixedWindow => (window_key(base, start_ms / 1000, tag), None),
        Algorithm::SlidingWindow => {
            let previous = start_ms.saturating_sub(window_ms) / 1000;
            (
                window_key(copy_base(&base), start_ms / 1000, tag),
                Some(window_key(base, previous, tag)),
            )
        }
        Algorithm::TokenBucket => (
            bucket_key(base, limit.multiplier, limit.unit, limit.requests_per_unit),
            None,
        ),
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
    default_algorithm: Algorithm,
) -> Result<Vec<Resolved<'a>>, ServiceError> {
    let known_domain = tree.domains.contains_key(&req.domain);
    // The reference's rules: a request addend of 0 means 1; a descriptor's own addend, 0
    // included (check without charging), wins. Counters saturate at MAX_COUNT on both
    // backends, so a larger addend is counted as MAX_COUNT (over any limit).
    let request_hits = u64::from(req.hits_addend.max(1));
    let mut scratch = String::new();
    let mut replaced: Vec<&'a str> = Vec::new();
    let mut out = Vec::with_capacity(req.descriptors.len());
    for (i, d) in req.descriptors.iter().enumerate() {
        let cost = d.hits_addend.unwrap_or(request_hits).min(MAX_COUNT);
        out.push(if !known_domain {
            Resolved::Nothing
        } else if let Some(o) = &d.limit {
            let limit = OverrideLimit {
                requests_per_unit: o.requests_per_unit,
                unit: o.unit,
                algorithm: default_algorithm,
            };
            override_limit(i, &req.domain, d, limit, cost)?
        } else {
            match matcher::find(tree, &req.domain, &d.entries, &mut scratch) {
                None => Resolved::Nothing,
                Some(m) => {
                    let rule: &'a Rule = m.rule;
                    replaced.extend(rule.replaces.iter().map(String::as_str));
                    if rule.limits.is_empty() {
                        Resolved::Unlimited
                    } else {
                        Resolved::Limited {
                            limits: Cow::Borrowed(&rule.limits),
                            rule: Some(rule),
                            shared: m.shared,
                            stats_key: m.stats_key,
                            cost,
                        }
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

/// A limit sent by Envoy in a descriptor, counted with `DEFAULT_ALGORITHM`.
struct OverrideLimit {
    requests_per_unit: u32,
    /// The wire value of its unit.
    unit: i32,
    algorithm: Algorithm,
}

/// A limit sent by Envoy in the descriptor. Its metrics go under the descriptor's keys only
/// (`domain.key1.key2`), not their values; Envoy chooses the keys too, so the stats key counts
/// against `METRICS_MAX_DYNAMIC_KEYS` (see [`crate::metrics`]).
fn override_limit<'a>(
    i: usize,
    domain: &str,
    d: &crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor,
    o: OverrideLimit,
    cost: u64,
) -> Result<Resolved<'a>, ServiceError> {
    match Unit::from_wire(o.unit) {
        Some(unit) => Ok(Resolved::Limited {
            limits: Cow::Owned(vec![Limit {
                algorithm: o.algorithm,
                ..Limit::fixed(o.requests_per_unit, unit)
            }]),
            rule: None,
            shared: Vec::new(),
            stats_key: Cow::Owned(d.entries.iter().fold(domain.to_owned(), |mut k, e| {
                k.push('.');
                k.push_str(&e.key);
                k
            })),
            cost,
        }),
        None => Err(ServiceError::InvalidArgument(format!(
            "descriptor {i} has a limit override with unknown unit {}",
            o.unit
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
        let call = async { self.0.answer(request.get_ref()).await.map_err(Into::into) };
        match &self.0.tracer {
            None => call.await,
            Some(tracer) => tracer.server_call(&request, call).await,
        }
        .map(tonic::Response::new)
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
        let bad = OverrideLimit {
            requests_per_unit: 1,
            unit: 99,
            algorithm: Algorithm::FixedWindow,
        };
        let e = override_limit(0, "d", &d, bad, 1)
            .err()
            .unwrap()
            .to_string();
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
            limiter_with(clock, RULES, ServiceSettings::default())
        }

        fn limiter_with(
            clock: Arc<FakeClock>,
            rules: &str,
            settings: ServiceSettings,
        ) -> RateLimiter<MemoryStore> {
            let raw = parse("rules.yaml", rules).unwrap();
            let tree = compile(&[("rules.yaml".to_owned(), raw)], false).unwrap();
            let stats = Arc::new(Stats::new(None, StatsSettings::default()));
            let store = MemoryStore::new(clock.clone(), NonZeroUsize::MIN.saturating_add(999));
            RateLimiter::new(
                Arc::new(ArcSwap::from_pointee(tree)),
                Arc::new(store),
                clock,
                ServiceSettings {
                    near_limit_ratio: 0.8,
                    ..settings
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

        use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
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

        const SEVERAL: &str = "
domain: d
descriptors:
  - key: k
    rate_limits:
      - {unit: second, requests_per_unit: 3}
      - {unit: minute, requests_per_unit: 5}
";

        #[tokio::test]
        async fn several_limits_show_the_most_restrictive_and_wait_for_the_longest() {
            let clock = Arc::new(FakeClock(AtomicU64::new(1_000_020)));
            let settings = ServiceSettings {
                response_headers: Some(HeaderNames {
                    limit: "RateLimit-Limit".into(),
                    remaining: "RateLimit-Remaining".into(),
                    reset: "RateLimit-Reset".into(),
                }),
                request_headers: Some(HeaderNames {
                    limit: "X-Up-Limit".into(),
                    remaining: "X-Up-Remaining".into(),
                    reset: "X-Up-Reset".into(),
                }),
                ..ServiceSettings::default()
            };
            let l = limiter_with(clock.clone(), SEVERAL, settings);
            // Within both: the per-second limit has the fewest left.
            assert_eq!(ask(&l, 1).await, (OK, 2, 1, None));
            assert_eq!(ask(&l, 2).await, (OK, 0, 1, None));
            // Over the per-second limit: shown, and its wait; counted in both (fixed windows).
            assert_eq!(ask(&l, 1).await, (OVER, 0, 1, Some("1".into())));
            clock.0.store(1_000_021, Ordering::SeqCst);
            // A new second; the minute has 5 − 4 = 1 left, the fewest.
            let r = l.should_rate_limit(&request(1)).await.unwrap();
            let s = &r.statuses[0];
            assert_eq!((s.code, s.limit_remaining), (OK, 0));
            assert_eq!(s.current_limit.as_ref().unwrap().requests_per_unit, 5);
            let header = |name: &str| {
                r.response_headers_to_add
                    .iter()
                    .find(|h| h.key == name)
                    .map(|h| h.value.clone())
            };
            assert_eq!(
                header("RateLimit-Limit").as_deref(),
                Some("5, 3;w=1, 5;w=60")
            );
            assert_eq!(header("RateLimit-Remaining").as_deref(), Some("0"));
            assert_eq!(header("RateLimit-Reset").as_deref(), Some("59"));
            // The same values toward the upstream, under their own names.
            let upstream: Vec<(&str, &str)> = r
                .request_headers_to_add
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_str()))
                .collect();
            assert_eq!(
                upstream,
                [
                    ("X-Up-Limit", "5, 3;w=1, 5;w=60"),
                    ("X-Up-Remaining", "0"),
                    ("X-Up-Reset", "59")
                ]
            );
            // Over the minute (and not the second): the minute's 59 s is the wait.
            assert_eq!(ask(&l, 1).await, (OVER, 0, 59, Some("59".into())));
        }
    }
}
