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
mod guest;
mod handle;
mod host;
mod persist;

pub use self::handle::{VsockHandle, VsockHostEvents};
pub use self::persist::VsockState;
use self::host::set_nonblocking;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::{self};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::conn::{Conn, ConnKey};
use super::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

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
/// What a host client reads instead of `OK <port>\n` when the guest did not answer its
/// connection within [`CONNECT_TIMEOUT`] (an ember extension: Firecracker closes the socket in
/// silence, the same as for a guest's RST).
pub const CONNECT_TIMED_OUT: &[u8] = b"TIMEOUT\n";
/// After the host closed and we sent SHUTDOWN both ways, the guest must answer RST this fast.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long host clients wait for a guest to take in a TRANSPORT_RESET before their
/// connections are sent anyway (a guest that never reads its CID back).
pub const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the device looks whether the guest has taken in the reset, while clients wait.
const RESET_ACK_POLL: Duration = Duration::from_millis(2);
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
    /// When the guest was given a TRANSPORT_RESET it has not yet taken in. Until it has, a
    /// connection the host opens would be killed by the guest's reset handling (or answered
    /// from its old CID), so host clients' requests wait in `deferred`. Linux reads the CID
    /// from the config space first thing when it handles the event: that read is the sign.
    reset_unacked: Option<Instant>,
    /// The guest read its CID from the config space (set from the vCPU's MMIO exit).
    cid_read: std::cell::Cell<bool>,
    deferred: Vec<ConnKey>,
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
            reset_unacked: None,
            cid_read: std::cell::Cell::new(false),
            deferred: Vec::new(),
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

}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The listening socket's file goes with the device (connections' fds close themselves).
        let _ = std::fs::remove_file(&self.uds_path);
    }
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
        if offset < 8 {
            self.cid_read.set(true);
        }
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
        self.reset_unacked = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().flat_map(|a| a.queues.iter().map(|q| q.state())).collect()
    }
}

