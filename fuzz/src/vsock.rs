//! virtio-vsock, both sides at once: the guest queues tx packets with any header (CIDs,
//! ports, type, op, flags, credit), payloads in one or several descriptors or none, rx and
//! event buffers of any size, and malformed chains; host programs connect to the device's
//! socket with `CONNECT` lines (or garbage), listen where guest connections go, write, read,
//! half-close and drop their sockets; and the device serves its host events, resets its
//! transport, or is reset by the driver, in any order.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arbitrary::Arbitrary;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::vsock::{Vsock, HOST_CID, HOST_PORT_BASE, TYPE_STREAM};
use vmm::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use crate::guest::{Addr, Driver, Len, F_NEXT, F_WRITE};
use crate::seed::{Seed, Writer};

pub const GUEST_CID: u64 = 3;
const MEM: u64 = 2 << 20;
/// Each queue's table and rings; the tx queue's 12 KiB above the rx queue's, the event
/// queue's above that.
const QUEUE_BASE: [u64; 3] = [0, 0x3000, 0x6000];
const TX_SLOTS: u64 = 0x1_0000;
const TX_SLOT: u64 = 0x1_1000;
const RX_SLOTS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1_0000;
const SLOTS: u64 = 8;
/// Host sockets kept at once (clients, accepted connections).
const MAX_STREAMS: usize = 16;

/// A port: one of the few the other ops use, so that packets meet connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Port {
    /// Host ports with a listener (`Op::Listen`).
    Listener(u8),
    /// The ports the device gives host-initiated connections, first ones first.
    Assigned(u8),
    /// Guest ports.
    Guest(u8),
    Raw(u32),
}

impl Port {
    pub fn resolve(self) -> u32 {
        match self {
            Port::Listener(n) => 1000 + u32::from(n % 4),
            Port::Assigned(n) => HOST_PORT_BASE + u32::from(n % 4),
            Port::Guest(n) => 5000 + u32::from(n % 4),
            Port::Raw(p) => p,
        }
    }
}

impl Seed for Port {
    fn write(&self, w: &mut Writer) {
        match *self {
            Port::Listener(n) => w.variant(0, 4).u8(n),
            Port::Assigned(n) => w.variant(1, 4).u8(n),
            Port::Guest(n) => w.variant(2, 4).u8(n),
            Port::Raw(p) => w.variant(3, 4).u32(p),
        };
    }
}

/// A packet header as the guest writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub struct Hdr {
    /// The guest's CID and the host's, or these raw values.
    pub src_cid: Option<u64>,
    pub dst_cid: Option<u64>,
    pub src_port: Port,
    pub dst_port: Port,
    /// The payload's length; the header says `len_lie` instead when given.
    pub len_lie: Option<u32>,
    pub stream: bool,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Seed for Hdr {
    fn write(&self, w: &mut Writer) {
        let opt = |w: &mut Writer, v: Option<u64>| {
            w.bool(v.is_some());
            if let Some(v) = v {
                w.u64(v);
            }
        };
        opt(w, self.src_cid);
        opt(w, self.dst_cid);
        self.src_port.write(w);
        self.dst_port.write(w);
        w.bool(self.len_lie.is_some());
        if let Some(l) = self.len_lie {
            w.u32(l);
        }
        w.bool(self.stream).u16(self.op).u32(self.flags).u32(self.buf_alloc).u32(self.fwd_cnt);
    }
}

impl Hdr {
    /// A well-formed stream packet from guest port `src` to host port `dst`.
    pub fn guest(src: Port, dst: Port, op: u16) -> Self {
        Hdr {
            src_cid: None,
            dst_cid: None,
            src_port: src,
            dst_port: dst,
            len_lie: None,
            stream: true,
            op,
            flags: 0,
            buf_alloc: 256 << 10,
            fwd_cnt: 0,
        }
    }

