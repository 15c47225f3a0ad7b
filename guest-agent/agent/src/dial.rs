//! `Dial`: a connection from the host becomes a TCP connection to a port on the guest's
//! loopback, its bytes spliced both ways until both sides have ended.
//!
//! Each direction is one blocking copy through a buffer of its own (one `CHUNK`), so a
//! stream holds at most two chunks whatever its peers do: a side that does not read blocks
//! the copy towards it, and with it the writer on the other side (TCP's and vsock's own flow
//! control carry the wait to the peers). One side's end of file shuts down only the write
//! side towards the other (half-close), so a client that shuts its write side after a request
//! still reads the whole answer; a failed read or write ends both directions at once.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use agent_protocol::CHUNK;
use tracing::debug;

use crate::Connection;

/// How long a dial waits for the service's accept (a loopback refusal is immediate; this
/// bounds a listener whose backlog is full).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The thread that copies the service's bytes to the host: a buffer on the heap, a few
/// frames of stack.
const SPLICE_STACK: usize = 64 << 10;

/// Connects to `port` on the guest's IPv4 loopback, or on its IPv6 one when nothing listens
/// on the first (a service bound to `::1` only). The error names the port.
pub(crate) fn connect(port: u16) -> io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let first = match TcpStream::connect_timeout(&v4, DIAL_TIMEOUT) {
        Ok(s) => return finish(s),
        Err(e) => e,
    };
    if first.kind() == io::ErrorKind::ConnectionRefused {
        if let Ok(s) = TcpStream::connect_timeout(&SocketAddr::from((Ipv6Addr::LOCALHOST, port)), DIAL_TIMEOUT) {
            return finish(s);
        }
    }
    Err(io::Error::new(
        first.kind(),
        format!("nothing accepts connections on port {port} in the sandbox ({v4}: {first})"),
    ))
}

fn finish(s: TcpStream) -> io::Result<TcpStream> {
    // Interactive protocols (a terminal, a notebook's websocket) would wait on Nagle.
    s.set_nodelay(true)?;
    Ok(s)
}

/// Splices `host` and `service` until both directions have ended; `early` holds bytes the
/// host sent after its `Dial` that were already read, which the service gets first.
pub(crate) fn splice<S: Connection>(host: S, early: &[u8], service: TcpStream) -> io::Result<()> {
    let host_out = host.try_clone()?;
    let service_in = service.try_clone()?;
    let down = std::thread::Builder::new()
        .name("dial".into())
        .stack_size(SPLICE_STACK)
        .spawn(move || {
            let r = pump(service_in, host_out, |h| h.shutdown_write(), |s, h| {
                let _ = s.shutdown(Shutdown::Both);
                h.shutdown();
            });
            debug!("dial: service to host ended: {r:?}");
        })?;
    let mut service = service;
    let up = match service.write_all(early) {
        Ok(()) => pump(host, service, |s| {
            let _ = s.shutdown(Shutdown::Write);
        }, |h, s| {
            h.shutdown();
            let _ = s.shutdown(Shutdown::Both);
        }),
        Err(e) => {
            host.shutdown();
            let _ = service.shutdown(Shutdown::Both);
            Err(e)
        }
    };
    debug!("dial: host to service ended: {up:?}");
    let _ = down.join();
    Ok(())
}

/// Copies `from` to `to` until end of file, then calls `eof(to)`; on a failure, calls
/// `fail(from, to)` (which ends the other direction too) and returns the error.
fn pump<R: Read, W: Write>(
    mut from: R,
    mut to: W,
    eof: impl FnOnce(&W),
    fail: impl FnOnce(&R, &W),
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let r = loop {
        match from.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match r {
        Ok(()) => eof(&to),
        Err(_) => fail(&from, &to),
    }
    r
}
