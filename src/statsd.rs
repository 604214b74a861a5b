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
//! How: [`Statsd`] is a `metrics` recorder (an exporter of the same events Prometheus sees,
//! see `crate::metrics`), and the reference's naming rules live in
//! [`crate::metrics::reference_names`]: events it does not send get no-op handles. Handles are registered once
//! (per-rule ones when the config is compiled), so counting is an atomic add and a timing a
//! lock-free push; cadence formats the lines, and all I/O happens in the flush, off the
//! request path. A stat is forgotten once no handle can count into it and nothing is unsent
//! (its next registration starts it again, and the wire sees only deltas, so nothing changes
//! there): per-rule stat names come from stats keys that expire, and the map must not keep
//! every name ever used.
//!
//! Why our own recorder rather than `metrics-exporter-statsd`: that crate sends each metric
//! under its `metrics` name with labels as DogStatsD tags; the reference's names put label
//! values into the name (`ratelimit.service.rate_limit.<stats key>.total_hits`), counters go
//! out as deltas per flush, and `EXTRA_TAGS` are serialised gostats' way. cadence's buffered
//! sink alone would put a map lookup by name on every event.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Duration,
};

use cadence::{Counted, MetricSink, StatsdClient, Timed};
use dashmap::DashMap;
use metrics::{CounterFn, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::storage::AtomicBucket;

use crate::metrics::reference_names::{counter_name, timer_name};

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

/// Why the StatsD exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StatsdError {
    #[error("STATS_FLUSH_INTERVAL must be greater than zero")]
    ZeroFlushInterval,
    #[error("statsd needs a tokio runtime: {0}")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    #[error("EXTRA_TAGS: invalid map item: {0:?}")]
    ExtraTags(String),
}

