//! Starts one recipe of `examples/<name>/` exactly as shipped: its `envoy.yaml` (ports moved
//! to free ones), its `rules/` directory and the settings in its `ratelimitd.env`, with a
//! real redis-server behind ratelimitd. A recipe's files are the test's input, never copies
//! (but for a test that edits the rules to see a hot reload: it gets a fresh copy of them, see
//! [`Recipe::start_with_copied_rules`]).
//!
//! Conventions every `examples/*/envoy.yaml` follows, so a user can run it as written next to
//! `ratelimitd serve --config examples/<name>/rules`:
//! - ingress on 127.0.0.1:10000, Envoy admin on 127.0.0.1:9901;
//! - the upstream, when there is one, a second listener on 127.0.0.1:10001;
//! - ratelimitd's gRPC at 127.0.0.1:8081 (cluster `ratelimitd`);
//! - the rate limit filter's `timeout: 0.02s` (Envoy's default is 20 ms too), which tests
//!   raise so a loaded machine does not fail calls open.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tempfile::TempDir;

use super::{http_header, move_envoy_ports, Envoy, Ratelimitd, RedisServer};

/// `examples/<name>`.
pub fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The settings of `examples/<name>/ratelimitd.env` (`KEY=VALUE` lines; `#` comments and
/// blank lines skipped). A recipe without the file has none.
pub fn settings(name: &str) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(dir(name).join("ratelimitd.env")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}/ratelimitd.env: `{l}` is not KEY=VALUE"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// How long the tests let Envoy wait for ratelimitd (the shipped 20 ms fails calls open on a
/// busy 2-core machine, and a call that fails open is not counted).
pub const PATIENT: Duration = Duration::from_secs(5);

/// The recipe's Envoy config pointed at ratelimitd's gRPC address `rls` (`127.0.0.1:port`),
/// with its ports moved to free ones: (config, ingress port, admin port).
pub fn envoy_config(name: &str, rls: &str, timeout: Duration) -> (String, u16, u16) {
    envoy_config_edited(name, rls, timeout, |shipped| shipped.to_owned())
}

/// [`envoy_config`], with the shipped text passed through `edit` first (e.g. a key made in the
/// test in place of the recipe's demo key). The port conventions are checked after the edit.
pub fn envoy_config_edited(
    name: &str,
    rls: &str,
    timeout: Duration,
    edit: impl FnOnce(&str) -> String,
) -> (String, u16, u16) {
    let path = dir(name).join("envoy.yaml");
    let shipped =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shipped = edit(&shipped);
    for needle in [
        "port_value: 10000",
        "port_value: 8081",
        "port_value: 9901",
        "timeout: 0.02s",
    ] {
        assert!(
            shipped.contains(needle),
            "{}: no `{needle}`",
            path.display()
        );
    }
    let patient = shipped.replace(
        "timeout: 0.02s",
        &format!("timeout: {}s", timeout.as_secs_f64()),
    );
    move_envoy_ports(&patient, rls)
}

/// One recipe running: Redis, ratelimitd with the recipe's rules and settings, and Envoy.
/// Fields drop in reverse order of start (Envoy first).
pub struct Recipe {
    pub envoy: Envoy,
    pub rl: Ratelimitd,
    pub redis: RedisServer,
    pub name: String,
    /// The rules directory ratelimitd serves: `examples/<name>/rules`, or the copy of it made
    /// by [`Recipe::start_with_copied_rules`].
    pub rules: PathBuf,
    /// Holds that copy, when there is one.
    _copy: Option<TempDir>,
}

impl Recipe {
    /// Starts the recipe `name` with its shipped settings, then `extra` (which win).
    pub fn start(name: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_serving(name, dir(name).join("rules"), None, extra, str::to_owned)
    }

    /// [`Recipe::start`], with the shipped envoy.yaml passed through `edit` before Envoy runs
    /// it (only for what a test cannot take as shipped, such as a key pair made in the test).
    pub fn start_with_envoy_edit(
        name: &str,
        extra: &[(&str, &str)],
        edit: impl FnOnce(&str) -> String,
    ) -> Self {
        Self::start_serving(name, dir(name).join("rules"), None, extra, edit)
    }

    /// [`Recipe::start`], with ratelimitd serving a fresh copy of the recipe's rules
    /// directory ([`Recipe::rules`]), which the test may edit to see a hot reload: write a
    /// file aside and rename it over the old one, as an operator would.
    pub fn start_with_copied_rules(name: &str, extra: &[(&str, &str)]) -> Self {
        let copy = TempDir::new().unwrap();
        let rules = copy.path().join("rules");
        copy_dir(&dir(name).join("rules"), &rules);
        Self::start_serving(name, rules, Some(copy), extra, str::to_owned)
    }

    fn start_serving(
        name: &str,
        rules: PathBuf,
        copy: Option<TempDir>,
        extra: &[(&str, &str)],
        edit: impl FnOnce(&str) -> String,
    ) -> Self {
        let redis = RedisServer::start();
        let rl = ratelimitd_serving(name, &rules, &redis, extra);
        let (config, ingress, admin) = envoy_config_edited(name, &rl.grpc, PATIENT, edit);
        let envoy = Envoy::start_config(&config, ingress, admin);
        Recipe {
            envoy,
            rl,
            redis,
            name: name.to_owned(),
            rules,
            _copy: copy,
        }
    }

    /// Stops ratelimitd (unless a test already stopped it, e.g. with `rl.terminate()` to show
    /// Envoy failing open) and starts it again (same rules, settings and Redis) on the same
    /// gRPC port, so the running Envoy reaches it again.
    pub fn restart_ratelimitd(&mut self, extra: &[(&str, &str)]) {
        let port = self.rl.grpc.rsplit_once(':').unwrap().1.to_owned();
        if self.rl.running() {
            self.rl.terminate();
        }
        let mut all = extra.to_vec();
        all.push(("GRPC_PORT", &port));
        self.rl = ratelimitd_serving(&self.name, &self.rules, &self.redis, &all);
    }

    /// Every key in the recipe's Redis, sorted.
    pub fn redis_keys(&self) -> Vec<String> {
        self.redis.keys()
    }

    /// A command's reply as a number: `GET` of a counter (`None` when the key is absent),
    /// `TTL`, ...
    pub fn redis_number(&self, args: &[&str]) -> Option<i64> {
        let reply = self.redis.command(args);
        if let Some(n) = reply.strip_prefix(':') {
            return Some(n.trim_end().parse().unwrap());
        }
        match reply.split("\r\n").nth(1) {
            Some(v) if !reply.starts_with("$-1") => Some(
                v.parse()
                    .unwrap_or_else(|e| panic!("{args:?}: {reply:?}: {e}")),
            ),
            _ => None,
        }
    }
}

/// Copies the files of `from` into `to` (created), subdirectories too.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// ratelimitd serving `examples/<name>/rules` with the recipe's settings, counting in `redis`.
pub fn ratelimitd(name: &str, redis: &RedisServer, extra: &[(&str, &str)]) -> Ratelimitd {
    ratelimitd_serving(name, &dir(name).join("rules"), redis, extra)
}

/// [`ratelimitd`] serving the rules in `rules` (a copy of the recipe's, say) with the
/// recipe's settings.
pub fn ratelimitd_serving(
    name: &str,
    rules: &Path,
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> Ratelimitd {
    let mut b = Ratelimitd::builder(rules).redis(redis);
    for (k, v) in settings(name) {
        b = b.env(&k, &v);
    }
    b.envs(extra).start()
}

/// [`super::http_request`] from the loopback address `source` (e.g. 127.0.0.2, another
/// client as Envoy's `remote_address` sees it; Linux answers on all of 127.0.0.0/8):
/// (status, lower-cased headers, body).
pub async fn http_request_from(
    source: std::net::Ipv4Addr,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut s = socket.connect(addr.parse().unwrap()).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    super::parse_http_response(&raw)
}

/// The whole seconds in header `name` of a response (`retry-after`, `ratelimit-reset`); fails
/// the test when it is missing or not a number.
pub fn header_secs(headers: &[(String, String)], name: &str) -> u64 {
    let value = http_header(headers, name);
    value
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} {value:?}: {headers:?}"))
}

/// Seconds until the current window of `secs` seconds ends, as a fixed window reports them
/// (read before and after a request, they bound what ratelimitd reported, however slow the
/// machine).
pub fn secs_to_window_end(secs: u64) -> u64 {
    secs - super::unix_now() % secs
}
