//! The `RateLimitResponse` for one request, from what the store decided for each limit.
//!
//! Field for field as envoyproxy/ratelimit answers (statuses in request order, the same
//! `limit_remaining`, `duration_until_reset`, RateLimit-* headers toward the client and, with
//! `LIMIT_REQUEST_HEADERS_ENABLED`, toward the upstream, and shadow/quota rules);
//! where we differ it is on purpose and listed in the README's migration notes. For a rule
//! with several limits the descriptor's status reports the most restrictive one (an
//! over-limit one first, else the one with the fewest requests left), and its wait is the
//! longest among the limits it is over.

use std::borrow::Cow;

use crate::{
    body::Fired,
    config::{Limit, Rule},
    limiter::engine::Decided,
    metrics::{HitOutcome, Stats},
    proto::envoy::{
        config::core::v3::HeaderValue,
        service::ratelimit::v3::{
            rate_limit_response::{
                rate_limit::Unit as WireUnit, Code, DescriptorStatus, RateLimit,
            },
            RateLimitRequest, RateLimitResponse,
        },
    },
    service::{HeaderNames, ServiceSettings},
};

/// What applies to one descriptor.
pub enum Resolved<'a> {
    /// No rule (or replaced, or unknown domain): OK, no current limit.
    Nothing,
    /// `unlimited: true`: OK, remaining u32::MAX, store untouched.
    Unlimited,
    Limited {
        /// The rule's limits, or the one limit override sent by Envoy.
        limits: Cow<'a, [Limit]>,
        /// `None` for a limit override sent by Envoy.
        rule: Option<&'a Rule>,
        shared: Vec<(usize, &'a str)>,
        /// Key of the per-rule metrics.
        stats_key: Cow<'a, str>,
        /// `hits_addend`: what the request costs this descriptor.
        cost: u64,
    },
}

