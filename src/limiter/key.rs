//! Counter keys, byte-for-byte those of envoyproxy/ratelimit so both can share a Redis during a
//! migration: `PREFIX + domain + "_" + (key + "_" + value + "_")* + window_start`.

use crate::limiter::Unit;

/// Builds counter keys with the configured `CACHE_KEY_PREFIX`.
#[derive(Debug, Clone, Default)]
pub struct CacheKeyBuilder {
    prefix: String,
}

impl CacheKeyBuilder {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Key for one descriptor. `entries` yields (key, value) where the value is already the
    /// `share_threshold` wildcard pattern for entries that share one counter.
    pub fn build<'a>(
        &self,
        domain: &str,
        entries: impl Iterator<Item = (&'a str, &'a str)> + Clone,
        unit: Unit,
        now: u64,
    ) -> String {
        let window = unit.window_start(now);
        let body: usize = entries.clone().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut key = String::with_capacity(self.prefix.len() + domain.len() + body + 21);
        key.push_str(&self.prefix);
        key.push_str(domain);
        key.push('_');
        for (k, v) in entries {
            key.push_str(k);
            key.push('_');
            key.push_str(v);
            key.push('_');
        }
        // Writing a u64 into a String cannot fail.
        use std::fmt::Write;
        let _ = write!(key, "{window}");
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_reference_layout() {
        let b = CacheKeyBuilder::new("");
        let entries = [("key1", "value1"), ("subkey1", "subvalue1")];
        assert_eq!(
            b.build("domain", entries.iter().copied(), Unit::Second, 1234),
            "domain_key1_value1_subkey1_subvalue1_1234"
        );
        assert_eq!(
            b.build("domain", [("key", "")].into_iter(), Unit::Minute, 125),
            "domain_key__120"
        );
        let p = CacheKeyBuilder::new("prefix:");
        assert_eq!(
            p.build("d", [("k", "v")].into_iter(), Unit::Hour, 7_300),
            "prefix:d_k_v_7200"
        );
    }
}
