//! The host side of the vsock bridge: the listening socket, clients' `CONNECT` lines, host
//! connections' readiness and timeouts.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::conn::{Conn, ConnKey, State};
use super::*;

impl Vsock {
    /// Serves everything the host side has ready: new clients, `CONNECT` lines, readable and
    /// writable connections, timeouts; then moves what it can to and from the guest.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                self.handle_host_event(ev.data(), ev.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        self.expire_deadlines();
        self.release_deferred();
        self.run_queues();
        self.rearm_timer();
    }

    pub(super) fn handle_host_event(&mut self, token: u64, ev: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_clients(),
            TOKEN_TIMER => {
                self.release_deferred();
                let mut b = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a local buffer from our own timerfd.
                unsafe { libc::read(self.timer.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            }
            t if self.pending.contains_key(&t) => self.read_connect_line(t),
            t => {
                let Some(&key) = self.by_token.get(&t) else { return };
                self.handle_conn_event(key, ev);
            }
        }
    }

    pub(super) fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING_CLIENTS || stream.set_nonblocking(true).is_err() {
                        tracing::debug!("virtio-vsock: host client refused (too many pending)");
                        continue;
                    }
                    let token = self.new_token();
                    let ev = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED, token);
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), ev) {
                        tracing::warn!("virtio-vsock: cannot watch a host client: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + CONNECT_TIMEOUT;
                    self.pending.insert(token, Pending { stream, line: Vec::new(), deadline });
                    // The client may have written its line already: edge-triggered, so read now.
                    self.read_connect_line(token);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("virtio-vsock: accept: {e}");
                    break;
                }
            }
        }
    }

    pub(super) fn drop_pending(&mut self, token: u64) {
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    /// Reads the client's `CONNECT <port>\n` a byte at a time, so that nothing the client
    /// wrote after the line is consumed here: it belongs to the guest.
    pub(super) fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else { return };
        let port = loop {
            let mut b = [0u8; 1];
            match (&p.stream).read(&mut b) {
                Ok(0) => return self.drop_pending(token),
                Ok(_) if b[0] == b'\n' => break parse_connect(&p.line),
                Ok(_) => {
                    p.line.push(b[0]);
                    if p.line.len() > CONNECT_LINE_MAX {
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_pending(token),
            }
        };
        let Some(port) = port else {
            tracing::debug!("virtio-vsock: bad CONNECT line from a host client");
            return self.drop_pending(token);
        };
        if self.active.is_none() || self.conns.len() >= MAX_CONNS {
            return self.drop_pending(token);
        }
        let Some(local_port) = self.alloc_host_port() else { return self.drop_pending(token) };
        let p = self.pending.remove(&token).expect("pending client present");
        let ev = EpollEvent::new(conn_events(), token);
        if self.epoll.ctl(ControlOperation::Modify, p.stream.as_raw_fd(), ev).is_err() {
            return;
        }
        let key = ConnKey { local_port, peer_port: port };
        let mut conn = Conn::new(p.stream, token, State::LocalInit);
        let defer = self.reset_unacked.is_some();
        conn.send_request = !defer;
        conn.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        self.by_token.insert(token, key);
        self.conns.insert(key, conn);
        if defer {
            self.deferred.push(key);
        } else {
            self.schedule(key);
        }
    }

    /// Sends the host clients' waiting requests once the guest has taken in its reset (or
    /// has had long enough to).
    pub(super) fn release_deferred(&mut self) {
        let Some(since) = self.reset_unacked else { return };
        let acked = self.cid_read.take();
        if !acked && since.elapsed() < RESET_ACK_TIMEOUT {
            return;
        }
        tracing::debug!(
            "virtio-vsock: {} {:?} after the transport reset; {} host connections waited",
            if acked { "the guest took in the reset" } else { "gave up waiting for the guest to take in the reset" },
            since.elapsed(),
            self.deferred.len()
        );
        self.reset_unacked = None;
        for key in std::mem::take(&mut self.deferred) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.send_request = true;
            }
            self.schedule(key);
        }
    }

    pub(super) fn alloc_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let port = self.next_host_port;
            self.next_host_port = if port == u32::MAX { HOST_PORT_BASE } else { port + 1 };
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    pub(super) fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    pub(super) fn handle_conn_event(&mut self, key: ConnKey, ev: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if ev.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            c.host_readable = true;
        }
        if ev.contains(EventSet::HANG_UP) {
            c.host_hup = true;
            if c.state == State::LocalInit {
                // The client gave up before the guest answered.
                return self.kill(key);
            }
        }
        if ev.contains(EventSet::ERROR) {
            return self.kill(key);
        }
        if ev.contains(EventSet::OUT) {
            c.host_writable = true;
            self.flush_conn(key);
        }
        self.schedule(key);
    }

    /// Writes what the connection holds for the host, then finishes a guest-side shutdown.
    pub(super) fn flush_conn(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.host_writable {
            if let Err(e) = c.flush() {
                tracing::debug!("virtio-vsock: host side of {key:?} gone: {e}");
                return self.kill(key);
            }
        }
        self.finish_guest_shutdown(key);
    }

    pub(super) fn finish_guest_shutdown(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.guest_done() {
            // Linux waits for our RST to finish its close.
            return self.kill(key);
        }
        if c.peer_shutdown & SHUTDOWN_SEND != 0 && c.flushed() && !c.host_write_shut {
            c.host_write_shut = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    pub(super) fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx_work() {
                c.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    pub(super) fn remove_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_token.remove(&c.token);
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    /// Closes the host side at once and owes the guest an RST.
    pub(super) fn kill(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.rst_queue.push_back((key.local_port, key.peer_port));
    }

    pub(super) fn close_all(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        let tokens: Vec<_> = self.pending.keys().copied().collect();
        for t in tokens {
            self.drop_pending(t);
        }
        self.rx_ready.clear();
        self.rst_queue.clear();
        self.tx_stalled = false;
        self.deferred.clear();
    }

    pub(super) fn expire_deadlines(&mut self) {
        let now = Instant::now();
        let late: Vec<_> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| *t).collect();
        for t in late {
            self.drop_pending(t);
        }
        let late: Vec<_> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(k, _)| *k).collect();
        for key in late {
            if let Some(c) = self.conns.get(&key).filter(|c| c.state == State::LocalInit) {
                // Closing alone would read, to the client, like the guest's RST for a port
                // nobody listens on; a guest that is stalled or starved is another trouble.
                tracing::warn!(
                    "virtio-vsock: the guest did not answer a connection to its port {} within {CONNECT_TIMEOUT:?}",
                    key.peer_port
                );
                let _ = (&c.stream).write(CONNECT_TIMED_OUT);
            } else {
                tracing::debug!("virtio-vsock: {key:?} timed out");
            }
            self.kill(key);
        }
    }

    pub(super) fn rearm_timer(&mut self) {
        let next = self
            .pending
            .values()
            .map(|p| p.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain((!self.deferred.is_empty()).then(|| Instant::now() + RESET_ACK_POLL))
            .min();
        let r = match next {
            Some(d) => {
                let wait = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            tracing::error!("virtio-vsock: timer: {e}");
        }
    }
}

pub(super) fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// `CONNECT <port>` (the newline already stripped; a trailing `\r` tolerated).
pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Connects to a host listener without blocking: a listener whose backlog is full refuses at
/// once (EAGAIN) instead of stalling the event loop.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len is within it.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}
