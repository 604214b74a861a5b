//! Finds the rule for one request descriptor, exactly as envoyproxy/ratelimit's `GetLimit` does.
//!
//! Level by level, each entry is looked up by its composite key `key_value`, then against the
//! level's wildcard patterns in config order, then by `key` alone. A rule applies only if it
//! sits at the depth of the descriptor's last entry; a level with no match, or with no deeper
//! levels while entries remain, means no limit. Pure: no I/O, no clock.

use std::{borrow::Cow, sync::Arc};

use crate::config::{Node, Rule, RuleTree};

/// Read access to a descriptor entry, so the matcher works on protobuf entries and on plain
/// pairs alike.
pub trait EntryRef {
    fn key(&self) -> &str;
    fn value(&self) -> &str;
}

impl EntryRef for (&str, &str) {
    fn key(&self) -> &str {
        self.0
    }
    fn value(&self) -> &str {
        self.1
    }
}

impl EntryRef
    for crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry
{
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &str {
        &self.value
    }
}

/// How an entry found its node, for `explain` and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    /// `key` and `value` both matched a configured descriptor.
    Exact,
    /// The value matched a configured wildcard pattern.
    Wildcard,
    /// Only the key matched (a descriptor configured without a value).
    KeyOnly,
}

/// A rule that applies to a descriptor.
#[derive(Debug, Clone)]
pub struct Matched<'a> {
    pub rule: &'a Arc<Rule>,
    /// `(entry index, wildcard value)` for entries matched through a `share_threshold`
    /// pattern: their counter key uses the pattern, so all matching values share one counter.
    pub shared: Vec<(usize, &'a str)>,
    /// The stats key its metrics are recorded under: the rule's own key, or the key with
    /// request values where `detailed_metric` or `value_to_metric` asks for them.
    pub stats_key: Cow<'a, str>,
}

impl Matched<'_> {
    /// The value to put in the counter key for entry `i`.
    pub fn key_value<'v>(&'v self, i: usize, actual: &'v str) -> &'v str {
        counter_value(&self.shared, i, actual)
    }
}

/// The value entry `i` contributes to its counter key: the `share_threshold` pattern when
/// the entry matched through one, else its own value.
pub fn counter_value<'v>(shared: &[(usize, &'v str)], i: usize, actual: &'v str) -> &'v str {
    shared
        .iter()
        .find(|(at, _)| *at == i)
        .map_or(actual, |(_, pattern)| pattern)
}

/// Looks up `entries` in `domain`. `scratch` is reused for composite keys so a lookup does not
/// allocate once it has grown. Returns `None` for an unknown domain or no matching rule.
pub fn find<'a, E: EntryRef>(
    tree: &'a RuleTree,
    domain: &str,
    entries: &[E],
    scratch: &mut String,
) -> Option<Matched<'a>> {
    find_in(tree.domains.get(domain)?, domain, entries, scratch)
}

/// [`find`] under `root`, the node of `domain` the caller looked up already (once for all
/// of a request's descriptors).
pub fn find_in<'a, E: EntryRef>(
    root: &'a Node,
    domain: &str,
    entries: &[E],
    scratch: &mut String,
) -> Option<Matched<'a>> {
    let mut node = root;
    let mut shared = Vec::new();
    let mut value_to_metric = false;
    let last = entries.len().checked_sub(1)?;
    for (i, entry) in entries.iter().enumerate() {
        let (next, kind, wildcard_key) = step(node, entry, scratch)?;
        if kind == MatchKind::Wildcard && next.share_threshold {
            shared.push((
                i,
                wildcard_value(wildcard_key.unwrap_or_default(), entry.key()),
            ));
        }
        value_to_metric |= next.value_to_metric;
        if i == last {
            let rule = next.rule.as_ref()?;
            let stats_key = if rule.detailed_metric {
                Cow::Owned(detailed_key(domain, entries, &shared))
            } else if value_to_metric {
                Cow::Owned(value_to_metric_key(root, domain, entries, scratch))
            } else {
                Cow::Borrowed(rule.full_key.as_str())
            };
            return Some(Matched {
                rule,
                shared,
                stats_key,
            });
        }
        if next.children.is_empty() {
            return None;
        }
        node = next;
    }
    None
}

/// A share_threshold pattern's value part: `key_files*` -> `files*` (the reference trims
/// `key_`; a pattern that does not start with it is kept whole).
fn wildcard_value<'a>(pattern: &'a str, key: &str) -> &'a str {
    pattern
        .strip_prefix(key)
        .and_then(|p| p.strip_prefix('_'))
        .unwrap_or(pattern)
}