/// Parses `EXTRA_TAGS` as envconfig v1.4.0 parses a `map[string]string`: blank means none;
/// otherwise split on `,`, each item must split on `:` into exactly two parts (no trimming),
/// and a repeated key keeps its last value. Sorted by key.
pub fn parse_extra_tags(s: &str) -> Result<Vec<(String, String)>, StatsdError> {
    let mut tags = BTreeMap::new();
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    for item in s.split(',') {
        let mut parts = item.split(':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(v), None) => tags.insert(k.to_owned(), v.to_owned()),
            _ => return Err(StatsdError::ExtraTags(item.to_owned())),
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

/// The StatsD exporter: a `metrics` recorder that keeps the events the reference sends as
/// stats, under the reference's names, and sends them at each flush. `Send + Sync`; share it
/// in an `Arc` (an `Arc<Statsd>` is a recorder too).
pub struct Statsd {
    counters: DashMap<String, Arc<StatCounter>>,
    timers: DashMap<String, Arc<StatTimer>>,
    pending: Arc<Pending>,
    /// Serialised `EXTRA_TAGS`, appended to every name.
    suffix: String,
    client: StatsdClient,
    wire: Arc<Mutex<Wire>>,
    /// The last flush failed (so a lasting outage logs once, not every interval).
    failing: AtomicBool,
}

/// A counter's running total and how much of it was sent.
#[derive(Default)]
struct StatCounter {
    total: AtomicU64,
    sent: AtomicU64,
}

impl CounterFn for StatCounter {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.total.fetch_max(value, Ordering::Relaxed);
    }
}

/// Timings waiting for the next flush, in whole milliseconds. Lock-free on the request path.
struct StatTimer {
    values: AtomicBucket<u64>,
    pending: Arc<Pending>,
}

/// The bound on waiting timings, shared by every timer.
struct Pending {
    waiting: AtomicUsize,
    dropped: AtomicU64,
    max: usize,
}

impl HistogramFn for StatTimer {
    /// `value` in seconds, sent as `name:N|ms` truncated to whole milliseconds as the
    /// reference's `response_time` is. Dropped (and counted) when too many timings wait.
    fn record(&self, value: f64) {
        let p = &self.pending;
        if p.waiting.fetch_add(1, Ordering::Relaxed) >= p.max {
            p.waiting.fetch_sub(1, Ordering::Relaxed);
            p.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Saturating float-to-int cast: NaN and negatives become 0, as in Go's Milliseconds().
        self.values.push((value * 1000.0) as u64);
    }
}

impl Recorder for Statsd {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    /// A handle on the named stat's running total: counting is an atomic add, never any I/O.
    /// The clone is taken under the map's shard guard, which is what lets the flush prune
    /// safely.
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
        let Some(name) = counter_name(key) else {
            return metrics::Counter::noop();
        };
        let counter = self.counters.entry(name).or_default().clone();
        metrics::Counter::from_arc(counter)
    }

    /// The reference sends no gauges.
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
        let Some(name) = timer_name(key) else {
            return metrics::Histogram::noop();
        };
        let timer = self
            .timers
            .entry(name)
            .or_insert_with(|| {
                Arc::new(StatTimer {
                    values: AtomicBucket::new(),
                    pending: self.pending.clone(),
                })
            })
            .clone();
        metrics::Histogram::from_arc(timer)
    }
}

impl Statsd {
    /// Sends over UDP, from a socket bound to 127.0.0.1:0 for loopback hosts and 0.0.0.0:0
    /// otherwise (`[::1]:0`, `[::]:0` for IPv6), and starts the flush task on the current
    /// tokio runtime.
    pub fn start(settings: StatsdSettings) -> Result<Arc<Self>, StatsdError> {
        Self::start_with_protocol(settings, Protocol::Udp)
    }

    /// [`Statsd::start`] with a choice of transport. An unreachable or unresolvable host is
    /// not an error: it is logged, and retried at every flush, as gostats does.
    pub fn start_with_protocol(
        settings: StatsdSettings,
        protocol: Protocol,
    ) -> Result<Arc<Self>, StatsdError> {
        Self::start_inner(settings, protocol, MAX_PENDING_TIMERS)
    }

    fn start_inner(
        settings: StatsdSettings,
        protocol: Protocol,
        max_pending_timers: usize,
    ) -> Result<Arc<Self>, StatsdError> {
        if settings.flush_interval.is_zero() {
            return Err(StatsdError::ZeroFlushInterval);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(StatsdError::NoRuntime)?;
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
            pending: Arc::new(Pending {
                waiting: AtomicUsize::new(0),
                dropped: AtomicU64::new(0),
                max: max_pending_timers,
            }),
            suffix: tag_suffix(&settings.extra_tags),
            client,
            wire,
            failing: AtomicBool::new(false),
        });
        runtime.spawn(flush_loop(Arc::downgrade(&me), settings.flush_interval));
        Ok(me)
    }

    /// Sends the counter deltas and the waiting timings now, the per-thread slots folded
    /// first ([`crate::metrics::shards`]). Blocking I/O, bounded by the dial and write
    /// timeouts; the flush task runs it on tokio's blocking pool.
    pub fn flush_now(&self) {
        crate::metrics::shards::fold_all();
        // Copy out first: no map shard stays locked while sending.
        let counts: Vec<(String, u64)> = self
            .counters
            .iter()
            .filter_map(|c| {
                let total = c.total.load(Ordering::Relaxed);
                let delta = total.wrapping_sub(c.sent.swap(total, Ordering::Relaxed));
                (delta != 0).then(|| (format!("{}{}", c.key(), self.suffix), delta))
            })
            .collect();
        let mut timings: Vec<(String, Vec<u64>)> = Vec::new();
        for t in self.timers.iter() {
            let mut values = Vec::new();
            t.values.clear_with(|block| values.extend_from_slice(block));
            self.pending
                .waiting
                .fetch_sub(values.len(), Ordering::Relaxed);
            if !values.is_empty() {
                timings.push((format!("{}{}", t.key(), self.suffix), values));
            }
        }
        self.prune();
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
        let dropped = self.pending.dropped.swap(0, Ordering::Relaxed);
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

    /// Forgets the stats nothing can count into any more: no handle left but the map's own
    /// (per-rule handles go when their rule or request-built key does, see `crate::metrics`),
    /// and nothing unsent. `retain` holds each shard's write guard while it decides and
    /// handles are cloned under a guard of the same shard, so no handle appears between the
    /// check and the removal; so no count is lost, and the map holds only live stats.
    fn prune(&self) {
        self.counters.retain(|_, c| {
            Arc::strong_count(c) > 1
                || c.total.load(Ordering::Relaxed) != c.sent.load(Ordering::Relaxed)
        });
        self.timers
            .retain(|_, t| Arc::strong_count(t) > 1 || !t.values.is_empty());
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
    use crate::metrics as m;
    use metrics::Label;
    use tokio::time::{timeout_at, Instant};

    const HITS: &str = "ratelimit.service.rate_limit.d.k_v.total_hits";
    const TIME: &str = "ratelimit_server.ShouldRateLimit.response_time";
    const HOUR: Duration = Duration::from_secs(3600);
    static META: Metadata<'static> = Metadata::new("test", metrics::Level::INFO, None);

    fn settings(port: u16, flush_interval: Duration, tags: &str) -> StatsdSettings {
        StatsdSettings {
            host: "127.0.0.1".into(),
            port,
            flush_interval,
            extra_tags: parse_extra_tags(tags).unwrap(),
        }
    }

    /// `total_hits` of a per-rule stats key, as the per-rule metrics register it.
    fn hits(s: &Statsd, stats_key: &str) -> metrics::Counter {
        let labels = vec![
            Label::new("domain", "d"),
            Label::new(m::STATS_KEY_LABEL, stats_key.to_owned()),
        ];
        s.register_counter(&Key::from_parts(m::TOTAL_HITS, labels), &META)
    }

    fn counter(s: &Statsd, name: &'static str) -> metrics::Counter {
        s.register_counter(&Key::from_name(name), &META)
    }

    fn response_time(s: &Statsd) -> metrics::Histogram {
        let key = Key::from_parts(
            m::RESPONSE_TIME,
            vec![Label::new("grpc_method", "ShouldRateLimit")],
        );
        s.register_histogram(&key, &META)
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

    #[test]
    fn events_get_the_reference_stat_names() {
        let key = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            let labels: Vec<Label> = labels.iter().map(|&(k, v)| Label::new(k, v)).collect();
            Key::from_parts(name, labels)
        };
        let rule = [
            ("domain", "d"),
            ("key1", "a_b"),
            (m::STATS_KEY_LABEL, "d.a_b.c.e"),
        ];
        for (name, stat) in [
            (m::TOTAL_HITS, "total_hits"),
            (m::OVER_LIMIT, "over_limit"),
            (m::NEAR_LIMIT, "near_limit"),
            (m::WITHIN_LIMIT, "within_limit"),
            (m::SHADOW_MODE, "shadow_mode"),
            (
                m::OVER_LIMIT_WITH_LOCAL_CACHE,
                "over_limit_with_local_cache",
            ),
        ] {
            assert_eq!(
                counter_name(&key(name, &rule)).as_deref(),
                Some(&*format!("ratelimit.service.rate_limit.d.a_b.c.e.{stat}"))
            );
        }
        let named =
            |name, labels: &[(&'static str, &'static str)]| counter_name(&key(name, labels));
        assert_eq!(
            named(m::TOTAL_REQUESTS, &[("grpc_method", "ShouldRateLimit")]).as_deref(),
            Some("ratelimit_server.ShouldRateLimit.total_requests")
        );
        for t in ["service_error", "redis_error", "overloaded", "cancelled"] {
            assert_eq!(
                named(m::SHOULD_RATE_LIMIT_ERROR, &[("err_type", t)]),
                Some(format!("ratelimit.service.call.should_rate_limit.{t}"))
            );
        }
        for (name, stat) in [
            (m::GLOBAL_SHADOW_MODE, "global_shadow_mode"),
            (m::CONFIG_LOAD_SUCCESS, "config_load_success"),
            (m::CONFIG_LOAD_ERROR, "config_load_error"),
        ] {
            assert_eq!(named(name, &[]), Some(format!("ratelimit.service.{stat}")));
        }
        assert_eq!(
            timer_name(&key(
                m::RESPONSE_TIME,
                &[("grpc_method", "ShouldRateLimit")]
            ))
            .as_deref(),
            Some(TIME)
        );
        // Ours only, or missing the label the name needs: not sent.
        assert_eq!(named(m::BACKEND_ERRORS, &[("kind", "timeout")]), None);
        assert_eq!(named(m::CALLS_SHED, &[]), None);
        assert_eq!(named(m::TOTAL_HITS, &[("domain", "d")]), None);
        assert_eq!(named(m::TOTAL_REQUESTS, &[]), None);
        assert_eq!(timer_name(&key(m::BACKEND_DURATION, &[])), None);
    }

    #[tokio::test]
    async fn counters_send_deltas_once_and_timers_whole_milliseconds() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "")).unwrap();
        let h = hits(&s, "d.k_v");
        h.increment(2);
        h.increment(1);
        counter(&s, m::CONFIG_LOAD_SUCCESS).increment(1);
        counter(&s, m::CONFIG_LOAD_ERROR).increment(0);
        // Not a reference stat: nothing on the wire.
        counter(&s, m::CALLS_SHED).increment(5);
        let t = response_time(&s);
        t.record(0.0016);
        t.record(0.0004);
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
        h.increment(4);
        s.flush_now();
        assert_eq!(packets(&server, 1).await, [format!("{HITS}:4|c\n")]);
    }

    #[tokio::test]
    async fn stats_no_handle_can_count_into_are_forgotten_once_sent() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "")).unwrap();
        let held = hits(&s, "d.held");
        let dropped = hits(&s, "d.k_v");
        let timer = response_time(&s);
        held.increment(1);
        dropped.increment(2);
        timer.record(0.003);
        drop(dropped);
        drop(timer);
        // A handle held (by a rule, or the per-rule cache) keeps its stat, idle or not.
        assert_eq!(s.counters.len(), 2);
        s.flush_now();
        assert_eq!(
            lines(&server, 3).await,
            [
                "ratelimit.service.rate_limit.d.held.total_hits:1|c".to_owned(),
                format!("{HITS}:2|c"),
                format!("{TIME}:3|ms"),
            ]
        );
        let names: Vec<String> = s.counters.iter().map(|c| c.key().clone()).collect();
        assert_eq!(names, ["ratelimit.service.rate_limit.d.held.total_hits"]);
        assert!(s.timers.is_empty());
        for _ in 0..10 {
            s.flush_now();
        }
        assert_eq!(s.counters.len(), 1, "held, though idle");
        // Registered again: counted from zero, and the wire sees the same deltas as before.
        let again = hits(&s, "d.k_v");
        again.increment(3);
        drop(again);
        // A count not yet sent keeps its stat even with no handle left.
        s.prune();
        assert!(
            s.counters.contains_key(HITS),
            "an unsent count is never dropped"
        );
        s.flush_now();
        assert_eq!(packets(&server, 1).await, [format!("{HITS}:3|c\n")]);
        assert!(!s.counters.contains_key(HITS));
    }

    #[tokio::test]
    async fn extra_tags_go_into_the_name_like_gostats() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "zone:us.east-1,app:rl,empty:")).unwrap();
        hits(&s, "d.k_v").increment(3);
        response_time(&s).record(0.007);
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
        let h = hits(&s, "d.k_v");
        h.increment(5);
        assert_eq!(lines(&server, 1).await, [format!("{HITS}:5|c")]);
        // No await between the two: both land in the same interval, sent as one delta.
        h.increment(2);
        h.increment(3);
        assert_eq!(lines(&server, 1).await, [format!("{HITS}:5|c")]);
    }

    #[tokio::test]
    async fn datagrams_are_packed_up_to_1432_bytes() {
        let (server, port) = udp_server().await;
        let s = Statsd::start(settings(port, HOUR, "")).unwrap();
        for i in 0..100 {
            hits(&s, &format!("domain.key_{i:03}")).increment(1);
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
        let t = response_time(&s);
        for ms in [1.0, 2.0, 3.0, 4.0, 5.0] {
            t.record(ms / 1000.0);
        }
        assert_eq!(s.pending.dropped.load(Ordering::Relaxed), 2);
        s.flush_now();
        assert_eq!(
            lines(&server, 3).await,
            [
                format!("{TIME}:1|ms"),
                format!("{TIME}:2|ms"),
                format!("{TIME}:3|ms")
            ]
        );
        assert_eq!(s.pending.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(s.pending.dropped.load(Ordering::Relaxed), 0);
        t.record(0.006);
        s.flush_now();
        assert_eq!(lines(&server, 1).await, [format!("{TIME}:6|ms")]);
    }

    #[tokio::test]
    async fn tcp_streams_newline_terminated_lines() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = Statsd::start_with_protocol(settings(port, HOUR, "a:b"), Protocol::Tcp).unwrap();
        hits(&s, "d.k_v").increment(1);
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
        hits(&s, "d.k_v").increment(1);
        s.flush_now();
        assert!(s.failing.load(Ordering::Relaxed));
        // The delta was latched (dropped, as gostats drops it); nothing to send now.
        s.flush_now();
        assert!(!s.failing.load(Ordering::Relaxed));
    }

    #[test]
    fn start_needs_a_runtime_and_an_interval() {
        assert!(matches!(
            Statsd::start(settings(8125, HOUR, "")),
            Err(StatsdError::NoRuntime(_))
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let err = Statsd::start(settings(8125, Duration::ZERO, ""))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "STATS_FLUSH_INTERVAL must be greater than zero"
        );
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
            parse_extra_tags("a:b:c").unwrap_err().to_string(),
            "EXTRA_TAGS: invalid map item: \"a:b:c\""
        );
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
