//! Counter keys, byte-for-byte those of envoyproxy/ratelimit so both can share a Redis during a
//! migration: `PREFIX + domain + "_" + (key + "_" + value + "_")* + window_start`.
//!
//! With `CACHE_KEY_HASH_SECRET_FILE` set, each value is replaced by [`ValueHasher`]'s keyed
//! hash of it (32 lowercase hex digits), so whoever can read Redis sees which rule a counter
//! belongs to (domain and entry keys stay readable) but not the API keys, user ids or
//! addresses that were sent as values. Such keys are no longer the reference's.

use std::fmt;

use crate::{
    limiter::Unit,
    spares::{self, Spares},
};

/// Builds counter keys with the configured `CACHE_KEY_PREFIX`, and with hashed values when
/// `CACHE_KEY_HASH_SECRET_FILE` is set.
#[derive(Debug, Clone, Default)]
pub struct CacheKeyBuilder {
    prefix: String,
    /// `None`: values are written as they are, as the reference writes them.
    hasher: Option<ValueHasher>,
}

impl CacheKeyBuilder {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            hasher: None,
        }
    }

    /// The same builder, writing each value as its keyed hash.
    pub fn with_value_hasher(mut self, hasher: ValueHasher) -> Self {
        self.hasher = Some(hasher);
        self
    }

    /// Whether values are written as keyed hashes.
    pub fn hashes_values(&self) -> bool {
        self.hasher.is_some()
    }

    /// Key for one descriptor's fixed window of `unit` containing `now` (seconds): the
    /// reference's key. `entries` yields (key, value) where the value is already the
    /// `share_threshold` wildcard pattern for entries that share one counter.
    pub fn build<'a>(
        &self,
        domain: &str,
        entries: impl Iterator<Item = (&'a str, &'a str)> + Clone,
        unit: Unit,
        now: u64,
    ) -> String {
        let mut key = self.base(domain, entries);
        push_number(&mut key, unit.window_start(now));
        key
    }

    /// Everything of a descriptor's keys before the window: `PREFIX + domain + "_" + (key +
    /// "_" + value + "_")*`. One allocation: the capacity is computed first (with room for
    /// the longest suffix) and every part, hex digits included, is written straight in.
    pub fn base<'a>(
        &self,
        domain: &str,
        entries: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> String {
        let value_len = |v: &str| match self.hasher {
            Some(_) => ValueHasher::HEX_LEN,
            None => v.len(),
        };
        let body: usize = entries
            .clone()
            .map(|(k, v)| k.len() + value_len(v) + 2)
            .sum();
        let mut key = buffer(self.prefix.len() + domain.len() + body + SUFFIX_ROOM);
        key.push_str(&self.prefix);
        key.push_str(domain);
        key.push('_');
        for (k, v) in entries {
            key.push_str(k);
            key.push('_');
            match &self.hasher {
                Some(h) => h.write_hex(v, &mut key),
                None => key.push_str(v),
            }
            key.push('_');
        }
        key
    }
}

/// Room reserved after a base for the longest suffix: a 20-digit window start plus a tag.
const SUFFIX_ROOM: usize = 48;

/// Most spare key buffers a thread keeps, and the largest it keeps: at most 32 KiB a thread,
/// whatever the keys clients send.
const SPARE_KEYS: usize = 64;
const SPARE_KEY_BYTES: usize = 512;

thread_local! {
    /// Key buffers given back by finished requests ([`recycle_key`]), taken by the next ones: a
    /// request's keys cost no allocation once its thread has served a few.
    static SPARE: Spares<String> = const { Spares::new() };
}

/// An empty key buffer of at least `capacity` bytes: a spare one when this thread has one.
fn buffer(capacity: usize) -> String {
    match spares::take(&SPARE) {
        Some(mut key) => {
            key.reserve(capacity);
            key
        }
        None => String::with_capacity(capacity),
    }
}

/// Gives a key back for [`buffer`] to hand out again (unless this thread keeps enough, or the
/// key is too large to keep).
pub fn recycle_key(mut key: String) {
    if key.capacity() > SPARE_KEY_BYTES {
        return;
    }
    key.clear();
    spares::give(&SPARE, key, SPARE_KEYS);
}

/// A window counter's key: the base, the window's start in seconds and, for a limit that is
/// not the reference's single one-unit window, a tag naming the window (`_5minute`), so the
/// limits of one rule never share a counter.
/// The base is extended in place: built with room for the suffix, a key costs one allocation.
pub fn window_key(mut key: String, start_secs: u64, tag: Option<(u32, Unit)>) -> String {
    push_number(&mut key, start_secs);
    if let Some((multiplier, unit)) = tag {
        key.push('_');
        push_number(&mut key, multiplier);
        key.push_str(unit.name());
    }
    key
}

/// Appends `n` in decimal: itoa's digits, not the formatting machinery of `write!`, which
/// cost about 250 instructions per key on the hot path (bench/callgrind.sh).
fn push_number(key: &mut String, n: impl itoa::Integer) {
    key.push_str(itoa::Buffer::new().format(n));
}

