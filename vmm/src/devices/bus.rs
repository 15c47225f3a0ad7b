//! The port-I/O bus: routes a vCPU's `in`/`out` to the device that owns the port.

use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the device's first port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("ports {base:#x}+{len} of {name} overlap {other}")]
    Overlap { name: &'static str, base: u16, len: u16, other: &'static str },
}

struct Range {
    base: u16,
    len: u16,
    name: &'static str,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = base as u32 + len as u32;
        if let Some(r) = self
            .ranges
            .iter()
            .find(|r| (base as u32) < r.base as u32 + r.len as u32 && (r.base as u32) < end)
        {
            return Err(BusError::Overlap { name, base, len, other: r.name });
        }
        self.ranges.push(Range { base, len, name, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&Range> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && (port as u32) < r.base as u32 + r.len as u32)
    }

    /// Reads from `port`. Ports nobody owns float high, like an empty ISA bus.
    /// Returns the owner's name, for exit statistics.
    pub fn read(&self, port: u16, data: &mut [u8]) -> Option<&'static str> {
        match self.find(port) {
            Some(r) => {
                lock(&r.device).read(port - r.base, data);
                Some(r.name)
            }
            None => {
                data.fill(0xff);
                None
            }
        }
    }

    /// Writes to `port`; writes to ports nobody owns are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<&'static str> {
        let r = self.find(port)?;
        lock(&r.device).write(port - r.base, data);
        Some(r.name)
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread is still the best state there
/// is; the VM is being torn down in that case anyway.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_port_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::default();
        bus.insert("rec", 0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut b), Some("rec"));
        assert_eq!(b, [5]);
        assert_eq!(bus.write(0x3f8, &[b'x']), Some("rec"));
        assert_eq!(bus.write(0x400, &[1]), None);
        assert_eq!(bus.read(0x3f7, &mut b), None);
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = PioBus::default();
        bus.insert("a", 0x60, 5, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let err = bus.insert("b", 0x64, 2, Arc::new(Mutex::new(Recorder::default()))).unwrap_err();
        assert_eq!(err, BusError::Overlap { name: "b", base: 0x64, len: 2, other: "a" });
        bus.insert("c", 0x65, 1, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        assert!(bus.insert("d", 0x5f, 2, Arc::new(Mutex::new(Recorder::default()))).is_err());
    }
}
