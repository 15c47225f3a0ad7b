//! Bodies that count their bytes as they stream through the proxy: a request's on its way up,
//! and a response's on its way down, whose end (or abandonment) writes the request's audit
//! event with both counts.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::audit::{Audit, Event};

/// `inner`, its data bytes added to `bytes`.
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, bytes }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
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

/// A response body that records `event` once it has ended or been dropped, with the bytes it
/// passed as `bytes_down` and the request's (counted by a [`Counted`]) as `bytes_up`.
pub struct Audited<B> {
    inner: B,
    down: u64,
    up: Arc<AtomicU64>,
    pending: Option<(Arc<dyn Audit>, Event)>,
}

impl<B> Audited<B> {
    pub fn new(inner: B, up: Arc<AtomicU64>, audit: Arc<dyn Audit>, event: Event) -> Audited<B> {
        Audited {
            inner,
            down: 0,
            up,
            pending: Some((audit, event)),
        }
    }

    fn finish(&mut self) {
        if let Some((audit, mut event)) = self.pending.take() {
            event.bytes_up = self.up.load(Ordering::Relaxed);
            event.bytes_down = self.down;
            audit.record(event);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Audited<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.down += data.len() as u64;
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
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

impl<B> Drop for Audited<B> {
    fn drop(&mut self) {
        self.finish();
    }
}