/// A copy of `base` with room for a suffix, for a descriptor's second key (a clone keeps no
/// spare capacity, so extending it would allocate again).
pub fn copy_base(base: &str) -> String {
    let mut key = buffer(base.len() + SUFFIX_ROOM);
    key.push_str(base);
    key
}

/// A token bucket's key: the base, `bucket_`, the window and the limit (`bucket_1minute_100`).
/// The state is measured in the limit's refill steps, so another limit means another bucket.
pub fn bucket_key(mut key: String, multiplier: u32, unit: Unit, limit: u32) -> String {
    key.push_str("bucket_");
    push_number(&mut key, multiplier);
    key.push_str(unit.name());
    key.push('_');
    push_number(&mut key, limit);
    key
}

/// Keyed BLAKE3 of descriptor values, truncated to 128 bits.
///
/// The key is `blake3::derive_key(CONTEXT, secret)`: the secret file may hold any bytes of
/// any length from [`Self::MIN_SECRET_BYTES`], and the context ties the derived key to this
/// one use, so the same secret used elsewhere yields unrelated hashes.
#[derive(Clone)]
pub struct ValueHasher {
    /// The derived key, computed once at start-up. Each value is hashed with
    /// `blake3::keyed_hash`, which for values up to 1 KiB hashes in one pass without building
    /// a `blake3::Hasher`; cloning a prepared `Hasher` (1.9 KB) per value measured slower
    /// (examples/keybench.rs).
    key: [u8; 32],
}

impl ValueHasher {
    /// BLAKE3 key-derivation context; a new layout would get a new version here.
    pub const CONTEXT: &'static str = "ratelimitd counter key v1";
    /// Shortest accepted secret.
    pub const MIN_SECRET_BYTES: usize = 16;
    /// Hex digits written per value (128 bits).
    pub const HEX_LEN: usize = 32;

    /// A hasher keyed from `secret`, which must hold at least [`Self::MIN_SECRET_BYTES`].
    pub fn try_new(secret: &[u8]) -> Result<Self, SecretError> {
        match secret.len() {
            0 => Err(SecretError::Empty),
            n if n < Self::MIN_SECRET_BYTES => Err(SecretError::TooShort(n)),
            _ => Ok(Self {
                key: blake3::derive_key(Self::CONTEXT, secret),
            }),
        }
    }

    /// Appends the first 16 bytes of the keyed hash of `value` to `out` as lowercase hex.
    pub fn write_hex(&self, value: &str, out: &mut String) {
        let hash = blake3::keyed_hash(&self.key, value.as_bytes());
        for b in hash.as_bytes().iter().take(Self::HEX_LEN / 2) {
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
}

/// The derived key stays out of `{:?}` output.
impl fmt::Debug for ValueHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ValueHasher(blake3 keyed, key not shown)")
    }
}

/// Why a secret cannot key a [`ValueHasher`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the secret is empty")]
    Empty,
    #[error(
        "the secret is {0} bytes long; at least {min} are needed",
        min = ValueHasher::MIN_SECRET_BYTES
    )]
    TooShort(usize),
}

