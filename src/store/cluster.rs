//! `REDIS_TYPE=cluster`: counters in Redis Cluster, keys byte-identical to the reference's (no
//! hash tags added), so a request's keys are spread over many slots.
//!
//! One script call can only touch keys of one slot (CROSSSLOT otherwise), so a request is
//! split by the slot of each check's key and the groups go through `split.rs`'s N-way split:
//! one EVALSHA per slot, all concurrently, decisions merged back in order, and the two-phase
//! read-then-charge for `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`/`STRICT_CHARGING` across
//! slots. Grouping per slot rather than per node needs no slot map of our own, and is what
//! keeps each call valid while slots migrate. What stays atomic: each slot's checks together;
//! across slots, what `split.rs` describes (the reference is not atomic there either).
//!
//! Sliding windows read two keys, the current and the previous window's, whose names differ
//! in the window start and so hash to different slots (both on one node only by chance). The
//! previous window is closed: nothing charges it any more (it was the current window until
//! its end, and only the current window is written), so its count is read first, with a GET
//! routed to its own master, and handed to the script as a value (`engine.lua`'s `previous`
//! field `c<value>`); the script runs on the current key's slot. The decision is the one the
//! single-server script makes, except for hits that instances with clocks behind ours still
//! add to the previous window after we read it: the same skew the single-server case has,
//! moved by one round trip. The cost is that round trip, for requests with sliding windows.
//!
//! Connections: redis-rs's cluster connection, one multiplexed connection per node, shared by
//! every call; it follows MOVED/ASK, refreshes the slot map on topology changes and on
//! READONLY (a demoted master), reconnects to nodes that come back, and sends only to masters
//! (no READONLY command, no replica reads). It is opened on first use, so ratelimitd starts
//! while the cluster is still coming up. EVALSHA falls back to EVAL on NOSCRIPT on the node
//! that answered it.

use std::time::Duration;

use redis::{
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    ConnectionAddr, IntoConnectionInfo, RedisError, TlsMode,
};
use tokio::sync::OnceCell;

use super::{
    redis::from_redis,
    script::{self, EngineScript},
    split::{self, Parted},
    topology, RedisSettings, Store, StoreError,
};
use crate::limiter::{
    algorithm::Algorithm,
    engine::{Batch, Check, DecidedList},
};

/// Counters in Redis Cluster.
pub struct ClusterStore {
    client: ClusterClient,
    config: ClusterConfig,
    /// Opened by the first call that finds it unset; a failed open is retried by the next.
    conn: OnceCell<ClusterConnection>,
    timeout: Duration,
    engine: EngineScript,
}

