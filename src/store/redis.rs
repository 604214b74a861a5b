//! Redis counters: the counting engine as one Lua script per request (`engine.lua`, or
//! `fixed.lua` for fixed windows alone; called through `script.rs`), over a few multiplexed
//! connections shared by every concurrent RPC.
//!
//! A script and not MULTI because what is written depends on what is read: a transaction
//! cannot branch on a value it has not returned yet, and WATCH would turn every contended key
//! into retries. Even `fixed.lua`, whose INCRBYs do not branch, is a script rather than the
//! reference's pipelined INCRBY/EXPIRE: it is atomic (checks sharing a key count one after
//! the other, and a failed call undoes its increments) and costs Redis about 1 µs more.
//! Called with EVALSHA; on NOSCRIPT (Redis restarted, `SCRIPT FLUSH`) with EVAL, which runs
//! and caches it in one more round trip. redis-rs's own `Script::invoke_async` would send
//! SCRIPT LOAD and then EVALSHA again: two more.
//!
//! Connections are multiplexed, not pooled: one connection already pipelines concurrent
//! commands, so a pool would add a checkout per request for nothing. `single` (over TCP, TLS
//! or a Unix socket) uses our own (`pipe.rs`: the command written straight into the outgoing
//! buffer; 8.6% fewer instructions and 8 fewer allocations per call than redis-rs's).
//! `sentinel` and `cluster`, whose discovery and routing are redis-rs's, use its connections.
//!
//! [`RedisStore`] is the store for every `REDIS_TYPE`: this file's `single`, or
//! `sentinel.rs`'s or `cluster.rs`'s, chosen once at start-up. The reference's pool and
//! pipeline settings describe radix pools and have no counterpart on multiplexed connections:
//! `REDIS_POOL_SIZE` is the number of connections for `single` (capped at the cores, see
//! [`connection_count`]; under `RUNTIME_FLAVOR=per_core`, one per runtime instead) and
//! ignored by `sentinel` (one connection to the master) and `cluster`
//! (one per node, redis-rs's); `REDIS_PIPELINE_WINDOW`/`_LIMIT` are what a multiplexed
//! connection does on its own (concurrent calls share writes); `REDIS_POOL_ON_EMPTY_BEHAVIOR`
//! has nothing to wait for (no checkout); `REDIS_CLUSTER_PIPELINE_PARALLELISM` is always
//! unbounded (a request's slots are sent concurrently).

use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use redis::{ConnectionAddr, IntoConnectionInfo, RedisError};

use super::{
    cluster::ClusterStore,
    pipe::{Addr, Failed, Pipe, Target},
    resp::Plain,
    script::{self, EngineScript},
    sentinel::SentinelStore,
    tls::Tls,
    topology::RedisType,
    within, Deadline, Store, StoreError,
};
use crate::limiter::engine::{Batch, DecidedList};

/// How to reach Redis (the reference's `REDIS_*` settings).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `host:port`, a Unix socket path, or a `redis://`, `rediss://` or `unix://` URL.
    pub url: String,
    /// How a bare `REDIS_URL` is read.
    pub socket_type: SocketType,
    /// `password` or `user:password`.
    pub auth: String,
    /// TLS for a bare `host:port` URL.
    pub tls: bool,
    /// `REDIS_TLS_*`: used by a TLS connection (`tls`, or a `rediss://` URL), else ignored.
    pub tls_files: RedisTls,
    /// Number of multiplexed connections (`single`); at least one is opened.
    pub pool_size: usize,
    /// Bound on every Redis operation, connecting included.
    pub timeout: Duration,
    /// `REDIS_TYPE`: how `url` is read and what it points at.
    pub redis_type: RedisType,
    /// `REDIS_SENTINEL_AUTH`: `password` or `user:password` for the sentinels.
    pub sentinel_auth: String,
    /// `REDIS_CLOSE_CONNECTION_ON_READONLY_ERROR`, for `single`: a READONLY reply (the server
    /// behind the address became a replica) replaces that connection with a new one, resolving
    /// the address again. `sentinel` and `cluster` always do the equivalent.
    pub close_on_readonly: bool,
}

