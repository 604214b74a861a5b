//! Rate limit rules: the reference's YAML format, validated and compiled into an immutable tree.
//!
//! `raw` reads files into plain structs (after `depth` has refused pathologically nested
//! ones, reading the text through `yaml_reader` as libyaml does), `compile` validates them
//! and builds the [`RuleTree`] the matcher walks, `error` says what is wrong and where,
//! `load` finds and reads the files, `reload` swaps in a new tree, `watch` decides when. A
//! tree is never mutated after it is built; a reload builds a new one and swaps it in whole.

mod compile;
mod depth;
mod error;
pub(crate) mod load;
mod raw;
mod reload;
#[cfg(test)]
mod test_support;
mod watch;
mod yaml_reader;
mod yaml_v2;

use std::{collections::HashMap, fmt::Write, sync::Arc};

pub use compile::{compile, compile_with, MAX_WINDOW_SECS};
pub use error::{ConfigError, ConfigErrors};
pub use load::{content_hash, load_dir_or_file, load_hashed, ConfigSource};
pub use raw::{parse, parse_lenient, RawDescriptor, RawFile, RawRateLimit};
pub use reload::{ReloadOutcome, Reloader};

use crate::{
    limiter::{algorithm::Quota, Algorithm, Unit},
    metrics::RuleSlot,
};

/// The rule tree's maps: foldhash, seeded per process, instead of SipHash. Only the config
/// inserts into them; a request only looks up (its domain, then one or two keys per level),
/// so the flooding SipHash guards against cannot happen, and each lookup costs less than
/// half (bench/callgrind.sh).
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Every domain's rules. Lookups are hash lookups per descriptor level.
#[derive(Debug, Default)]
pub struct RuleTree {
    pub domains: Map<String, Node>,
    /// The files it was built from, for logs and summaries.
    pub files: Vec<String>,
    /// No config has arrived yet (rules over xDS, serving before the first one): calls fail
    /// with the reference's "no rate limit configuration loaded" until one does.
    pub awaiting_first_config: bool,
}

/// One level of a domain's descriptor tree.
#[derive(Debug, Default)]
pub struct Node {
    /// Children by the reference's composite key: `key` or `key_value`.
    pub children: Map<Box<str>, Node>,
    /// Children whose composite key contains `*`, in config order (first match wins).
    pub wildcards: Vec<Wildcard>,
    /// The limit configured at this node, if any.
    pub rule: Option<Arc<Rule>>,
    /// `share_threshold: true` on this node.
    pub share_threshold: bool,
    /// `value_to_metric: true` on this node.
    pub value_to_metric: bool,
}

/// A wildcard child: its composite key split on `*` once, at load time.
#[derive(Debug)]
pub struct Wildcard {
    pub key: Box<str>,
    pub parts: Vec<Box<str>>,
}

impl Wildcard {
    pub fn new(key: &str) -> Self {
        Self {
            key: key.into(),
            parts: key.split('*').map(Into::into).collect(),
        }
    }

    /// Whether `composite` (`key_value`) matches; each `*` matches any run of characters.
    pub fn matches(&self, composite: &str) -> bool {
        let parts = &self.parts;
        let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
            return false;
        };
        if parts.len() == 1 {
            return composite == &**first;
        }
        let fixed: usize = parts.iter().map(|p| p.len()).sum();
        if composite.len() < fixed
            || !composite.starts_with(&**first)
            || !composite.ends_with(&**last)
        {
            return false;
        }
        let Some(mut rest) = composite.get(first.len()..composite.len() - last.len()) else {
            return false;
        };
        for part in parts.iter().skip(1).take(parts.len().saturating_sub(2)) {
            match rest.find(&**part) {
                Some(at) => match rest.get(at + part.len()..) {
                    Some(r) => rest = r,
                    None => return false,
                },
                None => return false,
            }
        }
        true
    }
}

/// A configured limit and everything the service needs to answer with it.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The reference's stats key: `domain.key_value.key`.
    pub full_key: String,
    /// Human path: `domain > key=value > key`.
    pub path: String,
    /// `rate_limit` (one) or `rate_limits` (several, all checked and charged together); none
    /// for `unlimited: true`.
    pub limits: Vec<Limit>,
    /// `rate_limit.name`, empty when unset (as the reference reports it).
    pub name: String,
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    pub detailed_metric: bool,
    /// The descriptor's `metadata:`, put in the response's `dynamic_metadata` when it passes
    /// (RESPONSE_DYNAMIC_METADATA).
    pub metadata: Option<prost_types::Struct>,
    /// Its per-rule metrics under `full_key`, registered at its first hit: counting later
    /// hits needs no lookup.
    pub counters: RuleSlot,
}

/// A number of requests per window, and how they are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    /// `unit_multiplier`: windows of this many units (1 in the reference's format).
    pub multiplier: u32,
    pub algorithm: Algorithm,
    /// `burst`: the token bucket's capacity; `None` means `requests_per_unit`.
    pub burst: Option<u32>,
}

