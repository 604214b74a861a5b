//! A multiplexed Redis connection of our own, for `REDIS_TYPE=single` over TCP, TLS (config in
//! `tls.rs`) or a Unix socket.
//!
//! Why not redis-rs's `ConnectionManager` here: per call it built the command, encoded it,
//! sent it through a channel to its driver task, parsed the reply with a combinator parser
//! and crossed several boxed futures. This connection does the same work in 7,500 fewer
//! instructions (8.6% of a whole call) and 8 fewer allocations per call (docs/benchmarks.md,
//! "Our own Redis connection"). Here a call writes its command straight into the
//! connection's outgoing buffer under a short lock, queues its reply's sender in the same
//! order (a reused slot, `slot.rs`), and wakes the connection's task when the buffer was
//! empty. That task writes whatever has gathered in one write (concurrent calls share it:
//! auto-pipelining) and reads replies, handing each to the oldest waiting call.
//!
//! Failures, as the store above expects them (it never retries: a command written but not
//! answered may have run, and charging twice is worse than an error):
//! - a lost connection fails every call waiting on it; the next call reconnects;
//! - when connecting fails, calls fail at once for a backoff (50 ms doubling to 500 ms, as
//!   `ConnectionManager` was set up) and the first call after it tries again;
//! - a command without an answer within `REDIS_TIMEOUT` of being written closes the
//!   connection, failing every call waiting on it: the calls behind it would wait as long,
//!   and what they queued would pile up. One timer per connection keeps that bound, not one
//!   per call: the writer stamps each write with the time and the number of commands in it,
//!   and the timer, when it fires, looks only at the oldest unanswered write (replies come in
//!   order) and sleeps until that one's deadline. A backlog of [`MAX_WAITING`] unanswered
//!   calls closes the connection too;
//! - READONLY, with `REDIS_CLOSE_CONNECTION_ON_READONLY_ERROR`, closes it too, and the next
//!   connection resolves the address again;
//! - a call with a deadline (the caller's `grpc-timeout`, [`Pipe::call_by`]) ends
//!   [`Failed::Overdue`] when it passes, and its reply, when it comes, is dropped. One timer
//!   per connection for every call's deadline, set for the soonest: a tokio timer per call
//!   cost 1.8% of a Redis call's instructions (docs/benchmarks.md, "Deadlines on the
//!   connection"). Deadlines are kept in order
//!   with each call's number; those of answered calls are dropped as replies come, so while
//!   calls are answered in time the timer fires about once per deadline's length, whatever
//!   the call rate.

use std::{
    collections::VecDeque,
    convert::Infallible,
    io,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
    sync::Notify,
};

use super::{
    resp::{self, Command, Plain},
    slot,
    tls::Tls,
};

/// Unanswered calls on one connection beyond which it is closed: at 100k calls a second,
/// more than half a second of Redis's work; about 400 bytes each.
pub const MAX_WAITING: usize = 1 << 16;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Read and write buffers start at this, and go back to it after a burst beyond [`KEEP`].
const BUFFER: usize = 16 * 1024;
const KEEP: usize = 1024 * 1024;

/// Where to connect, and what to say first.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: Addr,
    /// TLS over [`Addr::Tcp`].
    pub tls: Option<Tls>,
    /// `AUTH [username] password` when there is a password.
    pub username: Option<String>,
    pub password: Option<String>,
    /// `SELECT db` when not 0.
    pub db: i64,
}

/// A TCP address (resolved again at each connection) or a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

type ReplyTo = slot::Sender;

/// Why a call got no reply.
#[derive(Debug)]
pub enum Failed {
    /// The connection failed it, or Redis answered with an error.
    Redis(RedisError),
    /// Its deadline passed first.
    Overdue,
}

impl From<RedisError> for Failed {
    fn from(e: RedisError) -> Self {
        Failed::Redis(e)
    }
}

