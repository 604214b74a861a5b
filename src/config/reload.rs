//! Hot reload: read, validate and swap in the whole rule tree, on demand (SIGHUP) or when
//! [`super::watch`] reports a change.
//!
//! Operators change limits without restarting (and without losing counters). A reload reads
//! every file once into a [`Snapshot`], hashes those bytes and, when the hash differs from the
//! config in force, compiles the same bytes into a complete new tree and publishes it with one
//! [`ArcSwap::store`], so a request sees either the old tree or the new one, never a mix. An
//! invalid config is reported and the last good tree stays in force. Counter keys depend only
//! on the rule and the request, so counters carry over.
//!
//! Why a separate module: this is the part with a contract (generation, content hash,
//! [`ReloadOutcome`], one attempt at a time); *when* to reload is `watch`'s business.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use super::{
    load::Snapshot,
    watch::{self, FALLBACK_INTERVAL},
    ConfigErrors, ConfigSource, RuleTree,
};

/// Outcome of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new, valid config was swapped in.
    Loaded {
        generation: u64,
        hash: u64,
        domains: usize,
        rules: usize,
    },
    /// The files match the config in force (same content hash): nothing swapped. After a
    /// failed attempt this means the files were put back; the config in force is theirs.
    Unchanged { generation: u64, hash: u64 },
    /// The new files are invalid; the previous config stays in force.
    Failed(ConfigErrors),
    /// The watcher found the very files the last attempt rejected (one write can raise
    /// several events, and on a loaded machine they straddle a reload): not a new failure, so
    /// neither counted nor logged again. A manual reload of them fails again as `Failed`.
    StillInvalid { hash: u64 },
}

/// Reloads the rules at `source` into `rules`, on demand or when the files change.
pub struct Reloader {
    source: ConfigSource,
    rules: Arc<ArcSwap<RuleTree>>,
    observer: Arc<dyn Fn(&ReloadOutcome) + Send + Sync>,
    generation: AtomicU64,
    hash: AtomicU64,
    /// Held for a whole load-and-swap so two reloads never interleave; the content hash of
    /// the files the last attempt rejected, if it failed.
    reloading: Mutex<Option<u64>>,
    /// Asks the watch task to rebuild its watches after a reload it did not run itself.
    rewatch: tokio::sync::Notify,
}

impl Reloader {
    /// `rules` already holds the config loaded at start-up (generation 1, whose hash is
    /// computed here). `observer` is called after every attempt, in order, while no other
    /// attempt runs; it must not call [`Reloader::reload_now`].
    pub fn new(
        source: ConfigSource,
        rules: Arc<ArcSwap<RuleTree>>,
        observer: Arc<dyn Fn(&ReloadOutcome) + Send + Sync>,
    ) -> Arc<Self> {
        let hash = super::content_hash(&source);
        Self::with_hash(source, rules, observer, hash)
    }