impl Limit {
    /// A reference limit: a fixed window of one unit.
    pub fn fixed(requests_per_unit: u32, unit: Unit) -> Self {
        Limit {
            requests_per_unit,
            unit,
            multiplier: 1,
            algorithm: Algorithm::FixedWindow,
            burst: None,
        }
    }

    /// The window in seconds (`unit × unit_multiplier`).
    pub fn window_secs(&self) -> u64 {
        self.unit.seconds() * u64::from(self.multiplier.max(1))
    }

    /// Whether the reference could have written this limit: a fixed window of one unit.
    pub fn is_plain(&self) -> bool {
        self.algorithm == Algorithm::FixedWindow && self.multiplier == 1 && self.burst.is_none()
    }

    /// `unit=MINUTE requests_per_unit=10`, then ` unit_multiplier=N` when not 1, then
    /// ` algorithm=NAME`, then ` burst=N` when set: one limit in a [`Rule::dump_line`].
    fn dump(&self) -> String {
        let mut out = format!(
            "unit={} requests_per_unit={}",
            self.unit.name().to_uppercase(),
            self.requests_per_unit
        );
        if self.multiplier != 1 {
            let _ = write!(out, " unit_multiplier={}", self.multiplier);
        }
        let _ = write!(out, " algorithm={}", self.algorithm.name());
        if let Some(burst) = self.burst {
            let _ = write!(out, " burst={burst}");
        }
        out
    }

    /// The numbers the counting algorithms need.
    pub fn quota(&self) -> Quota {
        Quota::new(
            self.algorithm,
            self.requests_per_unit,
            self.unit,
            self.multiplier,
            self.burst,
        )
    }
}

impl Rule {
    /// One line for `/rlconfig` and `check-config`. A rule the reference could have written
    /// (one fixed window of one unit, or `unlimited`) is dumped exactly as the reference dumps
    /// it: `KEY: unit=MINUTE requests_per_unit=10, shadow_mode: false, quota_mode: false`.
    /// Any other rule lists every limit in config order, separated by `; `, each as
    /// [`Limit::dump`] writes it (always with its algorithm):
    /// `KEY: unit=MINUTE requests_per_unit=10 algorithm=token_bucket burst=20; unit=HOUR
    /// requests_per_unit=100 algorithm=fixed_window, shadow_mode: false, quota_mode: false`.
    pub fn dump_line(&self) -> String {
        let limits = match self.limits.as_slice() {
            [] => "unit=UNKNOWN requests_per_unit=0".to_owned(),
            [l] if l.is_plain() => format!(
                "unit={} requests_per_unit={}",
                l.unit.name().to_uppercase(),
                l.requests_per_unit
            ),
            several => several
                .iter()
                .map(Limit::dump)
                .collect::<Vec<_>>()
                .join("; "),
        };
        format!(
            "{}: {limits}, shadow_mode: {}, quota_mode: {}",
            self.full_key, self.shadow_mode, self.quota_mode
        )
    }
}

impl RuleTree {
    /// The tree in force before the first config arrives over xDS: no rules, and calls fail.
    pub fn awaiting_first_config() -> Self {
        Self {
            awaiting_first_config: true,
            ..Self::default()
        }
    }

    /// Number of limits (rules) in the tree, for summaries.
    pub fn rule_count(&self) -> usize {
        fn count(n: &Node) -> usize {
            usize::from(n.rule.is_some()) + n.children.values().map(count).sum::<usize>()
        }
        self.domains.values().map(count).sum()
    }

    /// Every rule, sorted by stats key, for `check-config` and `/rlconfig`.
    pub fn rules(&self) -> Vec<&Rule> {
        fn walk<'a>(n: &'a Node, out: &mut Vec<&'a Rule>) {
            if let Some(r) = &n.rule {
                out.push(r);
            }
            for c in n.children.values() {
                walk(c, out);
            }
        }
        let mut out = Vec::new();
        for d in self.domains.values() {
            walk(d, &mut out);
        }
        out.sort_by(|a, b| a.full_key.cmp(&b.full_key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Wildcard;

    #[test]
    fn wildcards_match_trailing_middle_and_several_stars() {
        let w = Wildcard::new("path_/foo/*");
        assert!(w.matches("path_/foo/"));
        assert!(w.matches("path_/foo/bar/baz"));
        assert!(!w.matches("path_/fo"));
        let m = Wildcard::new("path_/api/*/users");
        assert!(m.matches("path_/api/v1/users"));
        assert!(m.matches("path_/api//users"));
        assert!(!m.matches("path_/api/v1/users/1"));
        let s = Wildcard::new("k_a*b*c");
        assert!(s.matches("k_abc"));
        assert!(s.matches("k_a1b2c"));
        assert!(!s.matches("k_a1c2b"));
        // Fixed parts may not overlap: "ab*ba" needs at least four characters.
        assert!(!Wildcard::new("k_ab*ba").matches("k_aba"));
        assert!(Wildcard::new("k_*").matches("k_"));
    }
}
