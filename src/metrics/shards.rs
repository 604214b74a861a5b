//! Per-thread slots for the metrics every call updates, folded into the recorder's handles
//! when they are read: at each `/metrics` render, before each StatsD flush and at the
//! exporter's upkeep tick ([`fold_all`]).
//!
//! Why: a metric handle is one set of atomics shared by every core. Each call raised and
//! lowered two in-flight gauges (a compare-and-swap loop each way), counted a total and
//! pushed two latency samples into the exporter's lock-free buckets (with an epoch pin each),
//! so under load those cache lines moved between cores on every call. Here a thread updates
//! its own slot, a cache line no other thread writes, and a reader sums or drains the slots;
//! the figures a scrape sees are exact, because the scrape folds first
//! (docs/benchmarks.md, "Per-call metrics in per-thread slots").

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
};

/// Slots per [`Shards`]. Threads beyond this many share slots (still exact: every update is
/// atomic), which costs only the sharing this module avoids.
pub const SLOTS: usize = 64;
const _: () = assert!(SLOTS.is_power_of_two());

/// One `T` per thread (up to [`SLOTS`] threads), each on cache lines of its own.
pub struct Shards<T> {
    slots: Box<[Padded<T>]>,
}

/// Two 64-byte lines: adjacent-line prefetching pairs lines, so one would still be shared.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> Shards<T> {
    /// This thread's slot.
    pub fn local(&self) -> &T {
        // `slots` has SLOTS entries and `thread_slot` is below SLOTS.
        &self.slots[thread_slot()].0
    }

    /// Every slot, for a reader.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|p| &p.0)
    }
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// No slot taken yet.
const UNSET: usize = usize::MAX;

thread_local! {
    /// This thread's slot index, [`UNSET`] until it first counts. Const-initialised: an
    /// access is a plain load, with no lazy-initialisation state to check.
    static THREAD_SLOT: Cell<usize> = const { Cell::new(UNSET) };
}

/// The calling thread's slot index, below [`SLOTS`]. Threads take slots in the order they
/// first count: the per-core runtimes, started together, get slots of their own.
fn thread_slot() -> usize {
    THREAD_SLOT.with(|slot| match slot.get() {
        UNSET => {
            // SLOTS is a power of two: the remainder is a mask.
            let i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            slot.set(i);
            i
        }
        i => i,
    })
}

/// Something holding per-thread slots that it folds into the recorder's handles.
pub trait Fold: Send + Sync {
    /// Moves what the slots hold into the handles (counts added, gauges set, samples
    /// recorded). Called from any thread, possibly from two at once.
    fn fold(&self);
}

/// Everything registered with [`register`] that is still alive.
static FOLDS: Mutex<Vec<Weak<dyn Fold>>> = Mutex::new(Vec::new());

/// Folds `fold` at every [`fold_all`] while it lives.
pub fn register(fold: Weak<dyn Fold>) {
    let mut folds = lock(&FOLDS);
    folds.retain(|f| f.strong_count() > 0);
    folds.push(fold);
}

/// Folds every live registration: before anything reads the recorder.
pub fn fold_all() {
    // Upgraded under the lock, folded outside it: a fold records into the recorder, which
    // must not wait on this list.
    let live: Vec<Arc<dyn Fold>> = lock(&FOLDS).iter().filter_map(Weak::upgrade).collect();
    for f in live {
        f.fold();
    }
}

/// Latency samples of one thread, waiting for a fold.
#[derive(Default)]
pub struct Samples(Mutex<Vec<f64>>);

impl Samples {
    /// Samples a slot holds before the thread recording them folds them itself, so a
    /// service nobody scrapes holds at most this many per slot. The call that reaches it
    /// waits while they are recorded (about 160 instructions each in the exporter, so some
    /// 10,000 here: a few µs on one call in 64), and the exporter's shared lines move once
    /// per batch rather than once per call.
    pub const CAP: usize = 64;

    /// Adds `value`; at [`Samples::CAP`] waiting, records them all into `into`.
    pub fn push(&self, value: f64, into: &metrics::Histogram) {
        let mut waiting = lock(&self.0);
        waiting.push(value);
        if waiting.len() >= Self::CAP {
            drain_into(&mut waiting, into);
        }
    }

    /// Records every waiting sample into `into`.
    pub fn fold(&self, into: &metrics::Histogram) {
        drain_into(&mut lock(&self.0), into);
    }
}

fn drain_into(waiting: &mut Vec<f64>, into: &metrics::Histogram) {
    for v in waiting.drain(..) {
        into.record(v);
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn counts_from_several_threads_spread_over_slots_and_sum_exactly() {
        let shards = Arc::new(Shards::<AtomicU64>::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let shards = shards.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        shards.local().fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = shards.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 8000);
        let used = shards
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) > 0)
            .count();
        // Eight threads in a row take eight slots, unless 57 other threads of this test
        // process took slots in between: assert only that they did not all share one.
        assert!(used > 1, "the threads did not all count in one slot");
    }

    #[test]
    fn slots_sit_on_lines_of_their_own() {
        let shards = Shards::<AtomicU64>::default();
        let addrs: Vec<usize> = shards
            .iter()
            .map(|s| std::ptr::from_ref(s) as usize)
            .collect();
        assert_eq!(addrs.len(), SLOTS);
        assert!(addrs.windows(2).all(|w| w[1] - w[0] == 128));
    }

    /// Counts its folds into a count that outlives it.
    struct Counted(Arc<AtomicU64>);

    impl Fold for Counted {
        fn fold(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn fold_all_reaches_the_live_registrations_only() {
        let (live_folds, gone_folds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let live: Arc<dyn Fold> = Arc::new(Counted(live_folds.clone()));
        let gone: Arc<dyn Fold> = Arc::new(Counted(gone_folds.clone()));
        register(Arc::downgrade(&live));
        register(Arc::downgrade(&gone));
        drop(gone);
        fold_all();
        // Other tests may fold too, in parallel: at least ours.
        assert!(live_folds.load(Ordering::Relaxed) >= 1);
        assert_eq!(gone_folds.load(Ordering::Relaxed), 0);
    }
}
