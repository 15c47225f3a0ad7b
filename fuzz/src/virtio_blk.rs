//! virtio-blk over a hand-built queue: a driver writes descriptor chains (direct and
//! indirect, any address and length), header bytes and ring fields into guest memory and
//! notifies; the device parses every request and does its I/O on a [`MemDisk`], which
//! panics on I/O outside the disk or a write to a read-only one.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vmm::config::DriveConfig;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::{
    Interrupt, VirtioDevice, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{self, Driver, GuestOp};
use crate::memdisk::MemDisk;
use crate::seed::{Seed, Writer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub struct Config {
    pub read_only: bool,
    pub event_idx: bool,
    /// The queue has 2^(n % 9) entries.
    pub queue_log2: u8,
    /// The disk's size in sectors.
    pub sectors: u16,
}

impl Seed for Config {
    fn write(&self, w: &mut Writer) {
        w.bool(self.read_only).bool(self.event_idx).u8(self.queue_log2).u16(self.sectors);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Op {
    Guest(GuestOp),
    /// The guest notifies the queue.
    Notify,
    /// The driver resets the device and sets the same queue up again.
    Reset,
}

impl Seed for Op {
    fn write(&self, w: &mut Writer) {
        match self {
            Op::Guest(g) => {
                w.variant(0, 3);
                g.write(w);
            }
            Op::Notify => {
                w.variant(1, 3);
            }
            Op::Reset => {
                w.variant(2, 3);
            }
        }
    }
}

pub fn decode(data: &[u8]) -> Option<(Config, Vec<Op>)> {
    let mut u = Unstructured::new(data);
    let config = Config::arbitrary(&mut u).ok()?;
    Some((config, crate::ops(u.take_rest())))
}

pub fn encode(config: &Config, ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::default();
    config.write(&mut w);
    w.bytes(&crate::seed::encode(ops));
    w.0
}

/// The queue at the guest's fixed rings, as a driver that set it up correctly left it.
pub fn queue(size: u16) -> Queue {
    let mut q = Queue::new(guest::MAX_QUEUE).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(guest::DESC as u32), Some(0));
    q.set_avail_ring_address(Some(guest::AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(guest::USED as u32), Some(0));
    q.set_ready(true);
    q
}

pub fn drive(read_only: bool) -> DriveConfig {
    DriveConfig { id: Some("fuzz".into()), path: "/fuzz/disk".into(), read_only, root: true, format: disk::Format::Raw }
}

pub fn features(event_idx: bool) -> u64 {
    let mut f = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;
    if event_idx {
        f |= VIRTIO_RING_F_EVENT_IDX;
    }
    f
}

pub fn run(data: &[u8]) {
    let Some((config, ops)) = decode(data) else { return };
    let mem = guest::memory();
    let size = 1u16 << (config.queue_log2 % 9);
    let disk = MemDisk::new(u64::from(config.sectors) * 512, config.read_only);
    let mut block = Block::new(drive(config.read_only), Box::new(disk));
    let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(Interrupt::new(evt.try_clone().expect("eventfd")));
    let activate = |block: &mut Block| {
        block.set_acked_features(features(config.event_idx));
        block.activate(mem.clone(), vec![queue(size)], interrupt.clone()).expect("one queue activates");
    };
    activate(&mut block);
    let mut driver = Driver::new(size);
    for op in ops {
        match op {
            Op::Guest(g) => driver.apply(&mem, g),
            Op::Notify => block.process_queue(0),
            Op::Reset => {
                block.reset();
                driver = Driver::new(size);
                activate(&mut block);
            }
        }
    }
}
