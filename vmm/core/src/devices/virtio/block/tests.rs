//! The block device driven by hand-built descriptor chains and queues, against an in-memory disk.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{execute, Completion, Limits};
use super::*;
use disk::DiskBackend;

#[derive(Clone)]
struct MemDisk {
    data: Arc<Mutex<Vec<u8>>>,
    read_only: bool,
    flushes: Arc<Mutex<u32>>,
}

impl MemDisk {
    fn new(sectors: usize, read_only: bool) -> Self {
        let data = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        Self { data: Arc::new(Mutex::new(data)), read_only, flushes: Arc::default() }
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        let data = self.data.lock().unwrap();
        let mut at = offset as usize;
        for b in bufs {
            b.copy_from(&data[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }
    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        assert!(!self.read_only, "the device must not write to a read-only disk");
        let mut data = self.data.lock().unwrap();
        let mut at = offset as usize;
        for b in bufs {
            b.copy_to(&mut data[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn id(&self) -> Vec<u8> {
        b"ember-test-disk".to_vec()
    }
}

fn drive() -> DriveConfig {
    DriveConfig { id: None, path: "/test/disk".into(), read_only: false, root: false, format: disk::Format::Raw }
}

const MEM: usize = 1 << 20;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const LIMITS: Limits = Limits { seg_max: 8, size_max: 64 * 1024 };

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, 0, 0)
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
}

fn run(mem: &GuestMemoryMmap, disk: &mut MemDisk, chain: &[Descriptor]) -> Completion {
    execute(mem, chain.iter().copied(), disk, b"ember-test-disk", LIMITS)
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn write_then_read_round_trip() {
    let m = mem();
    let mut disk = MemDisk::new(64, false);
    m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 3);
    let done = run(&m, &mut disk, &[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)]);
    assert_eq!(done, Completion { used_len: 1, status: Some(VIRTIO_BLK_S_OK as u8) });
    assert!(disk.data.lock().unwrap()[3 * 512..5 * 512].iter().all(|b| *b == 0xab));
    assert_eq!(disk.data.lock().unwrap()[5 * 512], 5, "neighbouring sector untouched");

    m.write_slice(&[0; 2048], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_IN, 2);
    // Data split over two descriptors, status in its own.
    let done = run(&m, &mut disk, &[r(HDR, 16), w(DATA, 1024), w(DATA + 1024, 512), w(STATUS, 1)]);
    assert_eq!(done, Completion { used_len: 1537, status: Some(VIRTIO_BLK_S_OK as u8) });
    let mut got = [0u8; 1536];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 2));
    assert!(got[512..].iter().all(|b| *b == 0xab));
}

#[test]
fn header_split_across_descriptors_and_status_sharing_the_data_descriptor() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_IN, 1);
    let done = run(&m, &mut disk, &[r(HDR, 5), r(HDR + 5, 11), w(DATA, 513)]);
    assert_eq!(done.status, Some(VIRTIO_BLK_S_OK as u8));
    assert_eq!(done.used_len, 513);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn reads_and_writes_beyond_the_disk_fail() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_IN, 7);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&m, VIRTIO_BLK_T_OUT, u64::MAX);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&m, VIRTIO_BLK_T_IN, 7);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_OK as u8));
}

#[test]
fn unaligned_lengths_fail() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let done = run(&m, &mut disk, &[r(HDR, 16), w(DATA, 100), w(STATUS, 1)]);
    assert_eq!(done, Completion { used_len: 1, status: Some(VIRTIO_BLK_S_IOERR as u8) });
}

#[test]
fn read_only_disks_refuse_writes_and_keep_their_data() {
    let m = mem();
    let mut disk = MemDisk::new(8, true);
    m.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let done = run(&m, &mut disk, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    assert_eq!(done.status, Some(VIRTIO_BLK_S_IOERR as u8));
    assert!(disk.data.lock().unwrap()[..512].iter().all(|b| *b == 0));
    let dev = Block::new(drive(), Box::new(MemDisk::new(8, true)));
    assert_ne!(dev.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(Block::new(drive(), Box::new(MemDisk::new(8, false))).avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn chains_without_a_status_byte_are_dropped() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), r(DATA, 512)]), Completion { used_len: 0, status: None });
    assert_eq!(run(&m, &mut disk, &[]), Completion { used_len: 0, status: None });
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(DATA, 0)]), Completion { used_len: 0, status: None });
    // The status byte itself outside guest memory.
    let beyond = MEM as u64 + 0x1000;
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(beyond, 1)]), Completion { used_len: 0, status: None });
    // A buffer whose end lies past 2^64: its address plus its length wraps.
    let wrapping = u64::MAX - 0xff;
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(wrapping, 0x1000)]), Completion { used_len: 0, status: None });
}