/// The reference's `REDIS_TLS_*` files, read and checked at start-up; shared by the main
/// and the per-second Redis, as in the reference.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// `REDIS_TLS_CACERT` (PEM): the only roots Redis's certificate is verified against;
    /// without it, the public (webpki) roots.
    pub root_cert: Option<Vec<u8>>,
    /// `REDIS_TLS_CLIENT_CERT` and `REDIS_TLS_CLIENT_KEY` (PEM).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// `REDIS_TLS_SKIP_HOSTNAME_VERIFICATION`: the chain is verified, the name is not.
    pub skip_hostname_verification: bool,
}

impl RedisTls {
    /// The files as redis-rs takes them, when there are any (else its defaults: the public
    /// roots and no client certificate).
    pub(super) fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.root_cert.is_none() && self.client.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.root_cert.clone(),
        })
    }
}

impl std::fmt::Debug for RedisTls {
    // The key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("root_cert", &self.root_cert.is_some())
            .field("client", &self.client.is_some())
            .field(
                "skip_hostname_verification",
                &self.skip_hostname_verification,
            )
            .finish()
    }
}

impl RedisTls {
    /// Whether any file or switch is set.
    pub fn is_set(&self) -> bool {
        self.root_cert.is_some() || self.client.is_some() || self.skip_hostname_verification
    }
}

/// `REDIS_SOCKET_TYPE`: how a bare `REDIS_URL` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// `host:port`.
    Tcp,
    /// A Unix socket path.
    Unix,
}

/// Counters in Redis, whatever its `REDIS_TYPE`.
pub enum RedisStore {
    /// Each boxed: built once, and of very different sizes.
    Single(Box<Single>),
    Sentinel(Box<SentinelStore>),
    Cluster(Box<ClusterStore>),
}

impl RedisStore {
    /// Sets up the connections without waiting for Redis: they connect on first use and
    /// reconnect on their own, so ratelimitd starts (and answers `UNAVAILABLE`) while Redis
    /// is still coming up. An error is a settings error.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        Ok(match settings.redis_type {
            RedisType::Single => RedisStore::Single(Box::new(Single::new(settings)?)),
            RedisType::Sentinel => RedisStore::Sentinel(Box::new(SentinelStore::new(settings)?)),
            RedisType::Cluster => RedisStore::Cluster(Box::new(ClusterStore::new(settings)?)),
        })
    }

    /// Number of multiplexed connections in use (for `cluster`, per node).
    pub fn connections(&self) -> usize {
        match self {
            RedisStore::Single(s) => s.len(),
            RedisStore::Sentinel(_) | RedisStore::Cluster(_) => 1,
        }
    }

    /// `PING`, bounded by the timeout; for start-up logs and health.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            RedisStore::Single(s) => s.ping().await,
            RedisStore::Sentinel(s) => boxed(s.ping()).await,
            RedisStore::Cluster(s) => boxed(s.ping()).await,
        }
    }
}

impl Store for RedisStore {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        self.decide_by(batch, None).await
    }

    async fn decide_by(
        &self,
        batch: &Batch<'_>,
        deadline: Option<Deadline>,
    ) -> Result<DecidedList, StoreError> {
        match self {
            RedisStore::Single(s) => s.decide_by(batch, deadline).await,
            // redis-rs's connections: a timer per call (inside the box).
            RedisStore::Sentinel(s) => boxed(within(deadline, s.decide(batch))).await,
            RedisStore::Cluster(s) => boxed(within(deadline, s.decide(batch))).await,
        }
    }
}

/// `future` on the heap: the sentinel and cluster stores' futures nest redis-rs's deeply enough
/// that, inline under every handler's future, laying them out passes the compiler's query
/// depth. One allocation per call, against a network round trip.
fn boxed<'a, T>(
    future: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(future)
}

/// `REDIS_TYPE=single`: a few multiplexed connections to one address.
pub struct Single {
    /// Our own (`pipe.rs`); never empty.
    pipes: Vec<Pipe>,
    next: AtomicUsize,
    timeout: Duration,
    /// The counting engine's scripts and their SHA1s.
    engine: EngineScript,
}

