//! Address buses: route a vCPU's port I/O or MMIO access to the device that owns the address.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's first address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{name} at {base:#x}+{len:#x} overlaps {other}")]
    Overlap { name: &'static str, base: u64, len: u64, other: &'static str },
}

struct Range {
    base: u64,
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space: the port-I/O space or the MMIO space.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.saturating_add(len);
        if let Some(r) = self.ranges.iter().find(|r| base < r.base + r.len && r.base < end) {
            return Err(BusError::Overlap { name, base, len, other: r.name });
        }
        self.ranges.push(Range { base, len, name, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Range> {
        self.ranges.iter().find(|r| addr >= r.base && addr - r.base < r.len)
    }

    /// Reads from `addr`. Addresses nobody owns float high, like an empty ISA bus.
    /// Returns the owner's name, for exit statistics.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Option<&'static str> {
        match self.find(addr) {
            Some(r) => {
                lock(&r.device).read(addr - r.base, data);
                Some(r.name)
            }
            None => {
                data.fill(0xff);
                None
            }
        }
    }

    /// Writes to `addr`; writes nobody owns are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<&'static str> {
        let r = self.find(addr)?;
        lock(&r.device).write(addr - r.base, data);
        Some(r.name)
    }
}

/// A device whose lock was poisoned by a panicking thread is still the best state there is;
/// the VM is being torn down in that case anyway.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_address_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert("rec", 0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut b), Some("rec"));
        assert_eq!(b, [5]);
        assert_eq!(bus.write(0x3f8, b"x"), Some("rec"));
        assert_eq!(bus.write(0x400, &[1]), None);
        assert_eq!(bus.read(0x3f7, &mut b), None);
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert("a", 0x60, 5, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let err = bus.insert("b", 0x64, 2, Arc::new(Mutex::new(Recorder::default()))).unwrap_err();
        assert_eq!(err, BusError::Overlap { name: "b", base: 0x64, len: 2, other: "a" });
        bus.insert("c", 0x65, 1, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        assert!(bus.insert("d", 0x5f, 2, Arc::new(Mutex::new(Recorder::default()))).is_err());
        bus.insert("e", 0xd000_0000, 0x1000, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        assert!(bus.insert("f", 0xd000_0fff, 0x1000, Arc::new(Mutex::new(Recorder::default()))).is_err());
    }
}
