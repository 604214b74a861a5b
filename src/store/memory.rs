//! In-memory counters for a single instance, bounded by `MEMORY_MAX_COUNTERS`.
//!
//! Two structures:
//! - `shards`: the keys' states (a window's count, a bucket's TAT and remainder) in hash
//!   tables, each behind its own lock, chosen by the key's fingerprint. A request takes the
//!   locks of every shard its checks' keys live in (in index order, so requests never wait on
//!   each other in a cycle), reads the states, decides with [`engine::decide`] and writes the
//!   charged states before letting go (a few instructions, never across an await): requests
//!   on one key are decided one at a time, so counts are exact under concurrency, and
//!   charging an existing key allocates nothing.
//! - `order`: the table hash of every counter, sorted by when it ends and then by creation,
//!   behind one lock. Only creating or removing a counter takes it, for O(log w) work with w
//!   distinct ends (a handful per rule), never a scan.
//!
//! **Fingerprints, not keys.** A counter is stored as a 32-byte [`Slot`]: a 128-bit
//! fingerprint of its key (SipHash-1-3 keyed with a secret drawn at start-up), its value, and
//! its window's end or its bucket's remainder; no key text. Two keys share a counter if and
//! only if their fingerprints are equal. With n live counters, the chance that any two of
//! them share one is at most n(n−1)/2 · 2^−128 ≈ n²/2^129: about 1.5·10^−27 for a million,
//! 1.5·10^−21 for a billion. Clients cannot do better than that by choosing keys, since they
//! do not know the secret: each new key they send matches one of the n fingerprints with
//! probability at most n/2^128. A collision would make two keys count together on one
//! counter until it ends; nothing else. Nothing reads keys back from the store (the usage
//! view and the local failure policy decide through it like any request), so keeping no key
//! text loses nothing.
//!
//! **Sizing.** hashbrown tables have a power of two of buckets and double when 7/8 full, so
//! the shard count is chosen from `max` ([`shard_count`]) to hold `max` counters at about 3/4
//! of their buckets rather than just under half (a million counters: 10 shards of 2^17
//! buckets instead of 8 of 2^18). A full store, removing a counter for each it creates, also
//! leaves tombstones in its tables; [`Table::insert`] clears them instead of letting hashbrown
//! double the table. A million counters then take about 52 MB (33 bytes a bucket, plus 8 per
//! counter in `order`), against about 165 MB when the keys were stored (measured in
//! docs/benchmarks.md).
//!
//! `order` holds the first 64 bits of the fingerprint (the table hash) rather than all 128;
//! removing by hash takes any counter with that hash from its shard. Two live keys sharing
//! a 64-bit hash (about one chance in 4·10^7 with a million counters, n²/2^65) may swap the
//! moment they are removed, nothing worse: each `order` entry stands for exactly one counter
//! with its hash, so the count stays exact.
//!
//! **Windows come from the caller.** The service reads the clock once per request: that
//! instant ([`Batch::now_ms`]) names the window in each [`engine::Check`]'s key and is the
//! instant the engine decides at. A charged key ends at [`engine::Check::ends_ms`] of that
//! instant, rounded up to the second: the end of its window (of the next one for a sliding
//! window, whose count is read then as the previous one), or when its bucket is full again.
//! The store never re-reads the clock to decide whether a counter is current, so a request
//! computed just before a window boundary and counted just after it adds to its own window's
//! counter instead of resetting it.
//!
//! **Full store.** Creating a counter when `max` exist first removes the counter that comes
//! first in `order`: one whose window has already ended if there is one (a plain drop), else
//! the live one whose window ends first, whose loss costs the least (an eviction, counted in
//! `ratelimitd_memory_evictions_total`). Among counters ending at the same second the oldest
//! goes first. The new counter is never its own victim. So every creation when full removes
//! exactly one counter, and `order` never holds more than `max` entries.
//!
//! **Slack.** A counter is added to its shard and to `order` under two separate locks (holding
//! both at once could deadlock against a removal, which takes them in the other order), so a
//! creating thread briefly holds one counter more in the shards than in `order`: the shards
//! exceed `max` by at most the number of threads creating counters at that instant (the tokio
//! worker threads, one per core), and never once they are done.
//!
//! **Sweeping.** Every second [`MemoryStore::sweep`] removes counters that ended at least
//! [`GRACE_SECS`] ago, so memory follows the number of live windows and buckets.
//!
//! Why not `dashmap` (used elsewhere) or `moka`: with `dashmap` the eviction order needs its
//! own copy of every key, since its map cannot be searched by hash alone (a shared `Arc<str>`
//! measured about 240 bytes per counter in the server, hashbrown tables of `Box<str>` keys
//! about 176, and these fingerprints about 50; see docs/benchmarks.md); `moka` evicts by
//! frequency and recency, not by window end, and needs a compute closure per increment.

