//! The reference's StatsD stats (`USE_STATSD`), so teams whose dashboards and alerts sit on a
//! statsd pipeline can swap envoyproxy/ratelimit for ratelimitd without touching them.
//!
//! Stat names, verified in envoyproxy/ratelimit (HEAD f2fb157) and Lyft's gostats v0.4.14,
//! the version its go.mod pins. Every scope below is made with `ScopeWithTags(.., ExtraTags)`:
//!
//! - `ratelimit.service.rate_limit.<stats key>.{total_hits,over_limit,near_limit,within_limit,
//!   shadow_mode,over_limit_with_local_cache}`: src/stats/manager_impl.go:12 (scope `ratelimit`
//!   with the extra tags, then `service`), :15 (`rate_limit`), :33-38 (`key + ".total_hits"`...).
//! - `ratelimit.service.rate_limit.<domain>.domain_not_found`: manager_impl.go:45.
//! - `ratelimit.service.call.should_rate_limit.{redis_error,service_error}`: manager_impl.go:17,
//!   :51-52; incremented in src/service/ratelimit.go:427, :432.
//! - `ratelimit.service.{config_load_success,config_load_error,global_shadow_mode}`:
//!   manager_impl.go:58-61; incremented in src/service/ratelimit.go:84, :67, :269.
//! - `ratelimit_server.ShouldRateLimit.total_requests` (counter) and `.response_time` (timer):
//!   src/service_cmd/runner/runner.go:181 (scope `ratelimit_server` with the extra tags),
//!   src/metrics/metrics.go:24-25 (`methodName + ".total_requests"`, `".response_time"`), :43
//!   (the value is `time.Since(start).Milliseconds()`: whole milliseconds, truncated).
//!
//! Wire behaviour copied from gostats: scopes are joined with `.` (stats.go:628); counters
//! hold a running total and each flush sends `name:delta|c` for the change since the last one,
//! skipping zero deltas (stats.go:263 `latch`, :376-389 `Flush`); timers go out as `name:N|ms`
//! (net_sink.go:262); the store flushes every `STATS_FLUSH_INTERVAL` (runner.go:85,
//! settings.go:91).
//! `EXTRA_TAGS` (`k1:v1,k2:v2`, envconfig v1.4.0's map syntax, settings.go:90) are
//! serialised into the name, not as DogStatsD tags: `.__key=value` per tag, sorted by key, tags
//! with an empty key or value dropped, and `.`, `:`, `|` in values replaced by `_`
//! (internal/tags/tags.go:26-35 `NewTagSet`, :307 `Serialize`, :454 `ReplaceChars`). UDP
//! datagrams are packed up to 1432 bytes, one newline-terminated stat per line (net_sink.go:36).
//!
//! Differences: gostats sends each timing as it happens; here timings wait (bounded) for the
//! next flush. gostats' transport defaults to TCP (`STATSD_PROTOCOL`, gostats settings.go:33,
//! used by runner.go:69); [`Statsd::start`] uses UDP and [`Statsd::start_with_protocol`] does
//! either. Not emitted: Go runtime gauges (`ratelimit.go.*`) and gostats' `reserved_tag`.
//! cadence formats the lines; counting on the request path is a map lookup and an atomic add,
//! and all I/O happens in the flush, off the request path. A counter that has not changed for
//! [`PRUNE_AFTER_IDLE_FLUSHES`] flushes is forgotten (its next increment starts it again, and
//! the wire sees only deltas, so nothing changes there): per-rule stat names come from stats
//! keys that expire (see `crate::metrics`), and the map must not keep every name ever used.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Duration,
};

use cadence::{Counted, MetricSink, StatsdClient, Timed};
use dashmap::DashMap;

/// Flushes in a row with no change after which a counter is forgotten.
pub const PRUNE_AFTER_IDLE_FLUSHES: u32 = 6;
/// Timings waiting for the next flush, at most; more are dropped and counted.
const MAX_PENDING_TIMERS: usize = 65_536;
/// gostats' UDP buffer: fits a 1500-byte MTU without fragmenting (net_sink.go:36).
const UDP_PACKET_BYTES: usize = 1432;
const TCP_BUFFER_BYTES: usize = 1 << 16;
/// gostats' dial and write timeouts (net_sink.go:27-28).
const DIAL_TIMEOUT: Duration = Duration::from_millis(1500);
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where and how often to send.
#[derive(Debug, Clone)]
pub struct StatsdSettings {
    pub host: String,
    pub port: u16,
    pub flush_interval: Duration,
    pub extra_tags: Vec<(String, String)>,
}