/// Builds the response; counts each limited descriptor in the per-rule metrics. `decided`
/// holds one decision per limit of every limited descriptor, in request order.
pub fn respond(
    settings: &ServiceSettings,
    stats: &Stats,
    req: &RateLimitRequest,
    resolved: &[Resolved<'_>],
    decided: &[Decided],
    global_shadow: &metrics::Counter,
) -> RateLimitResponse {
    // The decisions not yet taken by a descriptor (each takes one per limit).
    let mut rest = decided;
    // The first over-limit descriptor's rule and the limit it is over, for
    // LIMIT_RULE_HEADER and LIMIT_RESPONSE_BODY.
    let mut fired: Option<(&str, Limit)> = None;
    let mut statuses = Vec::with_capacity(resolved.len());
    let (mut failed, mut failed_quota, mut total_quota) = (0usize, 0usize, 0usize);
    // The descriptor closest to its limit, for the RateLimit-* headers (as the reference
    // picks it: lowest remaining, and any non-quota OVER_LIMIT wins).
    let mut header_source: Option<HeaderSource<'_>> = None;
    let mut min_remaining = u32::MAX;
    let mut retry_after_ms = 0u64;
    // RESPONSE_DYNAMIC_METADATA: the `metadata:` of the rules of the descriptors that passed.
    let mut passed = prost_types::Struct::default();
    let mut pass = |rule: Option<&Rule>| {
        if let Some(meta) = rule.and_then(|r| r.metadata.as_ref()) {
            if settings.dynamic_metadata {
                crate::metadata::merge(&mut passed, meta);
            }
        }
    };
    for r in resolved {
        let (limits, rule, stats_key, cost) = match r {
            Resolved::Nothing => {
                total_quota += usize::from(settings.global_quota_mode);
                statuses.push(DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                });
                continue;
            }
            Resolved::Unlimited => {
                statuses.push(DescriptorStatus {
                    code: Code::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..Default::default()
                });
                continue;
            }
            Resolved::Limited {
                limits,
                rule,
                stats_key,
                cost,
                ..
            } => (limits, *rule, stats_key, *cost),
        };
        // Borrowed, not copied: no allocation per descriptor.
        let (own, tail) = rest.split_at(limits.len().min(rest.len()));
        rest = tail;
        // One decision per limit, so both are there; were one missing, the descriptor would
        // still get its status (OK, nothing known), keeping statuses in request order.
        let shown = reported(own).and_then(|i| Some((*limits.get(i)?, *own.get(i)?)));
        let Some((
            limit,
            Decided {
                verdict, cached, ..
            },
        )) = shown
        else {
            pass(rule);
            statuses.push(DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            });
            continue;
        };
        let over_any = own.iter().any(|d| !d.verdict.allowed);
        let shadow = rule.is_some_and(|r| r.shadow_mode);
        let over = over_any && !shadow;
        let outcome = HitOutcome {
            requests_per_unit: limit.requests_per_unit,
            hits: cost,
            after: verdict.used,
            shadow_mode: shadow,
            local_cache: cached,
        };
        let ratio = settings.near_limit_ratio;
        match (rule, stats_key) {
            // The rule's own key (borrowed from the rule): the counters it keeps.
            (Some(rule), Cow::Borrowed(key)) => {
                stats.record_rule(&req.domain, key, &rule.counters, outcome, ratio)
            }
            // A key holding request data: through the bounded map.
            _ => stats.record(&req.domain, stats_key, outcome, ratio),
        }
        if over && fired.is_none() {
            // From the config only (a name, a path of configured keys and values) or fixed
            // words: never request data, so a body can carry it unescaped.
            let name = rule.map_or("limit override", |r| {
                if r.name.is_empty() {
                    &r.path
                } else {
                    &r.name
                }
            });
            // When over, the shown limit is the first one it is over.
            fired = Some((name, limit));
        }
        // The longest wait among the limits it is over; else when the shown one resets.
        let wait_ms = own
            .iter()
            .filter(|d| !d.verdict.allowed)
            .map(|d| d.verdict.retry_ms)
            .max();
        let remaining = u32::try_from(verdict.remaining).unwrap_or(u32::MAX);
        let status = DescriptorStatus {
            code: if over { Code::OverLimit } else { Code::Ok } as i32,
            current_limit: Some(RateLimit {
                name: rule.map(|r| r.name.clone()).unwrap_or_default(),
                requests_per_unit: limit.requests_per_unit,
                unit: wire_unit(limit) as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(duration(wait_ms.unwrap_or(verdict.reset_ms))),
            quota: None,
        };
        let quota = settings.global_quota_mode || rule.is_some_and(|r| r.quota_mode);
        let source = HeaderSource {
            limits,
            shown: limit,
            // The status' duration, as the reference takes RateLimit-Reset from it: when
            // over, the longest wait, not when the reported limit alone resets.
            reset_ms: wait_ms.unwrap_or(verdict.reset_ms),
        };
        if remaining < min_remaining {
            header_source = Some(source.clone());
            min_remaining = remaining;
        }
        if over {
            retry_after_ms = retry_after_ms.max(wait_ms.unwrap_or(verdict.reset_ms));
            if quota {
                failed_quota += 1;
            } else {
                failed += 1;
                header_source = Some(source);
                min_remaining = 0;
            }
        }
        total_quota += usize::from(quota);
        if !over {
            pass(rule);
        }
        statuses.push(status);
    }

    let mut overall = if failed > 0 || (total_quota > 0 && total_quota == failed_quota) {
        Code::OverLimit
    } else {
        Code::Ok
    };
    let rate_limit_headers = |names: &Option<HeaderNames>| match (names, &header_source) {
        (Some(names), Some(source)) => source.headers(names, min_remaining),
        _ => Vec::new(),
    };
    let mut headers = rate_limit_headers(&settings.response_headers);
    // As the reference's PR #1168: the same three values toward the upstream, on every answer
    // that has a limited descriptor (Envoy applies them on OK only), before shadow mode.
    let request_headers = rate_limit_headers(&settings.request_headers);
    if overall == Code::OverLimit && settings.global_shadow_mode {
        overall = Code::Ok;
        global_shadow.increment(1);
    }
    let mut raw_body = Vec::new();
    if overall == Code::OverLimit {
        let retry_after = retry_after_ms.div_ceil(1000).max(1);
        headers.push(header("Retry-After", retry_after.to_string()));
        if let (Some(name), Some((rule, _))) = (&settings.rule_header, fired) {
            tracing::debug!(domain = %req.domain, rule, "over limit");
            headers.push(header(name, rule.to_owned()));
        }
        // An OVER_LIMIT answer has a descriptor over, so `fired` is set.
        let rendered = fired.and_then(|(rule, limit)| {
            let fired = Fired {
                rule,
                limit,
                retry_after,
            };
            settings.limit_body.render(&fired)
        });
        if let Some((body, content_type)) = rendered {
            headers.push(header("content-type", content_type.to_owned()));
            raw_body = body;
        }
    }
    RateLimitResponse {
        overall_code: overall as i32,
        statuses,
        response_headers_to_add: headers,
        request_headers_to_add: request_headers,
        raw_body,
        dynamic_metadata: settings
            .dynamic_metadata
            .then(|| crate::metadata::dynamic_metadata(req, passed)),
        ..Default::default()
    }
}

/// Which limit a descriptor's status shows: the first one it is over, else the one with the
/// fewest requests left (the first of equals).
fn reported(decided: &[Decided]) -> Option<usize> {
    decided.iter().position(|d| !d.verdict.allowed).or_else(|| {
        decided
            .iter()
            .enumerate()
            .min_by_key(|(_, d)| d.verdict.remaining)
            .map(|(i, _)| i)
    })
}

/// The descriptor the RateLimit-* headers describe.
#[derive(Clone)]
struct HeaderSource<'a> {
    limits: &'a [Limit],
    shown: Limit,
    reset_ms: u64,
}