struct State {
    /// Commands not yet written, in the order of `waiting`'s tail.
    out: Vec<u8>,
    /// One sender per command written or queued, oldest first.
    waiting: VecDeque<ReplyTo>,
    /// Calls off the front of `waiting` so far (answered, or failed with the connection):
    /// calls are numbered from 0 in the order they queue, and call `n` waits at
    /// `waiting[n - answered]`.
    answered: u64,
    /// The deadlines of calls that have one, soonest first, with each call's number. Those of
    /// calls answered since are dropped from the front as replies come.
    deadlines: VecDeque<(Instant, u64)>,
    /// When the deadline timer ([`expire`]) is to fire; `None`: not set.
    armed: Option<Instant>,
    /// Commands in `out`.
    queued: usize,
    /// Writes with commands still unanswered, oldest first: when each was written, and how
    /// many of its commands are unanswered.
    written: VecDeque<(Instant, usize)>,
    /// Connecting failed: calls fail at once with this error until the instant.
    down: Option<(Instant, RedisError)>,
    /// The connection being served, counted from 1 (0 before the first).
    generation: u64,
    /// Connection `.0` is to be closed, for `.1`.
    close: Option<(u64, RedisError)>,
}

struct Shared {
    target: Target,
    /// Bound on connecting and the handshake (`REDIS_TIMEOUT`).
    timeout: Duration,
    close_on_readonly: bool,
    /// [`MAX_WAITING`], smaller in tests.
    max_waiting: usize,
    state: Mutex<State>,
    /// The writer (and between connections the driver) waits here for commands.
    wake: Notify,
    /// The connection's task waits here for `State::close` or `closed`.
    kill: Notify,
    /// The deadline timer waits here for an earlier `State::armed`.
    rearm: Notify,
    /// Whether the driver task is alive: it is spawned on first use, on the caller's runtime
    /// (so under `RUNTIME_FLAVOR=per_core`, on that core's), and again if that runtime ended.
    running: AtomicBool,
    /// The `Pipe` was dropped: the driver ends.
    closed: AtomicBool,
}

impl State {
    /// Keeps the deadline of the call just queued (the last in `waiting`); whether the timer
    /// must be set earlier for it. Deadlines mostly come in order (one `grpc-timeout` for
    /// every call): then it goes at the back.
    fn keep_deadline(&mut self, at: Instant) -> bool {
        let n = (self.answered + self.waiting.len() as u64).saturating_sub(1);
        match self.deadlines.back() {
            Some(&(last, _)) if at < last => {
                let i = self.deadlines.partition_point(|&(t, _)| t <= at);
                self.deadlines.insert(i, (at, n));
            }
            _ => self.deadlines.push_back((at, n)),
        }
        if self.armed.is_some_and(|t| t <= at) {
            return false;
        }
        self.armed = Some(at);
        true
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails every waiting call with `error` and drops what was not written; with `down`,
    /// calls fail at once until then.
    fn fail_all(&self, error: &RedisError, down: Option<Instant>) {
        let waiting = {
            let mut s = self.lock();
            s.out.clear();
            if s.out.capacity() > KEEP {
                s.out.shrink_to(BUFFER);
            }
            s.queued = 0;
            s.written.clear();
            s.answered += s.waiting.len() as u64;
            s.deadlines.clear();
            s.down = down.map(|until| (until, error.clone()));
            s.close = None;
            std::mem::take(&mut s.waiting)
        };
        for to in waiting {
            to.send(Err(error.clone()));
        }
    }

    /// Ends every call whose deadline is before `now`, drops the deadlines of calls already
    /// answered from the front, and sets the timer for the next.
    fn expire_due(&self, now: Instant) {
        let mut s = self.lock();
        while let Some(&(at, n)) = s.deadlines.front() {
            let Some(i) = n.checked_sub(s.answered) else {
                s.deadlines.pop_front();
                continue;
            };
            if at > now {
                break;
            }
            s.deadlines.pop_front();
            if let Some(to) = usize::try_from(i).ok().and_then(|i| s.waiting.get(i)) {
                to.expire();
            }
        }
        s.armed = s.deadlines.front().map(|&(at, _)| at);
    }

    /// Asks the task serving connection `generation` to close it.
    fn close(&self, generation: u64, why: RedisError) {
        self.lock().close = Some((generation, why));
        self.kill.notify_one();
    }
}

/// One multiplexed connection, opened on first use and reopened after a loss.
pub struct Pipe {
    shared: Arc<Shared>,
}

impl Pipe {
    /// Nothing is connected yet: the first call does it.
    pub fn new(target: Target, timeout: Duration, close_on_readonly: bool) -> Self {
        Self::with_max_waiting(target, timeout, close_on_readonly, MAX_WAITING)
    }

