//! The reference's StatsD stats (`USE_STATSD`), so teams on a statsd pipeline migrate without
//! touching it.
//!
//! Names are envoyproxy/ratelimit's (src/stats/manager_impl.go scopes `ratelimit.service`,
//! `rate_limit`, `call.should_rate_limit`; src/server/server_impl.go `ratelimit_server`):
//! `ratelimit.service.rate_limit.<stats key>.{total_hits,over_limit,near_limit,within_limit,shadow_mode}`,
//! `ratelimit.service.call.should_rate_limit.{redis_error,service_error}`,
//! `ratelimit.service.{config_load_success,config_load_error,global_shadow_mode}`,
//! `ratelimit_server.ShouldRateLimit.{total_requests,response_time}`.
//!
//! Like Lyft's gostats (which the reference uses), counters are summed in memory and sent as
//! one `name:delta|c` line per interval (`STATS_FLUSH_INTERVAL`), unchanged counters are not
//! sent, timers go out as `name:ms|ms`, and `EXTRA_TAGS` are serialised into the name as
//! `.__key=value`, sorted by key, with `.`, `:` and `|` in values replaced by `_`. cadence
//! writes the wire format and owns the UDP socket; counting on the request path is a map
//! lookup and an atomic add.

use std::{
    net::UdpSocket,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use cadence::{BufferedUdpMetricSink, Counted, MetricSink, StatsdClient, Timed};
use dashmap::DashMap;

/// Timers waiting for the next flush, at most; more are dropped (and counted in the log).
const MAX_PENDING_TIMERS: usize = 65_536;

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct StatsdSettings {
    pub host: String,
    pub port: u16,
    pub flush_interval: Duration,
    pub extra_tags: Vec<(String, String)>,
}

/// Parses `EXTRA_TAGS` (`k1:v1,k2:v2`, the envconfig map syntax the reference reads).
pub fn parse_extra_tags(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once(':') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!(
                "invalid EXTRA_TAGS entry '{pair}' (expected key:value)"
            )),
        })
        .collect()
}

/// A StatsD sink shared by the service.
pub struct Statsd {
    counters: DashMap<String, Counter>,
    timers: mpsc::SyncSender<(String, u64)>,
    /// The receiving end, drained at each flush. A std Mutex: held only while draining.
    pending: Mutex<mpsc::Receiver<(String, u64)>>,
    client: StatsdClient,
    sink: Arc<BufferedUdpMetricSink>,
    suffix: String,
}

#[derive(Default)]
struct Counter {
    total: AtomicU64,
    sent: AtomicU64,
}

impl Statsd {
    /// Opens the UDP socket and starts the flush task on the current tokio runtime.
    pub fn start(settings: StatsdSettings) -> Result<Arc<Self>, String> {
        let addr = (settings.host.as_str(), settings.port);
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("statsd socket: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("statsd socket: {e}"))?;
        let sink = Arc::new(
            BufferedUdpMetricSink::from(addr, socket)
                .map_err(|e| format!("statsd address {}:{}: {e}", settings.host, settings.port))?,
        );
        let client = StatsdClient::from_sink("", SharedSink(sink.clone()));
        let (timers, pending) = mpsc::sync_channel(MAX_PENDING_TIMERS);
        let me = Arc::new(Self {
            counters: DashMap::new(),
            timers,
            pending: Mutex::new(pending),
            client,
            sink,
            suffix: tag_suffix(&settings.extra_tags),
        });
        let flusher = me.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(settings.flush_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                flusher.flush_now();
            }
        });
        Ok(me)
    }

    /// Adds `delta` to the counter `name` (sent at the next flush).
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

    /// Records one timing in milliseconds (sent at the next flush; dropped when too many wait).
    pub fn timer_ms(&self, name: &str, ms: f64) {
        let _ = self
            .timers
            .try_send((name.to_owned(), ms.max(0.0).round() as u64));
    }

    /// Sends counter deltas and pending timers now.
    pub fn flush_now(&self) {
        let mut failed = 0usize;
        for entry in self.counters.iter() {
            let total = entry.total.load(Ordering::Relaxed);
            let sent = entry.sent.swap(total, Ordering::Relaxed);
            let delta = total.wrapping_sub(sent);
            if delta == 0 {
                continue;
            }
            let name = format!("{}{}", entry.key(), self.suffix);
            let delta = i64::try_from(delta).unwrap_or(i64::MAX);
            if self.client.count(&name, delta).is_err() {
                failed += 1;
            }
        }
        let pending = match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        while let Ok((name, ms)) = pending.try_recv() {
            if self
                .client
                .time(&format!("{name}{}", self.suffix), ms)
                .is_err()
            {
                failed += 1;
            }
        }
        drop(pending);
        if self.sink.flush().is_err() {
            failed += 1;
        }
        if failed > 0 {
            tracing::warn!(failed, "statsd: some stats could not be sent");
        }
    }
}