impl Single {
    fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let info = connection_info(settings).map_err(StoreError::Settings)?;
        let target = pipe_target(&info, &settings.tls_files).map_err(StoreError::Settings)?;
        let pipes = (0..settings.pool_size.max(1))
            .map(|_| Pipe::new(target.clone(), settings.timeout, settings.close_on_readonly))
            .collect();
        Ok(Self {
            pipes,
            next: AtomicUsize::new(0),
            timeout: settings.timeout,
            engine: EngineScript::default(),
        })
    }

    fn len(&self) -> usize {
        self.pipes.len()
    }

    /// The connection to use: on a per-core runtime its own (so that its task, spawned where
    /// the connection was first used, runs on the caller's thread; see [`crate::workers`]),
    /// elsewhere round robin.
    fn index(&self) -> usize {
        let i = match crate::workers::index() {
            Some(runtime) => runtime,
            None => self.next.fetch_add(1, Ordering::Relaxed),
        };
        i % self.len().max(1)
    }

    /// `PING` on one connection, bounded by the timeout.
    async fn ping(&self) -> Result<(), StoreError> {
        let reply = pick(&self.pipes, self.index())?
            .call(&Plain(&[b"PING"]))
            .await
            .map_err(|e| from_redis(e, self.timeout))?;
        match reply {
            redis::Value::SimpleString(s) if s == "PONG" => Ok(()),
            other => Err(StoreError::Reply(format!("PING answered {other:?}"))),
        }
    }
}

fn pick<T>(links: &[T], i: usize) -> Result<&T, StoreError> {
    // Never empty (pool_size.max(1)); `get` keeps that from being a panic path.
    links
        .get(i)
        .ok_or_else(|| StoreError::Topology("no Redis connection".into()))
}

/// Our own connection's target; `tls` serves a TLS address.
fn pipe_target(info: &redis::ConnectionInfo, tls: &RedisTls) -> Result<Target, RedisError> {
    let (addr, tls) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => (Addr::Tcp(host.clone(), *port), None),
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            ..
        } => (
            Addr::Tcp(host.clone(), *port),
            Some(Tls::new(host, tls, *insecure)?),
        ),
        ConnectionAddr::Unix(path) => (Addr::Unix(path.clone()), None),
        other => {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "unsupported Redis address",
                format!("{other:?}"),
            )))
        }
    };
    let redis = info.redis_settings();
    Ok(Target {
        addr,
        tls,
        username: redis.username().map(str::to_owned),
        password: redis.password().map(str::to_owned),
        db: redis.db(),
    })
}

impl Single {
    /// [`Store::decide_by`] for [`RedisStore::Single`]. Bounded by the connection:
    /// `REDIS_TIMEOUT` from when the command was written, and the call's deadline, with one
    /// timer per connection for each, not per call (see pipe.rs).
    async fn decide_by(
        &self,
        batch: &Batch<'_>,
        deadline: Option<Deadline>,
    ) -> Result<DecidedList, StoreError> {
        if batch.checks.is_empty() {
            return Ok(DecidedList::new());
        }
        let pipe = pick(&self.pipes, self.index())?;
        let reply = self
            .engine
            .run_on(pipe, batch, deadline.map(|d| d.at))
            .await;
        let reply = reply.map_err(|e| match (e, deadline) {
            (Failed::Redis(e), _) => from_redis(e, self.timeout),
            (Failed::Overdue, Some(d)) => StoreError::Deadline(d.budget),
            // Not without a deadline; as a timeout if it were.
            (Failed::Overdue, None) => StoreError::Timeout(self.timeout),
        })?;
        script::decisions(batch, reply)
    }
}

/// Multiplexed connections to open: `REDIS_POOL_SIZE`, capped at the number of CPU cores.
/// One multiplexed connection already carries any number of concurrent requests, and each
/// extra one adds a driver task and smaller write batches; on 2 cores (docs/benchmarks.md)
/// 2 connections matched 10 in throughput with a lower p99 (5.9 ms against 8.0 ms).
pub fn connection_count(pool_size: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    pool_size.clamp(1, cores.max(1))
}

/// Sorts a redis-rs error; `timeout` is `REDIS_TIMEOUT`, which redis-rs's own timeouts also
/// are where they are set (cluster responses, and connecting in every topology).
pub(super) fn from_redis(e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout(timeout)
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        StoreError::Connection(e)
    } else {
        StoreError::Response(e)
    }
}