    fn with_max_waiting(
        target: Target,
        timeout: Duration,
        close_on_readonly: bool,
        max_waiting: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                target,
                timeout,
                close_on_readonly,
                max_waiting,
                state: Mutex::new(State {
                    out: Vec::with_capacity(BUFFER),
                    waiting: VecDeque::new(),
                    answered: 0,
                    deadlines: VecDeque::new(),
                    armed: None,
                    queued: 0,
                    written: VecDeque::new(),
                    down: None,
                    generation: 0,
                    close: None,
                }),
                wake: Notify::new(),
                kill: Notify::new(),
                rearm: Notify::new(),
                running: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `command` and waits for its reply; an error reply is `Err`. Bounded by the
    /// connection: its connecting by `REDIS_TIMEOUT`, then its answer by `REDIS_TIMEOUT` from
    /// when it was written.
    pub async fn call(&self, command: &impl Command) -> RedisResult<Value> {
        match self.call_by(command, None).await {
            Ok(value) => Ok(value),
            Err(Failed::Redis(e)) => Err(e),
            Err(Failed::Overdue) => Err(closed("given up without a deadline")),
        }
    }

    /// [`Pipe::call`], given up at `deadline` if there is one ([`Failed::Overdue`]).
    pub async fn call_by(
        &self,
        command: &impl Command,
        deadline: Option<Instant>,
    ) -> Result<Value, Failed> {
        match self.send(command, deadline)?.await {
            slot::Outcome::Reply(reply) => Ok(reply?),
            slot::Outcome::Closed => Err(closed("the connection closed").into()),
            slot::Outcome::Overdue => Err(Failed::Overdue),
        }
    }

    fn send(
        &self,
        command: &impl Command,
        deadline: Option<Instant>,
    ) -> RedisResult<slot::Receiver> {
        self.start()?;
        let (wake, reply, rearm) = {
            let mut s = self.shared.lock();
            if let Some((until, error)) = &s.down {
                if Instant::now() < *until {
                    return Err(error.clone());
                }
                s.down = None;
            }
            if s.waiting.len() >= self.shared.max_waiting {
                let generation = s.generation;
                drop(s);
                let error = closed("too many calls waiting for Redis on one connection");
                self.shared.close(generation, error.clone());
                return Err(error);
            }
            let wake = s.out.is_empty();
            resp::write(&mut s.out, command);
            s.queued += 1;
            // Taken only for a call that is queued: one refused above takes no slot.
            let (to, reply) = slot::channel();
            s.waiting.push_back(to);
            let rearm = deadline.is_some_and(|at| s.keep_deadline(at));
            (wake, reply, rearm)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        if rearm {
            self.shared.rearm.notify_one();
        }
        Ok(reply)
    }

    /// Spawns the driver task when none is running.
    fn start(&self) -> RedisResult<()> {
        let shared = &self.shared;
        if shared.running.load(Ordering::Acquire) {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| closed("Redis called outside a tokio runtime"))?;
        if shared
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // The guard is made here, not in the task: a task dropped before its first poll
            // (its runtime shutting down) still marks the driver gone.
            runtime.spawn(drive(Alive(Arc::clone(shared))));
        }
        Ok(())
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.kill.notify_one();
        self.shared.wake.notify_one();
    }
}

/// An I/O-kind error (a connection error to the store above).
fn closed(why: &str) -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        why.to_owned(),
    ))
}

/// Marks the driver gone when its task ends, however it ends (a runtime shutting down drops
/// it), and fails what was waiting on it.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0
            .fail_all(&closed("the Redis connection's task ended"), None);
    }
}

/// Connects when calls are waiting, serves the connection until it fails, and again.
async fn drive(alive: Alive) {
    let shared = &alive.0;
    let mut backoff = MIN_BACKOFF;
    while !shared.closed.load(Ordering::Acquire) {
        if shared.lock().waiting.is_empty() {
            shared.wake.notified().await;
            continue;
        }
        let connecting = tokio::time::timeout(shared.timeout, connect(&shared.target));
        let connected = tokio::select! {
            c = connecting => c,
            never = expire(shared) => match never {},
        };
        let error = match connected {
            Ok(Ok(stream)) => {
                backoff = MIN_BACKOFF;
                let generation = {
                    let mut s = shared.lock();
                    s.generation += 1;
                    s.generation
                };
                tracing::debug!(generation, "Redis connection open");
                let error = serve(shared, stream, generation).await;
                tracing::debug!(generation, %error, "Redis connection closed");
                shared.fail_all(&error, None);
                continue;
            }
            Ok(Err(error)) => error,
            Err(_) => RedisError::from(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connecting to Redis took over {:?} (REDIS_TIMEOUT)",
                    shared.timeout
                ),
            )),
        };
        let until = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        shared.fail_all(&error, Some(until));
    }
}

