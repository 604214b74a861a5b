//! In-memory counters for a single instance: a sharded concurrent map, exact under
//! concurrency (each increment holds its shard's lock for a few instructions, never across an
//! await), with expired windows swept away so memory follows the number of live keys.

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;

use super::{Hit, Store, StoreError};
use crate::limiter::Clock;

#[derive(Debug, Clone, Copy)]
struct Counter {
    value: u64,
    /// Unix second after which the counter is gone.
    expires_at: u64,
}

/// Counters in this process's memory.
#[derive(Clone)]
pub struct MemoryStore {
    counters: Arc<DashMap<String, Counter>>,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            counters: Arc::new(DashMap::new()),
            clock,
        }
    }

    /// Removes expired counters. Called periodically by [`MemoryStore::spawn_sweeper`].
    pub fn sweep(&self) {
        let now = self.clock.now_unix();
        self.counters.retain(|_, c| c.expires_at > now);
    }

    /// Number of live counters (for tests and metrics).
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
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

    fn add(&self, hit: &Hit, now: u64) -> u64 {
        // Reclaimed when its window ends: no later request names this key again, and no
        // jitter is needed with no shared server to spare from an expiry storm.
        let window = hit.window_secs.max(1);
        let expires_at = now.saturating_add(window - now % window);
        // Look up by reference first so a hit on a live counter allocates nothing; only a new
        // counter copies its key.
        let mut c = match self.counters.get_mut(hit.key.as_str()) {
            Some(c) => c,
            None => self.counters.entry(hit.key.clone()).or_insert(Counter {
                value: 0,
                expires_at,
            }),
        };
        if c.expires_at <= now {
            // Expired but not swept yet: a fresh counter, as Redis would have it.
            c.value = 0;
        }
        c.value = c.value.saturating_add(hit.hits).min(super::MAX_COUNT);
        c.expires_at = expires_at;
        c.value
    }
}

impl Store for MemoryStore {
    async fn increment(&self, hits: &[Hit]) -> Result<Vec<u64>, StoreError> {
        let now = self.clock.now_unix();
        Ok(hits.iter().map(|h| self.add(h, now)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeClock(AtomicU64);
    impl Clock for FakeClock {
        fn now_unix(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn hit(key: &str, hits: u64, window: u64) -> Hit {
        Hit {
            key: key.into(),
            hits,
            window_secs: window,
            ttl_secs: window + 300,
        }
    }

    #[tokio::test]
    async fn counts_adds_reads_and_expires() {
        let clock = Arc::new(FakeClock(AtomicU64::new(1_000)));
        let store = MemoryStore::new(clock.clone());
        let got = store
            .increment(&[hit("a", 1, 60), hit("b", 5, 1)])
            .await
            .unwrap();
        assert_eq!(got, vec![1, 5]);
        assert_eq!(store.increment(&[hit("a", 0, 60)]).await.unwrap(), vec![1]);
        assert_eq!(store.increment(&[hit("a", 2, 60)]).await.unwrap(), vec![3]);
        clock.0.store(1_001, Ordering::SeqCst);
        store.sweep();
        assert_eq!(
            store.len(),
            1,
            "b's 1 s window ended, a's minute (960..1020) lives"
        );
        assert_eq!(store.increment(&[hit("b", 1, 1)]).await.unwrap(), vec![1]);
        clock.0.store(1_019, Ordering::SeqCst);
        store.sweep();
        assert_eq!(
            store.len(),
            1,
            "a lives to the end of its minute, jitter ignored"
        );
        clock.0.store(1_020, Ordering::SeqCst);
        store.sweep();
        assert!(store.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_increments_are_exact() {
        let store = MemoryStore::new(Arc::new(crate::limiter::SystemClock));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..500 {
                    seen.push(s.increment(&[hit("k", 1, 60)]).await.unwrap()[0]);
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
}
