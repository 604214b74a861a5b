//! Validates parsed files and builds the [`RuleTree`], collecting every error.

use std::sync::Arc;

use super::{
    error::ConfigError, ConfigErrors, Limit, Node, RawDescriptor, RawFile, RawRateLimit, Rule,
    RuleTree, Wildcard,
};
use crate::limiter::{
    algorithm::{Algorithm, MAX_SCALED},
    Unit,
};

/// Longest window (`unit × unit_multiplier`) a limit may have: 100 years of 365 days, so that
/// window arithmetic in milliseconds cannot overflow.
pub const MAX_WINDOW_SECS: u64 = 100 * 365 * 86_400;

/// Builds one tree from `(file name, parsed file)` pairs, in the given order. With `merge`,
/// files naming the same domain add to it (as `MERGE_DOMAIN_CONFIG=true` does in the
/// reference); otherwise a repeated domain is an error. Limits that name no algorithm are
/// fixed windows; see [`compile_with`] to choose another.
pub fn compile(files: &[(String, RawFile)], merge: bool) -> Result<RuleTree, ConfigErrors> {
    compile_with(files, merge, Algorithm::FixedWindow)
}

/// [`compile`], giving limits that name no algorithm `default_algorithm`
/// (`DEFAULT_ALGORITHM`).
pub fn compile_with(
    files: &[(String, RawFile)],
    merge: bool,
    default_algorithm: Algorithm,
) -> Result<RuleTree, ConfigErrors> {
    let mut tree = RuleTree::default();
    let mut errors = Vec::new();
    let mut domain_files: std::collections::HashMap<String, String> = Default::default();
    for (file, raw) in files {
        tree.files.push(file.clone());
        if raw.domain.is_empty() {
            continue; // reported by the parser
        }
        if let Some(first) = domain_files.get(&raw.domain) {
            if !merge {
                errors.push(ConfigError::new(
                    file,
                    &raw.domain,
                    "domain",
                    format!(
                        "duplicate domain '{}' in config file (also in {first}; set MERGE_DOMAIN_CONFIG=true to merge)",
                        raw.domain
                    ),
                ));
                continue;
            }
        } else {
            domain_files.insert(raw.domain.clone(), file.clone());
        }
        let node = tree.domains.entry(raw.domain.clone()).or_default();
        let mut c = Compiler {
            file,
            default_algorithm,
            errors: &mut errors,
        };
        c.level(node, &raw.domain, &raw.domain, &raw.descriptors);
    }
    if errors.is_empty() {
        Ok(tree)
    } else {
        Err(ConfigErrors(errors))
    }
}

struct Compiler<'a> {
    file: &'a str,
    /// `DEFAULT_ALGORITHM`: the algorithm of limits that name none.
    default_algorithm: Algorithm,
    errors: &'a mut Vec<ConfigError>,
}

