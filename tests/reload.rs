//! Hot reload of the real binary, always under continuous load: every scenario keeps a client
//! calling ShouldRateLimit every ~2 ms while the config changes, and requires zero failed
//! calls, answers that switch to the new limits, and never a half-loaded rule set (two
//! descriptors whose limits always change together are never seen apart).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::symlink,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, RateLimitRequest, RateLimitResponse,
};
use support::*;
use tokio::task::JoinHandle;

/// Domain `domain` with keys `a` and `b`, both at `limit` per hour.
fn rules(domain: &str, limit: u32) -> String {
    format!(
        "domain: {domain}\ndescriptors:\n  - key: a\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n  - key: b\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n"
    )
}

/// The request the load sends: one descriptor for `a`, one for `b`.
fn ab(domain: &str) -> RateLimitRequest {
    request(domain, &[&[("a", "1")], &[("b", "1")]])
}

/// The limit in force as one answer shows it: `None` without a current limit.
fn shown_limit(r: &RateLimitResponse) -> Option<u32> {
    r.statuses
        .first()?
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit)
}

#[derive(Default)]
struct Seen {
    /// Every limit answered so far.
    limits: BTreeSet<Option<u32>>,
    /// The latest answer's limit and code.
    last: Option<(Option<u32>, i32)>,
    calls: u64,
    failures: Vec<String>,
    /// Answers whose two descriptors showed different limits (a half-loaded rule set).
    mixed: Vec<String>,
}

