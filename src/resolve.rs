//! A request checked and resolved: refused when the service cannot answer it meaningfully
//! ([`validate`]), then each descriptor matched to what applies to it ([`resolve`]): nothing,
//! unlimited, or a rule's limits (or the limit Envoy sent), with its cost.

use std::{borrow::Cow, cell::RefCell};

use smallvec::SmallVec;

use crate::{
    answer::Resolved,
    config::{Limit, Node, Rule, RuleTree},
    error::ServiceError,
    limiter::{engine::INLINE_CHECKS, Algorithm, Unit},
    matcher,
    proto::envoy::service::ratelimit::v3::RateLimitRequest,
    store::MAX_COUNT,
};

/// Most descriptors one request may carry (Envoy sends a handful).
pub const MAX_DESCRIPTORS: usize = 256;
/// Most entries one descriptor may carry.
pub const MAX_ENTRIES: usize = 64;
/// Longest descriptor key or value, in bytes.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;

/// Rejects requests the service cannot answer meaningfully, with a message saying why.
pub fn validate(req: &RateLimitRequest) -> Result<(), ServiceError> {
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

thread_local! {
    /// The matcher's composite `key_value` lookups, one buffer per thread reused by every
    /// request instead of a new string per request. Resolving never awaits, so a borrow never
    /// spans a task switch; it keeps the capacity of the longest entry seen (at most twice
    /// [`MAX_ENTRY_BYTES`] and a byte).
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A request's descriptors, resolved: inline for the usual few.
pub type ResolvedList<'a> = SmallVec<[Resolved<'a>; INLINE_CHECKS]>;

/// Finds what applies to each descriptor, then drops limits other matched rules replace.
pub fn resolve<'a>(
    tree: &'a RuleTree,
    req: &RateLimitRequest,
    default_algorithm: Algorithm,
) -> Result<ResolvedList<'a>, ServiceError> {
    let mut out = ResolvedList::new();
    resolve_in(
        tree.domains.get(&req.domain),
        req,
        default_algorithm,
        &mut out,
    )?;
    Ok(out)
}

/// [`resolve`] with the request's domain already looked up (`None`: not configured), so a
/// request looks its domain up once, whatever its descriptors. Written into `out` (emptied
/// first), where the caller keeps it: returned, the list would be copied on its way up.
pub fn resolve_in<'a>(
    root: Option<&'a Node>,
    req: &RateLimitRequest,
    default_algorithm: Algorithm,
    out: &mut ResolvedList<'a>,
) -> Result<(), ServiceError> {
    out.clear();
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => resolve_with(root, req, default_algorithm, &mut scratch, out),
        // Not reentered today; were it, a fresh buffer rather than a panic.
        Err(_) => resolve_with(root, req, default_algorithm, &mut String::new(), out),
    })
}

fn resolve_with<'a>(
    root: Option<&'a Node>,
    req: &RateLimitRequest,
    default_algorithm: Algorithm,
    scratch: &mut String,
    out: &mut ResolvedList<'a>,
) -> Result<(), ServiceError> {
    // The reference's rules: a request addend of 0 means 1; a descriptor's own addend, 0
    // included (check without charging), wins. Counters saturate at MAX_COUNT on both
    // backends, so a larger addend is counted as MAX_COUNT (over any limit).
    let request_hits = u64::from(req.hits_addend.max(1));
    let mut replaced: Vec<&'a str> = Vec::new();
    for (i, d) in req.descriptors.iter().enumerate() {
        let cost = d.hits_addend.unwrap_or(request_hits).min(MAX_COUNT);
        out.push(if root.is_none() {
            Resolved::Nothing
        } else if let Some(o) = &d.limit {
            let limit = OverrideLimit {
                requests_per_unit: o.requests_per_unit,
                unit: o.unit,
                algorithm: default_algorithm,
            };
            override_limit(i, &req.domain, d, limit, cost)?
        } else {
            match root.and_then(|root| matcher::find_in(root, &req.domain, &d.entries, scratch)) {
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
        for r in out.iter_mut() {
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
    Ok(())
}

/// A limit sent by Envoy in a descriptor, counted with `DEFAULT_ALGORITHM`.
pub(crate) struct OverrideLimit {
    requests_per_unit: u32,
    /// The wire value of its unit.
    unit: i32,
    algorithm: Algorithm,
}

/// A limit sent by Envoy in the descriptor. Its metrics go under the descriptor's keys only
/// (`domain.key1.key2`), not their values; Envoy chooses the keys too, so the stats key counts
/// against `METRICS_MAX_DYNAMIC_KEYS` (see [`crate::metrics`]).
pub(crate) fn override_limit<'a>(
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };

    /// A request descriptor with these entries (also used by the service's tests).
    pub(crate) fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
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

    /// The thread's reused buffer holds the previous request's composite key: each lookup
    /// must start from an empty one (a long value, then a short exact one, then key-only).
    #[test]
    fn the_reused_lookup_buffer_never_leaks_one_request_into_the_next() {
        use crate::config::{compile, parse};
        let raw = parse(
            "r.yaml",
            "
domain: d
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: k
    value: v
    rate_limit: {unit: second, requests_per_unit: 2}
",
        )
        .unwrap();
        let tree = compile(&[("r.yaml".to_owned(), raw)], false).unwrap();
        let limit_of = |value: &str| {
            let req = RateLimitRequest {
                domain: "d".into(),
                descriptors: vec![descriptor(&[("k", value)])],
                hits_addend: 0,
            };
            match resolve(&tree, &req, Algorithm::FixedWindow)
                .unwrap()
                .first()
            {
                Some(Resolved::Limited { limits, .. }) => {
                    limits.first().map(|l| l.requests_per_unit)
                }
                _ => None,
            }
        };
        let long = "v".repeat(MAX_ENTRY_BYTES);
        for _ in 0..2 {
            assert_eq!(limit_of(&long), Some(1), "key-only");
            assert_eq!(limit_of("v"), Some(2), "exact");
            assert_eq!(limit_of(""), Some(1), "key-only, empty value");
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
}