impl HeaderSource<'_> {
    /// The shown limit's requests, then, when the rule has several limits or a window of
    /// several units, every limit with its window (`10, 10;w=60, 100;w=3600`), which Envoy's
    /// own headers cannot carry.
    /// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` under `names`, in this
    /// order; `remaining` is the lowest remaining (0 once a descriptor is over).
    fn headers(&self, names: &HeaderNames, remaining: u32) -> Vec<HeaderValue> {
        vec![
            header(&names.limit, self.limit_header()),
            header(&names.remaining, remaining.to_string()),
            header(&names.reset, self.reset_ms.div_ceil(1000).to_string()),
        ]
    }

    fn limit_header(&self) -> String {
        let shown = self.shown.requests_per_unit.to_string();
        if self.limits.len() == 1 && self.shown.multiplier == 1 {
            return shown;
        }
        let policies: Vec<String> = self
            .limits
            .iter()
            .map(|l| format!("{};w={}", l.requests_per_unit, l.window_secs()))
            .collect();
        format!("{shown}, {}", policies.join(", "))
    }
}

pub(crate) fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value,
        raw_value: Vec::new(),
    }
}

fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // Below 10^9: (ms % 1000) × 10^6.
        nanos: i32::try_from(ms % 1000 * 1_000_000).unwrap_or(0),
    }
}

