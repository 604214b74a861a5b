//! The responses the failure policy gives: fixed ones (`allow`, `deny`) built without any
//! decision, and the `LIMIT_RULE_HEADER` of a refusal the policy made.
//!
//! A fixed answer records nothing in the per-rule metrics: nothing was counted, and the
//! policy's own counter (`ratelimitd_backend_policy_answers_total`) says what happened.

use super::Policy;
use crate::{
    answer::{header, wire_unit, Resolved},
    proto::envoy::service::ratelimit::v3::{
        rate_limit_response::{Code, DescriptorStatus, RateLimit},
        RateLimitResponse,
    },
    service::ServiceSettings,
};

/// The `allow` or `deny` answer for a request resolved as `resolved`. `deny` refuses every
/// limited descriptor except those of shadow-mode rules, and the request when any is refused
/// (unless `SHADOW_MODE`), with `Retry-After: retry_after_secs` and, under
/// `LIMIT_RULE_HEADER`, `backend-failure-policy:deny`. Each limited descriptor's status shows
/// its first limit with 0 remaining (`allow` cannot know what remains either).
pub fn fixed_response(
    policy: Policy,
    settings: &ServiceSettings,
    resolved: &[Resolved<'_>],
    retry_after_secs: u64,
) -> RateLimitResponse {
    let mut refused = false;
    let statuses = resolved
        .iter()
        .map(|r| match r {
            Resolved::Nothing => DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            },
            Resolved::Unlimited => DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..Default::default()
            },
            Resolved::Limited { limits, rule, .. } => {
                let refuse = policy == Policy::Deny && !rule.is_some_and(|r| r.shadow_mode);
                refused |= refuse;
                DescriptorStatus {
                    code: if refuse { Code::OverLimit } else { Code::Ok } as i32,
                    current_limit: limits.first().map(|l| RateLimit {
                        name: rule.map(|r| r.name.clone()).unwrap_or_default(),
                        requests_per_unit: l.requests_per_unit,
                        unit: wire_unit(*l) as i32,
                    }),
                    ..Default::default()
                }
            }
        })
        .collect();
    let mut response = RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses,
        ..Default::default()
    };
    if refused && !settings.global_shadow_mode {
        response.overall_code = Code::OverLimit as i32;
        response
            .response_headers_to_add
            .push(header("Retry-After", retry_after_secs.max(1).to_string()));
        if let Some(name) = &settings.rule_header {
            response
                .response_headers_to_add
                .push(header(name, policy.rule_header_value()));
        }
    }
    response
}

/// Marks a refusal decided by `policy` (the `local` limiter): the `LIMIT_RULE_HEADER` says
/// `backend-failure-policy:local` instead of the rule's name.
pub fn mark_refusal(response: &mut RateLimitResponse, settings: &ServiceSettings, policy: Policy) {
    let Some(name) = &settings.rule_header else {
        return;
    };
    if response.overall_code != Code::OverLimit as i32 {
        return;
    }
    match response
        .response_headers_to_add
        .iter_mut()
        .find(|h| &h.key == name)
    {
        Some(h) => h.value = policy.rule_header_value(),
        None => response
            .response_headers_to_add
            .push(header(name, policy.rule_header_value())),
    }
}