enum Stream {
    Tcp(TcpStream),
    /// Boxed: rustls's connection state is many times the size of a socket.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// Opens the connection and sends AUTH and SELECT when the target asks for them.
async fn connect(target: &Target) -> RedisResult<Stream> {
    let mut stream = match &target.addr {
        Addr::Tcp(host, port) => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            // Without it Nagle's algorithm and delayed ACKs stall pipelined calls ~40 ms.
            s.set_nodelay(true)?;
            match &target.tls {
                None => Stream::Tcp(s),
                Some(tls) => {
                    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                    Stream::Tls(Box::new(connector.connect(tls.name.clone(), s).await?))
                }
            }
        }
        Addr::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
    };
    let mut hello = Vec::new();
    let mut replies = 0;
    if let Some(password) = &target.password {
        match &target.username {
            Some(user) => resp::write(
                &mut hello,
                &Plain(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
            ),
            None => resp::write(&mut hello, &Plain(&[b"AUTH", password.as_bytes()])),
        }
        replies += 1;
    }
    if target.db != 0 {
        let mut digits = itoa::Buffer::new();
        let db = digits.format(target.db);
        resp::write(&mut hello, &Plain(&[b"SELECT", db.as_bytes()]));
        replies += 1;
    }
    if replies > 0 {
        match &mut stream {
            Stream::Tcp(s) => handshake(s, &hello, replies).await?,
            Stream::Tls(s) => handshake(s.as_mut(), &hello, replies).await?,
            Stream::Unix(s) => handshake(s, &hello, replies).await?,
        }
    }
    Ok(stream)
}

async fn handshake(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    hello: &[u8],
    mut replies: usize,
) -> RedisResult<()> {
    s.write_all(hello).await?;
    let mut buf = Vec::with_capacity(256);
    while replies > 0 {
        if s.read_buf(&mut buf).await? == 0 {
            return Err(closed("Redis closed the connection during AUTH/SELECT"));
        }
        while let Some((reply, used)) = resp::parse(&buf)? {
            buf.drain(..used);
            replies = replies.saturating_sub(1);
            if let Err(e) = reply.extract_error() {
                return Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "Redis refused the connection's AUTH or SELECT",
                    e.to_string(),
                )));
            }
        }
    }
    Ok(())
}

/// Serves one connection until it fails or is closed; returns why.
async fn serve(shared: &Shared, stream: Stream, generation: u64) -> RedisError {
    match stream {
        Stream::Tcp(mut s) => {
            let (r, w) = s.split();
            exchange(shared, r, w, generation).await
        }
        Stream::Tls(s) => {
            // One rustls state for both directions: split behind tokio's lock.
            let (r, w) = tokio::io::split(*s);
            exchange(shared, r, w, generation).await
        }
        Stream::Unix(mut s) => {
            let (r, w) = s.split();
            exchange(shared, r, w, generation).await
        }
    }
}

async fn exchange(
    shared: &Shared,
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
    generation: u64,
) -> RedisError {
    tokio::select! {
        e = write_loop(shared, &mut w) => e,
        e = read_loop(shared, &mut r) => e,
        e = closing(shared, generation) => e,
        e = overdue(shared) => e,
        never = expire(shared) => match never {},
    }
}

