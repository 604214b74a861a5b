//! Accepting connections, for the gRPC and HTTP listeners alike.
//!
//! [`Incoming`] is the accept loop as a stream. It sets `TCP_NODELAY` on every accepted
//! socket: tonic's `Server::tcp_nodelay` applies only to listeners tonic binds itself, so
//! with our own listener Nagle's algorithm and delayed ACKs held responses back for ~40 ms,
//! twice Envoy's whole 20 ms budget. It also survives accept errors: when the process runs out
//! of file descriptors, `accept` fails at once, every time; tonic's loop retries without
//! pause (one core at 100 %) and logs nothing. We back off (10 ms doubling to 200 ms), log the
//! first failure and then one line per [`crate::log_throttle`] period, and count them.
//!
//! It also turns on TCP keepalive and `TCP_USER_TIMEOUT`, so the kernel finds clients that
//! vanished (host gone, network cut), as the reference's Go listener does (a 15 s keepalive;
//! grpc-go pings only after two idle hours). HTTP/2 pings would do it too, but while they are
//! on hyper takes a lock and reads the clock for every frame it reads: about 1,400
//! instructions a call (docs/benchmarks.md, "Dead clients found by TCP keepalive").
//!
//! On the Unix socket, each connection is first wrapped in [`AuthorityFix`], which lets gRPC
//! C-core clients through h2's `:authority` check (see [`crate::h2_authority`]).
//!
//! [`ConnIo`] wraps each connection:
//! - until the peer's first bytes arrive it is *opening*: it fails (and hyper closes it) when
//!   the opening timeout passes or shutdown begins, so a client that connects and never sends
//!   the HTTP/2 preface neither holds a file descriptor forever nor holds up the drain;
//! - it fails for good at its deadline, `GRPC_MAX_CONNECTION_AGE` + grace. gRPC's contract
//!   (grpc-go, which the reference uses) is a GOAWAY at the max age, so clients move to a new
//!   connection, and a close only after the grace. tonic sends the GOAWAY at the age (we give
//!   it no grace of its own: with one it resets calls instead); the close is ours.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
    time::Sleep,
};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::{h2_authority::AuthorityFix, log_throttle::LogThrottle};

/// Idle time before the first keepalive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes that close the connection: 60 s after the last byte in all.
const KEEPALIVE_PROBES: u32 = 3;
/// Sent data unacknowledged this long closes the connection (no probes go out while data is
/// in flight, so keepalive alone would not notice).
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// First pause after an accept error; doubled on each further error.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while they keep failing: short enough that service
/// resumes within 0.2 s of descriptors coming free, long enough that retrying costs nothing.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// A listening socket `Incoming` can accept from.
pub trait Listen: Unpin + Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A just-accepted connection detached from its runtime, to move to another
    /// ([`crate::workers`]): a tokio socket belongs to the reactor it was registered with.
    type Detached: Send + 'static;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
    /// Socket options for a new connection.
    fn prepare(io: &Self::Io) -> io::Result<()>;
    /// Detaches a connection nothing has been read from yet.
    fn detach(io: Self::Io) -> io::Result<Self::Detached>;
    /// Registers a detached connection with the current runtime.
    fn attach(detached: Self::Detached) -> io::Result<Self::Io>;
}

impl Listen for TcpListener {
    type Io = TcpStream;
    type Detached = std::net::TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
    fn prepare(io: &TcpStream) -> io::Result<()> {
        io.set_nodelay(true)?;
        let socket = socket2::SockRef::from(io);
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_PROBES),
        )?;
        socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
    }
    fn detach(io: TcpStream) -> io::Result<std::net::TcpStream> {
        io.into_std()
    }
    fn attach(detached: std::net::TcpStream) -> io::Result<TcpStream> {
        // `into_std` left the socket non-blocking, as `from_std` needs.
        TcpStream::from_std(detached)
    }
}

/// Unix-socket connections get C-core clients' `:authority` fixed (see [`crate::h2_authority`]);
/// TCP ones are not touched.
impl Listen for UnixListener {
    type Io = AuthorityFix<UnixStream>;
    type Detached = std::os::unix::net::UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        UnixListener::poll_accept(self, cx).map_ok(|(s, _)| AuthorityFix::new(s))
    }
    fn prepare(_: &Self::Io) -> io::Result<()> {
        Ok(())
    }
    fn detach(io: Self::Io) -> io::Result<Self::Detached> {
        io.into_inner().into_std()
    }
    fn attach(detached: Self::Detached) -> io::Result<Self::Io> {
        UnixStream::from_std(detached).map(AuthorityFix::new)
    }
}

