//! Finds the rule for one request descriptor, exactly as envoyproxy/ratelimit's `GetLimit` does.
//!
//! Level by level, each entry is looked up by its composite key `key_value`, then against the
//! level's wildcard patterns in config order, then by `key` alone. A rule applies only if it
//! sits at the depth of the descriptor's last entry; a level with no match, or with no deeper
//! levels while entries remain, means no limit. Pure: no I/O, no clock.

use std::sync::Arc;

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
}

impl Matched<'_> {
    /// The value to put in the counter key for entry `i`.
    pub fn key_value<'v>(&'v self, i: usize, actual: &'v str) -> &'v str {
        self.shared
            .iter()
            .find(|(at, _)| *at == i)
            .map_or(actual, |(_, pattern)| pattern)
    }
}

/// Looks up `entries` in `domain`. `scratch` is reused for composite keys so a lookup does not
/// allocate once it has grown. Returns `None` for an unknown domain or no matching rule.
pub fn find<'a, E: EntryRef>(
    tree: &'a RuleTree,
    domain: &str,
    entries: &[E],
    scratch: &mut String,
) -> Option<Matched<'a>> {
    let mut node = tree.domains.get(domain)?;
    let mut shared = Vec::new();
    let last = entries.len().checked_sub(1)?;
    for (i, entry) in entries.iter().enumerate() {
        let (next, kind, wildcard_key) = step(node, entry, scratch)?;
        if kind == MatchKind::Wildcard && next.share_threshold {
            let pattern = wildcard_key.unwrap_or_default();
            let value = pattern
                .strip_prefix(entry.key())
                .and_then(|p| p.strip_prefix('_'))
                .unwrap_or(pattern);
            shared.push((i, value));
        }
        if i == last {
            return next.rule.as_ref().map(|rule| Matched { rule, shared });
        }
        if next.children.is_empty() {
            return None;
        }
        node = next;
    }
    None
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