/// Writes what calls queued, all of it at once.
async fn write_loop(shared: &Shared, w: &mut (impl AsyncWrite + Unpin)) -> RedisError {
    let mut buf = Vec::with_capacity(BUFFER);
    loop {
        {
            // The two buffers trade places: calls fill one while the other is written.
            let mut s = shared.lock();
            std::mem::swap(&mut s.out, &mut buf);
            if !buf.is_empty() {
                let commands = std::mem::take(&mut s.queued);
                s.written.push_back((Instant::now(), commands));
            }
        }
        if buf.is_empty() {
            shared.wake.notified().await;
            continue;
        }
        // The flush sends what TLS still holds; on TCP and Unix sockets it does nothing.
        if let Err(e) = async {
            w.write_all(&buf).await?;
            w.flush().await
        }
        .await
        {
            return e.into();
        }
        buf.clear();
        if buf.capacity() > KEEP {
            buf.shrink_to(BUFFER);
        }
    }
}

/// Reads replies and hands each to the oldest waiting call.
async fn read_loop(shared: &Shared, r: &mut (impl AsyncRead + Unpin)) -> RedisError {
    let mut buf: Vec<u8> = Vec::with_capacity(BUFFER);
    let mut replies: Vec<Value> = Vec::new();
    let mut to: Vec<ReplyTo> = Vec::new();
    loop {
        if buf.capacity() - buf.len() < BUFFER / 4 {
            buf.reserve(BUFFER);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => return closed("Redis closed the connection"),
            Ok(_) => {}
            Err(e) => return e.into(),
        }
        let mut used = 0;
        while let Some(rest) = buf.get(used..) {
            match resp::parse(rest) {
                Ok(Some((reply, n))) => {
                    replies.push(reply);
                    used += n;
                }
                Ok(None) => break,
                Err(e) => return e,
            }
        }
        // What is left is the start of a reply still arriving; usually nothing.
        buf.drain(..used);
        if buf.capacity() > KEEP && buf.len() < BUFFER {
            buf.shrink_to(BUFFER);
        }
        if replies.is_empty() {
            continue;
        }
        {
            let mut s = shared.lock();
            if s.waiting.len() < replies.len() {
                return RedisError::from((ErrorKind::Parse, "a reply nobody asked for"));
            }
            to.extend(s.waiting.drain(..replies.len()));
            s.answered += replies.len() as u64;
            while s.deadlines.front().is_some_and(|&(_, n)| n < s.answered) {
                s.deadlines.pop_front();
            }
            let mut answered = replies.len();
            while answered > 0 {
                let Some(oldest) = s.written.front_mut() else {
                    break;
                };
                if oldest.1 > answered {
                    oldest.1 -= answered;
                    break;
                }
                answered -= oldest.1;
                s.written.pop_front();
            }
        }
        let mut readonly = None;
        for (to, reply) in to.drain(..).zip(replies.drain(..)) {
            let reply = reply.extract_error();
            if let Err(e) = &reply {
                if shared.close_on_readonly
                    && e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
                {
                    readonly = Some(e.clone());
                }
            }
            to.send(reply);
        }
        if let Some(e) = readonly {
            // The next connection resolves the address again.
            tracing::warn!(error = %e, "READONLY from Redis: connection replaced (REDIS_CLOSE_CONNECTION_ON_READONLY_ERROR)");
            return e;
        }
    }
}

/// Returns when the oldest unanswered write is `REDIS_TIMEOUT` old. Wakes once per
/// `REDIS_TIMEOUT` at most while answers keep coming, whatever the call rate.
async fn overdue(shared: &Shared) -> RedisError {
    let timeout = shared.timeout;
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let oldest = shared.lock().written.front().map(|w| w.0);
        let now = Instant::now();
        let next = match oldest {
            Some(at) if now.saturating_duration_since(at) >= timeout => {
                return RedisError::from(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer from Redis within {timeout:?} (REDIS_TIMEOUT): connection closed"
                    ),
                ))
            }
            Some(at) => at + timeout,
            None => now + timeout,
        };
        sleep.as_mut().reset(next.into());
    }
}

/// Ends calls at their deadlines ([`Shared::expire_due`]), while calls wait: when the
/// connection is being opened and while it is served. Never returns.
async fn expire(shared: &Shared) -> Infallible {
    loop {
        let armed = shared.lock().armed;
        match armed {
            None => shared.rearm.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => shared.expire_due(Instant::now()),
                    () = shared.rearm.notified() => {}
                }
            }
        }
    }
}