/// `detailed_metric`: every entry's key and value, or the shared pattern for entries that
/// share one counter (the reference's two formats, including its `key_` for empty values).
fn detailed_key<E: EntryRef>(domain: &str, entries: &[E], shared: &[(usize, &str)]) -> String {
    let mut key = domain.to_owned();
    for (i, e) in entries.iter().enumerate() {
        key.push('.');
        key.push_str(e.key());
        match shared.iter().find(|(at, _)| *at == i) {
            Some((_, pattern)) => {
                key.push('_');
                key.push_str(pattern);
            }
            None if shared.is_empty() => {
                key.push('_');
                key.push_str(e.value());
            }
            None if !e.value().is_empty() => {
                key.push('_');
                key.push_str(e.value());
            }
            None => {}
        }
    }
    crate::stat_name::sanitize(&key)
}

/// `value_to_metric`: walks the path again and writes, per level, the request's value where
/// the matched node asks for it, the wildcard pattern (or shared pattern) where a wildcard
/// matched, the configured value for exact matches, and nothing for key-only matches.
fn value_to_metric_key<E: EntryRef>(
    root: &Node,
    domain: &str,
    entries: &[E],
    scratch: &mut String,
) -> String {
    let mut key = domain.to_owned();
    let mut node = root;
    for entry in entries {
        key.push('.');
        key.push_str(entry.key());
        let Some((next, kind, wildcard_key)) = step(node, entry, scratch) else {
            break;
        };
        let value = match kind {
            MatchKind::Wildcard => {
                let pattern = wildcard_value(wildcard_key.unwrap_or_default(), entry.key());
                if next.share_threshold || !next.value_to_metric {
                    pattern
                } else {
                    entry.value()
                }
            }
            MatchKind::Exact => entry.value(),
            MatchKind::KeyOnly if next.value_to_metric => entry.value(),
            MatchKind::KeyOnly => "",
        };
        if !value.is_empty() {
            key.push('_');
            key.push_str(value);
        }
        node = next;
    }
    crate::stat_name::sanitize(&key)
}

/// One level: the child `entry` selects, how, and the wildcard key when it was a wildcard.
pub fn step<'a, E: EntryRef>(
    node: &'a Node,
    entry: &E,
    scratch: &mut String,
) -> Option<(&'a Node, MatchKind, Option<&'a str>)> {
    scratch.clear();
    scratch.push_str(entry.key());
    scratch.push('_');
    scratch.push_str(entry.value());
    if let Some(n) = node.children.get(scratch.as_str()) {
        return Some((n, MatchKind::Exact, None));
    }
    for w in &node.wildcards {
        if w.matches(scratch) {
            if let Some(n) = node.children.get(&w.key) {
                return Some((n, MatchKind::Wildcard, Some(&w.key)));
            }
        }
    }
    node.children
        .get(entry.key())
        .map(|n| (n, MatchKind::KeyOnly, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, parse};

    fn tree(files: &[&str]) -> RuleTree {
        let parsed: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("f{i}.yaml"), parse("t.yaml", t).unwrap()))
            .collect();
        compile(&parsed, true).unwrap()
    }

    fn rule_key(t: &RuleTree, domain: &str, entries: &[(&str, &str)]) -> Option<String> {
        find(t, domain, entries, &mut String::new()).map(|m| m.rule.full_key.clone())
    }

    const LEVELS: &str = r#"
domain: d
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: k
    value: exact
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: k
    value: ex*
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: k
    value: e*
    rate_limit: {unit: second, requests_per_unit: 4}