/// `n` (below 16) as a lowercase hex digit.
fn hex_digit(n: u8) -> char {
    char::from(if n < 10 { b'0' + n } else { b'a' + (n - 10) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-test-secret";

    fn hashed(prefix: &str, secret: &[u8]) -> CacheKeyBuilder {
        CacheKeyBuilder::new(prefix).with_value_hasher(ValueHasher::try_new(secret).unwrap())
    }

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
        assert!(!p.hashes_values());
    }

    /// Pinned once (and cross-checked with the Python `blake3` bindings): a change here
    /// changes every counter key of every deployment that hashes.
    #[test]
    fn hashed_keys_have_a_fixed_layout() {
        let b = hashed("pre:", SECRET);
        assert!(b.hashes_values());
        let key = b.build(
            "api",
            [("api_key", "sk_live_SECRET123")].into_iter(),
            Unit::Minute,
            1_700_000_012,
        );
        assert_eq!(
            key,
            "pre:api_api_key_693b4e4066a440e2bae1744c814b3c6d_1699999980"
        );
        // The same digits as BLAKE3's own keyed hash, cut to 128 bits.
        let full = blake3::keyed_hash(
            &blake3::derive_key(ValueHasher::CONTEXT, SECRET),
            b"sk_live_SECRET123",
        );
        assert!(full
            .to_hex()
            .starts_with("693b4e4066a440e2bae1744c814b3c6d"));
    }

    #[test]
    fn every_value_is_hashed_and_keys_stay_readable() {
        let b = hashed("", SECRET);
        let key = b.build(
            "d",
            [("a", "x"), ("b", "/public/*"), ("c", "")].into_iter(),
            Unit::Second,
            5,
        );
        let parts: Vec<&str> = key.split('_').collect();
        assert_eq!(parts.len(), 8, "{key}");
        assert_eq!(
            (parts[0], parts[1], parts[3], parts[5], parts[7]),
            ("d", "a", "b", "c", "5"),
            "{key}"
        );
        for hex in [parts[2], parts[4], parts[6]] {
            assert_eq!(hex.len(), ValueHasher::HEX_LEN, "{key}");
            assert!(
                hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{key}"
            );
        }
    }

    #[test]
    fn empty_value_is_hashed() {
        let b = hashed("", SECRET);
        let key = b.build("d", [("k", "")].into_iter(), Unit::Second, 7);
        assert_eq!(key, "d_k_4dfdb809d2bc94ef2f0c753b7df6a313_7");
        assert_ne!(key, "d_k__7");
    }

    #[test]
    fn same_value_same_key_different_secret_different_key() {
        let entries = [("user", "alice")];
        let build = |b: &CacheKeyBuilder| b.build("d", entries.iter().copied(), Unit::Hour, 0);
        let one = hashed("", SECRET);
        assert_eq!(build(&one), build(&one));
        assert_eq!(build(&one), build(&hashed("", SECRET)));
        assert_ne!(build(&one), build(&hashed("", b"another secret of 24 b")));
        // Different values under one secret differ too.
        assert_ne!(
            build(&one),
            one.build("d", [("user", "bob")].into_iter(), Unit::Hour, 0)
        );
    }

    #[test]
    fn hashed_key_is_built_in_one_allocation() {
        let b = hashed("prefix:", SECRET);
        let entries = [
            ("k1", "a long value that is longer than its hash"),
            ("k2", ""),
        ];
        let key = b.build("dom", entries.iter().copied(), Unit::Second, u64::MAX);
        // Any growth past the computed capacity would at least double it.
        let computed = "prefix:".len() + "dom".len() + (2 + 32 + 2) * 2 + SUFFIX_ROOM;
        assert_eq!(key.capacity(), computed);
        assert!(key.ends_with(&format!("_{}", u64::MAX)), "{key}");
    }

    #[test]
    fn short_or_empty_secrets_are_refused() {
        assert_eq!(ValueHasher::try_new(b"").unwrap_err(), SecretError::Empty);
        assert_eq!(
            ValueHasher::try_new(b"fifteen bytes!!")
                .unwrap_err()
                .to_string(),
            "the secret is 15 bytes long; at least 16 are needed"
        );
        assert!(ValueHasher::try_new(b"sixteen bytes!!!").is_ok());
        let debug = format!("{:?}", hashed("", SECRET));
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
    }

    #[test]
    fn a_recycled_key_buffer_is_handed_out_again_and_large_ones_are_not_kept() {
        // Whatever an earlier test left on this thread is dropped: the pool starts empty.
        SPARE.with(Spares::clear);
        let b = CacheKeyBuilder::new("p:");
        let first = b.base("d", [("k", "v")].into_iter());
        let at = first.as_ptr();
        recycle_key(first);
        let again = b.base("d", [("k", "w")].into_iter());
        assert_eq!(again.as_ptr(), at, "the spare buffer was not reused");
        assert_eq!(again, "p:d_k_w_");
        // A copy for a second limit comes from the pool too.
        let second = copy_base(&again);
        recycle_key(second);
        let copy = copy_base(&again);
        assert!(copy.capacity() >= again.len() + SUFFIX_ROOM);
        assert_eq!(copy, again);
        // A key longer than the pool keeps is freed, not kept.
        let long = "v".repeat(SPARE_KEY_BYTES);
        let big = b.base("d", [("k", long.as_str())].into_iter());
        let spare = || SPARE.with(Spares::len);
        assert_eq!(spare(), 0);
        recycle_key(big);
        assert_eq!(spare(), 0);
        // At most SPARE_KEYS are kept.
        for _ in 0..SPARE_KEYS + 10 {
            recycle_key(String::with_capacity(8));
        }
        assert_eq!(spare(), SPARE_KEYS);
    }

    #[test]
    fn window_and_bucket_keys_extend_the_base_in_place() {
        let b = CacheKeyBuilder::new("p:");
        let base = b.base("d", [("k", "v")].into_iter());
        let room = base.capacity();
        // The longest suffixes fit in the room the base reserved: no second allocation.
        let copy = copy_base(&base);
        let room_of_copy = copy.capacity();
        let key = window_key(copy, u64::MAX, Some((u32::MAX, Unit::Second)));
        assert_eq!(key, format!("p:d_k_v_{}_{}second", u64::MAX, u32::MAX));
        assert_eq!(key.capacity(), room_of_copy);
        let key = bucket_key(base, u32::MAX, Unit::Second, u32::MAX);
        assert_eq!(
            key,
            format!("p:d_k_v_bucket_{}second_{}", u32::MAX, u32::MAX)
        );
        assert_eq!(key.capacity(), room);
    }
}
