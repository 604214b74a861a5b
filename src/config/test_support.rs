//! Helpers shared by the `reload` and `watch` unit tests: config files in temporary
//! directories, a [`Reloader`] that records its outcomes, and polling with a deadline.

use std::{
    fs,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{task::JoinHandle, time::Instant};

use super::{load_dir_or_file, ConfigSource, ReloadOutcome, Reloader, RuleTree};

pub(super) fn rules_yaml(domain: &str, limit: u32) -> String {
    format!(
        "domain: {domain}\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n"
    )
}

/// The limit for `domain` / `k` in the tree in force.
pub(super) fn limit(rules: &ArcSwap<RuleTree>, domain: &str) -> Option<u32> {
    let tree = rules.load();
    let rule = tree.domains.get(domain)?.children.get("k")?.rule.clone()?;
    Some(rule.limits.first()?.requests_per_unit)
}

pub(super) struct Setup {
    pub(super) reloader: Arc<Reloader>,
    pub(super) rules: Arc<ArcSwap<RuleTree>>,
    pub(super) outcomes: Arc<Mutex<Vec<ReloadOutcome>>>,
}

pub(super) fn setup(path: &Path, ignore_dotfiles: bool) -> Setup {
    let source = ConfigSource {
        path: path.to_owned(),
        ignore_dotfiles,
        merge_domains: false,
        default_algorithm: crate::limiter::Algorithm::FixedWindow,
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

pub(super) fn dir_with(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Polls `f` every 20 ms for up to 5 s.
pub(super) async fn eventually(mut f: impl FnMut() -> bool) -> bool {
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
pub(super) fn watch_events_only(s: &Setup) -> JoinHandle<()> {
    s.reloader
        .spawn_watch_with(Duration::from_millis(50), Duration::from_secs(3600))
}

pub(super) async fn expect_limit(s: &Setup, domain: &str, want: u32) {
    assert!(
        eventually(|| limit(&s.rules, domain) == Some(want)).await,
        "limit for {domain} never became {want}; outcomes: {:?}",
        s.outcomes.lock().unwrap()
    );
}
