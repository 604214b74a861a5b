//! Turns file-system changes into reload requests for the [`Reloader`]: debounce, the watch
//! set (including Kubernetes' `..data` and `RUNTIME_ROOT`'s `current` symlink swaps), and a
//! periodic fingerprint check.
//!
//! Why a separate module: the [`Reloader`] knows *how* to reload; this knows *when*. Plain
//! edits, editors' rename-over saves, ConfigMap updates (an atomic `..data` symlink swap
//! inside the mount) and `RUNTIME_ROOT` deployments (an atomic swap of a `current` symlink
//! above the config directory) must all be followed, the way the reference does.
//!
//! inotify watches inodes, not names: a watch on a directory that was swapped out goes stale.
//! The watch set is therefore rebuilt after every reload, the parents of every swappable name
//! (the config path itself and each symlink on its way) are watched too, and a cheap
//! fingerprint of the files (paths, sizes, mtimes, inodes, symlink targets) is compared every
//! few seconds so a missed event never leaves a stale config in force for long.
//!
//! Hand-written rather than `notify-debouncer-mini`/`-full` and notify's `PollWatcher`,
//! after evaluating them against what this must do:
//! - The debounce here is "reload after `debounce` of quiet, but a steady stream of changes
//!   postpones it by at most `debounce * 10`" (at least 2 s), merged with SIGHUP's request to
//!   rebuild the watches, in one `select!`. The debouncers debounce per path and, under
//!   continuous writes, emit every `timeout` (mini's `AnyContinuous`), i.e. a reload per
//!   `debounce` instead of one per burst; and they run a thread of their own.
//! - Our own reloads open every file, and notify (inotify, `OPEN` in its mask) reports that
//!   as `Access(Open)`: events are filtered by kind and path *before* they count, or every
//!   reload would trigger the next. `notify-debouncer-mini` hands back only a path and
//!   `Any`/`AnyContinuous`, so our filter could no longer tell a read from a write.
//! - After a symlink swap the watch set itself changes (new directories, new anchors): the
//!   debouncer's watcher would be torn down and rebuilt after each reload just as ours is, so
//!   it saves no code there.
//! - `PollWatcher` (notify 8.2) keeps mtimes in whole seconds and reports a change only when
//!   the mtime grows (or, with `compare_contents`, reads and hashes every file on every poll):
//!   a same-second rewrite, or a file renamed into place with an older mtime, is missed unless
//!   every poll reads every file. The fingerprint below only lists and stats, and sees inode,
//!   ctime and nanosecond mtime changes and the resolved config path (a `current` swap).

use std::{os::unix::fs::MetadataExt, path::PathBuf, sync::Arc, time::Duration};

use notify::{
    event::{AccessKind, AccessMode},
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher,
};
use tokio::{sync::mpsc, time::Instant};

use super::{
    load::{list_files, Fnv},
    ConfigSource, Reloader,
};

/// How often [`Reloader::spawn_watch`] compares the files' fingerprint, in case an event was
/// missed (inotify queue overflow, a watch that went stale between two events, ...).
pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(3);

/// The watch task: reloads through `reloader` after changes; without `events` only the
/// fingerprint check runs (for tests). Runs until aborted.
pub(super) async fn run(
    reloader: Arc<Reloader>,
    debounce: Duration,
    fallback: Duration,
    events: bool,
) {
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
            () = reloader.rewatch_requested() => due = Some(Instant::now()),
            () = sleep_until(due), if due.is_some() => {
                (due, first_event) = (None, None);
                let me = Arc::clone(&reloader);
                let tx = tx.clone();
                // Watches first, then the reload: a change from now on is never missed.
                let done = tokio::task::spawn_blocking(move || {
                    let fingerprint = fingerprint_of(me.source());
                    let watcher = events.then(|| watch(me.source(), tx)).flatten();
                    me.reload_on_change();
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
                let source = reloader.source().clone();
                let now = tokio::task::spawn_blocking(move || fingerprint_of(&source)).await;
                if matches!(now, Ok(f) if f != fingerprint) && due.is_none() {
                    tracing::info!(path = %reloader.source().path.display(),
                        "config files changed without a file-system event; reloading");
                    due = Some(Instant::now());
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
    use std::{fs, os::unix::fs::symlink, path::Path};

    use super::*;
    use crate::config::{
        test_support::{
            dir_with, eventually, expect_limit, limit, rules_yaml, setup, watch_events_only,
        },
        ReloadOutcome,
    };

    #[test]
    fn the_fingerprint_sees_same_size_rewrites_and_renames_without_reading() {
        let dir = dir_with(&[("r.yaml", rules_yaml("d", 10))]);
        let source = ConfigSource {
            path: dir.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
            default_algorithm: crate::limiter::Algorithm::FixedWindow,
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
            eventually(|| s
                .outcomes
                .lock()
                .unwrap()
                .iter()
                .any(|o| matches!(o, ReloadOutcome::Failed(_))))
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
        let task = tokio::spawn(run(
            s.reloader.clone(),
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
