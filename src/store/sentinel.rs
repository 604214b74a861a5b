//! `REDIS_TYPE=sentinel`: counters on the master that Redis Sentinel names, followed across
//! failovers.
//!
//! The master is asked of the sentinels (redis-rs's `SentinelClient`: the first that answers,
//! then the master's role checked), and one multiplexed connection to it is shared by every
//! call. That connection is dropped, and the master asked again by the next call, when:
//!
//! - a call fails in a way a failover explains: the connection lost or refused, no answer in
//!   time, or READONLY (the old master demoted to a replica while still reachable);
//! - the sentinels name another master: a background task asks one of them every
//!   [`WATCH_EVERY`] (`SENTINEL GET-MASTER-ADDR-BY-NAME`). A failover promotes the replica
//!   before the old master is told to follow it, and until then the old master still takes
//!   writes, which its resync then discards: without this, counts made in those seconds would
//!   be lost. Polling rather than a `+switch-master` subscription: one command on a connection
//!   we already know how to open, and it also notices a switch announced while we were not
//!   listening.
//!
//! So a failover costs the calls in flight and those until the sentinels name the new master,
//! usually a second or two; nothing is ever written to a replica (it answers READONLY).
//!
//! Re-resolution is single-flight without a lock held across an await: the connection lives in
//! a `OnceCell` (one opener, the others wait on it) behind an `ArcSwap`; a failed call or the
//! watcher swaps in an empty cell only if the one it judged is still the current one.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use redis::{
    aio::MultiplexedConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError,
    ServerErrorKind, TlsMode,
};
use tokio::sync::OnceCell;

use super::{
    redis::{from_redis, open_client},
    script::{self, EngineScript},
    topology::{self, SentinelUrl},
    RedisSettings, RedisTls, Store, StoreError,
};
use crate::limiter::engine::{Batch, DecidedList};

/// How often the sentinels are asked which server is the master.
pub const WATCH_EVERY: Duration = Duration::from_millis(500);

/// The master connection: a cell opened once, swapped for an empty one to re-resolve.
type Current = ArcSwap<OnceCell<Master>>;

/// A connection to the master and the address the sentinels gave for it.
#[derive(Clone)]
struct Master {
    addr: (String, u16),
    conn: MultiplexedConnection,
}

/// Counters on a Sentinel-managed master.
pub struct SentinelStore {
    url: SentinelUrl,
    tls: Option<RedisTls>,
    auth: String,
    sentinel_auth: String,
    /// The current master connection, opened by the first call that needs it; shared with
    /// the watcher task, which ends when the store is dropped.
    conn: Arc<Current>,
    timeout: Duration,
    engine: EngineScript,
}

