//! [`LatencyProxy`]: a TCP proxy on a free loopback port that adds a delay, switchable while it
//! runs, to every chunk in both directions, for a slow (not hung, not dead) Redis.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedReadHalf, tcp::OwnedWriteHalf, TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinSet,
    time::Instant,
};

/// A proxy in front of `127.0.0.1:target`. It runs on its own thread and runtime, so a test
/// that blocks its own runtime (a synchronous HTTP call for `/metrics`) does not delay the
/// traffic more than asked. Stopped through a shutdown channel and joined on drop; every
/// connection it proxies is closed then.
pub struct LatencyProxy {
    /// The port clients connect to.
    pub port: u16,
    /// The added delay in microseconds, read for each chunk as it arrives.
    delay_us: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LatencyProxy {
    /// Starts a proxy to `127.0.0.1:target` with no added delay.
    pub fn start(target: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_us = Arc::new(AtomicU64::new(0));
        let (shutdown, stop) = oneshot::channel();
        let delay = delay_us.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let target = SocketAddr::from(([127, 0, 0, 1], target));
                // Dropping the set (at shutdown) aborts every connection's task.
                let mut conns = JoinSet::new();
                tokio::select! {
                    _ = stop => {}
                    _ = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else { continue };
                            while conns.try_join_next().is_some() {}
                            conns.spawn(proxy(client, target, delay.clone()));
                        }
                    } => {}
                }
            });
        });
        Self {
            port,
            delay_us,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `host:port` for REDIS_URL.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Adds `delay` to each chunk read from now on, in either direction (a chunk already on its
    /// way keeps the delay it was read with).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One client connection: both directions until either side closes.
async fn proxy(client: TcpStream, target: SocketAddr, delay: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = one_way(cr, sw, delay.clone()) => {}
        _ = one_way(sr, cw, delay) => {}
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read. Reading and writing are
/// apart (a queue between them), so the delay is latency, not a throughput cap: chunks read
/// 1 ms apart are written 1 ms apart.
async fn one_way(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Arc<AtomicU64>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let at = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The reader closed: pass the close on once everything read was written.
        let _ = to.shutdown().await;
    };
    // The writer finishes what the reader queued before its side closes.
    let (_, ()) = tokio::join!(read, write);
}
