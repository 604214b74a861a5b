//! `RUNTIME_FLAVOR=per_core`: one single-threaded tokio runtime per core, each serving the
//! gRPC connections handed to it.
//!
//! Why: under tokio's work-stealing runtime a call's tasks (the HTTP/2 connection, redis-rs's
//! connection driver) wake each other across threads; on Redis a call took about 30% less CPU
//! on a single-threaded runtime (docs/benchmarks.md). Here a connection stays on one thread
//! for its life, and with `REDIS_TYPE=single` each thread uses its own Redis connection, so
//! those wake-ups stay on one thread.
//!
//! The thread that runs `serve` is runtime 0 and serves no calls: it runs the acceptor, the
//! admin listeners, reloads and exporters, so a metrics scrape or a reload never delays a
//! call. [`Workers`] are runtimes 1 to N. The acceptor hands each new connection, round robin,
//! to a worker; a tokio socket belongs to the reactor it was registered with, so a connection
//! crosses as a std socket and is registered again where it will live.

use std::{cell::Cell, io, thread::JoinHandle};

use tokio::{runtime::Handle, sync::oneshot};

thread_local! {
    /// This thread's runtime number under `per_core`; `None` on every other thread.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The per-core runtime this thread runs, if any (stores pick their connection by it).
pub fn index() -> Option<usize> {
    INDEX.get()
}

/// Marks this thread as running per-core runtime `i`.
pub fn enter(i: usize) {
    INDEX.set(Some(i));
}

/// How many runtimes serve calls under `per_core`: `WORKER_THREADS`, or one per CPU the
/// process may use.
pub fn count(worker_threads: usize) -> usize {
    if worker_threads > 0 {
        worker_threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The runtimes of `per_core` that serve calls, each on a thread of its own; dropping stops
/// them (their tasks are dropped) and joins the threads.
pub struct Workers {
    threads: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts runtimes `1..=n`.
    pub fn start(n: usize) -> io::Result<Self> {
        let mut workers = Self {
            threads: Vec::with_capacity(n),
        };
        for i in 1..=n {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("ratelimitd-rt-{i}"))
                .spawn(move || {
                    enter(i);
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let _ = handle_tx.send(Ok(rt.handle().clone()));
                            // A dropped sender (Workers dropped) stops the runtime too.
                            let _ = rt.block_on(stopped);
                        }
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                        }
                    }
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("a runtime thread ended while starting"))??;
            workers.threads.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(workers)
    }

    /// The runtimes' handles, in order (runtime 1 first).
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.threads.iter().map(|w| &w.handle)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.threads {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.threads {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_knows_its_index_and_stops_on_drop() {
        let workers = Workers::start(2).unwrap();
        let seen: Vec<_> = workers
            .handles()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    tx.send((index(), std::thread::current().name().map(str::to_owned)))
                        .unwrap();
                });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (Some(1), Some("ratelimitd-rt-1".to_owned())),
                (Some(2), Some("ratelimitd-rt-2".to_owned())),
            ]
        );
        assert_eq!(index(), None, "the test's own thread is no runtime");
        let handle = workers.handles().next().unwrap().clone();
        drop(workers);
        // A stopped runtime's tasks are dropped: the JoinHandle reports cancellation.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let join = handle.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        assert!(rx.recv().is_err(), "the task was dropped with its runtime");
        drop(join);
    }

    #[test]
    fn count_is_worker_threads_or_the_cpus() {
        assert_eq!(count(3), 3);
        assert!(count(0) >= 1);
    }
}
