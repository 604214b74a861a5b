//! Validates parsed files and builds the [`RuleTree`], collecting every error.

use std::sync::Arc;

use super::{
    error::ConfigError, ConfigErrors, Limit, Node, RawDescriptor, RawFile, Rule, RuleTree, Wildcard,
};
use crate::limiter::Unit;

/// Builds one tree from `(file name, parsed file)` pairs, in the given order. With `merge`,
/// files naming the same domain add to it (as `MERGE_DOMAIN_CONFIG=true` does in the
/// reference); otherwise a repeated domain is an error.
pub fn compile(files: &[(String, RawFile)], merge: bool) -> Result<RuleTree, ConfigErrors> {
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
                        "duplicate domain '{}' (also in {first}; set MERGE_DOMAIN_CONFIG=true to merge)",
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
            errors: &mut errors,
        };
        c.level(node, &raw.domain, &raw.descriptors);
    }
    if errors.is_empty() {
        Ok(tree)
    } else {
        Err(ConfigErrors(errors))
    }
}

struct Compiler<'a> {
    file: &'a str,
    errors: &'a mut Vec<ConfigError>,
}

impl Compiler<'_> {
    fn err(&mut self, path: &str, field: &str, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.file, path, field, message));
    }

    /// Adds `descriptors` under `node`; `stats_parent` is the reference's dotted stats key.
    fn level(&mut self, node: &mut Node, stats_parent: &str, descriptors: &[RawDescriptor]) {
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
            if node.children.contains_key(composite.as_str()) {
                self.err(
                    &d.path,
                    "key",
                    format!("duplicate descriptor composite key '{full_key}'"),
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
            let rule = d
                .rate_limit
                .as_ref()
                .and_then(|rl| self.rule(d, rl, full_key.clone()));
            let mut child = Node {
                rule: rule.map(Arc::new),
                share_threshold: d.share_threshold && wildcard,
                value_to_metric: d.value_to_metric,
                ..Node::default()
            };
            self.level(&mut child, &full_key, &d.descriptors);
            if wildcard {
                node.wildcards.push(Wildcard::new(&composite));
            }
            node.children.insert(composite.into(), child);
        }
    }

    fn rule(
        &mut self,
        d: &RawDescriptor,
        rl: &super::RawRateLimit,
        full_key: String,
    ) -> Option<Rule> {
        let path = &d.path;
        let unit = match rl.unit.as_deref() {
            None => None,
            Some(u) => match Unit::parse(u) {
                Some(unit) => Some(unit),
                None => {
                    self.err(
                        path,
                        "rate_limit.unit",
                        format!(
                            "invalid rate limit unit '{u}' (expected one of: second, minute, hour, day, week, month, year)"
                        ),
                    );
                    return None;
                }
            },
        };
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
            None
        } else {
            match (unit, rl.requests_per_unit) {
                (Some(unit), Some(requests_per_unit)) => {
                    Some(Limit::fixed(requests_per_unit, unit))
                }
                _ if rl.had_errors => return None,
                (None, _) => {
                    self.err(
                        path,
                        "rate_limit.unit",
                        "missing; a rate_limit needs a unit (or unlimited: true)",
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
        ok.then(|| Rule {
            full_key,
            path: path.clone(),
            limits: limit.into_iter().collect(),
            name,
            replaces: rl.replaces.clone(),
            shadow_mode: d.shadow_mode,
            quota_mode: d.quota_mode,
            detailed_metric: d.detailed_metric,
            counters: Default::default(),
        })
    }
}