use std::{
    collections::{BTreeMap, VecDeque},
    hash::{BuildHasher, Hasher},
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use hashbrown::HashTable;
use siphasher::sip128::{Hasher128, SipHasher13};
use smallvec::SmallVec;

use super::{Deadline, Store, StoreError};
use crate::limiter::{
    algorithm::{Algorithm, State},
    engine::{self, Batch, DecidedList, INLINE_CHECKS},
    Clock,
};

/// How long after its window ends a counter is kept by the sweeper. A request reads the clock
/// once and reaches the store a little later (microseconds, but a second boundary can fall in
/// between); keeping the counter one more second means that request still finds it and adds
/// to it instead of starting its window over at 0. The clock has whole-second resolution, so
/// one second of grace is at least one second of real time.
pub const GRACE_SECS: u64 = 1;

/// Most counters the sweeper removes per hold of the `order` lock, so creations waiting for it
/// are delayed by a bounded amount of work even when a million counters end at once.
const SWEEP_BATCH: usize = 4_096;

/// Most items per bucket the shards are sized for at `max` counters (see [`shard_count`]):
/// below hashbrown's 7/8, so the binomial spread of keys over shards never pushes one past
/// it, and enough empty buckets remain that the tombstones left by removals in a full store
/// are reused rather than forcing a table to double.
const LOAD_AT_MAX: (usize, usize) = (4, 5);

/// Locks `m`. Every critical section here only moves values between collections and cannot
/// panic half-way through in a way that breaks an invariant the next holder relies on, so a
/// poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A counter key's 128-bit keyed SipHash-1-3, which stands for the key in the store (see the
/// module doc for the collision bound). Two words rather than a `u128`, so [`Slot`] needs no
/// 16-byte alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint([u64; 2]);

impl Fingerprint {
    /// The table hash, also the `order` entry. hashbrown places an entry by its low bits and
    /// tags it with the top 7; the shard comes from the bits between (see
    /// [`MemoryStore::shard_index`]).
    fn hash(self) -> u64 {
        self.0[0]
    }
}

/// Keys [`Fingerprint`]s with a secret drawn once per process, so clients cannot choose keys
/// that collide.
struct Fingerprinter {
    k0: u64,
    k1: u64,
}

impl Fingerprinter {
    /// A fresh secret: two outputs of std's `RandomState` (SipHash under a key the OS's random
    /// source seeded), so no RNG crate is needed.
    fn random() -> Self {
        let seed = std::collections::hash_map::RandomState::new();
        Fingerprinter {
            k0: seed.hash_one(0_u8),
            k1: seed.hash_one(1_u8),
        }
    }

    fn of(&self, key: &str) -> Fingerprint {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(key.as_bytes());
        let out = h.finish128();
        Fingerprint([out.h1, out.h2])
    }
}

/// One counter: a window's count, or a token bucket's TAT and remainder. 32 bytes (checked
/// below): a window's end and a bucket's remainder share a word, since a bucket's end follows
/// from its TAT.
struct Slot {
    /// The key's fingerprint, not the key: see the module doc.
    fp: [u64; 2],
    /// A window's count (up to `MAX_COUNT`) or a bucket's TAT in ms.
    value: u64,
    /// A window's end (Unix seconds: a u64 of ms over 1000, so below 2^54), or [`BUCKET`] with
    /// a bucket's remainder in 1/limit ms (at most 2^53: `algorithm::bucket` caps the debt it
    /// is taken from there). Set by the last check that charged the key, as its end was before.
    tail: u64,
}

/// The bit of [`Slot::tail`] that marks a token bucket.
const BUCKET: u64 = 1 << 63;

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

impl Slot {
    /// `fp`'s counter as `check` charged it (`ends` from [`engine::Check::ends_ms`], in ms).
    fn charged(fp: Fingerprint, check: &engine::Check, charge: State, ends_ms: u64) -> Slot {
        let tail = match check.quota.algorithm {
            Algorithm::TokenBucket => BUCKET | charge.b.min(!BUCKET),
            // Windows read their `b` from the previous window's counter (a fixed window
            // ignores it), never from here.
            Algorithm::FixedWindow | Algorithm::SlidingWindow => ends_ms.div_ceil(1000),
        };
        Slot {
            fp: fp.0,
            value: charge.a,
            tail,
        }
    }

    fn hash(&self) -> u64 {
        self.fp[0]
    }

    /// A bucket's remainder; 0 for a window.
    fn remainder(&self) -> u64 {
        if self.tail & BUCKET == 0 {
            0
        } else {
            self.tail & !BUCKET
        }
    }

    /// When it may go (Unix seconds): its window's end, or when its bucket is full again (its
    /// TAT plus 1 ms, rounded up, as [`engine::Check::ends_ms`] has it). A bucket's grows as
    /// it is charged; the sweeper then keeps it (see [`MemoryStore::sweep`]).
    fn expires(&self) -> u64 {
        if self.tail & BUCKET == 0 {
            self.tail
        } else {
            self.value.saturating_add(1).div_ceil(1000)
        }
    }
}

/// One shard of the counters, on its own cache lines so shards do not share them.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Table>);

/// Smallest table [`Table::insert`] rebuilds rather than let hashbrown grow it: smaller ones
/// cost little either way.
const REBUILD_FROM: usize = 1_024;

/// A shard's counters.
#[derive(Default)]
struct Table {
    slots: HashTable<Slot>,
    /// The most counters `slots` holds without growing (7/8 of its buckets): its
    /// `capacity()` when it has no tombstones, which is the largest it has reported, since a
    /// table never shrinks.
    full: usize,
}

impl Table {
    fn find(&self, fp: Fingerprint) -> Option<&Slot> {
        self.slots.find(fp.hash(), |s| s.fp == fp.0)
    }

    /// Adds a counter whose fingerprint is not in the table.
    ///
    /// A removal in a crowded part of a hashbrown table leaves a tombstone, which uses up
    /// room until an insertion reuses it or the table is rehashed; when room runs out with
    /// more than half the buckets' worth of counters, hashbrown moves them into a table of
    /// twice the buckets, even if the counters alone still fit. A store held at
    /// `MEMORY_MAX_COUNTERS`, removing one counter for each it creates, gets there: it
    /// measured at twice the table memory after a million evictions. So when room runs out
    /// while at least 1/16 of it is tombstones, the counters move into a fresh table of the
    /// same size instead (one pass over the shard, as hashbrown's own rehash is; no key is
    /// hashed again, the fingerprint is the hash).
    fn insert(&mut self, slot: Slot) {
        let len = self.slots.len();
        if len == self.slots.capacity()
            && self.full >= REBUILD_FROM
            && len < self.full - self.full / 16
        {
            let mut fresh = HashTable::with_capacity(self.full);
            for s in self.slots.drain() {
                fresh.insert_unique(s.hash(), s, Slot::hash);
            }
            self.slots = fresh;
        }
        self.slots.insert_unique(slot.hash(), slot, Slot::hash);
        self.full = self.full.max(self.slots.capacity());
    }
}

/// Counter hashes by window end, for removal in the order their loss costs least.
#[derive(Default)]
struct Order {
    /// Window end (Unix seconds) -> hashes of the counters ending then, oldest first. No empty
    /// queue is kept.
    by_end: BTreeMap<u64, VecDeque<u64>>,
    /// Hashes in `by_end`.
    len: usize,
}

impl Order {
    fn push(&mut self, end: u64, hash: u64) {
        self.by_end.entry(end).or_default().push_back(hash);
        self.len += 1;
    }

    /// End of the first counter in removal order.
    fn first_end(&self) -> Option<u64> {
        self.by_end.first_key_value().map(|(end, _)| *end)
    }

    /// Takes the first counter in removal order: the earliest window end, oldest first.
    fn pop_first(&mut self) -> Option<(u64, u64)> {
        while let Some(mut first) = self.by_end.first_entry() {
            let end = *first.key();
            let hash = first.get_mut().pop_front();
            if first.get().is_empty() {
                first.remove();
            }
            if let Some(hash) = hash {
                self.len -= 1;
                return Some((end, hash));
            }
        }
        None
    }
}

/// How many shards a store of at most `max` counters gets on `cores` cores: at least four per
/// core, as dashmap sizes its own, so contention stays rare; and among the counts from there
/// to twice that, the one whose tables hold `max` counters in the fewest buckets in all.
/// hashbrown's tables have a power of two of buckets and double past 7/8 full, so with a
/// power of two of shards a store just past 7/8 of a power of two of buckets (a million
/// counters: 7/8 of 2^20 is 917,504) holds twice the buckets it needs; 10 shards of 2^17
/// buckets hold a million at 76%.
fn shard_count(max: usize, cores: usize) -> usize {
    let least = cores.max(1).saturating_mul(4);
    let (num, den) = LOAD_AT_MAX;
    let buckets = |n: usize| {
        let per_shard = max.div_ceil(n).saturating_mul(den).div_ceil(num);
        n.saturating_mul(per_shard.checked_next_power_of_two().unwrap_or(usize::MAX))
    };
    // The largest count among those with the fewest buckets: the least contention.
    (least..least.saturating_mul(2))
        .min_by_key(|&n| (buckets(n), std::cmp::Reverse(n)))
        .unwrap_or(least)
}

/// What the store shares between its clones and the sweeper.
struct Inner {
    /// Fingerprints of keys, which come from traffic: keyed, so they cannot be predicted.
    fingerprinter: Fingerprinter,
    /// See [`shard_count`] and [`MemoryStore::shard_index`].
    shards: Box<[Shard]>,
    /// A std Mutex, not a tokio one: held for a few collection operations, never across an
    /// await, and never while a shard lock is held.
    order: Mutex<Order>,
    /// `MEMORY_MAX_COUNTERS`.
    max: usize,
    /// Only for the sweeper and for telling drops from evictions, never for windows.
    clock: Arc<dyn Clock>,
    /// Live counters removed to make room, for tests (the metric is write-only).
    evictions: AtomicU64,
    /// `ratelimitd_memory_evictions_total`.
    evictions_metric: metrics::Counter,
    /// `ratelimitd_memory_counters`: entries in `order`, set under its lock so updates never
    /// arrive out of order.
    counters_metric: metrics::Gauge,
}

/// Counters in this process's memory.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStore {
    /// A store keeping at most `max` counters (plus the slack described in the module doc).
    pub fn new(clock: Arc<dyn Clock>, max: NonZeroUsize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let shards = shard_count(max.get(), cores);
        let counters_metric = metrics::gauge!(crate::metrics::MEMORY_COUNTERS);
        counters_metric.set(0.0);
        Self {
            inner: Arc::new(Inner {
                fingerprinter: Fingerprinter::random(),
                shards: (0..shards).map(|_| Shard::default()).collect(),
                order: Mutex::new(Order::default()),
                max: max.get(),
                clock,
                evictions: AtomicU64::new(0),
                evictions_metric: metrics::counter!(crate::metrics::MEMORY_EVICTIONS),
                counters_metric,
            }),
        }
    }

    /// Removes counters whose window ended at least [`GRACE_SECS`] ago and returns how many.
    /// Called every second by [`MemoryStore::spawn_sweeper`]; works in batches of
    /// `SWEEP_BATCH` so creations never wait long for the `order` lock.
    pub fn sweep(&self) -> usize {
        let now = self.inner.clock.now_unix();
        let mut removed = 0;
        let mut batch = Vec::with_capacity(SWEEP_BATCH);
        loop {
            {
                let mut order = lock(&self.inner.order);
                while batch.len() < SWEEP_BATCH
                    && order
                        .first_end()
                        .is_some_and(|end| end.saturating_add(GRACE_SECS) <= now)
                {
                    if let Some(entry) = order.pop_first() {
                        batch.push(entry);
                    }
                }
                self.inner.counters_metric.set(order.len as f64);
            }
            if batch.is_empty() {
                return removed;
            }
            let full = batch.len() == SWEEP_BATCH;
            let taken = batch.len();
            // A token bucket charged since it was ordered ends later: it goes back in order.
            let extended: Vec<(u64, u64)> = batch
                .drain(..)
                .filter_map(|(end, hash)| self.remove_ended(hash, end).map(|later| (later, hash)))
                .collect();
            removed += taken - extended.len();
            if !extended.is_empty() {
                let mut order = lock(&self.inner.order);
                for (later, hash) in extended {
                    order.push(later, hash);
                }
            }
            if !full {
                return removed;
            }
        }
    }

    /// Counters in the shards (for tests): at most `max` plus the slack of creations in
    /// flight.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(&s.0).slots.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live counters removed so far to make room for new ones.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// Sweeps every `every` until the returned handle is aborted or the runtime stops.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                store.sweep();
            }
        })
    }

    fn fingerprint(&self, key: &str) -> Fingerprint {
        self.inner.fingerprinter.of(key)
    }

    /// The shard of table hash `hash`: 32 bits the tables do not use to place keys (they take
    /// the low bits for the bucket and the top 7 as a tag), mapped onto the shard count by
    /// multiplication (any count, not only powers of two; see [`shard_count`]).
    fn shard_index(&self, hash: u64) -> usize {
        let bits = (hash >> 25) & u64::from(u32::MAX);
        ((bits * self.inner.shards.len() as u64) >> 32) as usize
    }

    fn shard(&self, hash: u64) -> &Mutex<Table> {
        &self
            .inner
            .shards
            .get(self.shard_index(hash))
            .expect("a 32-bit fraction of the shard count is below it")
            .0
    }

    /// Removes one counter with this table hash (see the module doc on shared hashes).
    fn remove(&self, hash: u64) {
        let mut table = lock(self.shard(hash));
        if let Ok(slot) = table.slots.find_entry(hash, |s| s.hash() == hash) {
            slot.remove();
        }
    }

    /// Removes the counter with this hash ordered to end at `end`, unless it now ends later
    /// (a charged token bucket): then returns when.
    fn remove_ended(&self, hash: u64, end: u64) -> Option<u64> {
        let mut table = lock(self.shard(hash));
        let slot = table.slots.find_entry(hash, |s| s.hash() == hash).ok()?;
        let expires = slot.get().expires();
        if expires > end {
            return Some(expires);
        }
        slot.remove();
        None
    }

    /// Puts a new counter in the removal order, first removing one when the store is full.
    /// Called with no shard lock held.
    fn track(&self, end: u64, hash: u64) {
        let victim = {
            let mut order = lock(&self.inner.order);
            let victim = if order.len >= self.inner.max {
                order.pop_first()
            } else {
                None
            };
            order.push(end, hash);
            self.inner.counters_metric.set(order.len as f64);
            victim
        };
        if let Some((victim_end, victim)) = victim {
            self.remove(victim);
            if victim_end > self.inner.clock.now_unix() {
                self.inner.evictions.fetch_add(1, Ordering::Relaxed);
                self.inner.evictions_metric.increment(1);
            }
        }
    }

    /// Decides `batch` under the locks of every shard its keys live in: see
    /// [`MemoryStore::decide_fingerprinted`].
    fn decide_locked(&self, batch: &Batch<'_>) -> DecidedList {
        let fps: SmallVec<[(Fingerprint, Option<Fingerprint>); INLINE_CHECKS]> = batch
            .checks
            .iter()
            .map(|c| {
                (
                    self.fingerprint(&c.key),
                    c.previous.as_deref().map(|p| self.fingerprint(p)),
                )
            })
            .collect();
        self.decide_fingerprinted(batch, &fps)
    }

    /// Decides `batch`, whose checks' keys (and previous windows' keys) have the fingerprints
    /// `fps`, under the locks of every shard they live in (taken in index order, so two
    /// requests never wait on each other in a cycle): the states are read, decided and the
    /// charged ones written with no other request in between on those keys.
    fn decide_fingerprinted(
        &self,
        batch: &Batch<'_>,
        fps: &[(Fingerprint, Option<Fingerprint>)],
    ) -> DecidedList {
        let shard_of = |fp: Fingerprint| self.shard_index(fp.hash());
        // Inline for the usual few checks, like `fps`, `guards` and `states`: a request's
        // lists cost no allocation here (bench/callgrind.sh).
        let mut wanted: SmallVec<[usize; 2 * INLINE_CHECKS]> = fps
            .iter()
            .flat_map(|(f, p)| std::iter::once(*f).chain(*p))
            .map(shard_of)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut guards: SmallVec<[(usize, MutexGuard<'_, Table>); INLINE_CHECKS]> = wanted
            .iter()
            .filter_map(|&i| Some((i, lock(&self.inner.shards.get(i)?.0))))
            .collect();
        let find = |guards: &[(usize, MutexGuard<'_, Table>)], fp: Fingerprint| {
            guards
                .iter()
                .find(|(i, _)| *i == shard_of(fp))
                .and_then(|(_, t)| t.find(fp))
                .map(|s| (s.value, s.remainder()))
        };
        let states: SmallVec<[State; INLINE_CHECKS]> = batch
            .checks
            .iter()
            .zip(fps)
            .map(|(c, (f, p))| {
                let (a, remainder) = find(&guards, *f).unwrap_or_default();
                let b = match (&c.previous, p) {
                    (Some(_), Some(p)) => find(&guards, *p).map_or(0, |(v, _)| v),
                    _ => remainder,
                };
                State { a, b }
            })
            .collect();
        let decided = engine::decide(batch, &states);
        let mut created = Vec::new();
        for ((c, (fp, _)), d) in batch.checks.iter().zip(fps).zip(&decided) {
            let Some(charge) = d.charge else { continue };
            // No jitter: it spreads Redis expiries; here it would only blur the eviction order.
            let slot = Slot::charged(*fp, c, charge, c.ends_ms(batch.now_ms, &charge));
            let Some((_, table)) = guards.iter_mut().find(|(i, _)| *i == shard_of(*fp)) else {
                continue;
            };
            if let Some(old) = table.slots.find_mut(fp.hash(), |s| s.fp == fp.0) {
                *old = slot;
                continue;
            }
            created.push((slot.expires(), fp.hash()));
            table.insert(slot);
        }
        // `order` is never taken while a shard lock is held.
        drop(guards);
        for (expires, hash) in created {
            self.track(expires, hash);
        }
        decided
    }
}

impl Store for MemoryStore {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        Ok(self.decide_locked(batch))
    }

    /// Without a timer: the answer is there at the first poll, so a timer would only cost
    /// (the runtime's handle taken and released, and tokio's time driver locked when the timer
    /// is dropped, armed or not).
    async fn decide_by(
        &self,
        batch: &Batch<'_>,
        _deadline: Option<Deadline>,
    ) -> Result<DecidedList, StoreError> {
        Ok(self.decide_locked(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{
        algorithm::{Algorithm, Quota},
        engine::Check,
        MAX_COUNT,
    };

    struct FakeClock(AtomicU64);
    impl Clock for FakeClock {
        fn now_unix(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn clock_at(now: u64) -> Arc<FakeClock> {
        Arc::new(FakeClock(AtomicU64::new(now)))
    }

    fn store(clock: Arc<FakeClock>, max: usize) -> MemoryStore {
        store_with(clock, max)
    }

    fn store_with(clock: Arc<dyn Clock>, max: usize) -> MemoryStore {
        MemoryStore::new(clock, NonZeroUsize::new(max).unwrap())
    }

    /// `cost` hits on the fixed window of `window` seconds that contains `now` (Unix seconds),
    /// keyed as the service keys it (`name_` + window start). Its limit is the largest count,
    /// so every hit is allowed and charged: the store works as a plain counter.
    fn hit(name: &str, cost: u64, window: u64, now: u64) -> Check {
        counter(&format!("{name}_{}", now / window * window), cost, window)
    }

    /// `cost` hits on the counter `key` of a fixed window of `window` seconds.
    fn counter(key: &str, cost: u64, window: u64) -> Check {
        Check {
            descriptor: 0,
            quota: Quota {
                algorithm: Algorithm::FixedWindow,
                limit: MAX_COUNT,
                window_ms: window * 1000,
                capacity: MAX_COUNT,
            },
            key: key.to_owned(),
            previous: None,
            cost,
            jitter_secs: 0,
            per_second: false,
        }
    }

    /// `checks` of one descriptor at `now` (Unix seconds), always charged.
    fn batch_at(checks: &[Check], now: u64) -> Batch<'_> {
        Batch::plain(checks, now * 1000)
    }

    /// Decides `checks` at `now` (Unix seconds) through [`Store::decide`] and returns the
    /// counts they bring their counters to.
    async fn count(s: &MemoryStore, checks: &[Check], now: u64) -> Vec<u64> {
        let decided = s.decide(&batch_at(checks, now)).await.unwrap();
        decided
            .iter()
            .map(|d| {
                assert!(d.verdict.allowed, "{d:?}");
                d.charge.expect("allowed, so charged").a
            })
            .collect()
    }

    async fn add(s: &MemoryStore, c: Check, now: u64) -> u64 {
        count(s, &[c], now).await[0]
    }

    /// A counter's value without touching it (a check of cost 0 would create it).
    fn value(s: &MemoryStore, key: &str) -> Option<u64> {
        let fp = s.fingerprint(key);
        lock(s.shard(fp.hash())).find(fp).map(|slot| slot.value)
    }

    #[tokio::test]
    async fn counts_adds_reads_and_sweeps_ended_windows_after_the_grace() {
        let clock = clock_at(1_000);
        let store = store(clock.clone(), 100);
        let got = count(
            &store,
            &[hit("a", 1, 60, 1_000), hit("b", 5, 1, 1_000)],
            1_000,
        )
        .await;
        assert_eq!(got, vec![1, 5]);
        assert_eq!(add(&store, hit("a", 0, 60, 1_000), 1_000).await, 1);
        assert_eq!(add(&store, hit("a", 2, 60, 1_000), 1_000).await, 3);
        assert_eq!(value(&store, "a_960"), Some(3));
        clock.0.store(1_001, Ordering::SeqCst);
        assert_eq!(store.sweep(), 0, "b's window (1000..1001) is in its grace");
        clock.0.store(1_002, Ordering::SeqCst);
        assert_eq!(store.sweep(), 1, "b is gone a second after its window");
        assert_eq!(store.len(), 1, "a's minute (960..1020) lives");
        assert_eq!(value(&store, "b_1000"), None);
        clock.0.store(1_020, Ordering::SeqCst);
        assert_eq!(
            store.sweep(),
            0,
            "a lives to the end of its minute plus the grace"
        );
        clock.0.store(1_021, Ordering::SeqCst);
        assert_eq!(store.sweep(), 1);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn a_request_computed_before_a_boundary_keeps_counting_its_window() {
        // The service read 1019 and named window 960 (960..1020); by the time the store
        // counts, the clock says 1020, the first second of the next window.
        let clock = clock_at(1_019);
        let store = store(clock.clone(), 100);
        for i in 1..=5 {
            assert_eq!(add(&store, hit("k", 1, 60, 1_019), 1_019).await, i);
        }
        clock.0.store(1_020, Ordering::SeqCst);
        assert_eq!(
            add(&store, hit("k", 1, 60, 1_019), 1_019).await,
            6,
            "window 960's counter goes on, it is not reset to 1"
        );
        assert_eq!(store.sweep(), 0, "and the sweeper keeps it for the grace");
        assert_eq!(add(&store, hit("k", 1, 60, 1_019), 1_019).await, 7);
        assert_eq!(
            add(&store, hit("k", 1, 60, 1_020), 1_020).await,
            1,
            "window 1020 has its own counter"
        );
    }

    #[tokio::test]
    async fn a_full_store_evicts_the_counters_whose_window_ends_first() {
        const N: u64 = 100;
        const K: u64 = 37;
        let clock = clock_at(1_000);
        let store = store(clock.clone(), N as usize);
        // N counters with distinct window ends 2000..2000+N, created in a shuffled order:
        // each a one-second window, counted in its last second.
        let end = |i: u64| 2_000 + (i * 53) % N;
        let at = |name: &str| counter(name, 1, 1);
        for i in 0..N {
            assert_eq!(add(&store, at(&format!("old{i}")), end(i) - 1).await, 1);
        }
        assert_eq!((store.len(), store.evictions()), (N as usize, 0));
        // K more, all ending after every existing one.
        for i in 0..K {
            assert_eq!(add(&store, at(&format!("new{i}")), 4_999 + i).await, 1);
        }
        assert_eq!(store.len(), N as usize, "never above the cap once settled");
        assert_eq!(store.evictions(), K, "one eviction per creation when full");
        // Exactly the K earliest ends (2000..2000+K) are gone; the others kept their value.
        for i in 0..N {
            let expected = (end(i) >= 2_000 + K).then_some(1);
            assert_eq!(
                value(&store, &format!("old{i}")),
                expected,
                "old{i} ends at {}",
                end(i)
            );
        }
        for i in 0..K {
            assert_eq!(value(&store, &format!("new{i}")), Some(1));
        }
    }

    #[tokio::test]
    async fn ended_windows_are_dropped_before_live_counters_are_evicted() {
        let clock = clock_at(1_000);
        let store = store(clock.clone(), 3);
        add(&store, hit("second", 1, 1, 1_000), 1_000).await; // ends 1001
        add(&store, hit("minute", 1, 60, 1_000), 1_000).await; // ends 1020
        add(&store, hit("day", 1, 86_400, 1_000), 1_000).await; // ends 86400
        clock.0.store(1_005, Ordering::SeqCst); // no sweep has run
        add(&store, hit("day2", 1, 86_400, 1_005), 1_005).await;
        assert_eq!(store.len(), 3);
        assert_eq!(
            store.evictions(),
            0,
            "the ended second was dropped, not evicted"
        );
        assert_eq!(
            value(&store, "second_1000"),
            None,
            "the ended second went first"
        );
        assert_eq!(value(&store, "minute_960"), Some(1));
        add(&store, hit("day3", 1, 86_400, 1_005), 1_005).await;
        assert_eq!(store.len(), 3);
        assert_eq!(store.evictions(), 1, "then the live minute, ending first");
        assert_eq!(value(&store, "minute_960"), None);
        assert_eq!(value(&store, "day_0"), Some(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_increments_are_exact() {
        let store = store_with(Arc::new(crate::limiter::SystemClock), 100);
        let now = crate::limiter::SystemClock.now_unix();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..500 {
                    seen.push(add(&s, hit("k", 1, 60, now), now).await);
                }
                seen
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        let expected: Vec<u64> = (1..=4_000).collect();
        assert_eq!(all, expected, "every increment saw a distinct value");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creations_settle_at_the_cap_with_exact_evictions() {
        const MAX: usize = 500;
        let store = store(clock_at(1_000), MAX);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..1_000 {
                    add(&s, hit(&format!("t{t}-{i}"), 1, 86_400, 1_000), 1_000).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.len(), MAX);
        assert_eq!(store.evictions(), 8_000 - MAX as u64);
    }

    /// Decides `checks` at `now` as if their keys had the fingerprints `fps`.
    async fn count_as(
        s: &MemoryStore,
        checks: &[Check],
        fps: &[(Fingerprint, Option<Fingerprint>)],
        now: u64,
    ) -> Vec<u64> {
        s.decide_fingerprinted(&batch_at(checks, now), fps)
            .iter()
            .map(|d| d.charge.expect("allowed, so charged").a)
            .collect()
    }

    #[tokio::test]
    async fn keys_share_a_counter_only_when_their_whole_fingerprints_are_equal() {
        let store = store(clock_at(1_000), 100);
        let (a, b) = (hit("a", 1, 60, 1_000), hit("b", 1, 60, 1_000));
        // The same table hash (so the same shard and bucket), different second words: two
        // counters.
        let fa = Fingerprint([0x1234_5678_9abc_def0, 1]);
        let fb = Fingerprint([0x1234_5678_9abc_def0, 2]);
        for i in 1..=3 {
            assert_eq!(
                count_as(&store, std::slice::from_ref(&a), &[(fa, None)], 1_000).await,
                [i]
            );
        }
        assert_eq!(
            count_as(&store, std::slice::from_ref(&b), &[(fb, None)], 1_000).await,
            [1]
        );
        assert_eq!(store.len(), 2);
        // A forced collision: a third key with `fa` is counted on `a`'s counter. This is what
        // a fingerprint collision would mean (see the module doc for how unlikely it is).
        let c = hit("c", 1, 60, 1_000);
        assert_eq!(count_as(&store, &[c], &[(fa, None)], 1_000).await, [4]);
        assert_eq!(store.len(), 2);
        // Both sharing a table hash, each is still swept once, at its own end.
        let store_clock = clock_at(1_000);
        let s2 = MemoryStore::new(store_clock.clone(), NonZeroUsize::new(100).unwrap());
        count_as(&s2, &[hit("a", 1, 1, 1_000)], &[(fa, None)], 1_000).await;
        count_as(&s2, &[hit("b", 1, 60, 1_000)], &[(fb, None)], 1_000).await;
        store_clock.0.store(1_002, Ordering::SeqCst);
        assert_eq!(s2.sweep(), 1);
        store_clock.0.store(1_021, Ordering::SeqCst);
        assert_eq!(s2.sweep(), 1);
        assert!(s2.is_empty());
    }

    #[test]
    fn a_table_held_full_by_removals_and_creations_keeps_its_size() {
        // 76% of 2^14 buckets, as the shards of a full store are (see `shard_count`), then
        // ten times as many creations, each after removing the oldest counter, as a full store
        // evicts.
        const N: usize = 12_450;
        let mut rng = fastrand::Rng::with_seed(14);
        let slot = |fp: [u64; 2]| Slot {
            fp,
            value: 1,
            tail: 0,
        };
        let mut table = Table::default();
        let mut live = VecDeque::new();
        for _ in 0..N {
            let fp = [rng.u64(..), rng.u64(..)];
            table.insert(slot(fp));
            live.push_back(fp);
        }
        let full = table.full;
        assert_eq!(full, 14_336, "7/8 of 2^14 buckets");
        for _ in 0..10 * N {
            let old = live.pop_front().unwrap();
            let Ok(entry) = table.slots.find_entry(old[0], |s| s.fp == old) else {
                panic!("{old:?} is live");
            };
            entry.remove();
            let fp = [rng.u64(..), rng.u64(..)];
            table.insert(slot(fp));
            live.push_back(fp);
        }
        assert_eq!(table.slots.len(), N);
        assert_eq!(table.full, full, "never grew");
        for fp in live {
            assert!(table.find(Fingerprint(fp)).is_some());
        }
    }

    #[test]
    fn fingerprints_are_keyed_per_store_and_stable_within_one() {
        let (one, two) = (store(clock_at(0), 1), store(clock_at(0), 1));
        assert_eq!(one.fingerprint("k_60"), one.fingerprint("k_60"));
        assert_ne!(one.fingerprint("k_60"), one.fingerprint("k_61"));
        assert_ne!(
            one.fingerprint("k_60"),
            two.fingerprint("k_60"),
            "each store draws its own secret"
        );
    }

    #[test]
    fn shards_hold_max_counters_below_hashbrowns_limit_in_the_fewest_buckets() {
        // 10 shards of 2^17 buckets for a million counters on 2 cores: 76% full, where 8 or
        // 16 shards (powers of two) would need 2^21 buckets in all, 48% full.
        assert_eq!(shard_count(1_000_000, 2), 10);
        for cores in [1, 2, 3, 4, 8, 64] {
            for max in [
                1, 100, 1_000, 65_536, 100_000, 917_504, 1_000_000, 10_000_000,
            ] {
                let n = shard_count(max, cores);
                assert!((cores * 4..cores * 8).contains(&n), "{max} on {cores}: {n}");
                let per_shard = max.div_ceil(n);
                let buckets = (per_shard * 5).div_ceil(4).next_power_of_two();
                if max >= 1_000 {
                    assert!(per_shard * 8 <= buckets * 7, "{max} on {cores}: {n}");
                    // Never worse than the best power-of-two count from `cores * 4` up.
                    let pow2 = (cores * 4).next_power_of_two();
                    let pow2_buckets =
                        pow2 * (max.div_ceil(pow2) * 5).div_ceil(4).next_power_of_two();
                    assert!(n * buckets <= pow2_buckets, "{max} on {cores}: {n}");
                }
            }
        }
        assert!((8..16).contains(&shard_count(usize::MAX, 2)), "no overflow");
    }

    #[test]
    fn every_table_hash_maps_to_a_shard() {
        let s = store(clock_at(0), 1_000_000);
        let n = s.inner.shards.len();
        for hash in [0, u64::MAX, 1 << 25, u64::MAX >> 7, 0xdead_beef_dead_beef] {
            assert!(s.shard_index(hash) < n);
        }
        let mut seen = vec![0_usize; n];
        for i in 0..10_000 {
            seen[s.shard_index(s.fingerprint(&format!("k{i}")).hash())] += 1;
        }
        assert!(seen.iter().all(|&c| c > 0), "{seen:?}");
    }

    #[tokio::test]
    async fn an_end_past_32_bits_of_seconds_is_kept_exactly() {
        // A 200-year window from 1970 ends in 2170.
        let long = 200 * 365 * 86_400;
        let clock = clock_at(1_000);
        let store = store(clock.clone(), 100);
        assert_eq!(add(&store, hit("long", 2, long, 1_000), 1_000).await, 2);
        clock.0.store(long, Ordering::SeqCst);
        assert_eq!(store.sweep(), 0, "its last second");
        assert_eq!(add(&store, hit("long", 3, long, 1_000), 1_000).await, 5);
        clock.0.store(long + GRACE_SECS, Ordering::SeqCst);
        assert_eq!(store.sweep(), 1, "gone after the grace");
    }

    mod engine {
        use super::*;
        use crate::limiter::Unit;

        const NOW_S: u64 = 1_700_000_040;

        fn check(key: &str, algorithm: Algorithm, limit: u32, burst: Option<u32>) -> Check {
            Check {
                descriptor: 0,
                quota: Quota::new(algorithm, limit, Unit::Minute, 1, burst),
                key: key.to_owned(),
                previous: None,
                cost: 1,
                jitter_secs: 0,
                per_second: false,
            }
        }

        fn run(store: &MemoryStore, checks: &[Check], now_ms: u64) -> DecidedList {
            store.decide_locked(&Batch::plain(checks, now_ms))
        }

        #[test]
        fn a_token_bucket_keeps_its_state_and_outlives_its_first_expiry() {
            let clock = clock_at(NOW_S);
            let store = MemoryStore::new(clock.clone(), NonZeroUsize::MIN.saturating_add(99));
            let tb = [check("tb", Algorithm::TokenBucket, 3, Some(2))];
            let now = NOW_S * 1000;
            let allowed: Vec<bool> = (0..3)
                .map(|_| run(&store, &tb, now)[0].verdict.allowed)
                .collect();
            assert_eq!(allowed, [true, true, false]);
            // Charged again 30 s later (one token back after 20 s): the bucket ends later than
            // first ordered, so the sweeper at its first end keeps it.
            let d = run(&store, &tb, now + 30_000);
            assert!(d[0].verdict.allowed);
            assert_eq!(d[0].verdict.remaining, 0);
            clock.0.store(NOW_S + 41 + GRACE_SECS, Ordering::SeqCst);
            assert_eq!(store.sweep(), 0);
            assert_eq!(store.len(), 1);
            // Full again 40 s after the last charge (+ 1 s of grace): gone.
            clock.0.store(NOW_S + 71 + GRACE_SECS, Ordering::SeqCst);
            assert_eq!(store.sweep(), 1);
            assert!(store.is_empty());
        }

        #[test]
        fn a_sliding_window_reads_the_previous_window_and_writes_the_current_one() {
            let store = MemoryStore::new(clock_at(NOW_S), NonZeroUsize::MIN.saturating_add(99));
            let now = NOW_S * 1000;
            let prev = check("w0", Algorithm::SlidingWindow, 4, None);
            for _ in 0..4 {
                assert!(
                    run(&store, std::slice::from_ref(&prev), now)[0]
                        .verdict
                        .allowed
                );
            }
            // Half-way through the next window, 2 of the 4 still count.
            let mut cur = check("w1", Algorithm::SlidingWindow, 4, None);
            cur.previous = Some("w0".to_owned());
            let at = now + 90_000;
            let got: Vec<(bool, u64)> = (0..3)
                .map(|_| {
                    let d = run(&store, std::slice::from_ref(&cur), at)[0];
                    (d.verdict.allowed, d.verdict.remaining)
                })
                .collect();
            assert_eq!(got, [(true, 1), (true, 0), (false, 0)]);
        }

        #[test]
        fn concurrent_requests_on_shared_keys_are_decided_one_at_a_time() {
            let store = MemoryStore::new(clock_at(NOW_S), NonZeroUsize::MIN.saturating_add(99));
            let now = NOW_S * 1000;
            // Two keys per request, in both orders across threads: no deadlock, exact counts.
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        let bucket = check("bucket", Algorithm::TokenBucket, 100, None);
                        let window = check("window", Algorithm::FixedWindow, 1000, None);
                        let (checks, at) = if t % 2 == 0 {
                            ([bucket, window], 0)
                        } else {
                            ([window, bucket], 1)
                        };
                        (0..50)
                            .filter(|_| run(&store, &checks, now)[at].verdict.allowed)
                            .count()
                    })
                })
                .collect();
            let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            assert_eq!(allowed, 100, "exactly the bucket's capacity");
        }
    }
}
