//! The TLS handshake of each accepted gRPC connection, off the accept loop.
//!
//! tonic reads connections from a stream. A handshake awaited inside that stream would hold
//! up every accept behind one slow or silent client, so the accept loop ([`crate::conn::Incoming`]) runs
//! in a task of its own, each accepted connection gets a task of its own for its handshake,
//! and finished handshakes come back through a channel: the stream tonic reads.
//!
//! Bounds: the handshake must finish within `CONNECTION_OPENING_TIMEOUT` (a peer that sends
//! nothing at all is closed by [`ConnIo`] at the same timeout, or at once when shutdown
//! begins); after it, the peer's first HTTP/2 bytes must come within the same timeout again
//! (the outer [`ConnIo`], with no lifetime of its own: the inner one, counted from the
//! accept, closes the connection at `GRPC_MAX_CONNECTION_AGE` + grace).

use std::{io, sync::Arc};

use tokio::sync::mpsc;
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};

use super::ServerTls;
use crate::{
    conn::{ConnIo, ConnPolicy},
    log_throttle::LogThrottle,
};

/// A TLS connection as tonic serves it.
pub type TlsConn<T> = ConnIo<TlsStream<ConnIo<T>>>;

/// Handshakes done and not yet taken by the server; beyond this, finished handshakes wait.
const READY_QUEUE: usize = 64;

/// Why a handshake did not finish, as counted in `ratelimitd_tls_handshake_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Not finished within the opening timeout, or still silent when shutdown began.
    Timeout,
    /// The peer closed or reset the connection first (TCP probes, clients giving up).
    Closed,
    /// The TLS exchange failed: a plaintext client, an unknown or missing client
    /// certificate, a SAN that does not match, no common protocol version...
    Refused,
}

impl Failure {
    fn of(e: &io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
            return Self::Refused;
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::ConnectionAborted => Self::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => Self::Closed,
            _ => Self::Refused,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Refused => "refused",
        }
    }
}

/// What each handshake task shares.
struct Handshakes {
    tls: Arc<ServerTls>,
    policy: ConnPolicy,
    /// Refused handshakes are logged once per stretch, not once each (a scanner, or every
    /// client of a misconfigured deployment, would flood the log).
    log: LogThrottle,
}

/// The stream of TLS connections for tonic: takes connections from `incoming` (an
/// [`crate::conn::Incoming`] or [`crate::conn::attached`]) until shutdown begins or the
/// stream is dropped, and runs each handshake in a task of its own.
pub fn incoming<T, S>(
    mut incoming: S,
    tls: Arc<ServerTls>,
    policy: ConnPolicy,
) -> impl Stream<Item = io::Result<TlsConn<T>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Stream<Item = io::Result<ConnIo<T>>> + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let mut shutdown = policy.shutdown.clone();
    let shared = Arc::new(Handshakes {
        tls,
        policy,
        log: LogThrottle::default(),
    });
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                conn = incoming.next() => conn,
                () = tx.closed() => break,
                // A closed channel (no shutdown sent) disables this branch.
                Ok(_) = shutdown.wait_for(|stop| *stop) => break,
            };
            let Some(Ok(conn)) = conn else { break };
            let (tx, shared) = (tx.clone(), Arc::clone(&shared));
            tokio::spawn(async move {
                if let Some(conn) = shared.handshake(conn).await {
                    // The server is gone (shutdown): the connection is dropped, closing it.
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
        // Dropping `incoming` here closes the listening socket.
    });
    ReceiverStream::new(rx)
}

impl Handshakes {
    async fn handshake<T>(&self, conn: ConnIo<T>) -> Option<TlsConn<T>>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.tls.config());
        let result =
            match tokio::time::timeout(self.policy.opening_timeout, acceptor.accept(conn)).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake did not finish within CONNECTION_OPENING_TIMEOUT",
                )),
            };
        match result {
            Ok(stream) => {
                if self.log.success() {
                    tracing::info!("gRPC TLS handshakes succeed again");
                }
                let after = ConnPolicy {
                    lifetime: None,
                    ..self.policy.clone()
                };
                Some(ConnIo::new(stream, &after))
            }
            Err(e) => {
                let failure = Failure::of(&e);
                metrics::counter!(crate::metrics::TLS_HANDSHAKE_ERRORS, "reason" => failure.label())
                    .increment(1);
                if failure != Failure::Refused {
                    tracing::debug!(error = %e, reason = failure.label(), "gRPC TLS handshake did not finish");
                } else if let Some(suppressed) = self.log.failure() {
                    tracing::warn!(error = %e, suppressed, "gRPC TLS handshake refused");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_sorted_by_cause() {
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(Failure::of(&tls), Failure::Refused);
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(Failure::of(&eof), Failure::Closed);
        let silent = io::Error::new(io::ErrorKind::TimedOut, "opening timeout");
        assert_eq!(Failure::of(&silent), Failure::Timeout);
    }
}
