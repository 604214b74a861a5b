//! `ratelimitd explain` and `GET /explain`: which rule a request's descriptors match, why,
//! the counter key it would use and the metric labels it would bump, as text for people.
//!
//! It walks the same code as requests (`matcher::step`, `matcher::find`), so an explanation
//! cannot drift from what the service does.

use std::fmt::Write;

use crate::{
    config::{Limit, RuleTree},
    limiter::CacheKeyBuilder,
    matcher::{self, MatchKind},
};

/// Explains `descriptors` (each a list of `(key, value)`) in `domain` at time `now`.
pub fn explain(
    tree: &RuleTree,
    keys: &CacheKeyBuilder,
    domain: &str,
    descriptors: &[Vec<(String, String)>],
    now: u64,
) -> String {
    let mut out = String::new();
    let Some(root) = tree.domains.get(domain) else {
        let mut known: Vec<&str> = tree.domains.keys().map(String::as_str).collect();
        known.sort_unstable();
        let _ = writeln!(
            out,
            "domain '{domain}' is not configured (configured: {}): every descriptor is OK with no limit",
            known.join(", ")
        );
        return out;
    };
    let mut scratch = String::new();
    let matches: Vec<_> = descriptors
        .iter()
        .map(|d| {
            let entries: Vec<(&str, &str)> =
                d.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            matcher::find(tree, domain, &entries, &mut scratch)
        })
        .collect();
    let replaced: Vec<&str> = matches
        .iter()
        .flatten()
        .flat_map(|m| m.rule.replaces.iter().map(String::as_str))
        .collect();

    for (n, (d, m)) in descriptors.iter().zip(&matches).enumerate() {
        let shown: Vec<String> = d.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "descriptor {}: {}", n + 1, shown.join(", "));
        let mut node = root;
        for (i, (k, v)) in d.iter().enumerate() {
            let entry = (k.as_str(), v.as_str());
            match matcher::step(node, &entry, &mut scratch) {
                None => {
                    let _ = writeln!(
                        out,
                        "  level {}: {k}={v}: no match (tried '{k}_{v}', {} wildcard(s), then key-only '{k}')",
                        i + 1,
                        node.wildcards.len()
                    );
                    break;
                }
                Some((next, kind, wildcard)) => {
                    let how = match kind {
                        MatchKind::Exact => format!("exact match '{k}_{v}'"),
                        MatchKind::Wildcard => format!(
                            "wildcard match '{}'{}",
                            wildcard.unwrap_or_default(),
                            if next.share_threshold {
                                " (share_threshold: one counter for all values)"
                            } else {
                                ""
                            }
                        ),
                        MatchKind::KeyOnly => {
                            format!("key-only match '{k}' (no rule for value '{v}')")
                        }
                    };
                    let _ = writeln!(out, "  level {}: {k}={v}: {how}", i + 1);
                    let last = i + 1 == d.len();
                    if !last && next.children.is_empty() {
                        let _ = writeln!(
                            out,
                            "  the config has no level below this one, but the descriptor has {} more entr{}: no limit",
                            d.len() - i - 1,
                            if d.len() - i - 1 == 1 { "y" } else { "ies" }
                        );
                        break;
                    }
                    if last && next.rule.is_none() {
                        let _ = writeln!(out, "  no rate_limit at this level: no limit (a rule applies only at the depth of the descriptor's last entry)");
                    }
                    node = next;
                }
            }
        }
        let Some(m) = m else {
            let _ = writeln!(out, "  result: OK, no limit\n");
            continue;
        };
        let rule = m.rule;
        let _ = writeln!(out, "  rule: {} ({})", rule.path, rule.full_key);
        if !rule.name.is_empty() && replaced.contains(&rule.name.as_str()) {
            let _ = writeln!(
                out,
                "  replaced: another matched rule replaces '{}': OK, no limit\n",
                rule.name
            );
            continue;
        }
        if rule.limits.is_empty() {
            let _ = writeln!(out, "  unlimited: always OK, no counter\n");
            continue;
        }
        let named = format!(
            "{}{}",
            if rule.name.is_empty() {
                String::new()
            } else {
                format!(", name '{}'", rule.name)
            },
            if rule.replaces.is_empty() {
                String::new()
            } else {
                format!(", replaces {}", rule.replaces.join(", "))
            }
        );
        if let [only] = rule.limits.as_slice() {
            let _ = writeln!(out, "  limit: {}{named}", describe(only, !only.is_plain()));
        } else {
            let _ = writeln!(
                out,
                "  limits: {}, all checked and charged together{named}",
                rule.limits.len()
            );
            for l in &rule.limits {
                let _ = writeln!(out, "    {}", describe(l, true));
            }
        }
        if rule.shadow_mode {
            let _ = writeln!(out, "  shadow_mode: counted, but always reported OK");
        }
        if rule.quota_mode {
            let _ = writeln!(
                out,
                "  quota_mode: over limit fails the request only if every quota descriptor is over"
            );
        }
        let key_entries = d
            .iter()
            .enumerate()
            .map(|(i, (k, v))| (k.as_str(), matcher::counter_value(&m.shared, i, v)));
        let base = keys.base(domain, key_entries);
        let single = rule.limits.len() == 1;
        for limit in &rule.limits {
            let (key, previous) =
                crate::service::limit_keys(base.clone(), limit, single, now.saturating_mul(1000));
            let _ = match (limit.algorithm, previous) {
                (crate::limiter::Algorithm::TokenBucket, _) => writeln!(
                    out,
                    "  counter key: {key} (token bucket, refilled over {} s)",
                    limit.window_secs()
                ),
                (_, Some(previous)) => writeln!(
                    out,
                    "  counter key: {key} (window of {} s; previous window: {previous})",
                    limit.window_secs()
                ),
                (_, None) => writeln!(
                    out,
                    "  counter key: {key} (window of {} s)",
                    limit.window_secs()
                ),
            };
        }
        let labels = crate::metrics::labels(domain, &m.stats_key);
        let shown: Vec<String> = labels
            .iter()
            .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
            .collect();
        let _ = writeln!(
            out,
            "  metrics: ratelimit_service_rate_limit_*{{{}}}\n",
            shown.join(",")
        );
    }
    out
}

/// `10 per minute`, `3 per 5 minutes`; `with_algorithm` adds the algorithm and any burst:
/// `100 per minute (token_bucket, burst 20)`. Only a rule of one limit the reference could
/// have written is shown without them, as before limits had algorithms.
fn describe(limit: &Limit, with_algorithm: bool) -> String {
    let window = match limit.multiplier {
        1 => limit.unit.name().to_owned(),
        n => format!("{n} {}s", limit.unit.name()),
    };
    let mut out = format!("{} per {window}", limit.requests_per_unit);
    if with_algorithm {
        let _ = write!(out, " ({}", limit.algorithm.name());
        if let Some(burst) = limit.burst {
            let _ = write!(out, ", burst {burst}");
        }
        out.push(')');
    }
    out
}
