//! Hot reload: rebuild the rule tree when the config files change, and swap it in whole.
//!
//! Operators change limits without restarting (and without losing counters), so the service
//! must follow its config directory the way the reference does: plain edits, Kubernetes
//! ConfigMap updates (an atomic `..data` symlink swap inside the mount) and `RUNTIME_ROOT`
//! deployments (an atomic swap of a `current` symlink above the config directory), plus
//! SIGHUP. A reload compiles the complete new config first and publishes it with one
//! [`ArcSwap::store`], so a request sees either the old tree or the new one, never a mix; an
//! invalid config is reported and the last good tree stays in force. Counter keys depend only
//! on the rule and the request, so counters carry over.
//!
//! inotify watches inodes, not names: a watch on a directory that was swapped out goes stale.
//! The watch set is therefore rebuilt after every reload, the parents of every swappable name
//! (the config path itself and each symlink on its way) are watched too, and a cheap
//! fingerprint of the files (paths, sizes, mtimes, inodes, symlink targets) is compared every
//! few seconds so a missed event never leaves a stale config in force for long.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::{
    event::{AccessKind, AccessMode},
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use super::{
    load::list_files, load_dir_or_file, ConfigError, ConfigErrors, ConfigSource, RuleTree,
};

/// How often [`Reloader::spawn_watch`] compares the files' fingerprint, in case an event was
/// missed (inotify queue overflow, a watch that went stale between two events, ...).
pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(3);

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
}

