//! The guest side of the vsock device: tx packets from the guest, rx packets to it, and the
//! event queue.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, WriteVolatile};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent};

use super::conn::{Conn, ConnKey, State};
use crate::devices::virtio::INT_VRING;
use super::*;
use super::host::{conn_events, connect_nonblocking};

impl Vsock {
    /// Serves tx (guest packets) and rx (packets for the guest) until neither can move.
    pub(super) fn run_queues(&mut self) {
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

    pub(super) fn signal_used(&mut self, mem: &GuestMemoryMmap, queues: &[usize]) {
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

    pub(super) fn queue(&mut self, i: usize) -> Option<&mut Queue> {
        self.active.as_mut().map(|a| &mut a.queues[i])
    }

    /// Takes every packet the guest queued for the host. Returns whether any was used.
    pub(super) fn process_tx(&mut self, mem: &GuestMemoryMmap) -> bool {
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
            // An avail index more than a queue's length ahead of ours is a ring the guest
            // broke: no chain comes out of it, yet it always looks as if more were there.
            let next = match q.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    tracing::warn!("virtio-vsock: tx queue broken by the guest, not served: {e}");
                    break;
                }
            };
            let Some(mut chain) = next else {
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

    pub(super) fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
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

    pub(super) fn guest_connect(&mut self, key: ConnKey, pkt: &VsockPacket<'_, ()>) {
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
    pub(super) fn guest_data(&mut self, key: ConnKey, pkt: &VsockPacket<'_, ()>) {
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
    pub(super) fn process_rx(&mut self, mem: &GuestMemoryMmap) -> bool {
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
    pub(super) fn fill_conn_packet(&mut self, key: ConnKey, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
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
    pub(super) fn deliver_events(&mut self) {
        if !self.reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let mem = active.mem.clone();
        let q = &mut active.queues[EVQ];
        let mut delivered = false;
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
                self.reset_unacked = Some(Instant::now());
                self.cid_read.set(false);
                delivered = true;
                break;
            }
            tracing::debug!("virtio-vsock: malformed event buffer skipped");
        }
        // A reset is delivered right after a restore, when the queue's record of what the
        // guest was last told may be stale: it always gets an interrupt.
        if delivered || q.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal(INT_VRING);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn write_header(pkt: &mut VsockPacket<'_, ()>, cid: u64, src: u32, dst: u32, op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32) {
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

/// Copies a tx chain whose payload is spread over several descriptors into a header and a
/// payload buffer. Every descriptor must be device-readable and inside guest memory, the
/// header's length field must match what the chain holds, and the payload is bounded by
/// [`MAX_PKT_DATA`]; anything else gives None.
pub(super) fn gather_tx(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Option<(Vec<u8>, Vec<u8>)> {
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
