//! `REDIS_TYPE=cluster` and `REDIS_TYPE=sentinel` against real servers: a 3-master cluster with
//! a replica each, a master/replica pair with three sentinels. Limits exact across two
//! ratelimitd instances with keys on every node; requests whose checks span slots (sliding
//! windows whose two windows are on different nodes included); failovers under continuous
//! calls; bad settings refused at start-up.
#![allow(clippy::unwrap_used)]
mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::Code, RateLimitRequest,
};
use support::{topology::*, *};

const RULES: &str = r#"
domain: topo
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 5}
  - key: fixed
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: sliding
    rate_limit: {unit: hour, requests_per_unit: 4, algorithm: sliding_window}
  - key: bucket
    rate_limit: {unit: hour, requests_per_unit: 2, algorithm: token_bucket}
"#;

fn ratelimitd(dir: &std::path::Path, redis_type: &str, url: &str) -> Ratelimitd {
    Ratelimitd::builder(dir)
        .env("BACKEND_TYPE", "redis")
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_TYPE", redis_type)
        .env("REDIS_URL", url)
        .env("REDIS_TIMEOUT", "1s")
        .start()
}

/// The overall code and each descriptor's code, or the gRPC error's code.
async fn call(
    client: &mut ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>,
    req: RateLimitRequest,
) -> Result<(Code, Vec<Code>), tonic::Status> {
    let r = client.should_rate_limit(req).await?;
    let r = r.into_inner();
    Ok((
        r.overall_code(),
        r.statuses.iter().map(|s| s.code()).collect(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_limits_are_exact_across_two_instances_and_every_slot() {
    ensure_window_room(3600, Duration::from_secs(60)).await;
    let cluster = RedisCluster::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let a = ratelimitd(dir.path(), "cluster", &cluster.url());
    let b = ratelimitd(dir.path(), "cluster", &cluster.url());
    let users: Vec<String> = (0..120).map(|i| format!("u{i}")).collect();
    // 8 hits per user, alternating instances, all users concurrently: 5 OK, 3 OVER each.
    let mut tasks = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let (mut ca, mut cb) = (a.client().await, b.client().await);
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for hit in 0..8 {
                let client = if (hit + n) % 2 == 0 { &mut ca } else { &mut cb };
                let (code, _) = call(client, request("topo", &[&[("user", &user)]]))
                    .await
                    .unwrap();
                codes.push(code);
            }
            (user, codes)
        }));
    }
    for t in tasks {
        let (user, codes) = t.await.unwrap();
        let ok = codes.iter().filter(|&&c| c == Code::Ok).count();
        assert_eq!((ok, codes.len() - ok), (5, 3), "{user}: {codes:?}");
    }
    // The keys are the reference's, spread over every master, none on a replica.
    let masters = cluster.with_role("master");
    assert_eq!(masters.len(), 3);
    for m in &masters {
        let keys: u64 = m.command(&["DBSIZE"])[1..].trim().parse().unwrap();
        assert!(keys > 10, "master {} holds {keys} keys", m.port);
    }
    let window = unix_now() / 3600 * 3600;
    let owner = masters
        .iter()
        .find(|m| m.command(&["EXISTS", &format!("topo_user_u7_{window}")]) == ":1\r\n");
    assert!(owner.is_some(), "topo_user_u7_{window} on no master");
    for r in cluster.with_role("slave") {
        for cmd in ["evalsha", "eval", "get"] {
            assert_eq!(r.executed_calls(cmd), 0, "{cmd} run by replica {}", r.port);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_requests_spanning_slots_get_every_limit_right() {
    ensure_window_room(3600, Duration::from_secs(60)).await;
    let cluster = RedisCluster::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = ratelimitd(dir.path(), "cluster", &cluster.url());
    let mut client = rl.client().await;
    // Several values of each limit in one request: many slots, and every sliding window's
    // two keys on different slots (their names differ in the window start).
    let values = ["a", "b", "c", "d"];
    let mut descriptors: Vec<Vec<(&str, &str)>> = Vec::new();
    for v in values {
        for key in ["fixed", "sliding", "bucket"] {
            descriptors.push(vec![(key, v)]);
        }
    }
    let d: Vec<&[(&str, &str)]> = descriptors.iter().map(Vec::as_slice).collect();
    let limit = |key: &str| match key {
        "fixed" => 3,
        "sliding" => 4,
        _ => 2,
    };
    for hit in 1..=6 {
        let (_, codes) = call(&mut client, request("topo", &d)).await.unwrap();
        for (desc, code) in descriptors.iter().zip(&codes) {
            let want = if hit <= limit(desc[0].0) {
                Code::Ok
            } else {
                Code::OverLimit
            };
            assert_eq!(*code, want, "hit {hit}, {desc:?}");
        }
    }
    // Scripts flushed everywhere (as after a restart): EVALSHA's NOSCRIPT falls back to
    // EVAL on each node, and the limits are where they were.
    for m in cluster.with_role("master") {
        assert_eq!(m.command(&["SCRIPT", "FLUSH"]), "+OK\r\n");
    }
    let (_, codes) = call(&mut client, request("topo", &d)).await.unwrap();
    assert!(codes.iter().all(|&c| c == Code::OverLimit), "{codes:?}");

    // A sliding window whose previous window, on another node, is full: read from there
    // (with at least a minute of the hour left, 1000 hits weigh at least 16 > 4).
    let window = unix_now() / 3600 * 3600;
    let previous = format!("topo_sliding_prev_{}", window - 3600);
    let current = format!("topo_sliding_prev_{window}");
    assert_ne!(slot_of(&cluster, &previous), slot_of(&cluster, &current));
    let c =
        redis::cluster::ClusterClient::new(vec![format!("redis://{}", cluster.nodes[0].addr())])
            .unwrap();
    let mut conn = c.get_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&previous)
        .arg(1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..3 {
        let (code, _) = call(&mut client, request("topo", &[&[("sliding", "prev")]]))
            .await
            .unwrap();
        assert_eq!(
            code,
            Code::OverLimit,
            "the previous window's hits not counted"
        );
    }
}

/// Slots moving between masters under continuous calls (MOVED and ASK redirections): no
/// call fails, and limits are exact afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_resharding_fails_no_call() {
    ensure_window_room(3600, Duration::from_secs(90)).await;
    let cluster = RedisCluster::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = ratelimitd(dir.path(), "cluster", &cluster.url());
    let load = Load::start(&rl).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let masters = cluster.with_role("master");
    let id = |n: &RedisServer| {
        let reply = n.command(&["CLUSTER", "MYID"]);
        reply.split("\r\n").nth(1).unwrap().to_owned()
    };
    let (from, to) = (id(masters[0]), id(masters[1]));
    let cli = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &masters[0].addr()])
        .args(["--cluster-from", &from, "--cluster-to", &to])
        .args(["--cluster-slots", "2000", "--cluster-yes"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stdout)
    );
    cluster.wait_ok(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "ok {ok}");
    assert!(ok > 20, "ok {ok}");
    for user in ["moved-a", "moved-b", "moved-c", "moved-d", "moved-e"] {
        enforced(&rl, user).await;
    }
}

