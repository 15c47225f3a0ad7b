//! One vsock stream connection between a guest port and a host Unix socket: what is owed to the
//! guest, the credit both ways, and the bounded buffer of guest bytes the host has not read yet.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::{CONN_BUF, CREDIT_UPDATE_THRESHOLD, SHUTDOWN_BOTH};

/// A connection is named by its host-side port and its guest-side port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ConnKey {
    /// The port on the host side (CID 2): the listener's port P for a guest-initiated connection,
    /// the allocated local port for a host-initiated one.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    /// Host-initiated: REQUEST owed or sent to the guest, waiting for its RESPONSE.
    LocalInit,
    /// Both sides connected (for a guest-initiated connection, from the moment the host socket
    /// connected; the RESPONSE is then still owed).
    Established,
}

pub struct Conn {
    pub stream: UnixStream,
    pub token: u64,
    pub state: State,
    /// In the device's queue of connections with something for the guest.
    pub queued: bool,

    // Control packets owed to the guest.
    pub send_request: bool,
    pub send_response: bool,
    pub send_credit_update: bool,
    /// SHUTDOWN flags owed to the guest, and those already sent.
    pub send_shutdown: u32,
    pub shutdown_sent: u32,

    // Host → guest.
    /// The host socket may have bytes (or EOF) to read (edge-triggered: cleared on EAGAIN).
    pub host_readable: bool,
    /// The host peer closed both directions.
    pub host_hup: bool,
    pub host_eof: bool,
    /// Bytes sent to the guest, and the guest's receive buffer and forwarded count.
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,

    // Guest → host.
    pub host_writable: bool,
    /// Guest bytes not yet written to the host socket; never more than [`CONN_BUF`].
    pub buf: VecDeque<u8>,
    /// Bytes of ember's own for the host client (`OK <port>\n`), written before `buf`.
    pub ctl_out: Vec<u8>,
    /// Bytes received from the guest, bytes forwarded to the host, and the forwarded count the
    /// guest last heard of.
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    pub last_fwd_sent: u32,
    /// SHUTDOWN flags received from the guest.
    pub peer_shutdown: u32,
    pub host_write_shut: bool,

    /// When the connection is killed if nothing changes (connect or close timeout).
    pub deadline: Option<Instant>,
}

impl Conn {
    pub fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            queued: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: 0,
            shutdown_sent: 0,
            host_readable: false,
            host_hup: false,
            host_eof: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            // Optimistic: a write that would block clears it, and the edge-triggered EPOLLOUT
            // sets it again.
            host_writable: true,
            buf: VecDeque::new(),
            ctl_out: Vec::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_shutdown: 0,
            host_write_shut: false,
            deadline: None,
        }
    }

    /// How many more bytes the guest can take. Every value comes from the guest: a forwarded
    /// count ahead of what was sent (wrapping arithmetic makes the in-flight count huge) or a
    /// shrunken buffer gives no credit rather than a wrapped-around one.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The credit the guest believes it has: our buffer less what it sent since the forwarded
    /// count it last heard of.
    pub fn guest_view_free(&self) -> u32 {
        CONN_BUF.saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_sent))
    }

    /// Owe the guest a CREDIT_UPDATE when its view of our free space runs low and we have
    /// forwarded bytes it does not know about.
    pub fn check_credit_update(&mut self) {
        if self.fwd_cnt != self.last_fwd_sent && self.guest_view_free() < CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
    }

    pub fn wants_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & super::SHUTDOWN_RCV == 0
            && self.shutdown_sent & super::SHUTDOWN_SEND == 0
            && !self.send_response
            && self.peer_free() > 0
    }

    pub fn has_rx_work(&self) -> bool {
        self.send_request
            || self.send_response
            || self.wants_data()
            || self.send_shutdown & !self.shutdown_sent != 0
            || self.send_credit_update
    }

    /// Writes what is buffered for the host. Err: the host side is gone.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.ctl_out.is_empty() {
            match (&self.stream).write(&self.ctl_out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.ctl_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_writable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.check_credit_update();
        Ok(())
    }

    pub fn flushed(&self) -> bool {
        self.buf.is_empty() && self.ctl_out.is_empty()
    }

    /// The guest closed both directions and everything it sent reached the host.
    pub fn guest_done(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_BOTH && self.flushed()
    }
}
