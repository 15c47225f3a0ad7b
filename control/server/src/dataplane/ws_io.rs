//! A WebSocket as a byte stream (futures' `AsyncRead`/`AsyncWrite`), for a protocol that runs
//! over one, as yamux does under the SDK's tunnel: binary (or text) messages are read as the
//! bytes they hold, each write is sent as one binary message, a close is end of file.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket};
use futures_util::io::{AsyncRead, AsyncWrite};
use futures_util::{Sink, Stream};

pub struct WsIo {
    ws: WebSocket,
    /// The unread rest of the last message.
    pending: Bytes,
    closed: bool,
}

impl WsIo {
    pub fn new(ws: WebSocket) -> WsIo {
        WsIo { ws, pending: Bytes::new(), closed: false }
    }
}

fn to_io(e: axum::Error) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

impl AsyncRead for WsIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        while self.pending.is_empty() {
            if self.closed {
                return Poll::Ready(Ok(0));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(text))) => self.pending = Bytes::from(text.as_str().to_owned()),
                // axum answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.closed = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = buf.len().min(self.pending.len());
        let data = self.pending.split_to(n);
        buf[..n].copy_from_slice(&data);
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(to_io)
    }
}
