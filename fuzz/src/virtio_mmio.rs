//! The virtio-mmio transport driven by register accesses, in front of a real virtio-blk
//! device: any order of status, feature, queue-setup, notify and config accesses of any size,
//! with the guest's memory ops in between (so that a device that reaches DRIVER_OK serves
//! real requests). A save and restore of the transport in the middle must always succeed: a
//! state the transport saved is one it can be restored from.

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::GuestMemoryMmap;
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::mmio::{MmioTransport, TransportArgs};
use vmm::devices::virtio::Interrupt;
use vmm::persist::Persist;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{self, Driver, GuestOp};
use crate::memdisk::MemDisk;
use crate::seed::{Seed, Writer};
use crate::virtio_blk::drive;

/// The transport's registers, so that accesses hit them without guessing offsets.
pub const REGS: [u16; 25] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70, 0x80, 0x84, 0x90,
    0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x108,
];

pub const STATUS: u8 = 15;
pub const FEATURES_SEL: u8 = 7;
pub const FEATURES: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Op {
    Guest(GuestOp),
    /// A 32-bit write of `value` to register `REGS[reg % len]`.
    Write {
        reg: u8,
        value: u32,
    },
    Read {
        reg: u8,
    },
    /// An access of any size anywhere in the window.
    Access {
        offset: u16,
        len: u8,
        value: u64,
        write: bool,
    },
    /// Queue setup as Linux does it: select `queue`, size 2^(log2 % 9), the guest's rings, ready.
    SetupQueue {
        queue: u8,
        log2: u8,
    },
    /// Saves the transport's state and replaces it with one restored from that state.
    SaveRestore,
}

impl Seed for Op {
    fn write(&self, w: &mut Writer) {
        match *self {
            Op::Guest(g) => {
                w.variant(0, 6);
                g.write(w);
            }
            Op::Write { reg, value } => {
                w.variant(1, 6).u8(reg).u32(value);
            }
            Op::Read { reg } => {
                w.variant(2, 6).u8(reg);
            }
            Op::Access { offset, len, value, write } => {
                w.variant(3, 6).u16(offset).u8(len).u64(value).bool(write);
            }
            Op::SetupQueue { queue, log2 } => {
                w.variant(4, 6).u8(queue).u8(log2);
            }
            Op::SaveRestore => {
                w.variant(5, 6);
            }
        }
    }
}

/// The register index of `offset` in [`REGS`].
pub fn reg(offset: u16) -> u8 {
    REGS.iter().position(|&r| r == offset).expect("a register") as u8
}

pub fn decode(data: &[u8]) -> Option<(bool, Vec<Op>)> {
    let mut u = Unstructured::new(data);
    let read_only = bool::arbitrary(&mut u).ok()?;
    Some((read_only, crate::ops(u.take_rest())))
}

pub fn encode(read_only: bool, ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::default();
    w.bool(read_only).bytes(&crate::seed::encode(ops));
    w.0
}

/// The handshake of Linux's virtio_mmio driver for a block device, up to DRIVER_OK.
pub fn handshake(features_lo: u32, log2: u8) -> Vec<Op> {
    let w = |offset, value| Op::Write { reg: reg(offset), value };
    vec![
        w(0x70, 1),
        w(0x70, 3),
        Op::Read { reg: reg(0x10) },
        w(0x24, 0),
        w(0x20, features_lo),
        w(0x24, 1),
        w(0x20, 1),
        w(0x70, 11),
        Op::Read { reg: reg(0x70) },
        Op::SetupQueue { queue: 0, log2 },
        w(0x70, 15),
    ]
}

fn transport(mem: &GuestMemoryMmap, disk: &MemDisk, read_only: bool) -> (MmioTransport<Block>, EventFd) {
    let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let irq = Interrupt::new(evt.try_clone().expect("eventfd"));
    let block = Block::new(drive(read_only), Box::new(disk.clone()));
    (MmioTransport::new(block, mem.clone(), std::sync::Arc::new(irq)), evt)
}

fn write32(t: &mut MmioTransport<Block>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn run(data: &[u8]) {
    let Some((read_only, ops)) = decode(data) else { return };
    let mem = guest::memory();
    let disk = MemDisk::new(64 * 512, read_only);
    let (mut t, mut _evt) = transport(&mem, &disk, read_only);
    let mut driver = Driver::new(guest::MAX_QUEUE);
    for op in ops {
        match op {
            Op::Guest(g) => driver.apply(&mem, g),
            Op::Write { reg, value } => write32(&mut t, REGS[reg as usize % REGS.len()].into(), value),
            Op::Read { reg } => {
                let mut b = [0u8; 4];
                t.read(REGS[reg as usize % REGS.len()].into(), &mut b);
            }
            Op::Access { offset, len, value, write } => {
                let len = [1, 2, 4, 8, 3, 0][len as usize % 6];
                let offset = u64::from(offset) % 0x1000;
                if write {
                    t.write(offset, &value.to_le_bytes()[..len]);
                } else {
                    let mut b = [0u8; 8];
                    t.read(offset, &mut b[..len]);
                }
            }
            Op::SetupQueue { queue, log2 } => {
                let size = 1u16 << (log2 % 9);
                write32(&mut t, 0x30, queue.into());
                write32(&mut t, 0x38, size.into());
                for (lo, addr) in [(0x80, guest::DESC), (0x90, guest::AVAIL), (0xa0, guest::USED)] {
                    write32(&mut t, lo, addr as u32);
                    write32(&mut t, lo + 4, 0);
                }
                write32(&mut t, 0x44, 1);
                driver = Driver::new(size);
            }
            Op::SaveRestore => {
                let state = t.save();
                let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                let block = Block::new(drive(read_only), Box::new(disk.clone()));
                let args = TransportArgs { device: block, mem: mem.clone(), irq: evt.try_clone().expect("eventfd") };
                t = match MmioTransport::restore(args, &state) {
                    Ok(t) => t,
                    Err(e) => panic!("a saved transport does not restore: {e}\n{state:?}"),
                };
                _evt = evt;
            }
        }
    }
}
