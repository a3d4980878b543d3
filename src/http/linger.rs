//! A connection whose request body was not read to its end is closed after its answer,
//! and the answer says so (`Connection: close`).
//!
//! keyward refuses some requests before reading their body (a proof missing, a body
//! announced over its bound, the body budget spent, the request bound run out). hyper
//! then closes the connection once the answer is written, as it cannot read the next
//! request past an unread body, but the answer did not say so: a client that pooled the
//! connection sent its next request on it and got a broken connection instead of an
//! answer. nginx says `Connection: close` in this case too.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::http::{header, HeaderValue, Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A request body that records when it was read to its end.
pub struct Tracked {
    inner: Incoming,
    done: Option<Arc<AtomicBool>>,
}

/// Whether the body a [`track`] wrapped was read to its end: `None` for a request
/// without a body (nothing to track, nothing allocated).
pub struct Ended(Option<Arc<AtomicBool>>);

/// Wraps `request`'s body so that [`Ended::close_unless_read`] can tell, once answered,
/// whether it was read whole.
pub fn track(request: Request<Incoming>) -> (Request<Tracked>, Ended) {
    let done = (!request.body().is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
    let ended = Ended(done.clone());
    (request.map(|inner| Tracked { inner, done }), ended)
}

impl Ended {
    /// Adds `Connection: close` to `response` when its request's body was not read to
    /// its end.
    pub fn close_unless_read<B>(&self, response: &mut Response<B>) {
        if self
            .0
            .as_ref()
            .is_some_and(|done| !done.load(Ordering::Relaxed))
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The end: no more frames, or the last byte its length announced.
        let ended = matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream();
        if let (true, Some(done)) = (ended, &self.done) {
            done.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