    fn bytes(&self, payload_len: u32) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.unwrap_or(GUEST_CID).to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.unwrap_or(HOST_CID).to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.resolve().to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.resolve().to_le_bytes());
        b[24..28].copy_from_slice(&self.len_lie.unwrap_or(payload_len).to_le_bytes());
        let kind = if self.stream { TYPE_STREAM } else { 2 };
        b[28..30].copy_from_slice(&kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Op {
    /// A tx packet: its header, then `payload` bytes in `frags % 4` descriptors (0: header
    /// and payload in one descriptor).
    Tx {
        hdr: Hdr,
        payload: u16,
        frags: u8,
    },
    /// `n % 8 + 1` rx buffers: the header's 44 bytes, then `data` bytes (`split`: in a
    /// descriptor of their own).
    Rx {
        n: u8,
        data: u16,
        split: bool,
    },
    /// An event buffer of `len` bytes.
    Event {
        len: u8,
    },
    /// A one-descriptor chain of any shape on queue `queue % 3`.
    Chain {
        queue: u8,
        addr: Addr,
        len: Len,
        flags: u8,
    },
    Notify {
        queue: u8,
    },
    /// A host program connects to the device's socket and writes `CONNECT <port>\n` (with
    /// `garbage`, bytes of its own instead).
    Connect {
        port: Port,
        garbage: Option<u64>,
    },
    /// A host program listens where guest connections to `port` go.
    Listen {
        port: u8,
    },
    /// The host listeners accept what is waiting.
    Accept,
    HostWrite {
        stream: u8,
        len: u16,
    },
    HostRead {
        stream: u8,
    },
    /// 0: shut down reading, 1: writing, 2: both, else drop the socket.
    HostClose {
        stream: u8,
        how: u8,
    },
    HostEvents,
    TransportReset,
    ReadCid,
    /// The driver resets the device (status 0) and activates it again.
    Reset,
}

impl Seed for Op {
    fn write(&self, w: &mut Writer) {
        const N: u32 = 15;
        match *self {
            Op::Tx { hdr, payload, frags } => {
                w.variant(0, N);
                hdr.write(w);
                w.u16(payload).u8(frags);
            }
            Op::Rx { n, data, split } => {
                w.variant(1, N).u8(n).u16(data).bool(split);
            }
            Op::Event { len } => {
                w.variant(2, N).u8(len);
            }
            Op::Chain { queue, addr, len, flags } => {
                w.variant(3, N).u8(queue);
                addr.write(w);
                len.write(w);
                w.u8(flags);
            }
            Op::Notify { queue } => {
                w.variant(4, N).u8(queue);
            }
            Op::Connect { port, garbage } => {
                w.variant(5, N);
                port.write(w);
                w.bool(garbage.is_some());
                if let Some(g) = garbage {
                    w.u64(g);
                }
            }
            Op::Listen { port } => {
                w.variant(6, N).u8(port);
            }
            Op::Accept => {
                w.variant(7, N);
            }
            Op::HostWrite { stream, len } => {
                w.variant(8, N).u8(stream).u16(len);
            }
            Op::HostRead { stream } => {
                w.variant(9, N).u8(stream);
            }
            Op::HostClose { stream, how } => {
                w.variant(10, N).u8(stream).u8(how);
            }
            Op::HostEvents => {
                w.variant(11, N);
            }
            Op::TransportReset => {
                w.variant(12, N);
            }
            Op::ReadCid => {
                w.variant(13, N);
            }
            Op::Reset => {
                w.variant(14, N);
            }
        }
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Vsock,
    interrupt: Arc<Interrupt>,
    _evt: EventFd,
    queues: Vec<Driver>,
    next_slot: [u16; 3],
    tx_slot: u64,
    rx_slot: u64,
    uds: PathBuf,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
}

fn queue(d: &Driver) -> Queue {
    let mut q = Queue::new(256).expect("queue");
    q.set_size(d.size);
    q.set_desc_table_address(Some(d.desc_table() as u32), Some(0));
    q.set_avail_ring_address(Some(d.avail_ring() as u32), Some(0));
    q.set_used_ring_address(Some(d.used_ring() as u32), Some(0));
    q.set_ready(true);
    q
}

impl Rig {
    fn new(dir: &Path, event_idx: bool) -> Option<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
        let uds = dir.join("v.sock");
        let dev = Vsock::new(GUEST_CID, &uds).ok()?;
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let interrupt = Arc::new(Interrupt::new(evt.try_clone().expect("eventfd")));
        let queues = QUEUE_BASE.iter().map(|&b| Driver::at(b, 256)).collect();
        let mut rig = Rig {
            mem,
            dev,
            interrupt,
            _evt: evt,
            queues,
            next_slot: [0; 3],
            tx_slot: 0,
            rx_slot: 0,
            uds,
            listeners: Vec::new(),
            streams: Vec::new(),
        };
        rig.activate(event_idx);
        Some(rig)
    }

    fn activate(&mut self, event_idx: bool) {
        let mut features = VIRTIO_F_VERSION_1;
        if event_idx {
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        self.dev.set_acked_features(features);
        self.queues = QUEUE_BASE.iter().map(|&b| Driver::at(b, 256)).collect();
        self.next_slot = [0; 3];
        let queues = self.queues.iter().map(queue).collect();
        self.dev.activate(self.mem.clone(), queues, self.interrupt.clone()).expect("three queues activate");
    }

    /// Publishes a chain of `(addr, len, writable)` on queue `q`.
    fn chain(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
        let first = self.next_slot[q];
        self.next_slot[q] = first.wrapping_add(descs.len() as u16) % 256;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = first.wrapping_add(i as u16) % 256;
            let mut flags = if write { F_WRITE } else { 0 } as u16;
            if i + 1 < descs.len() {
                flags |= u16::from(F_NEXT);
            }
            self.queues[q].desc(&self.mem, idx, addr, len, flags, (idx + 1) % 256);
        }
        self.queues[q].publish(&self.mem, first);
    }

    fn stream(&mut self, i: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[i as usize % n])
    }

    fn keep(&mut self, s: UnixStream) {
        if self.streams.len() < MAX_STREAMS && s.set_nonblocking(true).is_ok() {
            self.streams.push(s);
        }
    }

    fn apply(&mut self, op: Op, event_idx: bool) {
        match op {
            Op::Tx { hdr, payload, frags } => {
                let base = TX_SLOTS + (self.tx_slot % SLOTS) * TX_SLOT;
                self.tx_slot += 1;
                let len = u32::from(payload);
                let _ = self.mem.write_slice(&hdr.bytes(len), GuestAddress(base));
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let _ = self.mem.write_slice(&data, GuestAddress(base + 44));
                let frags = u32::from(frags % 4);
                if frags == 0 {
                    self.chain(1, &[(base, 44 + len, false)]);
                } else {
                    let mut descs = vec![(base, 44, false)];
                    let step = len.div_ceil(frags).max(1);
                    let mut at = 0;
                    while at < len {
                        let n = step.min(len - at);
                        descs.push((base + 44 + u64::from(at), n, false));
                        at += n;
                    }
                    self.chain(1, &descs);
                }
            }
            Op::Rx { n, data, split } => {
                for _ in 0..=n % 8 {
                    let base = RX_SLOTS + (self.rx_slot % SLOTS) * RX_SLOT;
                    self.rx_slot += 1;
                    let data = u32::from(data).min((RX_SLOT - 0x100) as u32);
                    if split {
                        self.chain(0, &[(base, 44, true), (base + 0x100, data, true)]);
                    } else {
                        self.chain(0, &[(base, 44 + data, true)]);
                    }
                }
            }
            Op::Event { len } => self.chain(2, &[(0xf000, len.into(), true)]),
            Op::Chain { queue, addr, len, flags } => {
                let q = usize::from(queue % 3);
                let slot = self.next_slot[q];
                self.next_slot[q] = (slot + 1) % 256;
                self.queues[q].desc(&self.mem, slot, addr.resolve(), len.resolve(), flags.into(), (slot + 1) % 256);
                self.queues[q].publish(&self.mem, slot);
            }
            Op::Notify { queue } => self.dev.process_queue(usize::from(queue % 4)),
            Op::Connect { port, garbage } => {
                if let Ok(mut s) = UnixStream::connect(&self.uds) {
                    let line = match garbage {
                        Some(g) => g.to_le_bytes().to_vec(),
                        None => format!("CONNECT {}\n", port.resolve()).into_bytes(),
                    };
                    let _ = s.write_all(&line);
                    self.keep(s);
                }
            }
            Op::Listen { port } => {
                let path = format!("{}_{}", self.uds.display(), Port::Listener(port).resolve());
                if let Ok(l) = UnixListener::bind(path) {
                    if l.set_nonblocking(true).is_ok() {
                        self.listeners.push(l);
                    }
                }
            }
            Op::Accept => {
                let accepted: Vec<UnixStream> = self
                    .listeners
                    .iter()
                    .flat_map(|l| std::iter::from_fn(|| l.accept().ok().map(|(s, _)| s)))
                    .collect();
                for s in accepted {
                    self.keep(s);
                }
            }
            Op::HostWrite { stream, len } => {
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                if let Some(s) = self.stream(stream) {
                    let _ = s.write(&data);
                }
            }
            Op::HostRead { stream } => {
                if let Some(s) = self.stream(stream) {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                }
            }
            Op::HostClose { stream, how } => {
                let n = self.streams.len();
                if n > 0 {
                    let i = stream as usize % n;
                    match how % 4 {
                        0 => drop(self.streams[i].shutdown(Shutdown::Read)),
                        1 => drop(self.streams[i].shutdown(Shutdown::Write)),
                        2 => drop(self.streams[i].shutdown(Shutdown::Both)),
                        _ => drop(self.streams.swap_remove(i)),
                    }
                }
            }
            Op::HostEvents => self.dev.process_host_events(),
            Op::TransportReset => self.dev.send_transport_reset(),
            Op::ReadCid => {
                let mut b = [0u8; 8];
                self.dev.read_config(0, &mut b);
                assert_eq!(u64::from_le_bytes(b), GUEST_CID, "the config space holds the guest's CID");
            }
            Op::Reset => {
                self.dev.reset();
                self.activate(event_idx);
            }
        }
    }
}

pub fn decode(data: &[u8]) -> Option<(bool, Vec<Op>)> {
    let mut u = arbitrary::Unstructured::new(data);
    let event_idx = bool::arbitrary(&mut u).ok()?;
    Some((event_idx, crate::ops(u.take_rest())))
}

pub fn encode(event_idx: bool, ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::default();
    w.bool(event_idx).bytes(&crate::seed::encode(ops));
    w.0
}

pub fn run(data: &[u8]) {
    crate::like_the_vmm();
    let Some((event_idx, ops)) = decode(data) else { return };
    let dir = TempDir::new_in(Path::new("/dev/shm")).or_else(|_| TempDir::new()).expect("a temporary directory");
    let Some(mut rig) = Rig::new(dir.as_path(), event_idx) else { return };
    for op in ops {
        rig.apply(op, event_idx);
    }
    rig.dev.process_host_events();
}