    /// Like [`Reloader::new`], with the content hash of the bytes the start-up tree was built
    /// from ([`super::load_hashed`]), so a change that lands after the start-up load is never
    /// mistaken for the config in force.
    pub fn with_hash(
        source: ConfigSource,
        rules: Arc<ArcSwap<RuleTree>>,
        observer: Arc<dyn Fn(&ReloadOutcome) + Send + Sync>,
        hash: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            rules,
            observer,
            generation: AtomicU64::new(1),
            hash: AtomicU64::new(hash),
            reloading: Mutex::new(None),
            rewatch: tokio::sync::Notify::new(),
        })
    }

    /// Generation of the config in force: 1 at start-up, +1 per [`ReloadOutcome::Loaded`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Content hash of the config in force.
    pub fn hash(&self) -> u64 {
        self.hash.load(Ordering::Acquire)
    }

    /// Where the config is read from.
    pub(super) fn source(&self) -> &ConfigSource {
        &self.source
    }

    /// Resolves when a reload not started by the watch task (SIGHUP, a direct call) asks it
    /// to rebuild its watches.
    pub(super) async fn rewatch_requested(&self) {
        self.rewatch.notified().await;
    }

    /// Loads, validates and swaps now (SIGHUP calls this). Blocking file I/O: from async
    /// code, call it through `spawn_blocking`.
    pub fn reload_now(&self) -> ReloadOutcome {
        self.reload(true)
    }

    /// A reload asked for by the watch task: quiet in the log when nothing changed.
    pub(super) fn reload_on_change(&self) -> ReloadOutcome {
        self.reload(false)
    }

    /// `manual`: SIGHUP or a direct call, always answered in the log; otherwise a file-system
    /// event or the fingerprint check, quiet when nothing changed.
    fn reload(&self, manual: bool) -> ReloadOutcome {
        let mut rejected = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (outcome, hash) = self.attempt((!manual).then_some(*rejected).flatten());
        self.log(&outcome, manual, rejected.is_some());
        *rejected = match &outcome {
            ReloadOutcome::Failed(_) | ReloadOutcome::StillInvalid { .. } => Some(hash),
            ReloadOutcome::Loaded { .. } | ReloadOutcome::Unchanged { .. } => None,
        };
        (self.observer)(&outcome);
        if manual {
            self.rewatch.notify_one();
        }
        outcome
    }

    /// One load-and-swap; the caller holds `reloading`. Each file is read once: the hash and
    /// the tree come from the same bytes, so the hash kept always describes the tree kept.
    /// Files may still change while they are read (file A read before an edit, file B after
    /// it); such a mix is a valid config of its own, and the write that made it fires an
    /// event (or changes the fingerprint) after its file was read, so another attempt follows
    /// and loads the finished set.
    ///
    /// No `catch_unwind`: YAML is depth-checked before it is parsed (`depth.rs`), and the
    /// parser and our walk of its tree are fuzzed (`raw.rs`, `depth.rs` tests) without a
    /// panic found. Were one to happen anyway, it ends the blocking task that ran this
    /// (logged there as a failed reload task), `reloading`'s poison is ignored, and the
    /// config in force stays.
    ///
    /// `rejected`: the hash of files a failed attempt already reported, for a watch-triggered
    /// reload; the same files again are [`ReloadOutcome::StillInvalid`]. Returns the
    /// outcome and the content hash of the files read.
    fn attempt(&self, rejected: Option<u64>) -> (ReloadOutcome, u64) {
        let snapshot = Snapshot::read(&self.source);
        let hash = snapshot.content_hash(&self.source);
        if hash == self.hash() {
            let generation = self.generation();
            return (ReloadOutcome::Unchanged { generation, hash }, hash);
        }
        if rejected == Some(hash) {
            return (ReloadOutcome::StillInvalid { hash }, hash);
        }
        let outcome = match snapshot.compile(&self.source) {
            Ok(tree) => {
                let (domains, rules) = (tree.domains.len(), tree.rule_count());
                self.rules.store(Arc::new(tree));
                self.hash.store(hash, Ordering::Release);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                ReloadOutcome::Loaded {
                    generation,
                    hash,
                    domains,
                    rules,
                }
            }
            Err(errors) => ReloadOutcome::Failed(errors),
        };
        (outcome, hash)
    }

    fn log(&self, outcome: &ReloadOutcome, manual: bool, last_failed: bool) {
        let path = self.source.path.display();
        let trigger = if manual { "manual" } else { "watch" };
        match outcome {
            ReloadOutcome::Loaded {
                generation,
                hash,
                domains,
                rules,
            } => tracing::info!(
                path = %path, generation, hash = %format!("{hash:016x}"), domains, rules,
                trigger, "config reloaded"
            ),
            ReloadOutcome::Unchanged { generation, hash } => {
                let hash = format!("{hash:016x}");
                if manual || last_failed {
                    tracing::info!(path = %path, generation, hash = %hash, trigger,
                        "config unchanged; the config in force matches the files");
                } else {
                    tracing::debug!(path = %path, generation, hash = %hash, "config unchanged");
                }
            }
            ReloadOutcome::StillInvalid { hash } => tracing::debug!(path = %path,
                hash = %format!("{hash:016x}"), "config files still the rejected ones"),
            ReloadOutcome::Failed(errors) => {
                tracing::warn!(
                    path = %path, errors = errors.0.len(), generation = self.generation(),
                    trigger, "config reload failed; keeping the last good config"
                );
                for e in &errors.0 {
                    tracing::error!(file = %e.file, descriptor = %e.path, field = %e.field,
                        "config error: {e}");
                }
            }
        }
    }

    /// Calls [`Reloader::reload_now`] on every SIGHUP until the handle is aborted. The
    /// handler is registered before this returns, so a SIGHUP never kills the process.
    pub fn spawn_sighup(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let me = Arc::clone(self);
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received; reloading the config");
                let me = Arc::clone(&me);
                if let Err(e) = tokio::task::spawn_blocking(move || me.reload_now()).await {
                    tracing::error!(error = %e, "config reload task failed");
                }
            }
        }))
    }

    /// Watches the config and reloads after `debounce` of quiet following any relevant
    /// change; runs until the returned handle is aborted. How changes are noticed (and why by
    /// hand): `src/config/watch.rs`.
    pub fn spawn_watch(self: &Arc<Self>, debounce: Duration) -> JoinHandle<()> {
        self.spawn_watch_with(debounce, FALLBACK_INTERVAL)
    }

    /// [`Reloader::spawn_watch`] with the fingerprint check every `fallback` instead of
    /// [`FALLBACK_INTERVAL`].
    pub fn spawn_watch_with(
        self: &Arc<Self>,
        debounce: Duration,
        fallback: Duration,
    ) -> JoinHandle<()> {
        tokio::spawn(watch::run(Arc::clone(self), debounce, fallback, true))
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use super::*;
    use crate::config::test_support::{dir_with, limit, rules_yaml, setup};

    #[tokio::test]
    async fn reload_now_picks_up_a_changed_file() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        assert_eq!(s.reloader.generation(), 1);
        let first_hash = s.reloader.hash();
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 20)).unwrap();
        let outcome = s.reloader.reload_now();
        let ReloadOutcome::Loaded {
            generation: 2,
            hash,
            domains: 1,
            rules: 1,
        } = outcome
        else {
            panic!("expected Loaded generation 2, got {outcome:?}");
        };
        assert_ne!(hash, first_hash);
        assert_eq!(s.reloader.hash(), hash);
        assert_eq!(s.reloader.generation(), 2);
        assert_eq!(limit(&s.rules, "d"), Some(20));
        assert_eq!(*s.outcomes.lock().unwrap(), vec![outcome]);
    }

    #[tokio::test]
    async fn unchanged_files_swap_nothing() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        let before = s.rules.load_full();
        let hash = s.reloader.hash();
        assert_eq!(
            s.reloader.reload_now(),
            ReloadOutcome::Unchanged {
                generation: 1,
                hash
            }
        );
        // Rewriting the same bytes changes mtimes, not the config.
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 10)).unwrap();
        assert_eq!(
            s.reloader.reload_now(),
            ReloadOutcome::Unchanged {
                generation: 1,
                hash
            }
        );
        assert!(
            Arc::ptr_eq(&before, &s.rules.load_full()),
            "tree was swapped"
        );
    }

    #[tokio::test]
    async fn rejected_files_seen_again_by_the_watcher_are_not_a_new_failure() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        let bad = "domain: d\ndescriptors: 7\n";
        fs::write(dir.path().join("rules.yaml"), bad).unwrap();
        let failed = s.reloader.reload_on_change();
        assert!(matches!(failed, ReloadOutcome::Failed(_)), "{failed:?}");
        // A second event for the same write: the same files, already reported.
        let again = s.reloader.reload_on_change();
        let ReloadOutcome::StillInvalid { hash } = again else {
            panic!("expected StillInvalid, got {again:?}");
        };
        assert_ne!(hash, s.reloader.hash());
        // Rewriting the same bytes (new mtime) is still the same rejected config.
        fs::write(dir.path().join("rules.yaml"), bad).unwrap();
        assert_eq!(
            s.reloader.reload_on_change(),
            ReloadOutcome::StillInvalid { hash }
        );
        // Asked for by hand (SIGHUP), the same files are reported again.
        assert!(matches!(s.reloader.reload_now(), ReloadOutcome::Failed(_)));
        // Other invalid files are a new failure.
        fs::write(dir.path().join("rules.yaml"), "domain: d\ndescriptors: 8\n").unwrap();
        assert!(matches!(
            s.reloader.reload_on_change(),
            ReloadOutcome::Failed(_)
        ));
        // Fixed, then broken the first way again: reported again.
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 20)).unwrap();
        assert!(matches!(
            s.reloader.reload_on_change(),
            ReloadOutcome::Loaded { generation: 2, .. }
        ));
        fs::write(dir.path().join("rules.yaml"), bad).unwrap();
        assert!(matches!(
            s.reloader.reload_on_change(),
            ReloadOutcome::Failed(_)
        ));
        assert_eq!(limit(&s.rules, "d"), Some(20));
    }

    #[tokio::test]
    async fn an_invalid_file_fails_and_the_old_tree_stays() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        let bad = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 20}\n";
        fs::write(dir.path().join("rules.yaml"), bad).unwrap();
        let ReloadOutcome::Failed(errors) = s.reloader.reload_now() else {
            panic!("expected Failed");
        };
        let e = errors.0.first().expect("one error at least");
        assert!(e.file.ends_with("rules.yaml"), "{e}");
        assert!(e.path.contains('k'), "descriptor path missing: {e}");
        assert_eq!(limit(&s.rules, "d"), Some(10));
        assert_eq!(s.reloader.generation(), 1);
        // A second file that breaks the set as a whole (duplicate domain) fails too.
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 20)).unwrap();
        fs::write(dir.path().join("more.yaml"), rules_yaml("d", 30)).unwrap();
        assert!(matches!(s.reloader.reload_now(), ReloadOutcome::Failed(_)));
        assert_eq!(limit(&s.rules, "d"), Some(10));
        fs::remove_file(dir.path().join("more.yaml")).unwrap();
        assert!(matches!(
            s.reloader.reload_now(),
            ReloadOutcome::Loaded { generation: 2, .. }
        ));
        assert_eq!(limit(&s.rules, "d"), Some(20));
        assert_eq!(s.outcomes.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn reloads_read_files_as_start_up_does() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        // A byte order mark is ignored...
        let bom = format!("\u{feff}{}", rules_yaml("d", 20));
        fs::write(dir.path().join("rules.yaml"), bom).unwrap();
        assert!(matches!(
            s.reloader.reload_now(),
            ReloadOutcome::Loaded { generation: 2, .. }
        ));
        assert_eq!(limit(&s.rules, "d"), Some(20));
        // ...and deep nesting is refused before it is parsed.
        fs::write(dir.path().join("rules.yaml"), "[".repeat(1_000_000)).unwrap();
        let ReloadOutcome::Failed(errors) = s.reloader.reload_now() else {
            panic!("expected Failed");
        };
        let message = errors.0.first().map(|e| e.message.as_str());
        assert_eq!(
            message,
            Some("error loading config file: invalid YAML: nesting deeper than 64 levels at line 1 column 65")
        );
        assert_eq!(limit(&s.rules, "d"), Some(20));
    }

    #[tokio::test]
    async fn reverting_to_the_config_in_force_after_a_failure_is_unchanged() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        fs::write(dir.path().join("rules.yaml"), "domain: [").unwrap();
        assert!(matches!(s.reloader.reload_now(), ReloadOutcome::Failed(_)));
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 10)).unwrap();
        assert!(matches!(
            s.reloader.reload_now(),
            ReloadOutcome::Unchanged { generation: 1, .. }
        ));
    }

    #[tokio::test]
    async fn an_empty_directory_is_a_valid_empty_config() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        fs::remove_file(dir.path().join("rules.yaml")).unwrap();
        assert!(matches!(
            s.reloader.reload_now(),
            ReloadOutcome::Loaded {
                generation: 2,
                domains: 0,
                rules: 0,
                ..
            }
        ));
        assert!(s.rules.load().domains.is_empty());
    }

    #[tokio::test]
    async fn a_vanished_directory_fails_and_keeps_the_config() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("config");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("rules.yaml"), rules_yaml("d", 10)).unwrap();
        let s = setup(&dir, false);
        fs::rename(&dir, parent.path().join("elsewhere")).unwrap();
        let ReloadOutcome::Failed(errors) = s.reloader.reload_now() else {
            panic!("expected Failed");
        };
        assert!(errors.0[0].message.contains("no such file"), "{errors}");
        assert_eq!(limit(&s.rules, "d"), Some(10));
        assert_eq!(s.reloader.generation(), 1);
        fs::rename(parent.path().join("elsewhere"), &dir).unwrap();
        assert!(matches!(
            s.reloader.reload_now(),
            ReloadOutcome::Unchanged { generation: 1, .. }
        ));
    }

    #[test]
    fn concurrent_reloads_do_not_interleave() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 20)).unwrap();
        let outcomes: Vec<ReloadOutcome> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| s.reloader.reload_now()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let loaded = outcomes
            .iter()
            .filter(|o| matches!(o, ReloadOutcome::Loaded { .. }))
            .count();
        assert_eq!(loaded, 1, "{outcomes:?}");
        assert_eq!(s.reloader.generation(), 2);
    }

    /// Opens of `file` that inotify reports while `f` runs: the kernel's count, not ours.
    /// A sentinel opened afterwards marks the end of `f`'s events (one inotify queue is in
    /// order).
    fn opens_of(file: &Path, f: impl FnOnce()) -> usize {
        use notify::{event::AccessKind, EventKind, RecursiveMode, Watcher};
        let dir = file.parent().expect("a file in a directory");
        let sentinel = dir.join("sentinel.txt");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(tx).unwrap();
        watcher.watch(dir, RecursiveMode::NonRecursive).unwrap();
        f();
        fs::write(&sentinel, "not yaml, not config").unwrap();
        let mut opens = 0;
        loop {
            let event = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the sentinel's event")
                .unwrap();
            if !matches!(event.kind, EventKind::Access(AccessKind::Open(_))) {
                continue;
            }
            if event.paths.iter().any(|p| p == &sentinel) {
                return opens;
            }
            opens += event.paths.iter().filter(|p| *p == file).count();
        }
    }

    #[test]
    fn a_reload_attempt_reads_each_file_once() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let file = dir.path().join("rules.yaml");
        let s = setup(dir.path(), false);
        fs::write(&file, rules_yaml("d", 20)).unwrap();
        let mut outcome = None;
        assert_eq!(
            opens_of(&file, || outcome = Some(s.reloader.reload_now())),
            1
        );
        assert!(matches!(outcome, Some(ReloadOutcome::Loaded { .. })));
        assert_eq!(
            opens_of(&file, || outcome = Some(s.reloader.reload_now())),
            1
        );
        assert!(matches!(outcome, Some(ReloadOutcome::Unchanged { .. })));
        fs::write(&file, "domain: [").unwrap();
        assert_eq!(
            opens_of(&file, || outcome = Some(s.reloader.reload_now())),
            1
        );
        assert!(matches!(outcome, Some(ReloadOutcome::Failed(_))));
        // Start-up too: one read for the tree and its hash.
        fs::write(&file, rules_yaml("d", 30)).unwrap();
        let source = ConfigSource {
            path: dir.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
            default_algorithm: crate::limiter::Algorithm::FixedWindow,
        };
        assert_eq!(
            opens_of(&file, || drop(crate::config::load_hashed(&source))),
            1
        );
    }
}