/// How accepted connections are bounded.
#[derive(Debug, Clone)]
pub struct ConnPolicy {
    /// The peer must send its first bytes within this, or the connection is closed.
    pub opening_timeout: Duration,
    /// The connection is closed this long after it was accepted (`None`: never).
    pub lifetime: Option<Duration>,
    /// Turns true when shutdown begins; connections still opening close then.
    pub shutdown: watch::Receiver<bool>,
}

/// The accept loop as a stream of wrapped connections. It never yields an error (errors are
/// handled here, see the module doc) and ends only when dropped.
pub struct Incoming<L> {
    listener: L,
    policy: ConnPolicy,
    /// Listener name for logs and the accept error metric.
    name: &'static str,
    backoff: Duration,
    pause: Option<Pin<Box<Sleep>>>,
    log: LogThrottle,
    errors: metrics::Counter,
}

impl<L: Listen> Incoming<L> {
    pub fn new(listener: L, name: &'static str, policy: ConnPolicy) -> Self {
        Self {
            listener,
            policy,
            name,
            backoff: MIN_BACKOFF,
            pause: None,
            log: LogThrottle::default(),
            errors: metrics::counter!(crate::metrics::ACCEPT_ERRORS, "listener" => name),
        }
    }

    fn failed(&mut self, e: &io::Error) {
        self.errors.increment(1);
        if let Some(suppressed) = self.log.failure() {
            tracing::error!(listener = self.name, error = %e, suppressed, retry_in = ?self.backoff,
                "cannot accept connections (file descriptor limit?); backing off");
        }
        self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Errors that concern one connection only (the peer gave up before we accepted it).
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

impl<L: Listen> Incoming<L> {
    /// The next connection, its socket options set.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<L::Io> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok(io) => {
                    self.backoff = MIN_BACKOFF;
                    if self.log.success() {
                        tracing::info!(listener = self.name, "accepting connections again");
                    }
                    if let Err(e) = L::prepare(&io) {
                        // The peer is already gone (setsockopt on a reset socket); next.
                        tracing::debug!(listener = self.name, error = %e, "cannot set socket options");
                        continue;
                    }
                    return Poll::Ready(io);
                }
                Err(e) if per_connection(&e) => continue,
                Err(e) => self.failed(&e),
            }
        }
    }

    /// The next connection, detached to be moved to another runtime (see [`attached`]).
    pub async fn next_detached(&mut self) -> L::Detached {
        loop {
            let io = std::future::poll_fn(|cx| self.poll_accept(cx)).await;
            match L::detach(io) {
                Ok(detached) => return detached,
                Err(e) => {
                    tracing::debug!(listener = self.name, error = %e, "cannot detach a connection")
                }
            }
        }
    }
}

impl<L: Listen> Stream for Incoming<L> {
    type Item = io::Result<ConnIo<L::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let io = ready!(this.poll_accept(cx));
        Poll::Ready(Some(Ok(ConnIo::new(io, &this.policy))))
    }
}

/// Connections detached by [`Incoming::next_detached`] on another runtime, registered with
/// the runtime that polls this stream and wrapped as `Incoming` wraps them. Like `Incoming`,
/// it never yields an error; it ends when the sending side is dropped.
pub fn attached<L: Listen>(
    detached: tokio::sync::mpsc::Receiver<L::Detached>,
    policy: ConnPolicy,
) -> impl Stream<Item = io::Result<ConnIo<L::Io>>> + Unpin + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(detached).filter_map(move |d| match L::attach(d) {
        Ok(io) => Some(Ok(ConnIo::new(io, &policy))),
        Err(e) => {
            tracing::debug!(error = %e, "cannot register a connection with its runtime");
            None
        }
    })
}

/// Resolves when shutdown begins (never, if the sender is gone without a shutdown).
type ShutdownFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What bounds a connection that has not sent anything yet.
struct Opening {
    timeout: Pin<Box<Sleep>>,
    shutdown: ShutdownFuture,
}

/// An accepted connection with the bounds of [`ConnPolicy`] (see the module doc).
pub struct ConnIo<T> {
    inner: T,
    /// `Some` until the peer's first bytes arrive.
    opening: Option<Opening>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// The waker the timers were last polled with: they wake it when they fire, so while
    /// the connection task's waker stays the same they need no polling again.
    armed: Option<std::task::Waker>,
}