/// Transport to the statsd server (gostats' `STATSD_PROTOCOL`, `udp` or `tcp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Udp,
    Tcp,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "udp" | "udp4" | "udp6" => Ok(Self::Udp),
            "tcp" | "tcp4" | "tcp6" => Ok(Self::Tcp),
            _ => Err(format!("invalid STATSD_PROTOCOL '{s}' (udp or tcp)")),
        }
    }
}

/// Parses `EXTRA_TAGS` as envconfig v1.4.0 parses a `map[string]string`: blank means none;
/// otherwise split on `,`, each item must split on `:` into exactly two parts (no trimming),
/// and a repeated key keeps its last value. Sorted by key.
pub fn parse_extra_tags(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut tags = BTreeMap::new();
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    for item in s.split(',') {
        let mut parts = item.split(':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(v), None) => tags.insert(k.to_owned(), v.to_owned()),
            _ => return Err(format!("EXTRA_TAGS: invalid map item: {item:?}")),
        };
    }
    Ok(tags.into_iter().collect())
}

/// gostats' tag serialisation: `.__key=value` per tag, sorted by key.
fn tag_suffix(tags: &[(String, String)]) -> String {
    let tags: BTreeMap<&str, String> = tags
        .iter()
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .map(|(k, v)| (k.as_str(), v.replace(['.', ':', '|'], "_")))
        .collect();
    tags.iter().map(|(k, v)| format!(".__{k}={v}")).collect()
}

/// A StatsD client shared by the service (`Send + Sync`; share it in an `Arc`).
pub struct Statsd {
    counters: DashMap<String, Counter>,
    timers: DashMap<String, Mutex<Vec<u64>>>,
    pending_timers: AtomicUsize,
    dropped_timers: AtomicU64,
    max_pending_timers: usize,
    /// Serialised `EXTRA_TAGS`, appended to every name.
    suffix: String,
    client: StatsdClient,
    wire: Arc<Mutex<Wire>>,
    /// The last flush failed (so a lasting outage logs once, not every interval).
    failing: AtomicBool,
}

#[derive(Default)]
struct Counter {
    total: AtomicU64,
    sent: AtomicU64,
    /// Flushes in a row that found no change.
    idle_flushes: AtomicU32,
}

impl Statsd {
    /// Sends over UDP, from a socket bound to 127.0.0.1:0 for loopback hosts and 0.0.0.0:0
    /// otherwise (`[::1]:0`, `[::]:0` for IPv6), and starts the flush task on the current
    /// tokio runtime.
    pub fn start(settings: StatsdSettings) -> Result<Arc<Self>, String> {
        Self::start_with_protocol(settings, Protocol::Udp)
    }

    /// [`Statsd::start`] with a choice of transport. An unreachable or unresolvable host is
    /// not an error: it is logged, and retried at every flush, as gostats does.
    pub fn start_with_protocol(
        settings: StatsdSettings,
        protocol: Protocol,
    ) -> Result<Arc<Self>, String> {
        Self::start_inner(settings, protocol, MAX_PENDING_TIMERS)
    }

    fn start_inner(
        settings: StatsdSettings,
        protocol: Protocol,
        max_pending_timers: usize,
    ) -> Result<Arc<Self>, String> {
        if settings.flush_interval.is_zero() {
            return Err("STATS_FLUSH_INTERVAL must be greater than zero".to_owned());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| format!("statsd needs a tokio runtime: {e}"))?;
        let capacity = match protocol {
            Protocol::Udp => UDP_PACKET_BYTES,
            Protocol::Tcp => TCP_BUFFER_BYTES,
        };
        let mut wire = Wire {
            host: settings.host.clone(),
            port: settings.port,
            protocol,
            conn: None,
            buf: Vec::with_capacity(capacity),
            capacity,
            errors: 0,
            first_error: None,
        };
        if protocol == Protocol::Udp {
            // Binding is quick; TCP dials at the first flush, off the caller's thread.
            if let Err(e) = wire.connection() {
                tracing::warn!(host = %settings.host, port = settings.port, error = %e,
                    "statsd: cannot reach the server yet, retrying at each flush");
            }
        }
        let wire = Arc::new(Mutex::new(wire));
        let client = StatsdClient::from_sink("", SharedWire(wire.clone()));
        let me = Arc::new(Self {
            counters: DashMap::new(),
            timers: DashMap::new(),
            pending_timers: AtomicUsize::new(0),
            dropped_timers: AtomicU64::new(0),
            max_pending_timers,
            suffix: tag_suffix(&settings.extra_tags),
            client,
            wire,
            failing: AtomicBool::new(false),
        });
        runtime.spawn(flush_loop(Arc::downgrade(&me), settings.flush_interval));
        Ok(me)
    }

