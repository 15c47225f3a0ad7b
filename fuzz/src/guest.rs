//! A small guest for the virtio targets: 256 KiB of guest memory with one split queue's rings,
//! four indirect descriptor tables and seven data buffers at fixed places, and the operations
//! a (hostile) driver performs on them. Addresses and lengths may also be anything at all.

use arbitrary::Arbitrary;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::seed::{Seed, Writer};

pub const MEM_SIZE: u64 = 0x4_0000;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const INDIRECT: u64 = 0x3000;
pub const TABLES: u8 = 4;
pub const BUFS: u64 = 0x8000;
pub const BUF_SIZE: u64 = 0x8000;
pub const NBUFS: u8 = 7;
pub const MAX_QUEUE: u16 = 256;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

pub fn buf(index: u8) -> u64 {
    BUFS + u64::from(index % NBUFS) * BUF_SIZE
}

pub fn table(index: u8) -> u64 {
    INDIRECT + u64::from(index % TABLES) * 0x1000
}

/// Where a descriptor points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Addr {
    Buf {
        buf: u8,
        off: u16,
    },
    /// An indirect table (for a descriptor with the INDIRECT flag).
    Table(u8),
    /// Into the rings and tables themselves.
    Ring(u16),
    /// Just below the end of guest memory.
    End(u16),
    /// Just below the end of the address space.
    Top(u16),
    Raw(u64),
}

impl Addr {
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Buf { buf: b, off } => buf(b) + u64::from(off) % BUF_SIZE,
            Addr::Table(t) => table(t),
            Addr::Ring(off) => u64::from(off) % BUFS,
            Addr::End(back) => MEM_SIZE - 1 - u64::from(back),
            Addr::Top(back) => u64::MAX - u64::from(back),
            Addr::Raw(a) => a,
        }
    }
}