"#;

    #[test]
    fn exact_beats_wildcard_beats_key_only_and_first_wildcard_wins() {
        let t = tree(&[LEVELS]);
        assert_eq!(
            rule_key(&t, "d", &[("k", "exact")]).as_deref(),
            Some("d.k_exact")
        );
        // "exactly" matches both ex* and e*: the first in config order wins.
        assert_eq!(
            rule_key(&t, "d", &[("k", "exactly")]).as_deref(),
            Some("d.k_ex*")
        );
        assert_eq!(
            rule_key(&t, "d", &[("k", "else")]).as_deref(),
            Some("d.k_e*")
        );
        assert_eq!(rule_key(&t, "d", &[("k", "other")]).as_deref(), Some("d.k"));
        // An empty value finds the key-only rule (composite "k_" matches nothing else).
        assert_eq!(rule_key(&t, "d", &[("k", "")]).as_deref(), Some("d.k"));
        assert_eq!(rule_key(&t, "d", &[("other", "x")]), None);
        assert_eq!(rule_key(&t, "unknown", &[("k", "exact")]), None);
        let none: [(&str, &str); 0] = [];
        assert_eq!(rule_key(&t, "d", &none), None);
    }

    #[test]
    fn wildcards_in_the_middle_and_several_stars() {
        let t = tree(&[r#"
domain: d
descriptors:
  - key: path
    value: /api/*/users/*
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: path
    value: "*.png"
    rate_limit: {unit: minute, requests_per_unit: 2}
"#]);
        assert_eq!(
            rule_key(&t, "d", &[("path", "/api/v1/users/42")]).as_deref(),
            Some("d.path_/api/*/users/*")
        );
        assert_eq!(rule_key(&t, "d", &[("path", "/api/v1/groups/42")]), None);
        assert_eq!(
            rule_key(&t, "d", &[("path", "/img/a.png")]).as_deref(),
            Some("d.path_*.png")
        );
        assert_eq!(rule_key(&t, "d", &[("path", "/img/a.png.gz")]), None);
    }

    const NESTED: &str = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: hour, requests_per_unit: 1}
    descriptors:
      - key: b
        value: x
        descriptors:
          - key: c
            rate_limit: {unit: hour, requests_per_unit: 3}
  - key: leaf
    rate_limit: {unit: hour, requests_per_unit: 4}
"#;

    #[test]
    fn nested_rules_apply_only_at_the_depth_of_the_last_entry() {
        let t = tree(&[NESTED]);
        assert_eq!(rule_key(&t, "d", &[("a", "1")]).as_deref(), Some("d.a"));
        // Level two exists but has no rule.
        assert_eq!(rule_key(&t, "d", &[("a", "1"), ("b", "x")]), None);
        assert_eq!(
            rule_key(&t, "d", &[("a", "1"), ("b", "x"), ("c", "9")]).as_deref(),
            Some("d.a.b_x.c")
        );
        // Longer than the config: no limit, even though a rule sits higher up.
        assert_eq!(
            rule_key(&t, "d", &[("a", "1"), ("b", "x"), ("c", "9"), ("e", "1")]),
            None
        );
        assert_eq!(rule_key(&t, "d", &[("leaf", "1"), ("more", "1")]), None);
        // A level that does not match stops the walk.
        assert_eq!(
            rule_key(&t, "d", &[("a", "1"), ("b", "y"), ("c", "9")]),
            None
        );
    }

    #[test]
    fn share_threshold_records_the_pattern_per_entry() {
        let t = tree(&[r#"
domain: d
descriptors:
  - key: files
    value: /public/*
    share_threshold: true
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 5}
  - key: path
    value: /own/*
    rate_limit: {unit: minute, requests_per_unit: 5}
"#]);
        let entries = [("files", "/public/a.txt"), ("user", "alice")];
        let m = find(&t, "d", &entries, &mut String::new()).unwrap();
        assert_eq!(m.shared, vec![(0, "/public/*")]);
        assert_eq!(m.key_value(0, "/public/a.txt"), "/public/*");
        assert_eq!(m.key_value(1, "alice"), "alice");
        let m = find(&t, "d", &[("path", "/own/x")], &mut String::new()).unwrap();
        assert!(
            m.shared.is_empty(),
            "wildcard without share_threshold keeps values apart"
        );
    }

    #[test]
    fn composite_keys_behave_like_the_reference_even_across_underscores() {
        // The reference looks up "key_value" strings, so key "a" with value "b_c" finds the
        // descriptor configured as key "a_b", value "c". Identical answers need the same.
        let t = tree(&["domain: d\ndescriptors:\n  - key: a_b\n    value: c\n    rate_limit: {unit: second, requests_per_unit: 1}\n"]);
        assert_eq!(
            rule_key(&t, "d", &[("a", "b_c")]).as_deref(),
            Some("d.a_b_c")
        );
    }

    #[test]
    fn merged_domains_combine_rules_from_several_files() {
        let t = tree(&[
            "domain: d\ndescriptors:\n  - key: one\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
            "domain: d\ndescriptors:\n  - key: two\n    rate_limit: {unit: second, requests_per_unit: 2}\n",
        ]);
        assert_eq!(rule_key(&t, "d", &[("one", "")]).as_deref(), Some("d.one"));
        assert_eq!(rule_key(&t, "d", &[("two", "")]).as_deref(), Some("d.two"));
    }

    #[test]
    fn rule_flags_and_unlimited_come_through() {
        let t = tree(&[r#"
domain: d
descriptors:
  - key: u
    rate_limit: {unlimited: true}
  - key: s
    shadow_mode: true
    rate_limit: {unit: day, requests_per_unit: 1, name: shadowed, replaces: [{name: other}]}
"#]);
        let u = find(&t, "d", &[("u", "1")], &mut String::new()).unwrap();
        assert!(u.rule.limits.is_empty());
        let s = find(&t, "d", &[("s", "1")], &mut String::new()).unwrap();
        assert!(s.rule.shadow_mode);
        assert_eq!(s.rule.name, "shadowed");
        assert_eq!(s.rule.replaces, vec!["other".to_owned()]);
        assert_eq!(s.rule.path, "d > s");
    }
}