/// Reloads the rules at `source` into `rules`, on demand or when the files change.
pub struct Reloader {
    source: ConfigSource,
    rules: Arc<ArcSwap<RuleTree>>,
    observer: Arc<dyn Fn(&ReloadOutcome) + Send + Sync>,
    generation: AtomicU64,
    hash: AtomicU64,
    /// Held for a whole load-and-swap so two reloads never interleave; `true` while the
    /// last attempt failed.
    reloading: Mutex<bool>,
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
        let hash = content_hash(&source);
        Self::with_hash(source, rules, observer, hash)
    }

    /// Like [`Reloader::new`], with the content hash taken before the start-up load, so a
    /// change that lands between that load and this call is reloaded (at worst once too
    /// often) instead of being mistaken for the config in force.
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
            reloading: Mutex::new(false),
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

    /// Loads, validates and swaps now (SIGHUP calls this). Blocking file I/O: from async
    /// code, call it through `spawn_blocking`.
    pub fn reload_now(&self) -> ReloadOutcome {
        self.reload(true)
    }

    /// `manual`: SIGHUP or a direct call, always answered in the log; otherwise a file-system
    /// event or the fingerprint check, quiet when nothing changed.
    fn reload(&self, manual: bool) -> ReloadOutcome {
        let mut last_failed = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let outcome = self.attempt();
        self.log(&outcome, manual, *last_failed);
        *last_failed = matches!(outcome, ReloadOutcome::Failed(_));
        (self.observer)(&outcome);
        if manual {
            self.rewatch.notify_one();
        }
        outcome
    }

    /// One load-and-swap; the caller holds `reloading`.
    fn attempt(&self) -> ReloadOutcome {
        let mut tries = 0;
        loop {
            tries += 1;
            let before = content_hash(&self.source);
            if before == self.hash() {
                return ReloadOutcome::Unchanged {
                    generation: self.generation(),
                    hash: before,
                };
            }
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load_dir_or_file(&self.source)
            }));
            // Files changed while we read them: read again, so the hash we keep always
            // describes the tree we keep (a few tries; the next event catches the rest).
            if tries < 3 && content_hash(&self.source) != before {
                continue;
            }
            return match loaded {
                Ok(Ok(tree)) => {
                    let (domains, rules) = (tree.domains.len(), tree.rule_count());
                    self.rules.store(Arc::new(tree));
                    self.hash.store(before, Ordering::Release);
                    let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                    ReloadOutcome::Loaded {
                        generation,
                        hash: before,
                        domains,
                        rules,
                    }
                }
                Ok(Err(errors)) => ReloadOutcome::Failed(errors),
                Err(_) => ReloadOutcome::Failed(ConfigErrors(vec![ConfigError::new(
                    &self.source.path.display().to_string(),
                    "",
                    "",
                    "internal error while loading the config (see the panic above)",
                )])),
            };
        }
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
    /// change; runs until the returned handle is aborted.
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
        let me = Arc::clone(self);
        tokio::spawn(async move { me.watch_loop(debounce, fallback, true).await })
    }

    /// The watch task; without `events` only the fingerprint check runs (for tests).
    async fn watch_loop(self: Arc<Self>, debounce: Duration, fallback: Duration, events: bool) {
        // notify calls back on its own thread; a one-slot channel is enough, since all we
        // need to know is "something changed since the last reload".
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher: Option<RecommendedWatcher> = None;
        let mut fingerprint = 0;
        // Start with a reload check: it catches changes made before the watches existed.
        let mut due = Some(Instant::now());
        // A steady stream of events postpones a reload by at most this much.
        let (mut first_event, cap) = (None, (debounce * 10).max(Duration::from_secs(2)));
        let mut tick = tokio::time::interval(fallback.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    let now = Instant::now();
                    let first = *first_event.get_or_insert(now);
                    due = Some((now + debounce).min(first + cap));
                }
                () = self.rewatch.notified() => due = Some(Instant::now()),
                () = sleep_until(due), if due.is_some() => {
                    (due, first_event) = (None, None);
                    let me = Arc::clone(&self);
                    let tx = tx.clone();
                    // Watches first, then the reload: a change from now on is never missed.
                    let done = tokio::task::spawn_blocking(move || {
                        let fingerprint = fingerprint_of(&me.source);
                        let watcher = events.then(|| watch(&me.source, tx)).flatten();
                        me.reload(false);
                        (fingerprint, watcher)
                    })
                    .await;
                    match done {
                        Ok((f, w)) => {
                            fingerprint = f;
                            // The old watcher (and its inotify instance) is dropped here.
                            watcher = w.or(watcher);
                        }
                        Err(e) => tracing::error!(error = %e, "config reload task failed"),
                    }
                }
                _ = tick.tick() => {
                    let source = self.source.clone();
                    let now = tokio::task::spawn_blocking(move || fingerprint_of(&source)).await;
                    if matches!(now, Ok(f) if f != fingerprint) && due.is_none() {
                        tracing::info!(path = %self.source.path.display(),
                            "config files changed without a file-system event; reloading");
                        due = Some(Instant::now());
                    }
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

/// Which event paths matter: the swappable names themselves (`anchors`), and anything under
/// the config directory (`roots`).
struct Relevance {
    anchors: Vec<PathBuf>,
    roots: Vec<PathBuf>,
}

impl Relevance {
    fn matches(&self, event: &Event) -> bool {
        // Opening and reading (our own reloads do both) change nothing.
        if let EventKind::Access(kind) = event.kind {
            if kind != AccessKind::Close(AccessMode::Write) {
                return false;
            }
        }
        event.need_rescan()
            || event.paths.is_empty()
            || event.paths.iter().any(|p| {
                self.anchors.iter().any(|a| p == a) || self.roots.iter().any(|r| p.starts_with(r))
            })
    }
}

/// Sets up a fresh watch set for `source`; `None` when notify cannot start at all (the
/// fingerprint check still runs). A path that cannot be watched is logged and skipped.
fn watch(source: &ConfigSource, tx: mpsc::Sender<()>) -> Option<RecommendedWatcher> {
    let root = std::path::absolute(&source.path)
        .unwrap_or_else(|_| source.path.clone())
        .components()
        .collect::<PathBuf>();
    let canonical = std::fs::canonicalize(&root).ok();
    let mut watches: Vec<(PathBuf, RecursiveMode)> = Vec::new();
    let mut anchors = vec![root.clone()];
    let mut roots = Vec::new();
    if root.is_dir() {
        watches.push((root.clone(), RecursiveMode::Recursive));
        roots.push(root.clone());
        roots.extend(canonical);
    } else {
        anchors.extend(canonical);
    }
    // The config path and every symlink on its way can be replaced by a rename in their
    // parent directory (`current` in RUNTIME_ROOT, the mount dir itself...): watch those.
    for name in root.ancestors() {
        let swappable = name == root
            || std::fs::symlink_metadata(name).is_ok_and(|m| m.file_type().is_symlink());
        if let (true, Some(parent)) = (swappable, name.parent()) {
            watches.push((parent.to_owned(), RecursiveMode::NonRecursive));
            anchors.push(name.to_owned());
        }
    }
    // Symlinked files (Kubernetes' `config.yaml -> ..data/config.yaml`): their targets'
    // directories, so an edit of the target is seen wherever it lives.
    for file in list_files(source).unwrap_or_default() {
        let is_link = std::fs::symlink_metadata(&file).is_ok_and(|m| m.file_type().is_symlink());
        if let (true, Ok(target)) = (is_link, std::fs::canonicalize(&file)) {
            if let Some(dir) = target.parent() {
                watches.push((dir.to_owned(), RecursiveMode::NonRecursive));
            }
            anchors.push(target);
        }
    }
    let relevance = Relevance { anchors, roots };
    let handler = move |res: notify::Result<Event>| match res {
        Ok(event) if relevance.matches(&event) => {
            tracing::debug!(event = ?event, "config change");
            let _ = tx.try_send(());
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "config watch error; reloading to re-establish watches");
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config; checking it every few seconds instead");
            return None;
        }
    };
    watches.sort();
    watches.dedup_by(|a, b| a.0 == b.0);
    for (path, mode) in watches {
        if let Err(e) = watcher.watch(&path, mode) {
            tracing::debug!(path = %path.display(), error = %e, "cannot watch path");
        }
    }
    Some(watcher)
}

/// FNV-1a, 64 bits: stable across runs and Rust versions (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// A length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }
}