impl<T> ConnIo<T> {
    pub fn new(inner: T, policy: &ConnPolicy) -> Self {
        let mut rx = policy.shutdown.clone();
        let shutdown: ShutdownFuture = Box::pin(async move {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        Self {
            inner,
            opening: Some(Opening {
                timeout: Box::pin(tokio::time::sleep(policy.opening_timeout)),
                shutdown,
            }),
            deadline: policy
                .lifetime
                .map(|after| Box::pin(tokio::time::sleep(after))),
            armed: None,
        }
    }

    /// The wrapped connection (tests read its socket options).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Whether this connection may have to close now: while opening, or once the deadline
    /// has fired. Cheap (no timer poll), for every read and write; [`ConnIo::closing`] says
    /// for sure.
    fn may_close(&self) -> bool {
        self.opening.is_some() || self.deadline.as_ref().is_some_and(|d| d.is_elapsed())
    }

    /// An error once the connection must close; otherwise registers the waker, so the
    /// connection task wakes up at the deadline even when the peer is idle. Polling the
    /// timers costs more than the rest of a read, so it is done only when the connection is
    /// about to wait (a read or write returned `Pending`) or [`ConnIo::may_close`] says so.
    fn closing(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(o) = self.opening.as_mut() {
            if o.timeout.as_mut().poll(cx).is_ready() {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing within the connection opening timeout",
                ));
            }
            if o.shutdown.as_mut().poll(cx).is_ready() {
                return Some(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "shutting down before the peer sent anything",
                ));
            }
        }
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        expired.then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed after GRPC_MAX_CONNECTION_AGE + GRPC_MAX_CONNECTION_AGE_GRACE",
            )
        })
    }

    /// The inner connection returned `Pending`: the task is about to wait, so the timers
    /// must be able to wake it.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let armed =
            self.opening.is_none() && self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if armed {
            return Poll::Pending;
        }
        match self.closing(cx) {
            Some(e) => Poll::Ready(Err(e)),
            None => {
                self.armed = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.may_close() {
            if let Some(e) = self.closing(cx) {
                return Poll::Ready(Err(e));
            }
        }
        let before = buf.filled().len();
        let Poll::Ready(result) = Pin::new(&mut self.inner).poll_read(cx, buf) else {
            return self.waiting(cx);
        };
        if buf.filled().len() > before {
            self.opening = None;
        }
        Poll::Ready(result)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.may_close() {
            if let Some(e) = self.closing(cx) {
                return Poll::Ready(Err(e));
            }
        }
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for ConnIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    fn policy(opening: Duration) -> (watch::Sender<bool>, ConnPolicy) {
        let (tx, rx) = watch::channel(false);
        let p = ConnPolicy {
            opening_timeout: opening,
            lifetime: None,
            shutdown: rx,
        };
        (tx, p)
    }

    #[tokio::test]
    async fn accepted_tcp_sockets_have_nodelay_and_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_tx, p) = policy(Duration::from_secs(10));
        let mut incoming = Incoming::new(l, "test", p);
        let _client = TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        let s = conn.get_ref();
        assert!(s.nodelay().unwrap(), "TCP_NODELAY on the accepted socket");
        let socket = socket2::SockRef::from(s);
        assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
    }

    #[tokio::test]
    async fn a_silent_peer_is_closed_after_the_opening_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_tx, p) = policy(Duration::from_millis(50));
        let mut incoming = Incoming::new(l, "test", p);
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_peer_that_spoke_is_not_timed_out_and_shutdown_closes_only_silent_ones() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, p) = policy(Duration::from_millis(100));
        let mut incoming = Incoming::new(l, "test", p);
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut spoke = incoming.next().await.unwrap().unwrap();
        let _silent_client = TcpStream::connect(addr).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        talker.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        spoke.read_exact(&mut buf).await.unwrap();
        tx.send(true).unwrap();
        let err = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        // Well past the opening timeout, the talker's connection still carries bytes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        talker.write_all(b"ok").await.unwrap();
        spoke.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");
    }

    #[tokio::test]
    async fn a_connection_that_spoke_and_went_idle_is_closed_at_its_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_tx, mut p) = policy(Duration::from_secs(10));
        p.lifetime = Some(Duration::from_millis(150));
        let mut incoming = Incoming::new(l, "test", p);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let accepted = std::time::Instant::now();
        // Busy before the deadline: reads and writes go through without touching the timers.
        let mut buf = [0u8; 2];
        for _ in 0..3 {
            client.write_all(b"hi").await.unwrap();
            conn.read_exact(&mut buf).await.unwrap();
            conn.write_all(b"ok").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
        }
        // Idle: the pending read is woken by the deadline and fails.
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(accepted.elapsed() >= Duration::from_millis(150));
        // Once past it, writes fail too.
        assert_eq!(
            conn.write_all(b"late").await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }

    #[tokio::test]
    async fn unix_connections_keep_the_opening_timeout_and_pass_the_preface_through() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let (_tx, p) = policy(Duration::from_millis(100));
        let mut incoming = Incoming::new(l, "test", p);
        let _silent_client = UnixStream::connect(&path).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let mut talker = UnixStream::connect(&path).await.unwrap();
        let mut spoke = incoming.next().await.unwrap().unwrap();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        talker.write_all(preface).await.unwrap();
        let mut buf = [0u8; 24];
        spoke.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, preface);
        let err = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