    /// Adds `delta` to the counter `name` (a full stat name without the tags); the change is
    /// sent at the next flush. No allocation once `name` exists, never any I/O. The add happens
    /// while the map's shard guard is held (read guard, or the entry's write guard), which is
    /// what lets the flush prune safely.
    pub fn counter(&self, name: &str, delta: u64) {
        if let Some(c) = self.counters.get(name) {
            c.total.fetch_add(delta, Ordering::Relaxed);
            return;
        }
        self.counters
            .entry(name.to_owned())
            .or_default()
            .total
            .fetch_add(delta, Ordering::Relaxed);
    }

    /// Records one timing, sent at the next flush as `name:N|ms`. `ms` is truncated to whole
    /// milliseconds as the reference's `response_time` is. Dropped (and counted) when
    /// too many timings already wait.
    pub fn timer_ms(&self, name: &str, ms: f64) {
        if self.pending_timers.fetch_add(1, Ordering::Relaxed) >= self.max_pending_timers {
            self.pending_timers.fetch_sub(1, Ordering::Relaxed);
            self.dropped_timers.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Saturating float-to-int cast: NaN and negatives become 0, as in Go's Milliseconds().
        let ms = ms as u64;
        if let Some(t) = self.timers.get(name) {
            lock(&t).push(ms);
            return;
        }
        let t = self.timers.entry(name.to_owned()).or_default();
        lock(&t).push(ms);
    }

    /// Sends the counter deltas and the waiting timings now. Blocking I/O, bounded by the
    /// dial and write timeouts; the flush task runs it on tokio's blocking pool.
    pub fn flush_now(&self) {
        // Copy out first: no map shard stays locked while sending.
        let counts: Vec<(String, u64)> = self
            .counters
            .iter()
            .filter_map(|c| {
                let total = c.total.load(Ordering::Relaxed);
                let delta = total.wrapping_sub(c.sent.swap(total, Ordering::Relaxed));
                if delta == 0 {
                    c.idle_flushes.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.idle_flushes.store(0, Ordering::Relaxed);
                }
                (delta != 0).then(|| (format!("{}{}", c.key(), self.suffix), delta))
            })
            .collect();
        self.prune();
        let timings: Vec<(String, Vec<u64>)> = self
            .timers
            .iter()
            .filter_map(|t| {
                let values = std::mem::take(&mut *lock(t.value()));
                self.pending_timers
                    .fetch_sub(values.len(), Ordering::Relaxed);
                (!values.is_empty()).then(|| (format!("{}{}", t.key(), self.suffix), values))
            })
            .collect();
        let mut failed = 0usize;
        for (name, delta) in &counts {
            failed += usize::from(self.client.count(name, *delta).is_err());
        }
        for (name, values) in &timings {
            for &ms in values {
                failed += usize::from(self.client.time(name, ms).is_err());
            }
        }
        failed += usize::from(self.client.flush().is_err());
        let (failed, first_error) = {
            let mut wire = lock(&self.wire);
            (
                failed + std::mem::take(&mut wire.errors),
                wire.first_error.take(),
            )
        };
        let dropped = self.dropped_timers.swap(0, Ordering::Relaxed);
        // One line per flush at most; a lasting outage is reported when it starts.
        let newly_failing = failed > 0 && !self.failing.swap(true, Ordering::Relaxed);
        let recovered = failed == 0 && self.failing.swap(false, Ordering::Relaxed);
        if newly_failing || dropped > 0 {
            let error = first_error.as_deref().unwrap_or("none");
            tracing::warn!(
                failed,
                dropped_timings = dropped,
                error,
                "statsd: stats not sent (a lasting failure is logged again after a recovery)"
            );
        }
        if recovered {
            tracing::info!("statsd: sending again");
        }
    }

    /// Forgets the counters idle for [`PRUNE_AFTER_IDLE_FLUSHES`] flushes. `retain` holds each
    /// shard's write guard while it decides and [`Statsd::counter`] adds under a guard of the
    /// same shard, so no add lands between the check and the removal; and a counter is removed
    /// only with nothing unsent (`total == sent`), so no count is lost.
    fn prune(&self) {
        self.counters.retain(|_, c| {
            c.idle_flushes.load(Ordering::Relaxed) < PRUNE_AFTER_IDLE_FLUSHES
                || c.total.load(Ordering::Relaxed) != c.sent.load(Ordering::Relaxed)
        });
    }
}

async fn flush_loop(statsd: Weak<Statsd>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(statsd) = statsd.upgrade() else {
            return;
        };
        if let Err(e) = tokio::task::spawn_blocking(move || statsd.flush_now()).await {
            tracing::warn!(error = %e, "statsd: flush task failed");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

enum Conn {
    /// Unconnected, sending with `send_to`: ICMP errors from a missing listener are not
    /// reported back, so an absent collector costs nothing (classic statsd fire-and-forget).
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
}

/// The transport: lines packed into a buffer, sent when full and at each flush; the
/// connection is made lazily and dropped on error, so the next send resolves and dials again.
struct Wire {
    host: String,
    port: u16,
    protocol: Protocol,
    conn: Option<Conn>,
    buf: Vec<u8>,
    capacity: usize,
    errors: usize,
    first_error: Option<String>,
}

impl Wire {
    fn push(&mut self, line: &str) {
        if !self.buf.is_empty() && self.buf.len() + line.len() + 1 > self.capacity {
            self.send();
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
    }

    /// Sends the buffer; on failure drops it (as gostats eventually does) and notes the error.
    fn send(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.connection().and_then(|conn| match conn {
            Conn::Udp(s, to) => s.send_to(&buf, *to).map(drop),
            Conn::Tcp(s) => s.write_all(&buf),
        });
        buf.clear();
        self.buf = buf;
        if let Err(e) = result {
            self.conn = None;
            self.errors += 1;
            self.first_error.get_or_insert_with(|| {
                format!("{}:{} ({:?}): {e}", self.host, self.port, self.protocol)
            });
        }
    }

    fn connection(&mut self) -> io::Result<&mut Conn> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => connect(&self.host, self.port, self.protocol)?,
        };
        Ok(self.conn.insert(conn))
    }
}

fn connect(host: &str, port: u16, protocol: Protocol) -> io::Result<Conn> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for host"))?;
    match protocol {
        Protocol::Udp => {
            let local: SocketAddr = match addr {
                SocketAddr::V4(a) if a.ip().is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(a) if a.ip().is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = UdpSocket::bind(local)?;
            socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
            Ok(Conn::Udp(socket, addr))
        }
        Protocol::Tcp => {
            let stream = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT)?;
            stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
            Ok(Conn::Tcp(stream))
        }
    }
}

/// cadence's sink: each formatted line goes into the shared [`Wire`].
struct SharedWire(Arc<Mutex<Wire>>);

impl MetricSink for SharedWire {
    fn emit(&self, metric: &str) -> io::Result<usize> {
        lock(&self.0).push(metric);
        Ok(metric.len())
    }

