//! When to read the gRPC TLS files again: after file-system events in the directories that
//! hold them (debounced), and every [`FALLBACK_INTERVAL`] whatever happened.
//!
//! cert-manager and Kubernetes secret volumes replace the files by an atomic swap of a
//! `..data` symlink beside them (`tls.crt -> ..data/tls.crt`); others swap a symlinked
//! directory further up, or rewrite the files in place. As in [`crate::config`]'s watcher,
//! inotify watches inodes, so the watch set (each file's directory, the parent of every
//! symlink on its way, and the directory of the file it resolves to) is rebuilt after every
//! check, and a periodic check catches whatever an event missed. A check only reads three
//! small files and compares them with what is in force, so a spurious one costs nothing.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{
    event::{AccessKind, AccessMode},
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher,
};
use tokio::{sync::mpsc, time::Instant};

use super::ServerTls;

/// How often the files are compared with those in force even without an event.
pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(10);

/// The watch task: checks the files after changes, `debounce` after the last event, and
/// every `fallback`; without `events` only the periodic check runs (for tests). Runs until
/// aborted.
pub(super) async fn run(tls: Arc<ServerTls>, debounce: Duration, fallback: Duration, events: bool) {
    // notify calls back on its own thread; one slot is enough ("something changed").
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher: Option<RecommendedWatcher> = None;
    let mut due = Some(Instant::now());
    // A steady stream of events postpones a check by at most this much.
    let (mut first_event, cap) = (None, (debounce * 10).max(Duration::from_secs(2)));
    let mut tick = tokio::time::interval(fallback.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                let now = Instant::now();
                let first = *first_event.get_or_insert(now);
                due = Some((now + debounce).min(first + cap));
            }
            () = sleep_until(due), if due.is_some() => {
                (due, first_event) = (None, None);
                let (me, tx) = (Arc::clone(&tls), tx.clone());
                // Watches first, then the check: a change from now on is never missed.
                let done = tokio::task::spawn_blocking(move || {
                    let w = events.then(|| watch(&watched_dirs(me.files()), tx)).flatten();
                    me.check();
                    w
                })
                .await;
                match done {
                    // The old watcher (and its inotify instance) is dropped here.
                    Ok(w) => watcher = w.or(watcher),
                    Err(e) => tracing::error!(error = %e, "TLS file check failed"),
                }
            }
            _ = tick.tick() => {
                if due.is_none() {
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

/// The directories whose changes may change what a file path reads: its own, the parent of
/// each symlink on its way (a swapped `..data` or `current`), and its resolved file's.
fn watched_dirs(files: &super::ServerTlsFiles) -> Vec<PathBuf> {
    let paths = [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ];
    let mut dirs = Vec::new();
    for path in paths.into_iter().flatten() {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        for name in path.ancestors() {
            let swappable = name == path
                || std::fs::symlink_metadata(name).is_ok_and(|m| m.file_type().is_symlink());
            if let (true, Some(parent)) = (swappable, name.parent()) {
                dirs.push(parent.to_owned());
            }
        }
        if let Some(dir) = std::fs::canonicalize(&path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
        {
            dirs.push(dir);
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// A fresh watcher on `dirs`; `None` when notify cannot start (the periodic check remains).
fn watch(dirs: &[PathBuf], tx: mpsc::Sender<()>) -> Option<RecommendedWatcher> {
    let handler = move |res: notify::Result<Event>| {
        let relevant = match &res {
            // Opening and reading (our own checks do both) change nothing.
            Ok(event) => match event.kind {
                EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
                _ => true,
            },
            Err(_) => true,
        };
        if relevant {
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the gRPC TLS files; checking them periodically instead");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::debug!(path = %dir.display(), error = %e, "cannot watch path");
        }
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A certificate and key pair (PEM) for localhost.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Replaces the files with a new pair and waits (up to 10 s) for the config to change.
    async fn rotated(tls: &Arc<ServerTls>, dir: &Path) -> bool {
        // Past the task's first check, which would see any change made before it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = tls.config();
        let (cert, key) = pair();
        for (name, contents) in [("tls.key", key), ("tls.crt", cert)] {
            std::fs::write(dir.join("tmp"), contents).unwrap();
            std::fs::rename(dir.join("tmp"), dir.join(name)).unwrap();
        }
        for _ in 0..1000 {
            if !Arc::ptr_eq(&before, &tls.config()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn loaded(dir: &Path) -> Arc<ServerTls> {
        let (cert, key) = pair();
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        let files = super::super::ServerTlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: None,
            client_san: None,
        };
        Arc::new(ServerTls::load(files).unwrap())
    }

    #[tokio::test]
    async fn file_events_and_the_periodic_check_each_reload_on_their_own() {
        let dir = tempfile::tempdir().unwrap();
        // Events, with a periodic check too slow to be what reloads.
        let tls = loaded(dir.path());
        let task = tokio::spawn(run(
            tls.clone(),
            Duration::from_millis(20),
            Duration::from_secs(3600),
            true,
        ));
        assert!(rotated(&tls, dir.path()).await, "reloaded on an event");
        task.abort();
        // The periodic check alone.
        let tls = loaded(dir.path());
        let task = tokio::spawn(run(
            tls.clone(),
            Duration::from_millis(20),
            Duration::from_millis(50),
            false,
        ));
        assert!(
            rotated(&tls, dir.path()).await,
            "reloaded by the periodic check"
        );
        task.abort();
    }

    #[test]
    fn kubernetes_secret_layout_watches_the_mount_and_the_current_version() {
        // mount/tls.crt -> ..data/tls.crt, mount/..data -> ..v1: a rotation renames a new
        // `..data` into the mount directory.
        let root = tempfile::tempdir().unwrap();
        let mount = std::fs::canonicalize(root.path()).unwrap();
        let v1 = mount.join("..v1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("tls.crt"), "c").unwrap();
        symlink("..v1", mount.join("..data")).unwrap();
        symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
        let files = super::super::ServerTlsFiles {
            cert: mount.join("tls.crt"),
            key: mount.join("tls.crt"),
            client_ca: None,
            client_san: None,
        };
        assert_eq!(watched_dirs(&files), vec![mount, v1]);
    }
}