impl ClusterStore {
    /// Reads the nodes and credentials; connects on first use.
    pub fn new(s: &RedisSettings) -> Result<Self, StoreError> {
        let nodes = topology::cluster_nodes(&s.url).map_err(StoreError::url)?;
        let nodelay = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let infos = nodes
            .into_iter()
            .map(|(host, port)| {
                let addr = if s.tls {
                    ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host, port)
                };
                addr.into_connection_info()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::Settings)?;
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(s.timeout)
            .response_timeout(s.timeout)
            .tcp_settings(nodelay);
        if let Some((user, pass)) = topology::credentials(&s.auth) {
            builder = builder.password(pass);
            if let Some(user) = user {
                builder = builder.username(user);
            }
        }
        if s.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            builder = builder.tls(TlsMode::Secure);
            let files = &s.tls_files;
            if let Some(certs) = files.certificates() {
                builder = builder.certs(certs);
            }
            if files.skip_hostname_verification {
                builder = builder.danger_accept_invalid_hostnames(true);
            }
        }
        let client = builder.build().map_err(StoreError::Settings)?;
        let config = ClusterConfig::new()
            .set_connection_timeout(s.timeout)
            .set_response_timeout(s.timeout);
        Ok(Self {
            client,
            config,
            conn: OnceCell::new(),
            timeout: s.timeout,
            engine: EngineScript::default(),
        })
    }

    async fn conn(&self) -> Result<ClusterConnection, RedisError> {
        self.conn
            .get_or_try_init(|| {
                self.client
                    .get_async_connection_with_config(self.config.clone())
            })
            .await
            .cloned()
    }

    /// `PING` on a master, bounded by the timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let ping = async {
            let mut conn = self.conn().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        bounded(self.timeout, ping).await.map(drop)
    }

    /// The previous windows of `batch`'s sliding windows kept on another slot than their
    /// current one, read concurrently (see the module doc); `None` where the script reads it.
    async fn read_previous(
        &self,
        conn: &ClusterConnection,
        batch: &Batch<'_>,
    ) -> Result<Vec<Option<String>>, RedisError> {
        let reads = batch.checks.iter().map(|c| {
            let mut conn = conn.clone();
            async move {
                match elsewhere(c) {
                    Some(previous) => redis::cmd("GET")
                        .arg(previous)
                        .query_async::<Option<String>>(&mut conn)
                        .await
                        .map(|v| Some(v.unwrap_or_else(|| "0".to_owned()))),
                    None => Ok(None),
                }
            }
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .collect()
    }
}

/// A sliding window's previous key when it hashes to another slot than its current key.
fn elsewhere(c: &Check) -> Option<&str> {
    let previous = c.previous.as_deref()?;
    (c.quota.algorithm == Algorithm::SlidingWindow && slot(previous) != slot(&c.key))
        .then_some(previous)
}

/// Parts are hash slots.
impl Parted for ClusterStore {
    fn part_of(&self, c: &Check) -> u32 {
        u32::from(slot(&c.key))
    }

    async fn decide_part(&self, _slot: u32, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        let call = async {
            let mut conn = self.conn().await?;
            let read = self.read_previous(&conn, batch).await?;
            self.engine.run(&mut conn, batch, &read).await
        };
        script::decisions(batch, bounded(self.timeout, call).await?)
    }
}

impl Store for ClusterStore {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        split::decide(self, batch).await
    }
}

/// `call` within `timeout`, its error sorted.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(from_redis(e, timeout)),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// The key's hash slot, as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of its
/// first non-empty `{hash tag}`, modulo 16384.
pub fn slot(key: &str) -> u16 {
    let key = key.as_bytes();
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = key.get(open + 1..)?;
        let close = rest.iter().position(|&b| b == b'}')?;
        rest.get(..close).filter(|tag| !tag.is_empty())
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), Redis Cluster's key hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;
    use crate::limiter::{algorithm::Quota, Unit};

    #[test]
    fn slots_are_redis_clusters() {
        // The check value of the CRC-16/XMODEM catalogue, and CLUSTER KEYSLOT answers.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        for key in [
            "",
            "ratelimit_domain_key_value_1700000040",
            "foo{}{bar}",
            "foo{{bar}}zap",
            "{a}b",
            "a{b",
            "k}{x}",
        ] {
            assert_eq!(Slot::new(slot(key)), Some(Slot::for_key(key)), "{key:?}");
        }
    }

    #[test]
    fn only_sliding_windows_split_across_slots_read_their_previous_window_first() {
        let check = |algorithm, key: &str, previous: &str| Check {
            descriptor: 0,
            quota: Quota::new(algorithm, 5, Unit::Minute, 1, None),
            key: key.into(),
            previous: Some(previous.into()),
            cost: 1,
            jitter_secs: 0,
            per_second: false,
        };
        let (current, previous) = ("d_k_v_1700000040", "d_k_v_1699999980");
        assert_ne!(slot(current), slot(previous));
        let c = check(Algorithm::SlidingWindow, current, previous);
        assert_eq!(elsewhere(&c), Some(previous));
        let tagged = check(Algorithm::SlidingWindow, "{d}_1700000040", "{d}_1699999980");
        assert_eq!(elsewhere(&tagged), None, "same slot: read by the script");
        let fixed = check(Algorithm::FixedWindow, current, previous);
        assert_eq!(elsewhere(&fixed), None);
    }
}
