//! A disk in memory for the device targets, which checks what the device asks of it: every
//! read and write lies inside the disk, and a read-only disk is never written. A violation
//! panics, which libFuzzer reports. Sizes may be far larger than what is stored (a snapshot
//! declares any size): bytes past the store read as a pattern and writes there are dropped.

use std::sync::{Arc, Mutex};

use disk::DiskBackend;
use vm_memory::VolatileSlice;

/// Bytes actually stored, at most.
const STORE: u64 = 1 << 20;

#[derive(Clone)]
pub struct MemDisk {
    size: u64,
    read_only: bool,
    store: Arc<Mutex<Vec<u8>>>,
}

impl MemDisk {
    pub fn new(size: u64, read_only: bool) -> Self {
        let stored = size.min(STORE) as usize;
        let store = (0..stored).map(|i| (i / 512) as u8).collect();
        Self { size, read_only, store: Arc::new(Mutex::new(store)) }
    }

    /// Panics unless `bufs` at `offset` lie inside the disk.
    fn check(&self, offset: u64, bufs: &[VolatileSlice<'_>]) {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = offset.checked_add(len).expect("the I/O range wraps around");
        assert!(end <= self.size, "I/O at {offset}+{len} past the disk's {} bytes", self.size);
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        self.check(offset, bufs);
        let store = self.store.lock().unwrap();
        let mut at = offset;
        for b in bufs {
            let data: Vec<u8> =
                (at..at + b.len() as u64).map(|o| store.get(o as usize).copied().unwrap_or(o as u8)).collect();
            b.copy_from(&data);
            at += b.len() as u64;
        }
        Ok(())
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        assert!(!self.read_only, "the device wrote to a read-only disk");
        self.check(offset, bufs);
        let mut store = self.store.lock().unwrap();
        let mut at = offset;
        for b in bufs {
            let mut data = vec![0u8; b.len()];
            b.copy_to(&mut data);
            for (i, byte) in data.into_iter().enumerate() {
                if let Some(slot) = store.get_mut(at as usize + i) {
                    *slot = byte;
                }
            }
            at += b.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn id(&self) -> Vec<u8> {
        b"ember-fuzz-disk".to_vec()
    }
}
