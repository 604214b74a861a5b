//! In-memory counters for a single instance, bounded by `MEMORY_MAX_COUNTERS`.
//!
//! Two structures:
//! - `shards`: the keys' states (a window's count, a bucket's TAT and remainder) in hash
//!   tables, each behind its own lock, chosen by the key's hash. A request takes the locks of
//!   every shard its checks' keys live in (in index order, so requests never wait on each
//!   other in a cycle), reads the states, decides with [`engine::decide`] and writes the
//!   charged states before letting go (a few instructions, never across an await): requests
//!   on one key are decided one at a time, so counts are exact under concurrency, and
//!   charging an existing key allocates nothing.
//! - `order`: the key hash of every counter, sorted by when it ends and then by creation,
//!   behind one lock. Only creating or removing a counter takes it, for O(log w) work with w
//!   distinct ends (a handful per rule), never a scan.
//!
//! `order` holds 8-byte hashes rather than a second copy of each key; removing by hash takes
//! any counter with that hash from its shard. Two live keys sharing a 64-bit hash (about one
//! chance in 10^7 with a million counters) may swap the moment they are removed, nothing
//! worse: each `order` entry stands for exactly one counter with its hash, so the count stays
//! exact.
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
//! measured about 240 bytes per counter in the server, this layout about 160; see
//! docs/benchmarks.md); `moka` evicts by frequency and recency, not by window end, and needs a
//! compute closure per increment.