impl Compiler<'_> {
    fn err(&mut self, path: &str, field: &str, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.file, path, field, message));
    }

    /// Adds `descriptors` under `node`; `stats_parent` is the reference's dotted stats key,
    /// `key_parent` the same key unsanitised, as the reference's errors print it.
    fn level(
        &mut self,
        node: &mut Node,
        stats_parent: &str,
        key_parent: &str,
        descriptors: &[RawDescriptor],
    ) {
        for d in descriptors {
            if d.key.is_empty() {
                continue; // reported by the parser
            }
            let composite = match &d.value {
                Some(v) => format!("{}_{v}", d.key),
                None => d.key.clone(),
            };
            // The reference's stats key, sanitised as its stats manager does.
            let full_key = crate::stat_name::sanitize(&format!("{stats_parent}.{composite}"));
            let raw_key = format!("{key_parent}.{composite}");
            if node.children.contains_key(composite.as_str()) {
                self.err(
                    &d.path,
                    "key",
                    format!("duplicate descriptor composite key '{raw_key}'"),
                );
                continue;
            }
            let wildcard = composite.contains('*');
            if d.share_threshold && !wildcard {
                self.err(
                    &d.path,
                    "share_threshold",
                    format!(
                        "share_threshold can only be used with wildcard values (containing '*'), but found key '{composite}'"
                    ),
                );
            }
            let rule = self.rule(d, full_key.clone());
            let mut child = Node {
                rule: rule.map(Arc::new),
                share_threshold: d.share_threshold && wildcard,
                value_to_metric: d.value_to_metric,
                ..Node::default()
            };
            self.level(&mut child, &full_key, &raw_key, &d.descriptors);
            if wildcard {
                node.wildcards.push(Wildcard::new(&composite));
            }
            node.children.insert(composite.into(), child);
        }
    }

    /// The rule of descriptor `d`, from its `rate_limit` or its `rate_limits`; `None` when
    /// it has neither or when anything about them is wrong (reported).
    fn rule(&mut self, d: &RawDescriptor, full_key: String) -> Option<Rule> {
        let path = &d.path;
        let (limits, name, replaces) = match (&d.rate_limit, &d.rate_limits) {
            (None, None) => return None,
            (Some(_), Some(_)) => {
                self.err(
                    path,
                    "rate_limits",
                    "a descriptor has rate_limit or rate_limits, not both (put every limit in rate_limits)",
                );
                return None;
            }
            (Some(rl), None) => {
                let limit = self.single(path, rl)?;
                let name = rl.name.clone().unwrap_or_default();
                (limit.into_iter().collect(), name, rl.replaces.clone())
            }
            (None, Some(items)) => (self.several(path, items)?, String::new(), Vec::new()),
        };
        Some(Rule {
            full_key,
            path: path.clone(),
            limits,
            name,
            replaces,
            shadow_mode: d.shadow_mode,
            quota_mode: d.quota_mode,
            detailed_metric: d.detailed_metric,
            metadata: d.metadata.clone(),
            counters: Default::default(),
        })
    }

    /// A `rate_limit` block: its limit, or none for `unlimited: true`; `None` when it is
    /// wrong (reported).
    fn single(&mut self, path: &str, rl: &RawRateLimit) -> Option<Option<Limit>> {
        let unit = self.unit(path, "rate_limit", rl)?;
        let mut ok = true;
        let name = rl.name.clone().unwrap_or_default();
        for (i, r) in rl.replaces.iter().enumerate() {
            let field = format!("rate_limit.replaces[{i}].name");
            if r.is_empty() {
                self.err(path, &field, "should not have an empty replaces entry");
                ok = false;
            } else if *r == name {
                self.err(
                    path,
                    &field,
                    format!("replaces should not contain name of same descriptor ('{r}')"),
                );
                ok = false;
            }
        }
        let limit = if rl.unlimited {
            if rl.unit.is_some() {
                self.err(
                    path,
                    "rate_limit.unit",
                    "should not specify rate limit unit when unlimited",
                );
                ok = false;
            }
            if rl.requests_per_unit.is_some() {
                self.err(
                    path,
                    "rate_limit.requests_per_unit",
                    "should not specify requests_per_unit when unlimited",
                );
                ok = false;
            }
            let extras = [
                ("unit_multiplier", rl.unit_multiplier.is_some()),
                ("algorithm", rl.algorithm.is_some()),
                ("burst", rl.burst.is_some()),
            ];
            for (field, set) in extras {
                if set {
                    self.err(
                        path,
                        &format!("rate_limit.{field}"),
                        format!("should not specify {field} when unlimited"),
                    );
                    ok = false;
                }
            }
            None
        } else {
            match (unit, rl.requests_per_unit) {
                (Some(unit), Some(requests_per_unit)) => {
                    let limit = self.limit(path, "rate_limit", rl, unit, requests_per_unit);
                    ok &= limit.is_some();
                    limit
                }
                _ if rl.had_errors => return None,
                (None, _) => {
                    self.err(
                        path,
                        "rate_limit.unit",
                        "invalid rate limit unit '' (missing: a rate_limit needs a unit, or unlimited: true)",
                    );
                    return None;
                }
                (Some(_), None) => {
                    self.err(
                        path,
                        "rate_limit.requests_per_unit",
                        "missing; a rate_limit needs requests_per_unit (or unlimited: true)",
                    );
                    return None;
                }
            }
        };
        ok.then_some(limit)
    }

    /// A `rate_limits` list: every item's limit, or `None` when any is wrong (all reported).
    fn several(&mut self, path: &str, items: &[RawRateLimit]) -> Option<Vec<Limit>> {
        if items.is_empty() {
            self.err(
                path,
                "rate_limits",
                "the list is empty; give at least one limit (or rate_limit: {unlimited: true} for none)",
            );
            return None;
        }
        let mut ok = true;
        let mut limits = Vec::with_capacity(items.len());
        // (unit, multiplier, index) of every item whose window could be read.
        let mut windows: Vec<(Unit, u32, usize)> = Vec::new();
        for (i, rl) in items.iter().enumerate() {
            let field = format!("rate_limits[{i}]");
            let Some(unit) = self.unit(path, &field, rl) else {
                ok = false;
                continue;
            };
            let limit = match (unit, rl.requests_per_unit) {
                (Some(unit), Some(requests_per_unit)) => {
                    let multiplier = rl.unit_multiplier.unwrap_or(1);
                    match windows.iter().find(|w| w.0 == unit && w.1 == multiplier) {
                        Some(&(_, _, first)) => {
                            self.err(
                                path,
                                &field,
                                format!(
                                    "same unit and unit_multiplier as rate_limits[{first}] ({} × {multiplier}); the limits of a rule need different windows",
                                    unit.name()
                                ),
                            );
                            ok = false;
                        }
                        None => windows.push((unit, multiplier, i)),
                    }
                    self.limit(path, &field, rl, unit, requests_per_unit)
                }
                _ if rl.had_errors => None,
                (None, _) => {
                    self.err(
                        path,
                        &format!("{field}.unit"),
                        "invalid rate limit unit '' (missing: each rate_limits item needs a unit)",
                    );
                    None
                }
                (Some(_), None) => {
                    self.err(
                        path,
                        &format!("{field}.requests_per_unit"),
                        "missing; each rate_limits item needs requests_per_unit",
                    );
                    None
                }
            };
            match limit {
                Some(limit) => limits.push(limit),
                None => ok = false,
            }
        }
        ok.then_some(limits)
    }

    /// `field.unit` read: `Some(None)` when absent, `None` when it names no unit (reported).
    fn unit(&mut self, path: &str, field: &str, rl: &RawRateLimit) -> Option<Option<Unit>> {
        let Some(u) = rl.unit.as_deref() else {
            return Some(None);
        };
        match Unit::parse(u) {
            Some(unit) => Some(Some(unit)),
            None => {
                self.err(
                    path,
                    &format!("{field}.unit"),
                    format!(
                        "invalid rate limit unit '{u}' (expected one of: second, minute, hour, day, week, month, year)"
                    ),
                );
                None
            }
        }
    }

    /// One limit of a `rate_limit` block or `rate_limits` item (`field`) with its unit and
    /// requests; checks algorithm, multiplier and burst, and reports every problem.
    fn limit(
        &mut self,
        path: &str,
        field: &str,
        rl: &RawRateLimit,
        unit: Unit,
        requests_per_unit: u32,
    ) -> Option<Limit> {
        let mut ok = true;
        // `None` when the name is unknown: the checks that depend on it are skipped.
        let algorithm = match rl.algorithm.as_deref() {
            None => Some(self.default_algorithm),
            Some(name) => {
                let parsed = Algorithm::parse(name);
                if parsed.is_none() {
                    let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                    self.err(
                        path,
                        &format!("{field}.algorithm"),
                        format!(
                            "invalid algorithm '{name}' (expected one of: {})",
                            names.join(", ")
                        ),
                    );
                    ok = false;
                }
                parsed
            }
        };
        let multiplier = rl.unit_multiplier.unwrap_or(1);
        // The window in seconds, when it is usable.
        let mut window = None;
        if multiplier == 0 {
            self.err(
                path,
                &format!("{field}.unit_multiplier"),
                "must be at least 1 (a window of 0 units)",
            );
            ok = false;
        } else {
            let secs = unit.seconds() * u64::from(multiplier);
            if secs > MAX_WINDOW_SECS {
                self.err(
                    path,
                    &format!("{field}.unit_multiplier"),
                    format!(
                        "a window of {multiplier} {}s is longer than 100 years",
                        unit.name()
                    ),
                );
                ok = false;
            } else {
                window = Some(secs);
            }
        }
        if let (Some(burst), Some(algorithm)) = (rl.burst, algorithm) {
            if algorithm != Algorithm::TokenBucket {
                let message = if rl.algorithm.is_none() {
                    format!(
                        "burst applies only to algorithm token_bucket; this limit names no algorithm and DEFAULT_ALGORITHM is {} (add algorithm: token_bucket)",
                        algorithm.name()
                    )
                } else {
                    format!(
                        "burst applies only to algorithm token_bucket, not {}",
                        algorithm.name()
                    )
                };
                self.err(path, &format!("{field}.burst"), message);
                ok = false;
            } else if burst == 0 {
                self.err(
                    path,
                    &format!("{field}.burst"),
                    "must be at least 1 (the token bucket's capacity)",
                );
                ok = false;
            }
        }
        if let (Some(Algorithm::TokenBucket), Some(secs), true) = (algorithm, window, ok) {
            let capacity = rl.burst.unwrap_or(requests_per_unit);
            let window_ms = secs * 1000;
            if u128::from(capacity) * u128::from(window_ms) > u128::from(MAX_SCALED) {
                let (name, what) = match rl.burst {
                    Some(_) => ("burst", format!("burst {capacity}")),
                    None => (
                        "requests_per_unit",
                        format!("burst {capacity} (requests_per_unit, as burst is unset)"),
                    ),
                };
                self.err(
                    path,
                    &format!("{field}.{name}"),
                    format!(
                        "burst × window is too large for exact refills: {what} × {window_ms} ms is above 2^52 ({MAX_SCALED}); use a smaller burst or a shorter window"
                    ),
                );
                ok = false;
            }
        }
        let algorithm = algorithm?;
        ok.then_some(Limit {
            requests_per_unit,
            unit,
            multiplier,
            algorithm,
            burst: rl.burst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const ISSUE_EXAMPLE: &str = "domain: d
descriptors:
  - key: api_key
    rate_limit:
      unit: minute
      requests_per_unit: 100
      algorithm: token_bucket
      burst: 20
  - key: user
    rate_limits:
      - {unit: minute, requests_per_unit: 10}
      - {unit: hour, requests_per_unit: 100}
      - {unit: day, requests_per_unit: 500, algorithm: sliding_window}
  - key: report
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 3}
  - key: plain
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: free
    rate_limit: {unlimited: true}
";

    fn tree(text: &str, default: Algorithm) -> Result<RuleTree, Vec<String>> {
        let raw = parse("t.yaml", text)
            .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        compile_with(&[("t.yaml".to_owned(), raw)], false, default)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    fn rule(tree: &RuleTree, key: &str) -> Arc<Rule> {
        tree.domains["d"].children[key]
            .rule
            .clone()
            .expect("a rule")
    }

    fn limit(
        requests_per_unit: u32,
        unit: Unit,
        multiplier: u32,
        algorithm: Algorithm,
        burst: Option<u32>,
    ) -> Limit {
        Limit {
            requests_per_unit,
            unit,
            multiplier,
            algorithm,
            burst,
        }
    }

    /// Errors of a one-descriptor file `d > k` whose descriptor body is `body`.
    fn errors(body: &str, default: Algorithm) -> Vec<String> {
        tree(
            &format!("domain: d\ndescriptors:\n  - key: k\n{body}"),
            default,
        )
        .err()
        .unwrap_or_else(|| panic!("loaded: {body}"))
    }

    #[test]
    fn the_new_fields_build_every_limit() {
        let t = tree(ISSUE_EXAMPLE, Algorithm::FixedWindow).unwrap();
        use Algorithm::*;
        assert_eq!(
            rule(&t, "api_key").limits,
            [limit(100, Unit::Minute, 1, TokenBucket, Some(20))]
        );
        assert_eq!(
            rule(&t, "user").limits,
            [
                limit(10, Unit::Minute, 1, FixedWindow, None),
                limit(100, Unit::Hour, 1, FixedWindow, None),
                limit(500, Unit::Day, 1, SlidingWindow, None),
            ]
        );
        let user = rule(&t, "user");
        assert_eq!((user.name.as_str(), user.replaces.len()), ("", 0));
        let report = rule(&t, "report");
        assert_eq!(
            report.limits,
            [limit(3, Unit::Minute, 5, FixedWindow, None)]
        );
        assert_eq!(report.limits[0].window_secs(), 300);
        assert_eq!(rule(&t, "plain").limits, [Limit::fixed(10, Unit::Second)]);
        assert!(rule(&t, "free").limits.is_empty());
        // An explicit unit_multiplier of 1 is the reference's limit.
        let t = tree(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, unit_multiplier: 1, requests_per_unit: 0, algorithm: fixed_window}\n",
            TokenBucket,
        )
        .unwrap();
        assert_eq!(rule(&t, "k").limits, [Limit::fixed(0, Unit::Hour)]);
    }

    #[test]
    fn default_algorithm_applies_to_limits_that_name_none() {
        use Algorithm::*;
        let t = tree(ISSUE_EXAMPLE, SlidingWindow).unwrap();
        assert_eq!(rule(&t, "plain").limits[0].algorithm, SlidingWindow);
        assert_eq!(rule(&t, "report").limits[0].algorithm, SlidingWindow);
        let algorithms: Vec<_> = rule(&t, "user")
            .limits
            .iter()
            .map(|l| l.algorithm)
            .collect();
        assert_eq!(algorithms, [SlidingWindow, SlidingWindow, SlidingWindow]);
        // Named algorithms win over the default.
        assert_eq!(rule(&t, "api_key").limits[0].algorithm, TokenBucket);
        let t = tree(ISSUE_EXAMPLE, TokenBucket).unwrap();
        let algorithms: Vec<_> = rule(&t, "user")
            .limits
            .iter()
            .map(|l| l.algorithm)
            .collect();
        assert_eq!(algorithms, [TokenBucket, TokenBucket, SlidingWindow]);
        assert!(rule(&t, "free").limits.is_empty());
        // `compile` is `compile_with` fixed_window.
        let raw = parse("t.yaml", ISSUE_EXAMPLE).unwrap();
        let t = compile(&[("t.yaml".to_owned(), raw)], false).unwrap();
        assert_eq!(rule(&t, "plain").limits[0].algorithm, FixedWindow);

        // burst without an algorithm: fine when the default is token_bucket, refused (naming
        // the setting) when it is a window.
        let body = "    rate_limit: {unit: minute, requests_per_unit: 10, burst: 20}\n";
        let t = tree(
            &format!("domain: d\ndescriptors:\n  - key: k\n{body}"),
            TokenBucket,
        )
        .unwrap();
        assert_eq!(
            rule(&t, "k").limits,
            [limit(10, Unit::Minute, 1, TokenBucket, Some(20))]
        );
        assert_eq!(
            errors(body, SlidingWindow),
            ["t.yaml: d > k: rate_limit.burst: burst applies only to algorithm token_bucket; this limit names no algorithm and DEFAULT_ALGORITHM is sliding_window (add algorithm: token_bucket)"]
        );
    }

    #[test]
    fn windows_and_buckets_are_bounded_at_their_exact_limits() {
        use Algorithm::*;
        // 100 years is allowed, one unit more is not.
        tree(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: year, unit_multiplier: 100, requests_per_unit: 1}\n",
            FixedWindow,
        )
        .unwrap();
        assert_eq!(
            errors(
                "    rate_limit: {unit: day, unit_multiplier: 36501, requests_per_unit: 1}\n",
                FixedWindow
            ),
            ["t.yaml: d > k: rate_limit.unit_multiplier: a window of 36501 days is longer than 100 years"]
        );
        // u32::MAX seconds is longer than 100 years: refused, without overflowing.
        assert_eq!(
            errors(
                "    rate_limit: {unit: year, unit_multiplier: 4294967295, requests_per_unit: 1}\n",
                TokenBucket
            ),
            ["t.yaml: d > k: rate_limit.unit_multiplier: a window of 4294967295 years is longer than 100 years"]
        );
        // 100 years is 3153600000000 ms: a capacity of 1428 fits under 2^52, 1429 does not.
        let bucket = |burst: u32| {
            format!("    rate_limit: {{unit: year, unit_multiplier: 100, requests_per_unit: 1, algorithm: token_bucket, burst: {burst}}}\n")
        };
        const {
            assert!(1428 * 3_153_600_000_000 <= MAX_SCALED && 1429 * 3_153_600_000_000 > MAX_SCALED)
        };
        tree(
            &format!("domain: d\ndescriptors:\n  - key: k\n{}", bucket(1428)),
            FixedWindow,
        )
        .unwrap();
        assert_eq!(
            errors(&bucket(1429), FixedWindow),
            ["t.yaml: d > k: rate_limit.burst: burst × window is too large for exact refills: burst 1429 × 3153600000000 ms is above 2^52 (4503599627370496); use a smaller burst or a shorter window"]
        );
        // The same bound for a window algorithm does not apply.
        tree(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: year, unit_multiplier: 100, requests_per_unit: 4294967295, algorithm: sliding_window}\n",
            FixedWindow,
        )
        .unwrap();
        // A default token_bucket is held to it too.
        assert_eq!(
            errors(
                "    rate_limit: {unit: year, requests_per_unit: 4294967295}\n",
                TokenBucket
            ),
            ["t.yaml: d > k: rate_limit.requests_per_unit: burst × window is too large for exact refills: burst 4294967295 (requests_per_unit, as burst is unset) × 31536000000 ms is above 2^52 (4503599627370496); use a smaller burst or a shorter window"]
        );
    }

    #[test]
    fn every_problem_of_a_rate_limits_list_is_reported() {
        let body = "    rate_limits:
      - {unit: minute, requests_per_unit: 10, algorithm: token_bucket, burst: 0}
      - {unit: fortnight, requests_per_unit: 1}
      - {unit: minute, requests_per_unit: 5, unit_multiplier: 0}
      - {unit: hour, requests_per_unit: 1, algorithm: gcra}
      - {requests_per_unit: 1}
      - {unit: minute, requests_per_unit: 20}
";
        assert_eq!(
            errors(body, Algorithm::FixedWindow),
            [
                "t.yaml: d > k: rate_limits[0].burst: must be at least 1 (the token bucket's capacity)",
                "t.yaml: d > k: rate_limits[1].unit: invalid rate limit unit 'fortnight' (expected one of: second, minute, hour, day, week, month, year)",
                "t.yaml: d > k: rate_limits[2].unit_multiplier: must be at least 1 (a window of 0 units)",
                "t.yaml: d > k: rate_limits[3].algorithm: invalid algorithm 'gcra' (expected one of: fixed_window, sliding_window, token_bucket)",
                "t.yaml: d > k: rate_limits[4].unit: invalid rate limit unit '' (missing: each rate_limits item needs a unit)",
                "t.yaml: d > k: rate_limits[5]: same unit and unit_multiplier as rate_limits[0] (minute × 1); the limits of a rule need different windows",
            ]
        );
        // The same unit with another multiplier is another window.
        let t = tree(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limits:\n      - {unit: minute, requests_per_unit: 10}\n      - {unit: minute, unit_multiplier: 5, requests_per_unit: 30}\n",
            Algorithm::FixedWindow,
        )
        .unwrap();
        assert_eq!(rule(&t, "k").limits.len(), 2);
    }

    #[test]
    fn unlimited_refuses_every_limit_field_at_once() {
        assert_eq!(
            errors(
                "    rate_limit: {unlimited: true, unit_multiplier: 2, algorithm: nonsense, burst: 0}\n",
                Algorithm::FixedWindow
            ),
            [
                "t.yaml: d > k: rate_limit.unit_multiplier: should not specify unit_multiplier when unlimited",
                "t.yaml: d > k: rate_limit.algorithm: should not specify algorithm when unlimited",
                "t.yaml: d > k: rate_limit.burst: should not specify burst when unlimited",
            ]
        );
    }

    #[test]
    fn a_duplicate_key_is_named_unsanitised_as_the_reference_names_it() {
        let text = "domain: d
descriptors:
  - key: ip
    value: 10.0.0.1
  - key: ip
    value: 10.0.0.1
  - key: a:b
    descriptors:
      - key: c
      - key: c
";
        assert_eq!(
            tree(text, Algorithm::FixedWindow)
                .err()
                .unwrap_or_else(|| panic!("loaded")),
            [
                "t.yaml: d > ip=10.0.0.1: key: duplicate descriptor composite key 'd.ip_10.0.0.1'",
                "t.yaml: d > a:b > c: key: duplicate descriptor composite key 'd.a:b.c'",
            ]
        );
    }

    #[test]
    fn dump_line_keeps_the_reference_format_for_reference_rules() {
        let t = tree(ISSUE_EXAMPLE, Algorithm::FixedWindow).unwrap();
        let line = |key: &str| rule(&t, key).dump_line();
        assert_eq!(
            line("plain"),
            "d.plain: unit=SECOND requests_per_unit=10, shadow_mode: false, quota_mode: false"
        );
        assert_eq!(
            line("free"),
            "d.free: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false"
        );
        assert_eq!(
            line("api_key"),
            "d.api_key: unit=MINUTE requests_per_unit=100 algorithm=token_bucket burst=20, shadow_mode: false, quota_mode: false"
        );
        assert_eq!(
            line("user"),
            "d.user: unit=MINUTE requests_per_unit=10 algorithm=fixed_window; unit=HOUR requests_per_unit=100 algorithm=fixed_window; unit=DAY requests_per_unit=500 algorithm=sliding_window, shadow_mode: false, quota_mode: false"
        );
        assert_eq!(
            line("report"),
            "d.report: unit=MINUTE requests_per_unit=3 unit_multiplier=5 algorithm=fixed_window, shadow_mode: false, quota_mode: false"
        );
        // A reference rule under another DEFAULT_ALGORITHM is not counted as the reference
        // counts it, so its line says how.
        let t = tree(ISSUE_EXAMPLE, Algorithm::SlidingWindow).unwrap();
        assert_eq!(
            rule(&t, "plain").dump_line(),
            "d.plain: unit=SECOND requests_per_unit=10 algorithm=sliding_window, shadow_mode: false, quota_mode: false"
        );
    }
}