/// `STRICT_CHARGING` across slots: a request refused by one slot's limit charges none of
/// another slot's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_strict_charging_spans_slots() {
    ensure_window_room(3600, Duration::from_secs(60)).await;
    let cluster = RedisCluster::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .env("BACKEND_TYPE", "redis")
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_TYPE", "cluster")
        .env("REDIS_URL", &cluster.url())
        .env("STRICT_CHARGING", "true")
        .start();
    let window = unix_now() / 3600 * 3600;
    assert_ne!(
        slot_of(&cluster, &format!("topo_fixed_x_{window}")),
        slot_of(&cluster, &format!("topo_fixed_y_{window}"))
    );
    let mut client = rl.client().await;
    for _ in 0..3 {
        let (code, _) = call(&mut client, request("topo", &[&[("fixed", "x")]]))
            .await
            .unwrap();
        assert_eq!(code, Code::Ok);
    }
    let (code, codes) = call(
        &mut client,
        request("topo", &[&[("fixed", "x")], &[("fixed", "y")]]),
    )
    .await
    .unwrap();
    assert_eq!(
        (code, codes),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok])
    );
    for hit in 1..=3 {
        let (code, _) = call(&mut client, request("topo", &[&[("fixed", "y")]]))
            .await
            .unwrap();
        assert_eq!(
            code,
            Code::Ok,
            "y hit {hit}: the refused request charged it"
        );
    }
}

/// CLUSTER KEYSLOT, asked of a node.
fn slot_of(cluster: &RedisCluster, key: &str) -> String {
    cluster.nodes[0].command(&["CLUSTER", "KEYSLOT", key])
}