/// Waits for a request to close this connection, or for the `Pipe` to go.
async fn closing(shared: &Shared, generation: u64) -> RedisError {
    loop {
        shared.kill.notified().await;
        if shared.closed.load(Ordering::Acquire) {
            return closed("the Redis store is closing");
        }
        match shared.lock().close.take() {
            Some((g, why)) if g == generation => return why,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The connection's plumbing against a bare TCP peer that answers as told (or not at
    //! all); what Redis makes of the commands is tested against a real `redis-server` in
    //! tests/redis_*.rs.
    use super::*;
    use tokio::net::TcpListener;

    async fn peer() -> (TcpListener, Target) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target {
            addr: Addr::Tcp("127.0.0.1".into(), port),
            tls: None,
            username: None,
            password: None,
            db: 0,
        };
        (listener, target)
    }

    /// Reads commands off `conn` and answers each `ECHO n` with the integer n.
    async fn echo_numbers(mut conn: TcpStream) {
        let mut buf = Vec::new();
        loop {
            if conn.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            let mut out = Vec::new();
            while let Ok(Some((Value::Array(args), used))) = resp::parse(&buf) {
                buf.drain(..used);
                let Some(Value::BulkString(n)) = args.get(1) else {
                    panic!("not ECHO n: {args:?}");
                };
                out.push(b':');
                out.extend_from_slice(n);
                out.extend_from_slice(b"\r\n");
            }
            conn.write_all(&out).await.unwrap();
        }
    }

    const ECHO_1: Plain<'static> = Plain(&[b"ECHO", b"1"]);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_one_connection_and_each_gets_its_own_reply() {
        let (listener, target) = peer().await;
        let pipe = Arc::new(Pipe::new(target, Duration::from_secs(5), false));
        let accepted = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::spawn(echo_numbers(conn));
            // A second connection would be a bug: wait for one a while.
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_ok()
        });
        let calls: Vec<_> = (0..500i64)
            .map(|n| {
                let pipe = Arc::clone(&pipe);
                tokio::spawn(async move {
                    let digits = n.to_string();
                    let args: [&[u8]; 2] = [b"ECHO", digits.as_bytes()];
                    (n, pipe.call(&Plain(&args)).await)
                })
            })
            .collect();
        for call in calls {
            let (n, reply) = call.await.unwrap();
            assert_eq!(reply.unwrap(), Value::Int(n));
        }
        assert!(!accepted.await.unwrap(), "one connection for every call");
    }

    /// Accepts connections and never answers; returns how many it accepted so far.
    fn silent(listener: TcpListener) -> Arc<std::sync::atomic::AtomicUsize> {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        count
    }

    /// `ECHO 1` on `pipe`, in a task of its own.
    fn spawn_call(pipe: &Arc<Pipe>) -> tokio::task::JoinHandle<RedisResult<Value>> {
        let pipe = Arc::clone(pipe);
        tokio::spawn(async move { pipe.call(&ECHO_1).await })
    }

    /// Waits until the peer has accepted `n` connections (a call that opens the next one is
    /// left waiting on it, then dropped).
    async fn wait_accepted(accepted: &std::sync::atomic::AtomicUsize, n: usize) {
        while accepted.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn waiting(pipe: &Pipe, n: usize) {
        while pipe.shared.lock().waiting.len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_backlog_beyond_the_limit_closes_the_connection() {
        let (listener, target) = peer().await;
        let accepted = silent(listener);
        let pipe = Arc::new(Pipe::with_max_waiting(
            target,
            Duration::from_secs(5),
            false,
            4,
        ));
        let calls: Vec<_> = (0..4).map(|_| spawn_call(&pipe)).collect();
        waiting(&pipe, 4).await;
        let refused = pipe.call(&ECHO_1).await.unwrap_err();
        assert!(
            refused.to_string().contains("too many calls waiting"),
            "{refused}"
        );
        for call in calls {
            let e = call.await.unwrap().unwrap_err();
            assert!(e.is_io_error(), "{e}");
        }
        assert_eq!(pipe.shared.lock().waiting.len(), 0);
        // The next call opens a new connection.
        let next = spawn_call(&pipe);
        wait_accepted(&accepted, 2).await;
        next.abort();
    }

    #[tokio::test]
    async fn a_hung_connection_fails_its_waiting_calls_at_the_timeout_and_is_replaced() {
        let (listener, target) = peer().await;
        let accepted = silent(listener);
        let timeout = Duration::from_millis(200);
        let pipe = Arc::new(Pipe::new(target, timeout, false));
        let first = {
            let pipe = Arc::clone(&pipe);
            tokio::spawn(async move {
                let sent = Instant::now();
                (pipe.call(&ECHO_1).await, sent.elapsed())
            })
        };
        waiting(&pipe, 1).await;
        // Written later, within the first one's timeout: failed with it.
        tokio::time::sleep(timeout / 2).await;
        let second = spawn_call(&pipe);
        let (e, waited) = first.await.unwrap();
        let e = e.unwrap_err();
        assert!(e.is_timeout(), "{e}");
        // Not before the timeout; the upper bound only says "not never" on a loaded machine.
        assert!(
            waited >= timeout && waited < timeout + Duration::from_secs(5),
            "failed at the timeout: {waited:?}"
        );
        let e = second.await.unwrap().unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let next = spawn_call(&pipe);
        wait_accepted(&accepted, 2).await;
        next.abort();
    }

    /// `ECHO n` on `pipe` with `deadline`, in a task of its own.
    fn spawn_call_by(
        pipe: &Arc<Pipe>,
        n: i64,
        deadline: Option<Instant>,
    ) -> tokio::task::JoinHandle<Result<Value, Failed>> {
        let pipe = Arc::clone(pipe);
        tokio::spawn(async move {
            let digits = n.to_string();
            let args: [&[u8]; 2] = [b"ECHO", digits.as_bytes()];
            pipe.call_by(&Plain(&args), deadline).await
        })
    }

    #[tokio::test]
    async fn calls_end_at_their_own_deadlines_and_their_late_replies_go_to_nobody() {
        let (listener, target) = peer().await;
        // The peer answers once told to, in order, as Redis would after a stall.
        let answer = Arc::new(tokio::sync::Notify::new());
        let told = Arc::clone(&answer);
        let accepted = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            told.notified().await;
            tokio::spawn(echo_numbers(conn));
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_ok()
        });
        let pipe = Arc::new(Pipe::new(target, Duration::from_secs(30), false));
        let now = Instant::now();
        let (early, late) = (Duration::from_millis(100), Duration::from_millis(300));
        // Queued in this order: the later deadline first, then one without a deadline, then
        // the earlier one (kept before the later).
        let second = spawn_call_by(&pipe, 1, Some(now + late));
        waiting(&pipe, 1).await;
        let patient = spawn_call_by(&pipe, 2, None);
        waiting(&pipe, 2).await;
        let first = spawn_call_by(&pipe, 3, Some(now + early));
        waiting(&pipe, 3).await;
        let outcome = first.await.unwrap();
        assert!(matches!(outcome, Err(Failed::Overdue)), "{outcome:?}");
        assert!(now.elapsed() >= early, "not before its deadline");
        assert!(!second.is_finished(), "its deadline is later");
        let outcome = second.await.unwrap();
        assert!(matches!(outcome, Err(Failed::Overdue)), "{outcome:?}");
        assert!(now.elapsed() >= late, "not before its deadline");
        {
            let s = pipe.shared.lock();
            assert_eq!(s.waiting.len(), 3, "each keeps its place for its reply");
            assert!(s.deadlines.is_empty(), "both expired");
        }
        // Redis answers all three: the call without a deadline gets its own reply, and the
        // connection stays up.
        answer.notify_one();
        let outcome = patient.await.unwrap();
        assert_eq!(outcome.unwrap(), Value::Int(2));
        let outcome = spawn_call_by(&pipe, 4, Some(Instant::now() + late))
            .await
            .unwrap();
        assert_eq!(outcome.unwrap(), Value::Int(4));
        {
            let s = pipe.shared.lock();
            assert_eq!((s.waiting.len(), s.answered), (0, 4));
            assert!(
                s.deadlines.is_empty(),
                "an answered call's deadline is dropped"
            );
        }
        assert!(!accepted.await.unwrap(), "the same connection throughout");
    }

    #[tokio::test]
    async fn a_deadline_ends_a_call_while_the_connection_is_still_being_opened() {
        let (listener, mut target) = peer().await;
        // AUTH that is never answered: the connection stays in its handshake until
        // REDIS_TIMEOUT (30 s here).
        target.password = Some("pw".into());
        silent(listener);
        let pipe = Arc::new(Pipe::new(target, Duration::from_secs(30), false));
        let call = spawn_call_by(&pipe, 1, Some(Instant::now() + Duration::from_millis(100)));
        let outcome = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("ended at its deadline, not at REDIS_TIMEOUT")
            .unwrap();
        assert!(matches!(outcome, Err(Failed::Overdue)), "{outcome:?}");
    }

    #[test]
    fn deadlines_in_order_set_the_timer_once_and_an_earlier_one_sets_it_again() {
        let base = Instant::now();
        let at = |ms| base + Duration::from_millis(ms);
        let pipe = Pipe::new(
            Target {
                addr: Addr::Tcp("127.0.0.1".into(), 1),
                tls: None,
                username: None,
                password: None,
                db: 0,
            },
            Duration::from_secs(1),
            false,
        );
        let mut s = pipe.shared.lock();
        let queue = |s: &mut State, deadline| {
            s.waiting.push_back(slot::channel().0);
            s.keep_deadline(deadline)
        };
        assert!(queue(&mut s, at(20)), "the first sets the timer");
        assert!(!queue(&mut s, at(21)));
        assert!(!queue(&mut s, at(22)));
        assert!(queue(&mut s, at(5)), "an earlier one sets it earlier");
        assert!(!queue(&mut s, at(21)));
        assert_eq!(s.armed, Some(at(5)));
        let order: Vec<_> = s.deadlines.iter().map(|&(t, n)| (t - base, n)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            order,
            [
                (ms(5), 3),
                (ms(20), 0),
                (ms(21), 1),
                (ms(21), 4),
                (ms(22), 2)
            ]
        );
        // Calls 0 and 1 answered: at 20 ms, call 3 (5 ms) is overdue, and the timer is set
        // for call 4's 21 ms (call 1's, answered, is dropped on the way).
        s.waiting.drain(..2);
        s.answered = 2;
        drop(s);
        pipe.shared.expire_due(at(20));
        let s = pipe.shared.lock();
        assert_eq!(s.armed, Some(at(21)));
        let left: Vec<_> = s.deadlines.iter().map(|&(_, n)| n).collect();
        assert_eq!(left, [4, 2]);
    }

    #[tokio::test]
    async fn a_refused_connection_fails_calls_at_once_until_the_backoff_ends() {
        let (listener, target) = peer().await;
        drop(listener);
        let pipe = Pipe::new(target, Duration::from_secs(1), false);
        let e = pipe.call(&ECHO_1).await.unwrap_err();
        assert!(e.is_connection_refusal(), "{e}");
        // Within the backoff: the same error, without trying.
        let again = pipe.call(&ECHO_1).await.unwrap_err();
        assert_eq!(again.to_string(), e.to_string());
        assert!(pipe.shared.lock().down.is_some());
        tokio::time::sleep(MIN_BACKOFF + Duration::from_millis(20)).await;
        pipe.call(&ECHO_1).await.unwrap_err();
        // Tried again and failed: the backoff doubled.
        let until = pipe.shared.lock().down.as_ref().map(|d| d.0).unwrap();
        assert!(until > Instant::now() + MIN_BACKOFF, "{until:?}");
    }

    #[test]
    fn a_pipe_outlives_the_runtime_that_first_used_it() {
        let peer_runtime = tokio::runtime::Runtime::new().unwrap();
        let (listener, target) = peer_runtime.block_on(peer());
        peer_runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(echo_numbers(conn));
            }
        });
        let pipe = Pipe::new(target, Duration::from_secs(5), false);
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            assert_eq!(runtime.block_on(pipe.call(&ECHO_1)).unwrap(), Value::Int(1));
            // Its task goes with it; the next runtime's first call starts another.
            drop(runtime);
        }
    }

    #[tokio::test]
    async fn a_dropped_pipe_ends_its_task() {
        let (listener, target) = peer().await;
        silent(listener);
        let pipe = Pipe::new(target, Duration::from_secs(1), false);
        let shared = Arc::downgrade(&pipe.shared);
        let call = tokio::time::timeout(Duration::from_millis(50), pipe.call(&ECHO_1)).await;
        assert!(call.is_err(), "never answered");
        drop(pipe);
        for _ in 0..100 {
            if shared.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the connection's task still holds its state");
    }
}
