//! `GRPC_MAX_CONNECTION_AGE_GRACE`, enforced per connection.
//!
//! gRPC's contract (grpc-go, which the reference uses): at the max age the server sends
//! GOAWAY so the client moves to a new connection, and only after the grace does it close
//! the old one. tonic 0.14 does the opposite when a grace is set: no GOAWAY at the age, then
//! a plain close at age + grace, resetting any call the client sent meanwhile. So ratelimitd
//! asks tonic for the graceful GOAWAY at the age (no tonic grace) and wraps each connection in
//! [`AgedIo`], whose reads and writes fail once age + grace has passed, which ends the
//! connection if a client is still holding it.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};
use tonic::transport::server::Connected;

/// A connection that stops working at its deadline.
pub struct AgedIo<T> {
    inner: T,
    deadline: Pin<Box<Sleep>>,
}

impl<T> AgedIo<T> {
    /// `lifetime` is max age + grace.
    pub fn new(inner: T, lifetime: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(lifetime)),
        }
    }

    /// Ready (and an error) once the deadline has passed; otherwise registers the waker, so
    /// the connection task wakes up at the deadline even when the peer is idle.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed after GRPC_MAX_CONNECTION_AGE + GRPC_MAX_CONNECTION_AGE_GRACE",
            )
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AgedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AgedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for AgedIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