/// Envoy's `current_limit` has no multiplier: a window of several units reports its unit.
pub(crate) fn wire_unit(limit: Limit) -> WireUnit {
    use crate::limiter::Unit;
    match limit.unit {
        Unit::Second => WireUnit::Second,
        Unit::Minute => WireUnit::Minute,
        Unit::Hour => WireUnit::Hour,
        Unit::Day => WireUnit::Day,
        Unit::Week => WireUnit::Week,
        Unit::Month => WireUnit::Month,
        Unit::Year => WireUnit::Year,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        body::LimitBody,
        limiter::{algorithm::Verdict, Unit},
        metrics::StatsSettings,
    };

    /// One limit override of 100 per minute (its rule is `limit override`), over or not, then
    /// `unmatched` descriptors no rule matches.
    fn answer(settings: &ServiceSettings, allowed: bool, unmatched: usize) -> RateLimitResponse {
        let stats = Stats::new(None, StatsSettings::default());
        let req = RateLimitRequest {
            domain: "d".into(),
            ..Default::default()
        };
        let mut resolved = vec![Resolved::Limited {
            limits: Cow::Owned(vec![Limit::fixed(100, Unit::Minute)]),
            rule: None,
            shared: Vec::new(),
            stats_key: Cow::Owned("d.k".into()),
            cost: 1,
        }];
        resolved.extend((0..unmatched).map(|_| Resolved::Nothing));
        let verdict = Verdict {
            allowed,
            remaining: if allowed { 10 } else { 0 },
            reset_ms: 41_500,
            retry_ms: if allowed { 0 } else { 41_500 },
            used: if allowed { 90 } else { 101 },
        };
        let decided = [Decided {
            verdict,
            charge: None,
            cached: false,
        }];
        respond(
            settings,
            &stats,
            &req,
            &resolved,
            &decided,
            &metrics::Counter::noop(),
        )
    }

    fn problem_json() -> ServiceSettings {
        ServiceSettings {
            limit_body: LimitBody::ProblemJson,
            ..ServiceSettings::default()
        }
    }

    fn content_type(r: &RateLimitResponse) -> Option<&str> {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == "content-type")
            .map(|h| h.value.as_str())
    }

    #[test]
    fn over_limit_carries_the_body_built_from_the_limit_that_fired() {
        let r = answer(&problem_json(), false, 0);
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(
            std::str::from_utf8(&r.raw_body).unwrap(),
            r#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit of 100 requests per 1m exceeded (rule limit override); retry after 42 s","rule":"limit override","limit":100,"window":"1m","retry_after":42}"#
        );
        assert_eq!(content_type(&r), Some("application/problem+json"));
        // The same wait as the Retry-After header.
        let retry = r
            .response_headers_to_add
            .iter()
            .find(|h| h.key == "Retry-After");
        assert_eq!(retry.map(|h| h.value.as_str()), Some("42"));
    }

    #[test]
    fn ok_answers_have_no_body() {
        let r = answer(&problem_json(), true, 0);
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.raw_body.is_empty());
        assert_eq!(content_type(&r), None);
    }

    #[test]
    fn shadow_mode_and_quota_passes_have_no_body() {
        let shadow = ServiceSettings {
            global_shadow_mode: true,
            ..problem_json()
        };
        let r = answer(&shadow, false, 0);
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.raw_body.is_empty());
        assert_eq!(content_type(&r), None);
        // Quota mode: one of two quota descriptors over passes.
        let quota = ServiceSettings {
            global_quota_mode: true,
            ..problem_json()
        };
        let r = answer(&quota, false, 1);
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.raw_body.is_empty());
        assert_eq!(content_type(&r), None);
    }

    /// Decisions are taken in order, each descriptor its own (borrowed, not copied); one
    /// missing at the end still leaves the descriptor its OK status, in request order.
    #[test]
    fn each_descriptor_takes_its_own_decisions_and_a_missing_one_answers_ok() {
        let stats = Stats::new(None, StatsSettings::default());
        let req = RateLimitRequest {
            domain: "d".into(),
            ..Default::default()
        };
        let limited = |n: usize| Resolved::Limited {
            limits: Cow::Owned(vec![Limit::fixed(10, Unit::Minute); n]),
            rule: None,
            shared: Vec::new(),
            stats_key: Cow::Owned("d.k".into()),
            cost: 1,
        };
        let decided = |remaining: u64| Decided {
            verdict: Verdict {
                allowed: true,
                remaining,
                reset_ms: 1_000,
                retry_ms: 0,
                used: 10 - remaining,
            },
            charge: None,
            cached: false,
        };
        // Two limits (5 and 3 left: 3 shown), one limit (7 left), then one with no decision.
        let resolved = [limited(2), Resolved::Nothing, limited(1), limited(1)];
        let r = respond(
            &ServiceSettings::default(),
            &stats,
            &req,
            &resolved,
            &[decided(5), decided(3), decided(7)],
            &metrics::Counter::noop(),
        );
        let remaining: Vec<(i32, u32)> = r
            .statuses
            .iter()
            .map(|s| (s.code, s.limit_remaining))
            .collect();
        let ok = Code::Ok as i32;
        assert_eq!(remaining, [(ok, 3), (ok, 0), (ok, 7), (ok, 0)]);
        assert!(r.statuses[3].current_limit.is_none());
    }

    #[test]
    fn no_body_unless_configured() {
        let r = answer(&ServiceSettings::default(), false, 0);
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert!(r.raw_body.is_empty());
        assert_eq!(content_type(&r), None);
    }
}