use std::{
    collections::{BTreeMap, VecDeque},
    hash::BuildHasher,
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use hashbrown::HashTable;

use super::{Store, StoreError};
use crate::limiter::{
    algorithm::State,
    engine::{self, Batch, Decided},
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

/// Locks `m`. Every critical section here only moves values between collections and cannot
/// panic half-way through in a way that breaks an invariant the next holder relies on, so a
/// poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One counter (or a token bucket's TAT, with its remainder in `extra`).
struct Slot {
    key: Box<str>,
    value: u64,
    extra: u64,
    /// When it may go (Unix seconds): its window's end, or when its bucket is full again.
    /// A bucket's grows as it is charged; the sweeper then keeps it (see [`MemoryStore::sweep`]).
    expires: u64,
}

/// One shard of the counters, on its own cache lines so shards do not share them.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<HashTable<Slot>>);

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

/// What the store shares between its clones and the sweeper.
struct Inner {
    /// Keyed SipHash: keys come from traffic, so their hashes must not be predictable.
    hasher: std::collections::hash_map::RandomState,
    /// A power of two of them; see [`MemoryStore::shard`].
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
        // Four shards per core, as dashmap sizes its own: contention stays rare.
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let shards = (cores * 4).next_power_of_two();
        let counters_metric = metrics::gauge!(crate::metrics::MEMORY_COUNTERS);
        counters_metric.set(0.0);
        Self {
            inner: Arc::new(Inner {
                hasher: Default::default(),
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
        self.inner.shards.iter().map(|s| lock(&s.0).len()).sum()
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

    fn hash(&self, key: &str) -> u64 {
        self.inner.hasher.hash_one(key)
    }

    /// The shard of `hash`, from bits the tables do not use to place keys (they take the low
    /// bits for the bucket and the top 7 as a tag).
    fn shard(&self, hash: u64) -> &Mutex<HashTable<Slot>> {
        let index = (hash >> 32) as usize & (self.inner.shards.len() - 1);
        &self
            .inner
            .shards
            .get(index)
            .expect("masked by the shard count, a power of two")
            .0
    }

    /// Removes one counter with this key hash (see the module doc on shared hashes).
    fn remove(&self, hash: u64) {
        let mut table = lock(self.shard(hash));
        if let Ok(slot) = table.find_entry(hash, |s| self.hash(&s.key) == hash) {
            slot.remove();
        }
    }

    /// Removes the counter with this hash ordered to end at `end`, unless it now ends later
    /// (a charged token bucket): then returns when.
    fn remove_ended(&self, hash: u64, end: u64) -> Option<u64> {
        let mut table = lock(self.shard(hash));
        let slot = table.find_entry(hash, |s| self.hash(&s.key) == hash).ok()?;
        let expires = slot.get().expires;
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

    /// Decides `batch` under the locks of every shard its keys live in (taken in index order,
    /// so two requests never wait on each other in a cycle): the states are read, decided and
    /// the charged ones written with no other request in between on those keys.
    fn decide_locked(&self, batch: &Batch<'_>) -> Vec<Decided> {
        let hashes: Vec<(u64, Option<u64>)> = batch
            .checks
            .iter()
            .map(|c| {
                (
                    self.hash(&c.key),
                    c.previous.as_deref().map(|p| self.hash(p)),
                )
            })
            .collect();
        let mask = self.inner.shards.len() - 1;
        let shard_of = |hash: u64| (hash >> 32) as usize & mask;
        let mut wanted: Vec<usize> = hashes
            .iter()
            .flat_map(|(h, p)| std::iter::once(*h).chain(*p))
            .map(shard_of)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, HashTable<Slot>>)> = wanted
            .iter()
            .filter_map(|&i| Some((i, lock(&self.inner.shards.get(i)?.0))))
            .collect();
        let find = |guards: &[(usize, MutexGuard<'_, HashTable<Slot>>)], hash: u64, key: &str| {
            guards
                .iter()
                .find(|(i, _)| *i == shard_of(hash))
                .and_then(|(_, t)| t.find(hash, |s| *s.key == *key))
                .map(|s| (s.value, s.extra))
        };
        let states: Vec<State> = batch
            .checks
            .iter()
            .zip(&hashes)
            .map(|(c, (h, p))| {
                let (a, extra) = find(&guards, *h, &c.key).unwrap_or_default();
                let b = match (&c.previous, p) {
                    (Some(prev), Some(p)) => find(&guards, *p, prev).map_or(0, |(v, _)| v),
                    _ => extra,
                };
                State { a, b }
            })
            .collect();
        let decided = engine::decide(batch, &states);
        let mut created = Vec::new();
        for ((c, (hash, _)), d) in batch.checks.iter().zip(&hashes).zip(&decided) {
            let Some(charge) = d.charge else { continue };
            // No jitter: it spreads Redis expiries; here it would only blur the eviction order.
            let expires = c.ends_ms(batch.now_ms, &charge).div_ceil(1000);
            let extra = if c.previous.is_some() { 0 } else { charge.b };
            let Some((_, table)) = guards.iter_mut().find(|(i, _)| *i == shard_of(*hash)) else {
                continue;
            };
            if let Some(slot) = table.find_mut(*hash, |s| *s.key == *c.key) {
                slot.value = charge.a;
                slot.extra = extra;
                slot.expires = expires;
                continue;
            }
            table.insert_unique(
                *hash,
                Slot {
                    key: c.key.as_str().into(),
                    value: charge.a,
                    extra,
                    expires,
                },
                |s| self.hash(&s.key),
            );
            created.push((expires, *hash));
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
    async fn decide(&self, batch: &Batch<'_>) -> Result<Vec<Decided>, StoreError> {
        Ok(self.decide_locked(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{
        algorithm::{Algorithm, Quota},
        engine::{Charging, Check, Role},
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

    /// Decides `checks` at `now` (Unix seconds) through [`Store::decide`] and returns the
    /// counts they bring their counters to.
    async fn count(s: &MemoryStore, checks: &[Check], now: u64) -> Vec<u64> {
        let batch = Batch {
            checks,
            roles: &[Role::default()],
            quota_total: 0,
            charging: Charging::Always,
            never_refuse: false,
            now_ms: now * 1000,
        };
        let decided = s.decide(&batch).await.unwrap();
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
        let hash = s.hash(key);
        lock(s.shard(hash))
            .find(hash, |slot| &*slot.key == key)
            .map(|slot| slot.value)
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

        fn run(store: &MemoryStore, checks: &[Check], now_ms: u64) -> Vec<Decided> {
            let roles = [Role::default()];
            store.decide_locked(&Batch {
                checks,
                roles: &roles,
                quota_total: 0,
                charging: Charging::Always,
                never_refuse: false,
                now_ms,
            })
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
