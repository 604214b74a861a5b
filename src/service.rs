//! `ShouldRateLimit`: request in, rules matched, every limit decided in one store call,
//! answer out ([`crate::answer`]).
//!
//! Where we differ from envoyproxy/ratelimit it is on purpose and listed in the README's
//! migration notes: `Retry-After` on OVER_LIMIT, `INVALID_ARGUMENT` instead of `UNKNOWN` for
//! bad requests and `UNAVAILABLE` for backend failures.

use std::{collections::HashSet, future::Future, ops::Deref, pin::Pin, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use metrics::{counter, Counter};
use smallvec::SmallVec;

use crate::{
    answer::{self, Resolved},
    calls::{Calls, Outcome},
    config::{Limit, RuleTree},
    error::ServiceError,
    failure::{self, CallContext, Deadline, Decisions, FailureSettings, Guard},
    limiter::{
        algorithm::window_start_ms,
        algorithm::Verdict,
        bucket_key, copy_base,
        engine::{Batch, Charging, Check, DecidedList, Role, INLINE_CHECKS},
        recycle_key, window_key, Algorithm, CacheKeyBuilder, Clock, Unit,
    },
    local_cache::LocalCache,
    matcher,
    metrics::{self as m, Stats},
    otel::{self, Tracer},
    proto::envoy::service::ratelimit::v3::{
        rate_limit_service_server::RateLimitService, RateLimitRequest, RateLimitResponse,
    },
    resolve::{resolve, resolve_in, validate, ResolvedList},
    store::{Store, StoreError},
};

/// One request's checks, before the store decides them.
#[derive(Default)]
struct Plan {
    checks: SmallVec<[Check; INLINE_CHECKS]>,
    roles: SmallVec<[Role; INLINE_CHECKS]>,
    quota_total: usize,
}

/// The keys go back to this thread's spare buffers, for the next request's keys.
impl Drop for Plan {
    fn drop(&mut self) {
        for check in self.checks.drain(..) {
            recycle_key(check.key);
            if let Some(previous) = check.previous {
                recycle_key(previous);
            }
        }
    }
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

pub use crate::resolve::{MAX_DESCRIPTORS, MAX_ENTRIES, MAX_ENTRY_BYTES};

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
    /// `LIMIT_RESPONSE_BODY`: the body of an OVER_LIMIT answer.
    pub limit_body: crate::body::LimitBody,
    /// `MAX_CONCURRENT_CALLS`: calls answered at once; 0 means no bound.
    pub max_concurrent_calls: u64,
    /// `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`, `STRICT_CHARGING`: which checks a request
    /// charges.
    pub charging: Charging,
    /// `DEFAULT_ALGORITHM`, for limits sent by Envoy (rules get it when compiled).
    pub default_algorithm: Algorithm,
    /// `LOCAL_CACHE_SIZE_IN_BYTES`: over-limit fixed windows answered locally; 0 disables.
    pub local_cache_bytes: u64,
    /// `BACKEND_FAILURE_POLICY`, the breaker and the deadline margin.
    pub failure: FailureSettings,
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
    /// The store call's deadline, breaker and failure policy.
    guard: Guard,
    /// Per-call metrics, and admission under `MAX_CONCURRENT_CALLS`.
    calls: Calls,
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
            guard: Guard::new(settings.failure.clone(), clock.clone()),
            rules,
            store,
            clock,
            stats,
            global_shadow: counter!(m::GLOBAL_SHADOW_MODE),
            calls,
            local_cache: LocalCache::new(settings.local_cache_bytes),
            settings,
            tracer: None,
        }
    }

    /// Whether calls are traced (`TRACING_ENABLED`).
    pub fn traced(&self) -> bool {
        self.tracer.is_some()
    }

    /// Traces calls with `tracer`, if any (`TRACING_ENABLED`).
    pub fn with_tracer(mut self, tracer: Option<Tracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// Answers one call and counts it exactly once, however it ends: answered, refused as
    /// invalid, failed in the backend, shed because `MAX_CONCURRENT_CALLS` calls are in
    /// flight, or cancelled (this future dropped before it finished). No deadline of its own
    /// (`/json`); see [`RateLimiter::answer_by`].
    pub fn answer<'a>(
        &'a self,
        req: &'a RateLimitRequest,
    ) -> impl Future<Output = Result<RateLimitResponse, ServiceError>> + 'a {
        self.answer_by(req, None)
    }

    /// [`RateLimiter::answer`] for a caller that gives up after `grpc_timeout` (its header's
    /// value): at that deadline less `BACKEND_DEADLINE_MARGIN` the store call is abandoned
    /// and the failure policy answers.
    ///
    /// Both are plain functions returning [`RateLimiter::answer_from`]'s future: an async
    /// function awaiting it would build it and then copy it whole into its own.
    pub fn answer_by<'a>(
        &'a self,
        req: &'a RateLimitRequest,
        grpc_timeout: Option<&str>,
    ) -> impl Future<Output = Result<RateLimitResponse, ServiceError>> + 'a {
        // The call's one clock read, for its deadline, its duration and its windows.
        let started = Instant::now();
        self.answer_from(req, self.deadline(grpc_timeout, started), started)
    }

    /// The deadline of a call received at `started` with `grpc_timeout`.
    fn deadline(&self, grpc_timeout: Option<&str>, started: Instant) -> Option<Deadline> {
        let margin = self.guard.settings().deadline_margin;
        Deadline::from_header(grpc_timeout, margin, started)
    }

    /// The call received at `started` ([`RateLimiter::answer`]); `req` is borrowed, or owned
    /// by this future (tonic's request, in [`GrpcService`]).
    async fn answer_from<Q: Deref<Target = RateLimitRequest>>(
        &self,
        req: Q,
        deadline: Option<Deadline>,
        started: Instant,
    ) -> Result<RateLimitResponse, ServiceError> {
        let req = &*req;
        let mut call = match self.calls.begin(started) {
            Ok(call) => call,
            Err(limit) => return Err(ServiceError::Overloaded(limit)),
        };
        let ctx = CallContext {
            deadline,
            policy: true,
        };
        // One atomic load: the whole request sees one rule set even if a reload lands now.
        let tree = self.rules.load_full();
        // Plain functions before and after the one await, the checks' decisions: each async
        // level would be one more future built and then copied whole into its caller's, and
        // so would a list returned by value (docs/benchmarks.md, "One async level per call").
        let mut resolved = ResolvedList::new();
        let mut plan = Plan::default();
        let now_ms = match self.prepare(req, &tree, started, &mut resolved, &mut plan) {
            Ok(now_ms) => now_ms,
            Err(e) => return Err(call.ends(e)),
        };
        let decided = self
            .decide(&plan, self.settings.charging, now_ms, ctx)
            .await;
        match decided {
            Ok(decided) => {
                call.outcome = Outcome::Answered;
                Ok(self.respond(req, &resolved, &plan, decided))
            }
            Err(e) => Err(call.ends(e)),
        }
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

    /// The store call's guard (breaker state, for tests and the admin view).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// A request's rules and checks, into `resolved` and `plan` (both empty): validated,
    /// resolved against `tree`, its keys named at the wall-clock time of `started`, the call's
    /// one clock read. Returns that time.
    fn prepare<'t>(
        &self,
        req: &RateLimitRequest,
        tree: &'t RuleTree,
        started: Instant,
        resolved: &mut ResolvedList<'t>,
        plan: &mut Plan,
    ) -> Result<u64, ServiceError> {
        validate(req)?;
        if tree.awaiting_first_config {
            return Err(ServiceError::NoConfig);
        }
        // Every key and every decision of the request is at this instant.
        let now_ms = self.clock.millis_at(started);
        // One lookup of the domain for the whole request.
        let root = tree.domains.get(&req.domain);
        if root.is_none() {
            // As the reference: once per descriptor (its GetLimit's first step).
            let descriptors = u64::try_from(req.descriptors.len()).unwrap_or(u64::MAX);
            self.stats.domain_not_found(&req.domain, descriptors);
        }
        resolve_in(root, req, self.settings.default_algorithm, resolved)?;
        self.plan_into(req, resolved, now_ms, plan);
        Ok(now_ms)
    }

    /// The answer to `req` from its checks' decisions: the store's, or the failure policy's.
    fn respond(
        &self,
        req: &RateLimitRequest,
        resolved: &[Resolved<'_>],
        plan: &Plan,
        decided: Decisions,
    ) -> RateLimitResponse {
        tracing::debug!(domain = %req.domain, descriptors = req.descriptors.len(), checks = plan.checks.len(), "should_rate_limit");
        let respond = |decided: &[_]| {
            answer::respond(
                &self.settings,
                &self.stats,
                req,
                resolved,
                decided,
                &self.global_shadow,
            )
        };
        match decided {
            Decisions::Store(decided) => respond(&decided),
            Decisions::Local(decided) => {
                let mut response = respond(&decided);
                failure::mark_refusal(&mut response, &self.settings, failure::Policy::Local);
                response
            }
            Decisions::Fixed(policy) => {
                let open_for = self.guard.settings().breaker.open_for;
                let retry_after = open_for.as_millis().div_ceil(1000);
                failure::fixed_response(
                    policy,
                    &self.settings,
                    resolved,
                    u64::try_from(retry_after).unwrap_or(u64::MAX),
                )
            }
        }
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
        // The store's view or an error: never the failure policy's.
        let ctx = CallContext::default();
        let decided = self.decide(&plan, Charging::Never, now_ms, ctx).await?;
        let mut decided = decided.decided().iter();
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
        self.plan_into(req, resolved, now_ms, &mut plan);
        plan
    }

    /// [`RateLimiter::plan`] into `plan` (empty), where the caller keeps it: returned, it
    /// would be copied on its way up.
    fn plan_into(
        &self,
        req: &RateLimitRequest,
        resolved: &[Resolved<'_>],
        now_ms: u64,
        plan: &mut Plan,
    ) {
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
    }

    /// Decides `plan` in one store call (none when nothing is limited, or when the local
    /// cache answers every check), inside the failure guard: its deadline, breaker and
    /// policy.
    async fn decide(
        &self,
        plan: &Plan,
        charging: Charging,
        now_ms: u64,
        ctx: CallContext,
    ) -> Result<Decisions, ServiceError> {
        if plan.checks.is_empty() {
            return Ok(Decisions::Store(DecidedList::new()));
        }
        let batch = Batch {
            checks: &plan.checks,
            roles: &plan.roles,
            quota_total: plan.quota_total,
            charging,
            never_refuse: self.settings.global_shadow_mode,
            now_ms,
        };
        let local = self.local_cache.as_ref().and_then(|c| c.answer(&batch));
        // The checks the local cache did not answer, for the store.
        let rest: Vec<Check> = local.as_ref().map_or_else(Vec::new, |local| {
            plan.checks
                .iter()
                .zip(&local.decided)
                .filter(|(_, d)| d.is_none())
                .map(|(c, _)| c.clone())
                .collect()
        });
        let to_store = match &local {
            None => batch.clone(),
            Some(local) => Batch {
                checks: &rest,
                charging: local.charging,
                ..batch.clone()
            },
        };
        let from_store = if to_store.checks.is_empty() {
            Decisions::Store(DecidedList::new())
        } else if !self.guard.admit() {
            let open = StoreError::CircuitOpen;
            Box::pin(self.guard.fallback(&to_store, ctx, open)).await?
        } else {
            let result = {
                let _backend = self.calls.backend_call();
                let checks = to_store.checks.len();
                let span = otel::store_span(self.tracer.as_ref(), self.store.span(), checks);
                // The one await of the store: a second call site made every call's future
                // hold room for a second store future (docs/benchmarks.md, "Per-call lists
                // inline").
                match span {
                    None => self.store.decide_by(&to_store, ctx.deadline).await,
                    // The backend span (TRACING_ENABLED): the store call alone, not the
                    // policy. Boxed, so an untraced call's future has no room for it.
                    Some(cx) => {
                        let call = self.store.decide_by(&to_store, ctx.deadline);
                        Box::pin(otel::in_store_span(cx, call, |e| e.kind().to_string())).await
                    }
                }
            };
            self.guard.settle(&result);
            match result {
                Ok(decided) => Decisions::Store(decided),
                // Boxed, as for an open circuit: the failure path's future (the local policy's
                // store call) stays out of every call's.
                Err(e) => Box::pin(self.guard.fallback(&to_store, ctx, e)).await?,
            }
        };
        let Some(cache) = &self.local_cache else {
            return Ok(from_store);
        };
        if let Decisions::Store(d) = &from_store {
            cache.remember(to_store.checks, d, now_ms);
        }
        let Some(local) = local else {
            return Ok(from_store);
        };
        // Some checks answered locally: merged with the store's, in request order.
        let merge = |from_store: DecidedList| -> DecidedList {
            let mut from_store = from_store.into_iter();
            local
                .decided
                .into_iter()
                .filter_map(|d| d.or_else(|| from_store.next()))
                .collect()
        };
        Ok(match from_store {
            Decisions::Store(d) => Decisions::Store(merge(d)),
            Decisions::Local(d) => Decisions::Local(merge(d)),
            fixed @ Decisions::Fixed(_) => fixed,
        })
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

/// The tonic service: owns a [`RateLimiter`].
pub struct GrpcService<S>(pub Arc<RateLimiter<S>>);

/// A call's request, owned by the call's future.
struct Owned(tonic::Request<RateLimitRequest>);

impl Deref for Owned {
    type Target = RateLimitRequest;

    fn deref(&self) -> &RateLimitRequest {
        self.0.get_ref()
    }
}

type Reply = Result<tonic::Response<RateLimitResponse>, tonic::Status>;

/// Written out, not with `#[tonic::async_trait]`: that boxes a future of its own which awaits
/// the call's, so the call's future would be built and then copied whole into it. Here the
/// box holds the call's future itself.
impl<S: Store> RateLimitService for GrpcService<S> {
    fn should_rate_limit<'s, 'f>(
        &'s self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send + 'f>>
    where
        's: 'f,
        Self: 'f,
    {
        // The call's one clock read, for its deadline, its duration and its windows.
        let started = Instant::now();
        let limiter = &*self.0;
        let timeout = request.metadata().as_ref().get(&GRPC_TIMEOUT);
        let deadline = limiter.deadline(timeout.and_then(|v| v.to_str().ok()), started);
        match &limiter.tracer {
            None => Box::pin(
                limiter
                    .answer_from(Owned(request), deadline, started)
                    .map(|r| r.map(tonic::Response::new).map_err(Into::into)),
            ),
            Some(tracer) => Box::pin(async move {
                let call = limiter.answer_from(request.get_ref(), deadline, started);
                let call = call.map(|r| r.map_err(Into::into));
                tracer
                    .server_call(&request, call)
                    .await
                    .map(tonic::Response::new)
            }),
        }
    }
}

/// The caller's deadline's header, its name made once: a lookup by a string parses the
/// name first (matched against every standard header name of its length), on every call.
static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::tests::descriptor;

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
            let r = l.answer(&request(hits)).await.unwrap();
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
            let r = l.answer(&request(1)).await.unwrap();
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
