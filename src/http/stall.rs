//! A connection's socket that gives up on a client that stops reading its answers.
//!
//! [`super::Bounds`] times a request's arrival and its handler, not the sending of its
//! answer: a client that pipelines requests for large answers and never reads them
//! fills the kernel's buffers, hyper's write waits forever, and the connection holds its
//! slot, its descriptor and megabytes of unsent answers.
//! [`Stall`] fails a write (or flush, or shutdown) that has made no progress for the
//! listener's request bound with [`io::ErrorKind::TimedOut`]; hyper then drops the
//! connection. A write the kernel takes at once arms nothing: the timer is allocated
//! only when a connection first has to wait, and reset (not reallocated) after that.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// A [`TcpStream`] whose writes fail once they have waited `bound` without progress.
pub(super) struct Stall {
    stream: TcpStream,
    bound: Duration,
    /// The deadline of the write that is waiting; `None` until a write first waits.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` times the current wait (false after progress).
    armed: bool,
}

impl Stall {
    pub(super) fn new(stream: TcpStream, bound: Duration) -> Self {
        Stall {
            stream,
            bound,
            timer: None,
            armed: false,
        }
    }

    /// Passes on a write-side poll's answer, timing how long it has been waiting.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let bound = self.bound;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(bound)));
        if !self.armed {
            // A new wait: it may last `bound` from now.
            timer.as_mut().reset(Instant::now() + bound);
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        self.armed = false;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing of its answer for {} s",
                self.bound.as_secs()
            ),
        )))
    }
}

impl AsyncRead for Stall {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stall {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}
