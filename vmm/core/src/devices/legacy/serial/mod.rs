//! The 16550 UART on COM1 (vm-superio's model), its console output, and console input.
//!
//! Output goes to the VMM's stdout. On the way, the console watcher notes when the first byte
//! arrived (boot timing) and whether the kernel announced a panic: without ACPI there is no
//! pvpanic device, and a panicking kernel with `panic=-1` resets just like a reboot, so the
//! console is the one channel that tells the two apart.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;

use super::EventFdTrigger;
use crate::devices::bus::{lock, BusDevice};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORTS: u64 = 8;
pub const COM1_IRQ: u32 = 4;

const PANIC_MARKER: &str = "Kernel panic - not syncing";
const MAX_LINE: usize = 512;

/// What the console has shown so far that the VMM cares about.
#[derive(Default)]
pub struct ConsoleWatch {
    pub first_byte: OnceLock<Instant>,
    panic: Mutex<Option<String>>,
}

impl ConsoleWatch {
    /// The kernel's panic line, if it printed one.
    pub fn panic_message(&self) -> Option<String> {
        lock(&self.panic).clone()
    }
}

/// The UART's transmit side: the console sink plus the watcher.
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    watch: Arc<ConsoleWatch>,
    line: Vec<u8>,
}

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>, watch: Arc<ConsoleWatch>) -> Self {
        Self { sink, watch, line: Vec::new() }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if line.contains(PANIC_MARKER) {
                    let mut panic = lock(&self.watch.panic);
                    if panic.is_none() {
                        *panic = Some(line.trim().to_string());
                    }
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.watch.first_byte.get_or_init(Instant::now);
        self.scan(buf);
        // A console nobody reads (closed stdout) must not stop the guest.
        let _ = self.sink.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.sink.flush();
        Ok(())
    }
}

pub type Uart = Serial<EventFdTrigger, NoEvents, ConsoleOut>;

pub struct SerialDevice(pub Uart);

mod persist;
pub use self::persist::{SerialRestoreError, SerialSnapshot};

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            if let Err(e) = self.0.write(offset as u8, *b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// Feeds the VMM's stdin to the UART's receive FIFO, from the event loop.
pub struct SerialInput<R: std::io::Read + AsRawFd + Send> {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub input: R,
}

impl<R: std::io::Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled; such a stdin simply has nothing to give.
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            tracing::debug!("console input not attached: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = match self.input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        if n == 0 {
            // End of input: stop polling it, or the loop would spin on a readable EOF.
            let _ = ops.remove(events);
            return;
        }
        let mut serial = lock(&self.serial);
        // A guest that does not read its console cannot make the host buffer without bound:
        // what does not fit in the UART's FIFO is dropped, as on a real line.
        let fits = serial.0.fifo_capacity().min(n);
        if fits < n {
            tracing::debug!("console input: {} bytes dropped, the guest is not reading", n - fits);
        }
        if fits > 0 {
            if let Err(e) = serial.0.enqueue_raw_bytes(&buf[..fits]) {
                tracing::warn!("console input dropped: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (SerialDevice, Sink, Arc<ConsoleWatch>, EventFd) {
        let sink = Sink::default();
        let watch = Arc::new(ConsoleWatch::default());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = ConsoleOut::new(Box::new(sink.clone()), watch.clone());
        let dev = SerialDevice(Serial::new(EventFdTrigger(irq.try_clone().unwrap()), out));
        (dev, sink, watch, irq)
    }

    #[test]
    fn transmitted_bytes_reach_the_console_and_raise_the_irq_when_enabled() {
        let (mut dev, sink, watch, irq) = uart();
        assert!(watch.first_byte.get().is_none());
        dev.write(1, &[0x02]); // IER: transmitter-empty interrupt
        let mut iir = [0u8];
        dev.read(2, &mut iir); // the guest acknowledges the interrupt that enabling raised
        let _ = irq.read();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert!(watch.first_byte.get().is_some());
        assert!(irq.read().unwrap() >= 1, "THR-empty interrupt raised");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }

    #[test]
    fn panic_line_is_caught_and_other_lines_are_not() {
        let (mut dev, _sink, watch, _irq) = uart();
        for b in b"[ 1.0] random line\n[ 2.0] Kernel panic - not syncing: Attempted to kill init!\nmore\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            watch.panic_message().as_deref(),
            Some("[ 2.0] Kernel panic - not syncing: Attempted to kill init!")
        );
        let (mut dev, _sink, watch, _irq) = uart();
        for b in b"Kernel panic - not synci\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(watch.panic_message(), None);
    }

    #[test]
    fn registers_and_pending_input_survive_a_snapshot() {
        let (mut dev, _sink, _watch, _irq) = uart();
        dev.write(3, &[0x80]); // DLAB
        dev.write(0, &[0x0c]); // 9600 baud
        dev.write(3, &[0x03]); // 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.0.enqueue_raw_bytes(b"xy").unwrap();
        let state = dev.save();
        let (_, sink, watch, irq) = uart();
        let out = ConsoleOut::new(Box::new(sink), watch);
        let mut restored = SerialDevice::restore((EventFdTrigger(irq.try_clone().unwrap()), out), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'x');

        let mut too_long = state.clone();
        too_long.in_buffer = vec![0; 65];
        let (_, sink, watch, irq) = uart();
        assert!(SerialDevice::restore((EventFdTrigger(irq), ConsoleOut::new(Box::new(sink), watch)), &too_long).is_err());
    }

    #[test]
    fn input_bytes_are_readable_from_the_receive_register() {
        let (mut dev, _sink, _watch, _irq) = uart();
        dev.0.enqueue_raw_bytes(b"ok").unwrap();
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
    }
}