impl SentinelStore {
    /// Reads the master name, sentinels and credentials; connects on first use.
    pub fn new(s: &RedisSettings) -> Result<Self, StoreError> {
        let url = topology::sentinel_url(&s.url).map_err(StoreError::url)?;
        if s.tls && s.tls_files.skip_hostname_verification {
            // redis-rs verifies a sentinel-resolved master fully or not at all.
            return Err(StoreError::Topology(
                "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION is not supported with REDIS_TYPE=sentinel"
                    .into(),
            ));
        }
        if s.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let store = Self {
            url,
            tls: s.tls.then(|| s.tls_files.clone()),
            auth: s.auth.clone(),
            sentinel_auth: s.sentinel_auth.clone(),
            conn: Arc::new(ArcSwap::from_pointee(OnceCell::new())),
            timeout: s.timeout,
            engine: EngineScript::default(),
        };
        // Settings errors now rather than at the first call.
        store.client().map_err(StoreError::Settings)?;
        let sentinels = store
            .sentinel_clients(&s.tls_files)
            .map_err(StoreError::Settings)?;
        // Outside a runtime (never in ratelimitd) there is no watcher; errors still re-resolve.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch(
                Arc::downgrade(&store.conn),
                sentinels,
                store.url.master.clone(),
                s.timeout,
            ));
        }
        Ok(store)
    }

    /// Each sentinel's address, over TLS when Redis is.
    fn sentinel_addrs(&self) -> impl Iterator<Item = ConnectionAddr> + '_ {
        self.url
            .sentinels
            .iter()
            .map(|(host, port)| match self.tls {
                Some(_) => ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                },
                None => ConnectionAddr::Tcp(host.clone(), *port),
            })
    }

    /// A plain client per sentinel, for the watcher.
    fn sentinel_clients(&self, files: &RedisTls) -> Result<Vec<redis::Client>, RedisError> {
        self.sentinel_addrs()
            .map(|addr| {
                let mut info = addr.into_connection_info()?;
                if let Some((user, pass)) = topology::credentials(&self.sentinel_auth) {
                    let mut redis = info.redis_settings().clone().set_password(pass);
                    if let Some(user) = user {
                        redis = redis.set_username(user);
                    }
                    info = info.set_redis_settings(redis);
                }
                open_client(info, files)
            })
            .collect()
    }

    /// A client resolving the master through the sentinels (no I/O until used).
    fn client(&self) -> Result<SentinelClient, RedisError> {
        let sentinels = self.sentinel_addrs();
        let nodelay = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let mut b =
            SentinelClientBuilder::new(sentinels, &self.url.master, SentinelServerType::Master)?
                .set_client_to_redis_tcp_settings(nodelay.clone())
                .set_client_to_sentinel_tcp_settings(nodelay);
        if let Some((user, pass)) = topology::credentials(&self.auth) {
            b = b.set_client_to_redis_password(pass);
            if let Some(user) = user {
                b = b.set_client_to_redis_username(user);
            }
        }
        if let Some((user, pass)) = topology::credentials(&self.sentinel_auth) {
            b = b.set_client_to_sentinel_password(pass);
            if let Some(user) = user {
                b = b.set_client_to_sentinel_username(user);
            }
        }
        if let Some(files) = &self.tls {
            b = b
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certs) = files.certificates() {
                b = b
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs);
            }
        }
        b.build()
    }

    /// The current master connection and its cell, resolving the master if needed.
    async fn conn(
        &self,
    ) -> (
        Arc<OnceCell<Master>>,
        Result<MultiplexedConnection, RedisError>,
    ) {
        let cell = self.conn.load_full();
        // No response timeout of redis-rs's own: `with_master` bounds every command with the
        // same `REDIS_TIMEOUT` (connecting included) and handles its expiry as redis-rs's
        // would be (the connection dropped, the sentinels asked again); one timer per call.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        let conn = cell
            .get_or_try_init(|| async {
                let client = self.client()?.async_get_client().await?;
                let addr = match client.get_connection_info().addr() {
                    ConnectionAddr::Tcp(host, port)
                    | ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
                    other => (other.to_string(), 0),
                };
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                tracing::info!(master = %self.url.master, host = %addr.0, port = addr.1, "connected to the master named by the sentinels");
                Ok(Master { addr, conn })
            })
            .await
            .map(|m| m.conn.clone());
        (cell, conn)
    }

    /// Runs `call` on the master within the timeout; drops the connection when the error
    /// says the master may have moved.
    async fn with_master<T, F>(
        &self,
        call: impl FnOnce(MultiplexedConnection) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        let run = async {
            let (cell, conn) = self.conn().await;
            let result = match conn {
                Ok(conn) => call(conn).await,
                Err(e) => Err(e),
            };
            (cell, result)
        };
        let (cell, error) = match tokio::time::timeout(self.timeout, run).await {
            Ok((_, Ok(v))) => return Ok(v),
            Ok((cell, Err(e))) => {
                let moved = is_moved(&e);
                let error = from_redis(e, self.timeout);
                (moved.then_some(cell), error)
            }
            // The cell in use is unknown here; the current one is at worst a fresh one.
            Err(_) => (
                Some(self.conn.load_full()),
                StoreError::Timeout(self.timeout),
            ),
        };
        if let Some(cell) = cell {
            let fresh = Arc::new(OnceCell::new());
            let previous = self.conn.compare_and_swap(&cell, fresh);
            if Arc::ptr_eq(&*previous, &cell) && cell.initialized() {
                tracing::warn!(error = %error, master = %self.url.master, "dropping the master connection; asking the sentinels again");
            }
        }
        Err(error)
    }

    /// `PING` on the master, bounded by the timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.with_master(|mut conn| async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(drop)
    }
}

/// The watcher: asks a sentinel which server is the master every [`WATCH_EVERY`], and drops
/// the current connection when it is to another one. Ends when the store is dropped.
async fn watch(
    current: Weak<Current>,
    sentinels: Vec<redis::Client>,
    name: String,
    timeout: Duration,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut next = 0usize;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(current) = current.upgrade() else {
            return;
        };
        let cell = current.load_full();
        let Some(connected) = cell.get().map(|m| m.addr.clone()) else {
            continue; // Nothing to move: the next call asks the sentinels anyway.
        };
        let Some(client) = sentinels.get(next % sentinels.len().max(1)) else {
            return;
        };
        let ask = async {
            let c = match conn.take() {
                Some(c) => c,
                None => client.get_multiplexed_async_connection().await?,
            };
            let mut asking = c.clone();
            let named = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&name)
                .query_async::<Option<(String, u16)>>(&mut asking)
                .await?;
            Ok::<_, RedisError>((c, named))
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(Ok((c, named))) => {
                conn = Some(c);
                if let Some(named) = named.filter(|named| *named != connected) {
                    let previous = current.compare_and_swap(&cell, Arc::new(OnceCell::new()));
                    if Arc::ptr_eq(&*previous, &cell) {
                        tracing::warn!(master = %name, from = %format!("{}:{}", connected.0, connected.1), to = %format!("{}:{}", named.0, named.1), "the sentinels name another master; reconnecting");
                    }
                }
            }
            // This sentinel did not answer: the next one, next time.
            _ => next = next.wrapping_add(1),
        }
    }
}

/// Whether `e` may mean the master changed: the connection is gone, or it is a replica now.
fn is_moved(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_timeout()
}

impl Store for SentinelStore {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        if batch.checks.is_empty() {
            return Ok(DecidedList::new());
        }
        let reply = self
            .with_master(|mut conn| async move { self.engine.run(&mut conn, batch, &[]).await })
            .await?;
        script::decisions(batch, reply)
    }
}