/// Calls `request` every few ms until stopped; counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(rl: &Ratelimitd) -> Self {
        let mut client = rl.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let user = format!("load{}", i % 50);
                    match call(&mut client, request("topo", &[&[("user", &user)]])).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Waits until calls answer again: half a second with more than 10 successes and no
    /// failure, within `limit`.
    async fn recovers(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (ok, failed) = (
                self.ok.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed),
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (ok_now, failed_now) = (
                self.ok.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed),
            );
            if failed_now == failed && ok_now > ok + 10 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "calls did not recover within {limit:?}: ok {ok_now}, failed {failed_now}"
            );
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// `limit` hits OK then OVER, for a fresh user.
async fn enforced(rl: &Ratelimitd, user: &str) {
    let mut client = rl.client().await;
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(
            call(&mut client, request("topo", &[&[("user", user)]]))
                .await
                .unwrap()
                .0,
        );
    }
    let ok = codes.iter().filter(|&&c| c == Code::Ok).count();
    assert_eq!(ok, 5, "{user}: {codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_failover_under_continuous_calls() {
    ensure_window_room(3600, Duration::from_secs(90)).await;
    let mut cluster = RedisCluster::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = ratelimitd(dir.path(), "cluster", &cluster.url());
    let load = Load::start(&rl).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replicas_before: Vec<u16> = cluster.with_role("slave").iter().map(|r| r.port).collect();
    let victim = cluster
        .nodes
        .iter()
        .position(|n| n.role().as_deref() == Some("master"))
        .unwrap();
    cluster.nodes[victim].kill();
    // A replica takes over after the node timeout (1 s) and an election.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.with_role("master").len() != 3 {
        if Instant::now() > deadline {
            let live = cluster.nodes.iter().find(|n| n.running()).unwrap();
            panic!(
                "no replica promoted; nodes:\n{}\nlog:\n{}",
                live.command(&["CLUSTER", "NODES"]),
                rl.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_ok(Duration::from_secs(30));
    load.recovers(Duration::from_secs(15)).await;
    let (ok, failed) = load.stop().await;
    assert!(ok > 20, "ok {ok}, failed {failed}");
    for user in ["after-a", "after-b", "after-c", "after-d", "after-e"] {
        enforced(&rl, user).await;
    }
    // The replicas that stayed replicas never saw a script or a read.
    for r in cluster.with_role("slave") {
        assert!(replicas_before.contains(&r.port));
        for cmd in ["evalsha", "eval", "get"] {
            assert_eq!(r.executed_calls(cmd), 0, "{cmd} run by replica {}", r.port);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_continuous_calls() {
    ensure_window_room(3600, Duration::from_secs(90)).await;
    let group = SentinelGroup::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = ratelimitd(dir.path(), "sentinel", &group.url());
    enforced(&rl, "before").await;
    assert_eq!(group.master_port(), Some(group.master.port));
    let load = Load::start(&rl).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reply = group.sentinels[0]
        .command(&["SENTINEL", "FAILOVER", group.name])
        .unwrap();
    assert!(reply.starts_with("+OK"), "{reply}");
    wait_until(
        Duration::from_secs(20),
        "the sentinels name the replica",
        || group.master_port() == Some(group.replica.port),
    );
    wait_until(Duration::from_secs(20), "the replica is master", || {
        group.replica.role().as_deref() == Some("master")
    });
    load.recovers(Duration::from_secs(10)).await;
    let (ok, failed) = load.stop().await;
    assert!(ok > 20, "ok {ok}, failed {failed}");
    enforced(&rl, "after").await;
    let window = unix_now() / 3600 * 3600;
    assert_eq!(
        group
            .replica
            .command(&["GET", &format!("topo_user_after_{window}")]),
        "$1\r\n7\r\n",
        "counted on the new master"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sentinel_master_is_bounded_by_redis_timeout() {
    // REDIS_TIMEOUT (1 s here) is the only bound on a sentinel master's answer: redis-rs's own
    // response timeout is not set. A frozen master fails the call in time, not never.
    let group = SentinelGroup::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = ratelimitd(dir.path(), "sentinel", &group.url());
    enforced(&rl, "before-stall").await;
    let mut client = rl.client().await;
    group.master.pause();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        call(&mut client, request("topo", &[&[("user", "stalled")]])),
    )
    .await;
    group.master.resume();
    let e = answer
        .expect("answered within the guard")
        .expect_err("a frozen master cannot answer");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "failed before REDIS_TIMEOUT: {:?}",
        started.elapsed()
    );
    // Thawed, the master (asked of the sentinels again; it may have failed over, their
    // down-after is 1 s) counts as before.
    let mut recovered = false;
    for _ in 0..50 {
        if call(&mut client, request("topo", &[&[("user", "probe")]]))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "no answer after the master thawed");
    enforced(&rl, "after-stall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_second_redis_may_be_a_cluster() {
    ensure_window_room(30, Duration::from_secs(10)).await;
    let cluster = RedisCluster::start();
    let main = RedisServer::start();
    let rules = r#"
domain: ps
descriptors:
  - key: sec
    rate_limit: {unit: second, unit_multiplier: 30, requests_per_unit: 3}
  - key: hour
    rate_limit: {unit: hour, requests_per_unit: 2}
"#;
    let dir = config_dir(&[("r.yaml", rules)]);
    let rl = Ratelimitd::builder(dir.path())
        .redis(&main)
        .env("REDIS_PERSECOND", "true")
        .env("REDIS_PERSECOND_SOCKET_TYPE", "tcp")
        .env("REDIS_PERSECOND_TYPE", "cluster")
        .env("REDIS_PERSECOND_URL", &cluster.url())
        .start();
    let mut client = rl.client().await;
    let d: [&[(&str, &str)]; 3] = [&[("sec", "a")], &[("sec", "b")], &[("hour", "a")]];
    for hit in 1..=5 {
        let (_, codes) = call(&mut client, request("ps", &d)).await.unwrap();
        let want = |limit| {
            if hit <= limit {
                Code::Ok
            } else {
                Code::OverLimit
            }
        };
        assert_eq!(codes, [want(3), want(3), want(2)], "hit {hit}");
    }
    let dbsize = |r: &RedisServer| -> u64 { r.command(&["DBSIZE"])[1..].trim().parse().unwrap() };
    assert_eq!(dbsize(&main), 1, "the hour limit only");
    let on_cluster: u64 = cluster.with_role("master").into_iter().map(dbsize).sum();
    assert_eq!(on_cluster, 2, "the two per-second limits");
}

/// `REDIS_CLOSE_CONNECTION_ON_READONLY_ERROR`: a single Redis turned replica answers READONLY;
/// the connection is replaced, and calls work again once it is a master again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_replaces_a_single_connection_when_asked() {
    ensure_window_room(3600, Duration::from_secs(30)).await;
    let redis = RedisServer::start();
    let other = RedisServer::start();
    let dir = config_dir(&[("r.yaml", RULES)]);
    let rl = Ratelimitd::builder(dir.path())
        .redis(&redis)
        .env("REDIS_POOL_SIZE", "1")
        .env("REDIS_CLOSE_CONNECTION_ON_READONLY_ERROR", "true")
        .start();
    let mut client = rl.client().await;
    let req = || request("topo", &[&[("user", "ro")]]);
    assert!(call(&mut client, req()).await.is_ok());
    let before = redis.scripting_clients();
    assert_eq!(before.len(), 1, "one connection (REDIS_POOL_SIZE=1)");
    let port = other.port.to_string();
    redis.command(&["REPLICAOF", "127.0.0.1", &port]);
    let e = call(&mut client, req()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    wait_until(Duration::from_secs(5), "the connection replaced", || {
        rl.log()
            .contains("READONLY from Redis: connection replaced")
    });
    redis.command(&["REPLICAOF", "NO", "ONE"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&mut client, req()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "calls did not recover:\n{}",
            rl.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = redis.scripting_clients();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before, "a new connection serves the calls");
}

#[test]
fn bad_topology_settings_are_refused_at_start_up() {
    let dir = config_dir(&[("r.yaml", RULES)]);
    let refused = |env: &[(&str, &str)]| {
        let mut all = vec![("BACKEND_TYPE", "redis"), ("REDIS_SOCKET_TYPE", "tcp")];
        all.extend_from_slice(env);
        let (code, log) = serve_expecting_refusal(dir.path(), &all);
        assert_ne!(code, Some(0), "{log}");
        log
    };
    let log = refused(&[("REDIS_TYPE", "twemproxy"), ("REDIS_URL", "127.0.0.1:1")]);
    assert!(
        log.contains(
            "REDIS_TYPE 'twemproxy' is not supported (expected single, sentinel or cluster)"
        ),
        "{log}"
    );
    let log = refused(&[
        ("REDIS_TYPE", "cluster"),
        ("REDIS_URL", "127.0.0.1:7000,127.0.0.1"),
    ]);
    assert!(
        log.contains(
            "REDIS_TYPE=cluster: '127.0.0.1' is not host:port (in '127.0.0.1:7000,127.0.0.1')"
        ),
        "{log}"
    );
    let log = refused(&[("REDIS_TYPE", "sentinel"), ("REDIS_URL", "127.0.0.1:26379")]);
    assert!(
        log.contains("REDIS_TYPE=sentinel expects the master name and the sentinels"),
        "{log}"
    );
    let log = refused(&[
        ("REDIS_PERSECOND", "true"),
        ("REDIS_URL", "127.0.0.1:1"),
        ("REDIS_PERSECOND_SOCKET_TYPE", "tcp"),
        ("REDIS_PERSECOND_TYPE", "cluster"),
        ("REDIS_PERSECOND_URL", ""),
    ]);
    assert!(log.contains("REDIS_PERSECOND_URL"), "{log}");
    assert!(
        log.contains("REDIS_TYPE=cluster expects the nodes"),
        "{log}"
    );
}