impl Seed for Addr {
    fn write(&self, w: &mut Writer) {
        match *self {
            Addr::Buf { buf, off } => w.variant(0, 6).u8(buf).u16(off),
            Addr::Table(t) => w.variant(1, 6).u8(t),
            Addr::Ring(off) => w.variant(2, 6).u16(off),
            Addr::End(back) => w.variant(3, 6).u16(back),
            Addr::Top(back) => w.variant(4, 6).u16(back),
            Addr::Raw(a) => w.variant(5, 6).u64(a),
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Len {
    Bytes(u16),
    Sectors(u8),
    /// `n` descriptors of an indirect table.
    Descs(u8),
    Raw(u32),
}

impl Len {
    pub fn resolve(self) -> u32 {
        match self {
            Len::Bytes(n) => n.into(),
            Len::Sectors(n) => u32::from(n) * 512,
            Len::Descs(n) => u32::from(n) * 16,
            Len::Raw(n) => n,
        }
    }
}

impl Seed for Len {
    fn write(&self, w: &mut Writer) {
        match *self {
            Len::Bytes(n) => w.variant(0, 4).u16(n),
            Len::Sectors(n) => w.variant(1, 4).u8(n),
            Len::Descs(n) => w.variant(2, 4).u8(n),
            Len::Raw(n) => w.variant(3, 4).u32(n),
        };
    }
}

pub const F_NEXT: u8 = 1;
pub const F_WRITE: u8 = 2;
pub const F_INDIRECT: u8 = 4;

/// What a driver does to guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum GuestOp {
    /// Writes descriptor `slot` of the queue's table (`table` 0) or of an indirect table.
    Desc {
        table: u8,
        slot: u8,
        addr: Addr,
        len: Len,
        flags: u8,
        next: u8,
    },
    /// Writes a 16-byte virtio-blk request header (type, reserved, sector).
    BlkHeader {
        buf: u8,
        off: u16,
        kind: u32,
        sector: u64,
    },
    /// Makes the chain at `head` available.
    Publish {
        head: u8,
    },
    /// The avail ring's flags (1: no interrupts), and `used_event` at its end.
    AvailFlags(u16),
    UsedEvent(u16),
    /// Writes 8 bytes anywhere in guest memory.
    Poke {
        at: u32,
        value: u64,
    },
}

impl Seed for GuestOp {
    fn write(&self, w: &mut Writer) {
        match *self {
            GuestOp::Desc { table, slot, addr, len, flags, next } => {
                w.variant(0, 6).u8(table).u8(slot);
                addr.write(w);
                len.write(w);
                w.u8(flags).u8(next)
            }
            GuestOp::BlkHeader { buf, off, kind, sector } => w.variant(1, 6).u8(buf).u16(off).u32(kind).u64(sector),
            GuestOp::Publish { head } => w.variant(2, 6).u8(head),
            GuestOp::AvailFlags(f) => w.variant(3, 6).u16(f),
            GuestOp::UsedEvent(e) => w.variant(4, 6).u16(e),
            GuestOp::Poke { at, value } => w.variant(5, 6).u32(at).u64(value),
        };
    }
}

/// The driver's side of a queue whose descriptor table is at `base`, its avail ring 4 KiB
/// above and its used ring 8 KiB above: where the next available entry goes.
pub struct Driver {
    base: u64,
    pub size: u16,
    avail_idx: u16,
}

impl Driver {
    /// The queue at the fixed rings (`DESC`, `AVAIL`, `USED`).
    pub fn new(size: u16) -> Self {
        Self::at(DESC, size)
    }

    pub fn at(base: u64, size: u16) -> Self {
        Self { base, size: size.clamp(1, MAX_QUEUE), avail_idx: 0 }
    }

    pub fn desc_table(&self) -> u64 {
        self.base
    }

    pub fn avail_ring(&self) -> u64 {
        self.base + 0x1000
    }

    pub fn used_ring(&self) -> u64 {
        self.base + 0x2000
    }

    /// Writes descriptor `slot` of the queue's table.
    pub fn desc(&self, mem: &GuestMemoryMmap, slot: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        let _ = mem.write_obj(RawDescriptor::from(d), GuestAddress(self.base + 16 * u64::from(slot % MAX_QUEUE)));
    }

    /// Makes the chain at `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let at = self.avail_ring() + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(at));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail_ring() + 2));
    }

    /// Applies `op`; writes that do not fit guest memory are skipped.
    pub fn apply(&mut self, mem: &GuestMemoryMmap, op: GuestOp) {
        match op {
            GuestOp::Desc { table: t, slot, addr, len, flags, next } => {
                let base = match t % (TABLES + 1) {
                    0 => self.base,
                    t => table(t - 1),
                };
                let d = Descriptor::new(addr.resolve(), len.resolve(), flags.into(), next.into());
                let _ = mem.write_obj(RawDescriptor::from(d), GuestAddress(base + 16 * u64::from(slot)));
            }
            GuestOp::BlkHeader { buf: b, off, kind, sector } => {
                let at = buf(b) + u64::from(off) % (BUF_SIZE - 16);
                let _ = mem.write_obj(kind, GuestAddress(at));
                let _ = mem.write_obj(0u32, GuestAddress(at + 4));
                let _ = mem.write_obj(sector, GuestAddress(at + 8));
            }
            GuestOp::Publish { head } => self.publish(mem, head.into()),
            GuestOp::AvailFlags(f) => {
                let _ = mem.write_obj(f, GuestAddress(self.avail_ring()));
            }
            GuestOp::UsedEvent(e) => {
                let _ = mem.write_obj(e, GuestAddress(self.avail_ring() + 4 + 2 * u64::from(self.size)));
            }
            GuestOp::Poke { at, value } => {
                let _ = mem.write_obj(value, GuestAddress(u64::from(at) % MEM_SIZE));
            }
        }
    }
}

/// A block request as a seed's operations: header in buffer 0, data in buffer 1, status in
/// buffer 2, as descriptors `head`, `head + 1`, `head + 2` of the main table or, with
/// `indirect`, of indirect table 0 behind descriptor `head`.
pub fn blk_request(head: u8, kind: u32, sector: u64, sectors: u8, indirect: bool) -> Vec<GuestOp> {
    let data_flags = if kind == virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
    let (t, first) = if indirect { (1, 0) } else { (0, head) };
    let mut ops = vec![
        GuestOp::BlkHeader { buf: 0, off: 0, kind, sector },
        GuestOp::Desc {
            table: t,
            slot: first,
            addr: Addr::Buf { buf: 0, off: 0 },
            len: Len::Bytes(16),
            flags: F_NEXT,
            next: first + 1,
        },
        GuestOp::Desc {
            table: t,
            slot: first + 1,
            addr: Addr::Buf { buf: 1, off: 0 },
            len: Len::Sectors(sectors),
            flags: F_NEXT | data_flags,
            next: first + 2,
        },
        GuestOp::Desc {
            table: t,
            slot: first + 2,
            addr: Addr::Buf { buf: 2, off: 0 },
            len: Len::Bytes(1),
            flags: F_WRITE,
            next: 0,
        },
    ];
    if indirect {
        ops.push(GuestOp::Desc {
            table: 0,
            slot: head,
            addr: Addr::Table(0),
            len: Len::Descs(3),
            flags: F_INDIRECT,
            next: 0,
        });
    }
    ops.push(GuestOp::Publish { head });
    ops
}