#[test]
fn buffers_outside_guest_memory_fail_without_touching_anything() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let beyond = MEM as u64 - 256;
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(beyond, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), r(u64::MAX - 100, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    assert!(disk.data.lock().unwrap()[..512].iter().all(|b| *b == 0));
    // A header that is not in memory.
    assert_eq!(run(&m, &mut disk, &[r(1 << 40, 16), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn malformed_shapes_fail() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    // Readable after writable.
    assert_eq!(run(&m, &mut disk, &[w(DATA, 512), r(HDR, 16), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    // Header too short.
    assert_eq!(run(&m, &mut disk, &[r(HDR, 8), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    // A read carrying device-readable data, a write carrying device-writable data.
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn segment_limits_are_enforced() {
    let m = mem();
    let mut disk = MemDisk::new(512, false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![r(HDR, 16)];
    chain.extend((0..9).map(|i| w(DATA + i * 512, 512)));
    chain.push(w(STATUS, 1));
    assert_eq!(run(&m, &mut disk, &chain).status, Some(VIRTIO_BLK_S_IOERR as u8), "9 segments > seg_max 8");
    chain.remove(1);
    assert_eq!(run(&m, &mut disk, &chain).status, Some(VIRTIO_BLK_S_OK as u8));
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(DATA, 128 * 1024), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn flush_get_id_and_unknown_types() {
    let m = mem();
    let mut disk = MemDisk::new(8, false);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_OK as u8));
    assert_eq!(*disk.flushes.lock().unwrap(), 1);
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let done = run(&m, &mut disk, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    assert_eq!(done, Completion { used_len: 21, status: Some(VIRTIO_BLK_S_OK as u8) });
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..15], b"ember-test-disk");
    assert_eq!(id[15..], [0; 5]);
    header(&m, 0x1234, 0);
    assert_eq!(run(&m, &mut disk, &[r(HDR, 16), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_UNSUPP as u8));
    assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP as u8);
}

fn raw(d: Descriptor) -> RawDescriptor {
    RawDescriptor::from(d)
}

#[test]
fn device_serves_its_queue_and_interrupts_the_guest() {
    let m = mem();
    let disk = MemDisk::new(16, false);
    let mut dev = Block::new(drive(), Box::new(disk.clone()));
    assert_eq!(dev.device_type(), 2);
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 16, "capacity in sectors");
    let mut past = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut past);
    assert_eq!(past, [0; 4]);

    let vq = MockSplitQueue::new(&m, 16);
    header(&m, VIRTIO_BLK_T_IN, 5);
    let next = VRING_DESC_F_NEXT as u16;
    let chain = [
        raw(Descriptor::new(HDR, 16, next, 1)),
        raw(Descriptor::new(DATA, 512, VRING_DESC_F_WRITE as u16 | next, 2)),
        raw(Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0)),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::new(evt.try_clone().unwrap()));
    let queue: Queue = vq.create_queue().unwrap();
    dev.set_acked_features(VIRTIO_F_VERSION_1);
    dev.activate(m.clone(), vec![queue], irq.clone()).unwrap();
    dev.process_queue(0);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
    assert_eq!(irq.status() & INT_VRING, INT_VRING);
    assert_eq!(evt.read().unwrap(), 1);
}

#[test]
fn activation_serves_requests_already_queued() {
    // As when a snapshot was taken between the guest's notification and the device's service.
    let m = mem();
    let mut dev = Block::new(drive(), Box::new(MemDisk::new(16, false)));
    let vq = MockSplitQueue::new(&m, 16);
    header(&m, VIRTIO_BLK_T_IN, 7);
    let next = VRING_DESC_F_NEXT as u16;
    let chain = [
        raw(Descriptor::new(HDR, 16, next, 1)),
        raw(Descriptor::new(DATA, 512, VRING_DESC_F_WRITE as u16 | next, 2)),
        raw(Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0)),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::new(evt.try_clone().unwrap()));
    dev.set_acked_features(VIRTIO_F_VERSION_1);
    dev.activate(m.clone(), vec![vq.create_queue().unwrap()], irq.clone()).unwrap();
    assert_eq!(vq.used().idx().load(), 1, "served without a notification");
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 7);
    assert_eq!(evt.read().unwrap(), 1, "and the guest interrupted");
}

#[test]
fn activation_needs_exactly_one_queue() {
    let m = mem();
    let mut dev = Block::new(drive(), Box::new(MemDisk::new(8, false)));
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    assert!(dev.activate(m.clone(), vec![], irq.clone()).is_err());
    dev.process_queue(0);
}