/// A client for `info`, with the `REDIS_TLS_*` files when it connects over TLS.
pub(super) fn open_client(
    info: redis::ConnectionInfo,
    tls: &RedisTls,
) -> Result<redis::Client, RedisError> {
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        return redis::Client::open(info);
    }
    let mut info = if let Some(certs) = tls.certificates() {
        redis::Client::build_with_tls(info, certs)?
            .get_connection_info()
            .clone()
    } else {
        info
    };
    if tls.skip_hostname_verification {
        let mut addr = info.addr().clone();
        addr.set_danger_accept_invalid_hostnames(true);
        info = info.set_addr(addr);
    }
    redis::Client::open(info)
}

/// Whether `s` connects over TLS (`REDIS_TLS` with a bare address, or a `rediss://` URL;
/// `REDIS_TLS` for sentinel and cluster, whose URLs are bare addresses).
pub fn uses_tls(s: &RedisSettings) -> bool {
    if s.redis_type != RedisType::Single {
        return s.tls;
    }
    connection_info(s).is_ok_and(|i| matches!(i.addr(), ConnectionAddr::TcpTls { .. }))
}

/// Reads the reference's `REDIS_URL`/`REDIS_SOCKET_TYPE`/`REDIS_AUTH`/`REDIS_TLS` into
/// redis-rs connection info.
pub fn connection_info(s: &RedisSettings) -> Result<redis::ConnectionInfo, RedisError> {
    let url = s.url.trim();
    let is_url = [
        "redis://",
        "rediss://",
        "unix://",
        "redis+unix://",
        "valkey://",
        "valkeys://",
    ]
    .iter()
    .any(|scheme| url.starts_with(scheme));
    let info = if is_url {
        url.into_connection_info()?
    } else if s.socket_type == SocketType::Unix || url.starts_with('/') {
        ConnectionAddr::Unix(PathBuf::from(url)).into_connection_info()?
    } else {
        let (host, port) = match url.rsplit_once(':') {
            Some((h, p)) => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().map_err(|_| {
                    RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "the port is not a number",
                        url.to_owned(),
                    ))
                })?,
            ),
            None => (url, 6379),
        };
        let addr = if s.tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        };
        addr.into_connection_info()?
    };
    // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs stall pipelined requests on a
    // busy multiplexed connection for ~40 ms (seen as p99 = 41 ms in docs/benchmarks.md).
    let info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    if s.auth.is_empty() {
        return Ok(info);
    }
    let mut redis = info.redis_settings().clone();
    match s.auth.split_once(':') {
        Some((user, pass)) => redis = redis.set_username(user).set_password(pass),
        None => redis = redis.set_password(&s.auth),
    }
    Ok(info.set_redis_settings(redis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, socket_type: &str, auth: &str) -> RedisSettings {
        let socket_type = if socket_type == "unix" {
            SocketType::Unix
        } else {
            SocketType::Tcp
        };
        RedisSettings {
            url: url.into(),
            socket_type,
            auth: auth.into(),
            tls: false,
            tls_files: RedisTls::default(),
            pool_size: 1,
            timeout: Duration::from_secs(1),
            redis_type: RedisType::Single,
            sentinel_auth: String::new(),
            close_on_readonly: false,
        }
    }

    #[test]
    fn reads_the_reference_url_forms() {
        let i = connection_info(&settings("redis.local:6380", "tcp", "")).unwrap();
        assert_eq!(i.addr(), &ConnectionAddr::Tcp("redis.local".into(), 6380));
        assert!(i.tcp_settings().nodelay());
        let i = connection_info(&settings("/var/run/redis.sock", "unix", "")).unwrap();
        assert_eq!(
            i.addr(),
            &ConnectionAddr::Unix("/var/run/redis.sock".into())
        );
        let i = connection_info(&settings("redis://127.0.0.1:7000/2", "unix", "")).unwrap();
        assert_eq!(i.addr(), &ConnectionAddr::Tcp("127.0.0.1".into(), 7000));
        let i = connection_info(&settings("127.0.0.1:6379", "tcp", "alice:s3cret")).unwrap();
        assert_eq!(i.redis_settings().username(), Some("alice"));
        assert_eq!(i.redis_settings().password(), Some("s3cret"));
        let i = connection_info(&settings("127.0.0.1:6379", "tcp", "s3cret")).unwrap();
        assert_eq!(i.redis_settings().username(), None);
        assert_eq!(i.redis_settings().password(), Some("s3cret"));
        assert!(connection_info(&settings("host:notaport", "tcp", "")).is_err());
    }
}
