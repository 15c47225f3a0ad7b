//! virtio-vsock (device ID 19) bridged to host Unix sockets with Firecracker's conventions:
//! a host client connects to `<uds_path>` and writes `CONNECT <port>\n` to reach a guest
//! listener (answered `OK <host_port>\n`, or closed); a guest connection to CID 2 port P goes
//! to the host socket `<uds_path>_P`. Design notes in `README.md` next to this file.
//!
//! The device is a state machine over guest memory and its own sockets; it knows nothing about
//! KVM or threads. Its host sockets live in an epoll set of its own
//! ([`Vsock::host_event_fd`]); the event loop watches that one fd and calls
//! [`Vsock::process_host_events`] when it is readable. Tests call the same functions directly.

mod conn;
/// Copies a tx chain whose payload is spread over several descriptors into a header and a
/// payload buffer. Every descriptor must be device-readable and inside guest memory, the
/// header's length field must match what the chain holds, and the payload is bounded by
/// [`MAX_PKT_DATA`]; anything else gives None.
fn gather_tx(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Option<(Vec<u8>, Vec<u8>)> {
    const LEN_OFFSET: usize = 24;
    let limit = PKT_HEADER_SIZE + MAX_PKT_DATA as usize;
    let mut bytes = Vec::new();
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() || bytes.len() + len > limit {
            return None;
        }
        let start = bytes.len();
        bytes.resize(start + len, 0);
        mem.read_slice(&mut bytes[start..], desc.addr()).ok()?;
    }
    if bytes.len() < PKT_HEADER_SIZE {
        return None;
    }
    let len = u32::from_le_bytes(bytes[LEN_OFFSET..LEN_OFFSET + 4].try_into().ok()?) as usize;
    if len > MAX_PKT_DATA as usize || PKT_HEADER_SIZE + len > bytes.len() {
        return None;
    }
    let data = bytes[PKT_HEADER_SIZE..PKT_HEADER_SIZE + len].to_vec();
    bytes.truncate(PKT_HEADER_SIZE);
    Some((bytes, data))
}

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, WriteVolatile};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::conn::{Conn, ConnKey, State};
use super::{ActivateError, Interrupt, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::lock;

pub const VIRTIO_ID_VSOCK: u32 = 19;
pub const HOST_CID: u64 = 2;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The largest payload of one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The receive buffer each connection advertises to the guest (`buf_alloc`): guest bytes the
/// host has not read yet are held here, never more.
pub const CONN_BUF: u32 = 256 * 1024;
/// A CREDIT_UPDATE goes out when the guest's view of our free space drops below this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// Connections at once; one more is refused with RST (guest) or closed (host client).
pub const MAX_CONNS: usize = 256;
/// Host clients that have connected but not yet written their `CONNECT` line.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// RSTs for unknown connections waiting for an rx buffer; past this, tx processing pauses until
/// the guest takes them (a guest spraying bad packets cannot grow this queue).
pub const MAX_RST_BACKLOG: usize = 256;
/// First port handed out to host-initiated connections (Firecracker's convention).
pub const HOST_PORT_BASE: u32 = 1 << 30;
/// A host client's `CONNECT` line, and the guest's answer to the REQUEST, must come this fast.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the host closed and we sent SHUTDOWN both ways, the guest must answer RST this fast.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_LINE_MAX: usize = 32;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (it must be at least 3 and fit in 32 bits)")]
    Cid(u64),
    #[error("cannot listen on the vsock socket {0}: {1}")]
    Listen(PathBuf, io::Error),
    #[error("cannot set up the vsock device's epoll set or timer: {0}")]
    Setup(io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// A host client that connected to the main socket and has not finished its `CONNECT` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    acked_features: u64,
    active: Option<Active>,
    conns: HashMap<ConnKey, Conn>,
    by_token: HashMap<u64, ConnKey>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    next_host_port: u32,
    /// Connections that may have something for the guest, served round robin.
    rx_ready: VecDeque<ConnKey>,
    /// RSTs owed for packets that belong to no connection: (host port, guest port).
    rst_queue: VecDeque<(u32, u32)>,
    /// Tx processing paused because `rst_queue` is full.
    tx_stalled: bool,
    /// A TRANSPORT_RESET event is owed to the guest.
    reset_pending: bool,
}

impl Vsock {
    /// A vsock device for guest `cid`, listening on `uds_path` for host clients.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let listener = UnixListener::bind(uds_path).map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        listener.set_nonblocking(true).map_err(VsockError::Setup)?;
        let epoll = Epoll::new().map_err(VsockError::Setup)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Setup(io::Error::from_raw_os_error(e.errno())))?;
        set_nonblocking(timer.as_raw_fd()).map_err(VsockError::Setup)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_LISTENER))
            .map_err(VsockError::Setup)?;
        epoll
            .ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_TIMER))
            .map_err(VsockError::Setup)?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            acked_features: 0,
            active: None,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_host_port: HOST_PORT_BASE,
            rx_ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            tx_stalled: false,
            reset_pending: false,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The fd the event loop watches (level-triggered, readable): the device's own epoll set of
    /// its listening socket, its connections' sockets and its timer.
    pub fn host_event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open now (for tests and statistics).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes held for host peers that have not read them yet, over all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.buf.len() + c.ctl_out.len()).sum()
    }

    /// Closes every connection and tells the guest with a TRANSPORT_RESET event (after a
    /// snapshot restore the guest's connections belong to another host). The event goes out as
    /// soon as the guest has a buffer on the event queue.
    pub fn send_transport_reset(&mut self) {
        self.close_all();
        self.reset_pending = true;
        self.deliver_events();
    }

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
        self.run_queues();
        self.rearm_timer();
    }

    fn handle_host_event(&mut self, token: u64, ev: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_clients(),
            TOKEN_TIMER => {
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

    fn accept_clients(&mut self) {
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

    fn drop_pending(&mut self, token: u64) {
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    /// Reads the client's `CONNECT <port>\n` a byte at a time, so that nothing the client
    /// wrote after the line is consumed here: it belongs to the guest.
    fn read_connect_line(&mut self, token: u64) {
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
        conn.send_request = true;
        conn.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        self.by_token.insert(token, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    fn alloc_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let port = self.next_host_port;
            self.next_host_port = if port == u32::MAX { HOST_PORT_BASE } else { port + 1 };
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn handle_conn_event(&mut self, key: ConnKey, ev: EventSet) {
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
    fn flush_conn(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.host_writable {
            if let Err(e) = c.flush() {
                tracing::debug!("virtio-vsock: host side of {key:?} gone: {e}");
                return self.kill(key);
            }
        }
        self.finish_guest_shutdown(key);
    }

    fn finish_guest_shutdown(&mut self, key: ConnKey) {
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

    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx_work() {
                c.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_token.remove(&c.token);
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    /// Closes the host side at once and owes the guest an RST.
    fn kill(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.rst_queue.push_back((key.local_port, key.peer_port));
    }

    fn close_all(&mut self) {
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
    }

    fn expire_deadlines(&mut self) {
        let now = Instant::now();
        let late: Vec<_> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| *t).collect();
        for t in late {
            self.drop_pending(t);
        }
        let late: Vec<_> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(k, _)| *k).collect();
        for key in late {
            tracing::debug!("virtio-vsock: {key:?} timed out");
            self.kill(key);
        }
    }

    fn rearm_timer(&mut self) {
        let next = self
            .pending
            .values()
            .map(|p| p.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
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

    // ---- Guest side ----

    /// Serves tx (guest packets) and rx (packets for the guest) until neither can move.
    fn run_queues(&mut self) {
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else { return };
        let mut signal = false;
        loop {
            signal |= self.process_tx(&mem);
            signal |= self.process_rx(&mem);
            if !(self.tx_stalled && self.rst_queue.len() < MAX_RST_BACKLOG) {
                break;
            }
        }
        if signal {
            self.signal_used(&mem, &[RXQ, TXQ]);
        }
        self.rearm_timer();
    }

    fn signal_used(&mut self, mem: &GuestMemoryMmap, queues: &[usize]) {
        let Some(active) = self.active.as_mut() else { return };
        let mut raise = false;
        for &i in queues {
            match active.queues[i].needs_notification(mem) {
                Ok(n) => raise |= n,
                Err(e) => tracing::warn!("virtio-vsock: queue {i}: {e}"),
            }
        }
        if raise {
            active.interrupt.signal(INT_VRING);
        }
    }

    fn queue(&mut self, i: usize) -> Option<&mut Queue> {
        self.active.as_mut().map(|a| &mut a.queues[i])
    }

    /// Takes every packet the guest queued for the host. Returns whether any was used.
    fn process_tx(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.tx_stalled = false;
        let mut used = false;
        if let Some(q) = self.queue(TXQ) {
            let _ = q.disable_notification(mem);
        }
        loop {
            if self.rst_queue.len() >= MAX_RST_BACKLOG {
                self.tx_stalled = true;
                break;
            }
            let Some(q) = self.queue(TXQ) else { break };
            let Some(mut chain) = q.pop_descriptor_chain(mem) else {
                match q.enable_notification(mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let whole = chain.clone();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.handle_guest_packet(&pkt),
                // The crate takes the payload from one descriptor; Linux sends a large payload
                // as several page fragments, so such chains are gathered here instead.
                Err(virtio_vsock::packet::Error::DescriptorLengthTooSmall) => match gather_tx(mem, whole) {
                    Some((mut header, mut data)) => {
                        let raw = header.clone();
                        let data = if data.is_empty() { None } else { Some(&mut data[..]) };
                        // SAFETY: `header` and `data` outlive the packet, which is dropped at
                        // the end of this arm.
                        let pkt = unsafe { VsockPacket::new(&mut header, data) }
                            .and_then(|mut pkt| pkt.set_header_from_raw(&raw).map(|_| pkt));
                        match pkt {
                            Ok(pkt) => self.handle_guest_packet(&pkt),
                            Err(e) => tracing::debug!("virtio-vsock: malformed tx packet dropped: {e:?}"),
                        }
                    }
                    None => tracing::debug!("virtio-vsock: malformed fragmented tx packet dropped"),
                },
                Err(e) => tracing::debug!("virtio-vsock: malformed tx packet dropped: {e:?}"),
            }
            if let Some(q) = self.queue(TXQ) {
                if let Err(e) = q.add_used(mem, head, 0) {
                    tracing::warn!("virtio-vsock: tx queue: {e}");
                }
            }
            used = true;
        }
        used
    }

    fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        if pkt.src_cid() != self.cid || pkt.dst_cid() != HOST_CID {
            tracing::debug!("virtio-vsock: packet {} -> {} dropped (bad CID)", pkt.src_cid(), pkt.dst_cid());
            return;
        }
        let key = ConnKey { local_port: pkt.dst_port(), peer_port: pkt.src_port() };
        let op = pkt.op();
        if pkt.type_() != TYPE_STREAM {
            if op != OP_RST {
                self.rst_queue.push_back((key.local_port, key.peer_port));
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match op {
                OP_REQUEST => self.guest_connect(key, pkt),
                OP_RST => {}
                _ => self.rst_queue.push_back((key.local_port, key.peer_port)),
            }
            return;
        };
        c.peer_buf_alloc = pkt.buf_alloc();
        c.peer_fwd_cnt = pkt.fwd_cnt();
        match (c.state, op) {
            (_, OP_RST) => return self.remove_conn(key),
            (State::LocalInit, OP_RESPONSE) => {
                c.state = State::Established;
                c.deadline = None;
                c.ctl_out = format!("OK {}\n", key.local_port).into_bytes();
                c.host_writable = true;
                self.flush_conn(key);
            }
            (State::LocalInit, _) => return self.kill(key),
            (State::Established, OP_RW) => self.guest_data(key, pkt),
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => c.send_credit_update = true,
            (State::Established, OP_SHUTDOWN) => {
                c.peer_shutdown |= pkt.flags() & SHUTDOWN_BOTH;
                self.finish_guest_shutdown(key);
            }
            (State::Established, _) => return self.kill(key),
        }
        self.schedule(key);
    }

    fn guest_connect(&mut self, key: ConnKey, pkt: &VsockPacket<'_, ()>) {
        if self.conns.len() >= MAX_CONNS {
            return self.rst_queue.push_back((key.local_port, key.peer_port));
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connect to {path}: {e}");
                return self.rst_queue.push_back((key.local_port, key.peer_port));
            }
        };
        let token = self.new_token();
        if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(conn_events(), token)).is_err() {
            return self.rst_queue.push_back((key.local_port, key.peer_port));
        }
        let mut conn = Conn::new(stream, token, State::Established);
        conn.send_response = true;
        conn.peer_buf_alloc = pkt.buf_alloc();
        conn.peer_fwd_cnt = pkt.fwd_cnt();
        self.by_token.insert(token, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Guest bytes for the host: written straight from guest memory when the host socket takes
    /// them, else held in the connection's buffer, which the guest's credit keeps within
    /// [`CONN_BUF`]; a guest that sends past its credit loses the connection.
    fn guest_data(&mut self, key: ConnKey, pkt: &VsockPacket<'_, ()>) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.peer_shutdown & SHUTDOWN_SEND != 0 {
            tracing::debug!("virtio-vsock: {key:?}: data after SHUTDOWN");
            return self.kill(key);
        }
        let Some(data) = pkt.data_slice() else { return };
        let len = data.len();
        if c.buf.len() + len > CONN_BUF as usize {
            tracing::warn!("virtio-vsock: {key:?}: guest sent past its credit, connection reset");
            return self.kill(key);
        }
        let mut off = 0;
        if c.flushed() && c.host_writable {
            while off < len {
                let part = match data.subslice(off, len - off) {
                    Ok(p) => p,
                    Err(_) => break,
                };
                match (&c.stream).write_volatile(&part) {
                    Ok(0) => break,
                    Ok(n) => {
                        off += n;
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    }
                    Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.host_writable = false;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-vsock: host side of {key:?} gone: {e}");
                        return self.kill(key);
                    }
                }
            }
        }
        if off < len {
            let mut rest = vec![0u8; len - off];
            if let Ok(part) = data.subslice(off, len - off) {
                part.copy_to(&mut rest[..]);
            }
            c.buf.extend(rest);
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
        c.check_credit_update();
        if c.host_writable && !c.flushed() {
            self.flush_conn(key);
        }
    }

    /// Fills the guest's rx buffers: RSTs first, then connections round robin. Returns whether
    /// any buffer was used.
    fn process_rx(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            enum Item {
                Rst(u32, u32),
                Conn(ConnKey),
            }
            let item = if let Some(&(src, dst)) = self.rst_queue.front() {
                Item::Rst(src, dst)
            } else {
                let mut found = None;
                while let Some(key) = self.rx_ready.pop_front() {
                    if let Some(c) = self.conns.get_mut(&key) {
                        if c.has_rx_work() {
                            found = Some(key);
                            break;
                        }
                        c.queued = false;
                    }
                }
                match found {
                    Some(key) => Item::Conn(key),
                    None => break,
                }
            };
            let Some(q) = self.queue(RXQ) else { break };
            let chain = match q.pop_descriptor_chain(mem) {
                Some(c) => Some(c),
                None => match q.enable_notification(mem) {
                    Ok(true) => q.pop_descriptor_chain(mem),
                    _ => None,
                },
            };
            let Some(mut chain) = chain else {
                if let Item::Conn(key) = item {
                    self.rx_ready.push_front(key);
                }
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, u32::MAX) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("virtio-vsock: malformed rx buffer skipped: {e:?}");
                    if let Item::Conn(key) = item {
                        self.rx_ready.push_front(key);
                    }
                    if let Some(q) = self.queue(RXQ) {
                        let _ = q.add_used(mem, head, 0);
                    }
                    used = true;
                    continue;
                }
            };
            let mut unusable = false;
            let len = match item {
                Item::Rst(src, dst) => {
                    self.rst_queue.pop_front();
                    write_header(&mut pkt, self.cid, src, dst, OP_RST, 0, 0, 0);
                    Some(PKT_HEADER_SIZE as u32)
                }
                Item::Conn(key) => {
                    let len = self.fill_conn_packet(key, &mut pkt);
                    if let Some(c) = self.conns.get_mut(&key) {
                        // Nothing written yet still work to do: the buffer has no room for
                        // data. Consume it empty rather than offer it again forever.
                        unusable = len.is_none() && c.has_rx_work();
                        if c.has_rx_work() {
                            self.rx_ready.push_back(key);
                        } else {
                            c.queued = false;
                        }
                    }
                    len
                }
            };
            let Some(q) = self.queue(RXQ) else { break };
            match len {
                Some(len) => {
                    if let Err(e) = q.add_used(mem, head, len) {
                        tracing::warn!("virtio-vsock: rx queue: {e}");
                    }
                    used = true;
                }
                None if unusable => {
                    tracing::debug!("virtio-vsock: rx buffer without room for data skipped");
                    let _ = q.add_used(mem, head, 0);
                    used = true;
                }
                None => q.go_to_previous_position(),
            }
        }
        used
    }


    /// The next packet a connection owes the guest, written into `pkt`; its used length, or
    /// None when it had nothing after all (the buffer goes back to the queue).
    fn fill_conn_packet(&mut self, key: ConnKey, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        let cid = self.cid;
        let c = self.conns.get_mut(&key)?;
        let mut op = None;
        if c.send_request {
            c.send_request = false;
            op = Some((OP_REQUEST, 0));
        } else if c.send_response {
            c.send_response = false;
            op = Some((OP_RESPONSE, 0));
        } else if c.wants_data() {
            if let Some(data) = pkt.data_slice() {
                let room = data.len().min(c.peer_free() as usize).min(MAX_PKT_DATA as usize);
                let read = match data.subslice(0, room) {
                    Ok(mut part) => loop {
                        match (&c.stream).read_volatile(&mut part) {
                            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                            r => break r,
                        }
                    },
                    Err(e) => Err(e),
                };
                match read {
                    Ok(0) => {
                        c.host_readable = false;
                        c.host_eof = true;
                        c.send_shutdown |= if c.host_hup { SHUTDOWN_BOTH } else { SHUTDOWN_SEND };
                    }
                    Ok(n) => {
                        let (fwd, n32) = (c.fwd_cnt, n as u32);
                        c.tx_cnt = c.tx_cnt.wrapping_add(n32);
                        c.last_fwd_sent = fwd;
                        c.send_credit_update = false;
                        write_header(pkt, cid, key.local_port, key.peer_port, OP_RW, 0, CONN_BUF, fwd);
                        pkt.set_len(n32);
                        return Some(PKT_HEADER_SIZE as u32 + n32);
                    }
                    Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.host_readable = false;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-vsock: host side of {key:?} gone: {e}");
                        self.remove_conn(key);
                        write_header(pkt, cid, key.local_port, key.peer_port, OP_RST, 0, 0, 0);
                        return Some(PKT_HEADER_SIZE as u32);
                    }
                }
            }
        }
        let c = self.conns.get_mut(&key)?;
        if op.is_none() && c.send_shutdown & !c.shutdown_sent != 0 {
            let flags = c.send_shutdown;
            c.shutdown_sent |= flags;
            if c.shutdown_sent == SHUTDOWN_BOTH {
                c.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            }
            op = Some((OP_SHUTDOWN, flags));
        }
        if op.is_none() && c.send_credit_update {
            op = Some((OP_CREDIT_UPDATE, 0));
        }
        let (op, flags) = op?;
        c.send_credit_update = false;
        let fwd = c.fwd_cnt;
        c.last_fwd_sent = fwd;
        write_header(pkt, cid, key.local_port, key.peer_port, op, flags, CONN_BUF, fwd);
        Some(PKT_HEADER_SIZE as u32)
    }

    /// Delivers an owed TRANSPORT_RESET on the event queue.
    fn deliver_events(&mut self) {
        if !self.reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let mem = active.mem.clone();
        let q = &mut active.queues[EVQ];
        while let Some(mut chain) = q.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let written = match chain.next() {
                Some(d) if d.is_write_only() && d.len() >= 4 => {
                    mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()).is_ok()
                }
                _ => false,
            };
            let _ = q.add_used(&mem, head, if written { 4 } else { 0 });
            if written {
                self.reset_pending = false;
                break;
            }
            tracing::debug!("virtio-vsock: malformed event buffer skipped");
        }
        if q.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal(INT_VRING);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_header(pkt: &mut VsockPacket<'_, ()>, cid: u64, src: u32, dst: u32, op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32) {
    let _ = pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]);
    pkt.set_src_cid(HOST_CID)
        .set_dst_cid(cid)
        .set_src_port(src)
        .set_dst_port(dst)
        .set_type(TYPE_STREAM)
        .set_op(op)
        .set_flags(flags)
        .set_buf_alloc(buf_alloc)
        .set_fwd_cnt(fwd_cnt);
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The listening socket's file goes with the device (connections' fds close themselves).
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// `CONNECT <port>` (the newline already stripped; a trailing `\r` tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
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
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
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

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: write to read-only config at {offset:#x} ignored");
    }

    fn activate(&mut self, mem: GuestMemoryMmap, mut queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount(queues.len(), 3));
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        self.active = Some(Active { mem, queues, interrupt });
        self.deliver_events();
        self.run_queues();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RXQ | TXQ => self.run_queues(),
            EVQ => self.deliver_events(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.close_all();
        self.active = None;
        self.acked_features = 0;
        self.reset_pending = false;
    }
}

/// The device shared between the MMIO transport (which owns a `Box<dyn VirtioDevice>`) and the
/// event loop's [`VsockHostEvents`].
#[derive(Clone)]
pub struct VsockHandle(pub Arc<Mutex<Vsock>>);

impl VsockHandle {
    pub fn new(vsock: Vsock) -> Self {
        Self(Arc::new(Mutex::new(vsock)))
    }

    /// The event-loop subscriber for this device's host sockets.
    pub fn host_events(&self) -> VsockHostEvents {
        let fd = lock(&self.0).host_event_fd();
        VsockHostEvents { vsock: self.0.clone(), fd }
    }
}

impl VirtioDevice for VsockHandle {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn avail_features(&self) -> u64 {
        lock(&self.0).avail_features()
    }
    fn set_acked_features(&mut self, features: u64) {
        lock(&self.0).set_acked_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.0).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).write_config(offset, data)
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), ActivateError> {
        lock(&self.0).activate(mem, queues, interrupt)
    }
    fn process_queue(&mut self, index: usize) {
        lock(&self.0).process_queue(index)
    }
    fn reset(&mut self) {
        lock(&self.0).reset()
    }
}

/// Event-loop subscriber: watches the device's epoll fd and lets it serve its host sockets.
/// Lock order: the transport's lock, then the device's (this subscriber takes only the latter).
pub struct VsockHostEvents {
    vsock: Arc<Mutex<Vsock>>,
    fd: RawFd,
}

impl MutEventSubscriber for VsockHostEvents {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::error!("cannot watch the vsock device's sockets: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        lock(&self.vsock).process_host_events();
    }
}
