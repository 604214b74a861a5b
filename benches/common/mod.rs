//! What the benches share: the rules of `bench/algorithms.sh` (one per algorithm and two with
//! three limits, at limits no call reaches, so every call does the full work), a pinned clock,
//! and a descriptor's checks planned as the service plans them.
// Each bench target compiles this module and uses part of it.
#![allow(dead_code)]

use std::sync::Arc;

use ratelimitd::{
    config::{compile, parse, RuleTree},
    limiter::{engine::Check, CacheKeyBuilder, Clock, Unit},
    matcher,
    service::limit_keys,
};

/// One rule per algorithm and two with three limits: the rules `bench/algorithms.sh` serves.
pub const RULES: &str = include_str!("../../bench/rules/algorithms.yaml");

/// A fixed instant (ms), half a second into a second, so every run builds the same keys.
pub const NOW_MS: u64 = 1_764_000_030_500;

/// Compiles one YAML file of rules.
pub fn tree(text: &str) -> RuleTree {
    let raw = parse("bench.yaml", text).expect("the bench rules parse");
    compile(&[("bench.yaml".to_owned(), raw)], false).expect("the bench rules compile")
}

/// A clock pinned at [`NOW_MS`]: no window rolls over during a bench.
pub struct PinnedClock;

impl Clock for PinnedClock {
    fn now_unix(&self) -> u64 {
        NOW_MS / 1000
    }

    fn now_millis(&self) -> u64 {
        NOW_MS
    }
}

pub fn clock() -> Arc<dyn Clock> {
    Arc::new(PinnedClock)
}

/// The checks of one descriptor `(key, value)` of domain `bench`, cost 1, as the service's plan
/// builds them: the matched rule's limits, each with its counter keys at [`NOW_MS`].
pub fn checks(tree: &RuleTree, key: &str, value: &str) -> Vec<Check> {
    let entries = [(key, value)];
    let m = matcher::find(tree, "bench", &entries, &mut String::new())
        .unwrap_or_else(|| panic!("no rule for {key}"));
    let keys = CacheKeyBuilder::new("ratelimit_");
    let single = m.rule.limits.len() == 1;
    m.rule
        .limits
        .iter()
        .map(|limit| {
            let base = keys.base("bench", entries.iter().copied());
            let (key, previous) = limit_keys(base, limit, single, NOW_MS);
            Check {
                descriptor: 0,
                quota: limit.quota(),
                key,
                previous,
                cost: 1,
                jitter_secs: 0,
                per_second: limit.unit == Unit::Second,
            }
        })
        .collect()
}
