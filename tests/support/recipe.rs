//! Starts one recipe of `examples/<name>/` exactly as shipped: its `envoy.yaml` (ports moved
//! to free ones), its `rules/` directory and the settings in its `ratelimitd.env`, with a
//! real redis-server behind ratelimitd. A recipe's files are the test's input, never copies.
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

use super::{free_ports, Envoy, Ratelimitd, RedisServer};

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
    let path = dir(name).join("envoy.yaml");
    let shipped =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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
    let rls_port = rls.rsplit_once(':').unwrap().1;
    let [ingress, upstream, admin] = free_ports();
    let config = shipped
        .replace("port_value: 10000", &format!("port_value: {ingress}"))
        .replace("port_value: 10001", &format!("port_value: {upstream}"))
        .replace("port_value: 8081", &format!("port_value: {rls_port}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace(
            "timeout: 0.02s",
            &format!("timeout: {}s", timeout.as_secs_f64()),
        );
    (config, ingress, admin)
}

/// One recipe running: Redis, ratelimitd with the recipe's rules and settings, and Envoy.
/// Fields drop in reverse order of start (Envoy first).
pub struct Recipe {
    pub envoy: Envoy,
    pub rl: Ratelimitd,
    pub redis: RedisServer,
    pub name: String,
}

impl Recipe {
    /// Starts the recipe `name` with its shipped settings, then `extra` (which win).
    pub fn start(name: &str, extra: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start();
        let rl = ratelimitd(name, &redis, extra);
        let (config, ingress, admin) = envoy_config(name, &rl.grpc, PATIENT);
        let envoy = Envoy::start_config(&config, ingress, admin);
        Recipe {
            envoy,
            rl,
            redis,
            name: name.to_owned(),
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
        self.rl = ratelimitd(&self.name, &self.redis, &all);
    }
}

/// ratelimitd serving `examples/<name>/rules` with the recipe's settings, counting in `redis`.
pub fn ratelimitd(name: &str, redis: &RedisServer, extra: &[(&str, &str)]) -> Ratelimitd {
    let mut b = Ratelimitd::builder(&dir(name).join("rules")).redis(redis);
    for (k, v) in settings(name) {
        b = b.env(&k, &v);
    }
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}