/// Hash of the files' (path relative to the source, contents) in load order.
pub fn content_hash(source: &ConfigSource) -> u64 {
    let mut h = Fnv::new();
    match list_files(source) {
        Ok(files) => {
            for file in files {
                let rel = file.strip_prefix(&source.path).unwrap_or(&file);
                h.field(rel.as_os_str().as_encoded_bytes());
                match std::fs::read(&file) {
                    Ok(bytes) => h.field(b"ok").field(&bytes),
                    Err(e) => h.field(b"err").field(e.to_string().as_bytes()),
                };
            }
        }
        Err(e) => {
            h.field(b"unreadable").field(e.to_string().as_bytes());
        }
    }
    h.0
}

/// Cheap change detector: no file is read, only listed and stat'ed.
fn fingerprint_of(source: &ConfigSource) -> u64 {
    let mut h = Fnv::new();
    if let Ok(real) = std::fs::canonicalize(&source.path) {
        h.field(real.as_os_str().as_encoded_bytes());
    }
    for file in list_files(source).unwrap_or_default() {
        h.field(file.as_os_str().as_encoded_bytes());
        if let Ok(target) = std::fs::read_link(&file) {
            h.field(target.as_os_str().as_encoded_bytes());
        }
        if let Ok(m) = std::fs::metadata(&file) {
            for n in [m.dev(), m.ino(), m.size()] {
                h.bytes(&n.to_le_bytes());
            }
            for n in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
                h.bytes(&n.to_le_bytes());
            }
        }
    }
    h.0
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink, sync::Mutex};

    use super::*;
    use std::path::Path;

    fn rules_yaml(domain: &str, limit: u32) -> String {
        format!(
            "domain: {domain}\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n"
        )
    }

    /// The limit for `domain` / `k` in the tree in force.
    fn limit(rules: &ArcSwap<RuleTree>, domain: &str) -> Option<u32> {
        let tree = rules.load();
        let rule = tree.domains.get(domain)?.children.get("k")?.rule.clone()?;
        Some(rule.limit?.requests_per_unit)
    }

    struct Setup {
        reloader: Arc<Reloader>,
        rules: Arc<ArcSwap<RuleTree>>,
        outcomes: Arc<Mutex<Vec<ReloadOutcome>>>,
    }

    fn setup(path: &Path, ignore_dotfiles: bool) -> Setup {
        let source = ConfigSource {
            path: path.to_owned(),
            ignore_dotfiles,
            merge_domains: false,
        };
        let tree = load_dir_or_file(&source).expect("initial config is valid");
        let rules = Arc::new(ArcSwap::from_pointee(tree));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let seen = outcomes.clone();
        let observer = Arc::new(move |o: &ReloadOutcome| seen.lock().unwrap().push(o.clone()));
        Setup {
            reloader: Reloader::new(source, rules.clone(), observer),
            rules,
            outcomes,
        }
    }

    fn dir_with(files: &[(&str, String)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// Polls `f` every 20 ms for up to 5 s.
    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// A watcher that can only react to events (the fingerprint check is an hour away).
    fn watch_events_only(s: &Setup) -> JoinHandle<()> {
        s.reloader
            .spawn_watch_with(Duration::from_millis(50), Duration::from_secs(3600))
    }

    async fn expect_limit(s: &Setup, domain: &str, want: u32) {
        assert!(
            eventually(|| limit(&s.rules, domain) == Some(want)).await,
            "limit for {domain} never became {want}; outcomes: {:?}",
            s.outcomes.lock().unwrap()
        );
    }

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
            Some("invalid YAML: nesting deeper than 64 levels at line 1 column 65")
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

    #[test]
    fn content_hash_covers_relative_paths_and_contents() {
        let source = |d: &tempfile::TempDir| ConfigSource {
            path: d.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
        };
        let a = dir_with(&[("r.yaml", rules_yaml("d", 1))]);
        let b = dir_with(&[("r.yaml", rules_yaml("d", 1))]);
        let c = dir_with(&[("s.yaml", rules_yaml("d", 1))]);
        let d = dir_with(&[("r.yaml", rules_yaml("d", 2))]);
        assert_eq!(content_hash(&source(&a)), content_hash(&source(&b)));
        assert_ne!(content_hash(&source(&a)), content_hash(&source(&c)));
        assert_ne!(content_hash(&source(&a)), content_hash(&source(&d)));
        // Not yaml: not part of the config.
        fs::write(a.path().join("notes.txt"), "x").unwrap();
        assert_eq!(content_hash(&source(&a)), content_hash(&source(&b)));
        let mut fnv = Fnv::new();
        fnv.bytes(b"a");
        assert_eq!(fnv.0, 0xaf63_dc4c_8601_ec8c, "FNV-1a test vector");
    }

    #[test]
    fn the_fingerprint_sees_same_size_rewrites_and_renames_without_reading() {
        let dir = dir_with(&[("r.yaml", rules_yaml("d", 10))]);
        let source = ConfigSource {
            path: dir.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
        };
        let first = fingerprint_of(&source);
        assert_eq!(first, fingerprint_of(&source));
        // Same size, new inode (atomic rename into place).
        fs::write(dir.path().join("tmp"), rules_yaml("d", 20)).unwrap();
        fs::rename(dir.path().join("tmp"), dir.path().join("r.yaml")).unwrap();
        assert_ne!(first, fingerprint_of(&source));
    }

    #[tokio::test]
    async fn watching_does_not_reload_on_its_own_reads() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        let task = watch_events_only(&s);
        // The start-up check, then nothing: reading files must not trigger reloads.
        assert!(eventually(|| s.outcomes.lock().unwrap().len() == 1).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            s.outcomes.lock().unwrap().len(),
            1,
            "{:?}",
            s.outcomes.lock().unwrap()
        );
        task.abort();
    }

    #[tokio::test]
    async fn watch_reacts_to_rewrites_new_files_removals_and_renames() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        let task = watch_events_only(&s);
        assert!(eventually(|| !s.outcomes.lock().unwrap().is_empty()).await);

        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 20)).unwrap();
        expect_limit(&s, "d", 20).await;

        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/new.yaml"), rules_yaml("e", 5)).unwrap();
        expect_limit(&s, "e", 5).await;

        fs::remove_file(dir.path().join("sub/new.yaml")).unwrap();
        assert!(eventually(|| !s.rules.load().domains.contains_key("e")).await);

        // An editor's save: write a temporary file, rename it over the original.
        fs::write(dir.path().join(".rules.yaml.swp"), rules_yaml("d", 30)).unwrap();
        fs::rename(
            dir.path().join(".rules.yaml.swp"),
            dir.path().join("rules.yaml"),
        )
        .unwrap();
        expect_limit(&s, "d", 30).await;

        // An invalid file: reported, old tree kept; then fixed.
        fs::write(dir.path().join("rules.yaml"), "domain: d\ndescriptors: 7\n").unwrap();
        assert!(
            eventually(|| matches!(
                s.outcomes.lock().unwrap().last(),
                Some(ReloadOutcome::Failed(_))
            ))
            .await
        );
        assert_eq!(limit(&s.rules, "d"), Some(30));
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 40)).unwrap();
        expect_limit(&s, "d", 40).await;
        task.abort();
    }

    /// Writes a new timestamped directory and swaps `..data` to it, as the kubelet does.
    fn kubelet_update(mount: &Path, version: &str, text: &str) {
        let data = mount.join(format!("..2026_11_22_13_00_00.{version}"));
        fs::create_dir(&data).unwrap();
        fs::write(data.join("config.yaml"), text).unwrap();
        let old = fs::read_link(mount.join("..data")).ok();
        symlink(data.file_name().unwrap(), mount.join("..data_tmp")).unwrap();
        fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        if let Some(old) = old {
            fs::remove_dir_all(mount.join(old)).unwrap();
        }
    }

    #[tokio::test]
    async fn watch_follows_a_kubernetes_configmap_update() {
        let mount = tempfile::tempdir().unwrap();
        kubelet_update(mount.path(), "1", &rules_yaml("d", 10));
        symlink("..data/config.yaml", mount.path().join("config.yaml")).unwrap();
        let s = setup(mount.path(), true);
        assert_eq!(limit(&s.rules, "d"), Some(10));
        let task = watch_events_only(&s);
        assert!(eventually(|| !s.outcomes.lock().unwrap().is_empty()).await);
        kubelet_update(mount.path(), "2", &rules_yaml("d", 20));
        expect_limit(&s, "d", 20).await;
        // Again: the watches must have moved to the new directory.
        kubelet_update(mount.path(), "3", &rules_yaml("d", 30));
        expect_limit(&s, "d", 30).await;
        task.abort();
    }

    /// Creates `root/<version>/config/rules.yaml` and points `root/current` at it atomically.
    fn swap_current(root: &Path, version: &str, text: &str) {
        fs::create_dir_all(root.join(version).join("config")).unwrap();
        fs::write(root.join(version).join("config/rules.yaml"), text).unwrap();
        symlink(version, root.join("current_tmp")).unwrap();
        fs::rename(root.join("current_tmp"), root.join("current")).unwrap();
    }

    #[tokio::test]
    async fn watch_follows_a_runtime_root_symlink_swap() {
        let root = tempfile::tempdir().unwrap();
        swap_current(root.path(), "v1", &rules_yaml("d", 10));
        let s = setup(&root.path().join("current/config"), false);
        let task = watch_events_only(&s);
        assert!(eventually(|| !s.outcomes.lock().unwrap().is_empty()).await);
        swap_current(root.path(), "v2", &rules_yaml("d", 20));
        expect_limit(&s, "d", 20).await;
        // The new directory is watched now: a plain edit in it is seen.
        fs::write(
            root.path().join("v2/config/rules.yaml"),
            rules_yaml("d", 25),
        )
        .unwrap();
        expect_limit(&s, "d", 25).await;
        swap_current(root.path(), "v3", &rules_yaml("d", 30));
        expect_limit(&s, "d", 30).await;
        task.abort();
    }

    #[tokio::test]
    async fn watch_follows_a_single_file_replaced_by_rename() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(&dir.path().join("rules.yaml"), false);
        let task = watch_events_only(&s);
        assert!(eventually(|| !s.outcomes.lock().unwrap().is_empty()).await);
        fs::write(dir.path().join("next"), rules_yaml("d", 20)).unwrap();
        fs::rename(dir.path().join("next"), dir.path().join("rules.yaml")).unwrap();
        expect_limit(&s, "d", 20).await;
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 30)).unwrap();
        expect_limit(&s, "d", 30).await;
        task.abort();
    }

    #[tokio::test]
    async fn the_fingerprint_check_alone_picks_up_changes() {
        let dir = dir_with(&[("rules.yaml", rules_yaml("d", 10))]);
        let s = setup(dir.path(), false);
        let task = tokio::spawn(s.reloader.clone().watch_loop(
            Duration::from_secs(3600),
            Duration::from_millis(100),
            false,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        fs::write(dir.path().join("rules.yaml"), rules_yaml("d", 20)).unwrap();
        expect_limit(&s, "d", 20).await;
        task.abort();
    }
}