/// gostats' tag serialisation: `.__key=value` per tag, sorted by key.
fn tag_suffix(tags: &[(String, String)]) -> String {
    let mut tags: Vec<&(String, String)> = tags
        .iter()
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect();
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    tags.iter()
        .map(|(k, v)| {
            let v: String = v
                .chars()
                .map(|c| if matches!(c, '.' | ':' | '|') { '_' } else { c })
                .collect();
            format!(".__{k}={v}")
        })
        .collect()
}

/// Lets the client and the flusher share one buffered sink.
struct SharedSink(Arc<BufferedUdpMetricSink>);

impl MetricSink for SharedSink {
    fn emit(&self, metric: &str) -> std::io::Result<usize> {
        self.0.emit(metric)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive_until(socket: &UdpSocket, want: usize) -> Vec<String> {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut lines = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 65_536];
        while lines.len() < want && std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                lines.extend(text.lines().map(str::to_owned));
            }
        }
        lines.sort();
        lines
    }

    #[tokio::test]
    async fn counters_flush_as_deltas_with_extra_tags_and_timers() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let s = Statsd::start(StatsdSettings {
            host: "127.0.0.1".into(),
            port,
            flush_interval: Duration::from_secs(3600),
            extra_tags: parse_extra_tags("zone:us.east-1,app:rl").unwrap(),
        })
        .unwrap();
        s.counter("ratelimit.service.rate_limit.d.k_v.total_hits", 2);
        s.counter("ratelimit.service.rate_limit.d.k_v.total_hits", 1);
        s.counter("ratelimit.service.config_load_success", 1);
        s.timer_ms("ratelimit_server.ShouldRateLimit.response_time", 1.6);
        s.flush_now();
        assert_eq!(
            receive_until(&server, 3),
            vec![
                "ratelimit.service.config_load_success.__app=rl.__zone=us_east-1:1|c",
                "ratelimit.service.rate_limit.d.k_v.total_hits.__app=rl.__zone=us_east-1:3|c",
                "ratelimit_server.ShouldRateLimit.response_time.__app=rl.__zone=us_east-1:2|ms",
            ]
        );
        // Unchanged counters are not sent again; changed ones send only the delta.
        s.counter("ratelimit.service.rate_limit.d.k_v.total_hits", 4);
        s.flush_now();
        assert_eq!(
            receive_until(&server, 1),
            vec!["ratelimit.service.rate_limit.d.k_v.total_hits.__app=rl.__zone=us_east-1:4|c"]
        );
    }

    // The receive below blocks its thread; the flush task runs on the other worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_flush_task_sends_on_its_interval() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let s = Statsd::start(StatsdSettings {
            host: "127.0.0.1".into(),
            port,
            flush_interval: Duration::from_millis(50),
            extra_tags: Vec::new(),
        })
        .unwrap();
        s.counter("ratelimit.service.global_shadow_mode", 5);
        assert_eq!(
            receive_until(&server, 1),
            vec!["ratelimit.service.global_shadow_mode:5|c"]
        );
    }

    #[test]
    fn extra_tags_parse_like_envconfig_maps() {
        assert_eq!(
            parse_extra_tags("a:1, b:x:y").unwrap(),
            vec![("a".into(), "1".into()), ("b".into(), "x:y".into())]
        );
        assert_eq!(parse_extra_tags("").unwrap(), Vec::new());
        assert!(parse_extra_tags("novalue").is_err());
    }
}