    fn flush(&self) -> io::Result<()> {
        lock(&self.0).send();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{timeout_at, Instant};

    const HITS: &str = "ratelimit.service.rate_limit.d.k_v.total_hits";
    const TIME: &str = "ratelimit_server.ShouldRateLimit.response_time";
    const HOUR: Duration = Duration::from_secs(3600);

    fn settings(port: u16, flush_interval: Duration, tags: &str) -> StatsdSettings {
        StatsdSettings {
            host: "127.0.0.1".into(),
            port,
            flush_interval,
            extra_tags: parse_extra_tags(tags).unwrap(),
        }
    }

    async fn udp_server() -> (tokio::net::UdpSocket, u16) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        (socket, port)
    }

    /// Datagrams until they hold `want` lines in all, or 5 s have passed.
    async fn packets(socket: &tokio::net::UdpSocket, want: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65_536];
        let mut out: Vec<String> = Vec::new();
        while out.iter().map(|p| p.lines().count()).sum::<usize>() < want {
            match timeout_at(deadline, socket.recv(&mut buf)).await {
                Ok(Ok(n)) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                _ => break,
            }
        }
        out
    }

    /// The lines of the next datagrams, sorted (counters leave the map in no fixed order).
    async fn lines(socket: &tokio::net::UdpSocket, want: usize) -> Vec<String> {
        let mut lines: Vec<String> = packets(socket, want)
            .await
            .iter()
            .flat_map(|p| p.lines().map(str::to_owned))
            .collect();
        lines.sort();
        lines
    }

