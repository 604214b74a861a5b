//! Redis topologies from real processes on loopback: [`RedisCluster`] (three masters with a
//! replica each, made by `redis-cli --cluster create`) and [`SentinelGroup`] (a master, its
//! replica and three sentinels). Ready when the servers say so (`cluster_state:ok`, the
//! sentinels naming the master and its replica), polled, never slept on.

use std::{
    fs,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use super::{find_binary, free_port, RedisServer};

/// Polls `ok` every 50 ms until it holds, failing the test with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A field of an INFO-style reply (`name:value` lines).
pub fn info_field(reply: &str, name: &str) -> Option<String> {
    reply
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_owned())
}

/// A Redis Cluster of three masters with one replica each; node timeout 1 s, so a killed
/// master's replica takes over within a few seconds.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                // The bus port is given, not port + 10000 (which may not exist).
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-port",
                    &bus,
                    // Replicas sync at once, not after the default 5 s, so one can take over.
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let cli = find_binary(
            "redis-cli",
            "apt-get update && apt-get install -y redis-tools",
        );
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(RedisServer::addr))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        wait_until(Duration::from_secs(30), "every replica in sync", || {
            let replicas = cluster.with_role("slave");
            replicas.len() == 3
                && replicas.iter().all(|r| {
                    r.try_command(&["INFO", "replication"]).is_ok_and(|i| {
                        info_field(&i, "master_link_status").as_deref() == Some("up")
                    })
                })
        });
        cluster
    }

    /// `host:port,...` of every node: REDIS_URL for REDIS_TYPE=cluster.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node reports `cluster_state:ok` and sees all 16384 slots
    /// served.
    pub fn wait_ok(&self, limit: Duration) {
        wait_until(limit, "cluster_state:ok on every node", || {
            self.nodes.iter().filter(|n| n.running()).all(|n| {
                n.try_command(&["CLUSTER", "INFO"]).is_ok_and(|info| {
                    info_field(&info, "cluster_state").as_deref() == Some("ok")
                        && info_field(&info, "cluster_slots_ok").as_deref() == Some("16384")
                })
            })
        });
    }

    /// The running nodes whose role is `role` (`master` or `slave`).
    pub fn with_role(&self, role: &str) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.running() && n.role().as_deref() == Some(role))
            .collect()
    }
}

impl RedisServer {
    /// Whether the process is still running (not killed by the test).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `role` from INFO replication: `master` or `slave`.
    pub fn role(&self) -> Option<String> {
        let info = self.try_command(&["INFO", "replication"]).ok()?;
        info_field(&info, "role")
    }

    /// Calls of `command` (lower case) this server executed, from INFO commandstats (not the
    /// rejected ones: a cluster replica answers a write with MOVED, which redis-rs may send it
    /// while it looks for a failed master's successor).
    pub fn executed_calls(&self, command: &str) -> u64 {
        let stats = self.command(&["INFO", "commandstats"]);
        let Some(line) = info_field(&stats, &format!("cmdstat_{command}")) else {
            return 0;
        };
        let field = |name: &str| {
            line.split(',')
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field("calls")
    }
}

/// A master, one replica and three sentinels watching them as `name`.
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
    pub name: &'static str,
}

impl SentinelGroup {
    pub fn start() -> Self {
        let name = "rlmaster";
        let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
        let port = master.port.to_string();
        let replica = RedisServer::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &port,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        wait_until(Duration::from_secs(20), "replica in sync", || {
            replica
                .try_command(&["INFO", "replication"])
                .is_ok_and(|i| info_field(&i, "master_link_status").as_deref() == Some("up"))
        });
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(name, master.port)).collect();
        let group = Self {
            master,
            replica,
            sentinels,
            name,
        };
        wait_until(
            Duration::from_secs(30),
            "sentinels know the replica and each other",
            || {
                group.sentinels.iter().all(|s| {
                    s.command(&["SENTINEL", "MASTER", name]).is_some_and(|m| {
                        field_after(&m, "num-slaves") == Some(1)
                            && field_after(&m, "num-other-sentinels") == Some(2)
                    })
                })
            },
        );
        group
    }

    /// `master-name,host:port,...`: REDIS_URL for REDIS_TYPE=sentinel.
    pub fn url(&self) -> String {
        let mut url = self.name.to_owned();
        for s in &self.sentinels {
            url.push_str(&format!(",127.0.0.1:{}", s.port));
        }
        url
    }

    /// The master's port as the first sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        let reply =
            self.sentinels
                .first()?
                .command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name])?;
        reply.split("\r\n").nth(4)?.parse().ok()
    }
}

/// In a RESP array of alternating names and values, the integer value after `name`.
fn field_after(reply: &str, name: &str) -> Option<u64> {
    let mut lines = reply.split("\r\n").filter(|l| !l.starts_with(['$', '*']));
    lines.find(|l| *l == name)?;
    lines.next()?.parse().ok()
}

/// `redis-server --sentinel` on a free port.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl Sentinel {
    fn start(name: &str, master_port: u16) -> Self {
        let bin = find_binary(
            "redis-server",
            "apt-get update && apt-get install -y redis-server",
        );
        let dir = TempDir::new().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg(&conf)
            .arg("--sentinel")
            .arg("--logfile")
            .arg(dir.path().join("sentinel.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let s = Self {
            child,
            port,
            _dir: dir,
        };
        wait_until(Duration::from_secs(10), "sentinel answers PING", || {
            s.command(&["PING"]).is_some_and(|r| r.starts_with("+PONG"))
        });
        s
    }

    /// One RESP command; `None` when the sentinel does not answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