/// A background client calling ShouldRateLimit every ~2 ms, bounded to 60 s and 30,000 calls.
struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Load {
    async fn start(rl: &Ratelimitd, req: RateLimitRequest) -> Load {
        let mut client = rl.client().await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            for _ in 0..30_000 {
                if st.load(Ordering::Relaxed) || Instant::now() > end {
                    break;
                }
                let call = client.should_rate_limit(req.clone());
                let answer = tokio::time::timeout(Duration::from_secs(2), call).await;
                {
                    let mut seen = s.lock().unwrap();
                    seen.calls += 1;
                    match answer {
                        Ok(Ok(r)) => {
                            let r = r.into_inner();
                            let limits: Vec<_> = r
                                .statuses
                                .iter()
                                .map(|s| s.current_limit.as_ref().map(|l| l.requests_per_unit))
                                .collect();
                            if limits.windows(2).any(|w| w[0] != w[1]) {
                                seen.mixed.push(format!("{limits:?}"));
                            }
                            seen.limits.insert(shown_limit(&r));
                            seen.last = Some((shown_limit(&r), r.overall_code));
                        }
                        Ok(Err(status)) => seen.failures.push(status.to_string()),
                        Err(_) => seen.failures.push("timed out after 2 s".into()),
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let load = Load { seen, stop, task };
        load.wait_for("a first answer", |s| s.last.is_some()).await;
        load
    }

    /// Waits up to 10 s for `cond` on what the load has seen.
    async fn wait_for(&self, what: &str, cond: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if cond(&seen) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; last answer {:?}, limits seen {:?}, failures {:?}",
                    seen.last,
                    seen.limits,
                    seen.failures
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until answers show `limit`.
    async fn wait_limit(&self, limit: Option<u32>) {
        self.wait_for(
            &format!("limit {limit:?}"),
            |s| matches!(s.last, Some((l, _)) if l == limit),
        )
        .await;
    }

    /// Lets the load run on for 50 more calls, stops it, and asserts no call failed and no
    /// answer was half-loaded.
    async fn finish(self) -> Seen {
        let calls = self.seen.lock().unwrap().calls;
        self.wait_for("50 more answers", |s| s.calls >= calls + 50)
            .await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        assert!(
            seen.failures.is_empty(),
            "failed calls: {:?}",
            seen.failures
        );
        assert!(
            seen.mixed.is_empty(),
            "half-loaded answers: {:?}",
            seen.mixed
        );
        assert!(
            seen.calls >= 50,
            "the load barely ran: {} calls",
            seen.calls
        );
        seen
    }
}

/// Waits up to 10 s for the log to contain `text` `times` times.
async fn wait_log(rl: &Ratelimitd, text: &str, times: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = rl.log();
        if log.matches(text).count() >= times {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "log never had {times}x {text:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn rewriting_a_file_switches_the_limits() {
    let dir = config_dir(&[("rules.yaml", &rules("rl", 10))]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    fs::write(dir.path().join("rules.yaml"), rules("rl", 20)).unwrap();
    load.wait_limit(Some(20)).await;
    let seen = load.finish().await;
    assert_eq!(seen.limits, BTreeSet::from([Some(10), Some(20)]));
    let log = wait_log(&rl, "config reloaded", 1).await;
    assert!(log.contains("generation=2"), "{log}");
}

#[tokio::test]
async fn adding_a_file_with_a_new_domain() {
    let dir = config_dir(&[("rules.yaml", &rules("rl", 10))]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let load = Load::start(&rl, ab("fresh")).await;
    // Unknown domain: OK, no limit.
    load.wait_for("OK without a limit", |s| {
        s.last == Some((None, Code::Ok as i32))
    })
    .await;
    fs::create_dir(dir.path().join("more")).unwrap();
    fs::write(dir.path().join("more/fresh.yaml"), rules("fresh", 20)).unwrap();
    load.wait_limit(Some(20)).await;
    load.finish().await;
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
async fn a_kubernetes_configmap_update() {
    let mount = tempfile::tempdir().unwrap();
    kubelet_update(mount.path(), "1", &rules("rl", 10));
    symlink("..data/config.yaml", mount.path().join("config.yaml")).unwrap();
    let rl = Ratelimitd::builder(mount.path())
        .env("RUNTIME_IGNOREDOTFILES", "true")
        .start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    kubelet_update(mount.path(), "2", &rules("rl", 20));
    load.wait_limit(Some(20)).await;
    // A second update: the watches followed the first one.
    kubelet_update(mount.path(), "3", &rules("rl", 30));
    load.wait_limit(Some(30)).await;
    let seen = load.finish().await;
    assert_eq!(seen.limits, BTreeSet::from([Some(10), Some(20), Some(30)]));
}

#[tokio::test]
async fn a_runtime_root_symlink_swap() {
    let root = tempfile::tempdir().unwrap();
    let release = |version: &str, limit: u32| {
        let config = root.path().join(version).join("config");
        fs::create_dir_all(&config).unwrap();
        fs::write(config.join("rules.yaml"), rules("rl", limit)).unwrap();
        symlink(version, root.path().join("current_tmp")).unwrap();
        fs::rename(root.path().join("current_tmp"), root.path().join("current")).unwrap();
    };
    release("v1", 10);
    let rl = Ratelimitd::builder(&root.path().join("current/config")).start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    release("v2", 20);
    load.wait_limit(Some(20)).await;
    release("v3", 30);
    load.wait_limit(Some(30)).await;
    load.finish().await;
}

/// The reference's layout, found through `RUNTIME_ROOT` (a `current` symlink to a release),
/// `RUNTIME_SUBDIRECTORY` and `RUNTIME_APPDIRECTORY`, with `RUNTIME_WATCH_ROOT=watch_root`:
/// whatever the value, a swap of the root and an in-place edit in the subdirectory are both
/// followed (the reference follows only the swaps with `true` and only the edits with
/// `false`), and the setting is accepted without a warning.
async fn runtime_root_follows_swaps_and_edits(watch_root: &str) {
    let root = tempfile::tempdir().unwrap();
    let app = |version: &str| root.path().join(version).join("ratelimit/config");
    let release = |version: &str, limit: u32| {
        fs::create_dir_all(app(version)).unwrap();
        fs::write(app(version).join("rules.yaml"), rules("rl", limit)).unwrap();
        symlink(version, root.path().join("current_tmp")).unwrap();
        fs::rename(root.path().join("current_tmp"), root.path().join("current")).unwrap();
    };
    release("v1", 10);
    let rl = Ratelimitd::from_runtime_root()
        .env(
            "RUNTIME_ROOT",
            root.path().join("current").to_str().unwrap(),
        )
        .env("RUNTIME_SUBDIRECTORY", "ratelimit")
        .env("RUNTIME_APPDIRECTORY", "config")
        .env("RUNTIME_WATCH_ROOT", watch_root)
        .start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    // A swap of the root.
    release("v2", 20);
    load.wait_limit(Some(20)).await;
    // An in-place edit in the subdirectory the root now points to.
    fs::write(app("v2").join("rules.yaml"), rules("rl", 30)).unwrap();
    load.wait_limit(Some(30)).await;
    // And a swap again: the watches followed both.
    release("v3", 40);
    load.wait_limit(Some(40)).await;
    let seen = load.finish().await;
    assert_eq!(
        seen.limits,
        BTreeSet::from([Some(10), Some(20), Some(30), Some(40)])
    );
    let log = rl.log();
    assert!(!log.contains("not supported"), "{log}");
}

#[tokio::test]
async fn runtime_watch_root_true_follows_root_swaps_and_subdirectory_edits() {
    runtime_root_follows_swaps_and_edits("true").await;
}

#[tokio::test]
async fn runtime_watch_root_false_follows_root_swaps_and_subdirectory_edits() {
    runtime_root_follows_swaps_and_edits("false").await;
}

#[tokio::test]
async fn a_broken_file_keeps_the_last_good_config_until_fixed() {
    let dir = config_dir(&[("rules.yaml", &rules("rl", 10))]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    let broken = rules("rl", 20).replacen("unit: hour", "unit: fortnight", 1);
    fs::write(dir.path().join("rules.yaml"), broken).unwrap();
    let log = wait_log(&rl, "config reload failed; keeping the last good config", 1).await;
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("config error"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(error.contains("rules.yaml"), "file missing: {error}");
    assert!(error.contains("rl > a"), "descriptor path missing: {error}");
    assert!(error.contains("rate_limit.unit"), "field missing: {error}");
    // The old limit stays in force.
    let calls = load.seen.lock().unwrap().calls;
    load.wait_for("more answers", |s| s.calls > calls + 50)
        .await;
    assert_eq!(load.seen.lock().unwrap().limits, BTreeSet::from([Some(10)]));
    fs::write(dir.path().join("rules.yaml"), rules("rl", 20)).unwrap();
    load.wait_limit(Some(20)).await;
    load.finish().await;
}

#[tokio::test]
async fn deleting_every_file_leaves_a_valid_empty_config() {
    let dir = config_dir(&[("rules.yaml", &rules("rl", 10))]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    fs::remove_file(dir.path().join("rules.yaml")).unwrap();
    // No domains: every answer is OK with no current limit.
    load.wait_for("OK without a limit", |s| {
        s.last == Some((None, Code::Ok as i32))
    })
    .await;
    load.finish().await;
    let log = wait_log(&rl, "config reloaded", 1).await;
    assert!(log.contains("domains=0"), "{log}");
}

fn hup(rl: &Ratelimitd) {
    let status = Command::new("kill")
        .args(["-HUP", &rl.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_at_once() {
    let dir = config_dir(&[("rules.yaml", &rules("rl", 10))]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let load = Load::start(&rl, ab("rl")).await;
    load.wait_limit(Some(10)).await;
    fs::write(dir.path().join("rules.yaml"), rules("rl", 20)).unwrap();
    hup(&rl);
    let started = Instant::now();
    load.wait_limit(Some(20)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // A SIGHUP with nothing changed is answered in the log, and the process lives on.
    let before = rl.log().matches("config unchanged").count();
    hup(&rl);
    wait_log(&rl, "config unchanged", before + 1).await;
    let calls = load.seen.lock().unwrap().calls;
    load.wait_for("more answers", |s| s.calls > calls + 20)
        .await;
    load.finish().await;
}

#[tokio::test]
async fn counters_survive_a_reload() {
    let counted = "  - key: c\n    rate_limit: {unit: minute, requests_per_unit: 5}\n";
    let dir = config_dir(&[("rules.yaml", &format!("{}{counted}", rules("rl", 10)))]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let load = Load::start(&rl, ab("rl")).await;
    let mut client = rl.client().await;
    ensure_window_room(60, Duration::from_secs(20)).await;
    for remaining in [4, 3, 2] {
        let r = client
            .should_rate_limit(request("rl", &[&[("c", "x")]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.statuses[0].limit_remaining, remaining);
    }
    // An unrelated change: the limit for `a` and `b`.
    fs::write(
        dir.path().join("rules.yaml"),
        format!("{}{counted}", rules("rl", 20)),
    )
    .unwrap();
    load.wait_limit(Some(20)).await;
    let r = client
        .should_rate_limit(request("rl", &[&[("c", "x")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].limit_remaining, 1);
    load.finish().await;
}