    #[tokio::test]
    async fn counters_send_deltas_once_and_timers_whole_milliseconds() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "")).unwrap();
        s.counter(HITS, 2);
        s.counter(HITS, 1);
        s.counter("ratelimit.service.config_load_success", 1);
        s.counter("ratelimit.service.config_load_error", 0);
        s.timer_ms(TIME, 1.6);
        s.timer_ms(TIME, 0.4);
        s.flush_now();
        assert_eq!(
            lines(&server, 4).await,
            [
                "ratelimit.service.config_load_success:1|c",
                "ratelimit.service.rate_limit.d.k_v.total_hits:3|c",
                "ratelimit_server.ShouldRateLimit.response_time:0|ms",
                "ratelimit_server.ShouldRateLimit.response_time:1|ms",
            ]
        );
        // Nothing changed, so this flush sends nothing and the next datagram is the one after.
        s.flush_now();
        s.counter(HITS, 4);
        s.flush_now();
        assert_eq!(packets(&server, 1).await, [format!("{HITS}:4|c\n")]);
    }

    #[tokio::test]
    async fn counters_idle_for_several_flushes_are_forgotten_without_losing_counts() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "")).unwrap();
        let busy = "ratelimit.service.rate_limit.d.busy.total_hits";
        s.counter(HITS, 2);
        s.counter(busy, 1);
        s.flush_now();
        assert_eq!(
            lines(&server, 2).await,
            [format!("{busy}:1|c"), format!("{HITS}:2|c")]
        );
        for _ in 0..PRUNE_AFTER_IDLE_FLUSHES - 1 {
            s.counter(busy, 1);
            s.flush_now();
        }
        assert!(
            s.counters.contains_key(HITS),
            "idle for one flush fewer than the bound"
        );
        s.counter(busy, 1);
        s.flush_now();
        assert!(!s.counters.contains_key(HITS));
        assert!(s.counters.contains_key(busy), "changed at every flush");
        assert_eq!(s.counters.len(), 1);
        // Counted again from zero, and the wire sees the same deltas as without pruning.
        s.counter(HITS, 3);
        s.flush_now();
        let got = lines(&server, 7).await;
        assert_eq!(
            got.iter().filter(|l| l.starts_with(busy)).count(),
            6,
            "{got:?}"
        );
        assert_eq!(
            got.last().map(String::as_str),
            Some(&*format!("{HITS}:3|c")),
            "{got:?}"
        );
        // An add that lands after the flush looked, before the prune: kept (unsent counts).
        for _ in 0..PRUNE_AFTER_IDLE_FLUSHES {
            s.flush_now();
        }
        assert!(s.counters.is_empty());
        s.counter(HITS, 1);
        s.counters
            .get(HITS)
            .unwrap()
            .idle_flushes
            .store(PRUNE_AFTER_IDLE_FLUSHES, Ordering::Relaxed);
        s.prune();
        assert!(
            s.counters.contains_key(HITS),
            "an unsent count is never dropped"
        );
    }

    #[tokio::test]
    async fn extra_tags_go_into_the_name_like_gostats() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "zone:us.east-1,app:rl,empty:")).unwrap();
        s.counter(HITS, 3);
        s.timer_ms(TIME, 7.0);
        s.flush_now();
        assert_eq!(
            lines(&server, 2).await,
            [
                format!("{HITS}.__app=rl.__zone=us_east-1:3|c"),
                format!("{TIME}.__app=rl.__zone=us_east-1:7|ms"),
            ]
        );
    }

    #[tokio::test]
    async fn the_flush_task_sends_what_accumulated_in_each_interval() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, Duration::from_millis(50), "")).unwrap();
        s.counter(HITS, 5);
        assert_eq!(lines(&server, 1).await, [format!("{HITS}:5|c")]);
        // No await between the two: both land in the same interval, sent as one delta.
        s.counter(HITS, 2);
        s.counter(HITS, 3);
        assert_eq!(lines(&server, 1).await, [format!("{HITS}:5|c")]);
    }

    #[tokio::test]
    async fn datagrams_are_packed_up_to_1432_bytes() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "")).unwrap();
        for i in 0..100 {
            s.counter(
                &format!("ratelimit.service.rate_limit.domain.key_{i:03}.total_hits"),
                1,
            );
        }
        s.flush_now();
        let packets = packets(&server, 100).await;
        assert!(packets.len() > 1);
        assert!(packets
            .iter()
            .all(|p| p.len() <= UDP_PACKET_BYTES && p.ends_with("|c\n")));
        let n = packets
            .iter()
            .flat_map(|p| p.lines())
            .filter(|l| l.ends_with(":1|c"))
            .count();
        assert_eq!(n, 100);
    }

    #[tokio::test]
    async fn timings_beyond_the_bound_are_dropped_and_counted() {
        let (server, port) = udp_server().await;
        let s = Statsd::start_inner(settings(port, HOUR, ""), Protocol::Udp, 3).unwrap();
        for ms in [1.0, 2.0, 3.0, 4.0, 5.0] {
            s.timer_ms(TIME, ms);
        }
        assert_eq!(s.dropped_timers.load(Ordering::Relaxed), 2);
        s.flush_now();
        assert_eq!(
            lines(&server, 3).await,
            [
                format!("{TIME}:1|ms"),
                format!("{TIME}:2|ms"),
                format!("{TIME}:3|ms")
            ]
        );
        assert_eq!(s.pending_timers.load(Ordering::Relaxed), 0);
        assert_eq!(s.dropped_timers.load(Ordering::Relaxed), 0);
        s.timer_ms(TIME, 6.0);
        s.flush_now();
        assert_eq!(lines(&server, 1).await, [format!("{TIME}:6|ms")]);
    }

    #[tokio::test]
    async fn tcp_streams_newline_terminated_lines() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = Statsd::start_with_protocol(settings(port, HOUR, "a:b"), Protocol::Tcp).unwrap();
        s.counter(HITS, 1);
        s.flush_now();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut conn, _) = timeout_at(deadline, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let want = format!("{HITS}.__a=b:1|c\n");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let mut buf = [0u8; 1024];
            let n = timeout_at(deadline, conn.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&got), want);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_noted_not_fatal() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let s = Statsd::start_with_protocol(settings(port, HOUR, ""), Protocol::Tcp).unwrap();
        s.counter(HITS, 1);
        s.flush_now();
        assert!(s.failing.load(Ordering::Relaxed));
        // The delta was latched (dropped, as gostats drops it); nothing to send now.
        s.flush_now();
        assert!(!s.failing.load(Ordering::Relaxed));
    }

    #[test]
    fn start_needs_a_runtime_and_an_interval() {
        assert!(Statsd::start(settings(8125, HOUR, "")).is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        assert!(Statsd::start(settings(8125, Duration::ZERO, "")).is_err());
    }

    #[test]
    fn extra_tags_parse_like_envconfig_maps() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            parse_extra_tags("b:2,a:1,b:3").unwrap(),
            [pair("a", "1"), pair("b", "3")]
        );
        assert_eq!(parse_extra_tags(" a:1").unwrap(), [pair(" a", "1")]);
        assert_eq!(parse_extra_tags("a:").unwrap(), [pair("a", "")]);
        assert!(parse_extra_tags("").unwrap().is_empty());
        assert!(parse_extra_tags("  ").unwrap().is_empty());
        for bad in ["novalue", "a:1,", "a:b:c", ",a:1"] {
            assert!(parse_extra_tags(bad).is_err(), "{bad}");
        }
        assert_eq!(
            tag_suffix(&[
                pair("z", "a|b:c.d"),
                pair("", "x"),
                pair("e", ""),
                pair("k.1", "v")
            ]),
            ".__k.1=v.__z=a_b_c_d"
        );
        assert_eq!("tcp".parse(), Ok(Protocol::Tcp));
        assert_eq!("udp4".parse(), Ok(Protocol::Udp));
        assert!("http".parse::<Protocol>().is_err());
    }
}
