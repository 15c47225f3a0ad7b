//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2): the register file a guest
//! driver programs, the device status state machine, queue setup and device reset.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivateError, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x424d_4545; // "EEMB"
const CONFIG_SPACE: u64 = 0x100;

pub(super) const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(super) const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(super) const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(super) const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
pub(super) const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// The transport of one device `D`; generic, so that the device manager keeps typed handles
/// to its devices (a block device's disk swap) without downcasting.
pub struct MmioTransport<D: VirtioDevice> {
    pub(super) device: D,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    /// The driver's view of the queues; the device serves its own copies once active.
    pub(super) queues: Vec<Queue>,
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        let queues = Self::fresh_queues(&device);
        Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        }
    }

    pub(super) fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect()
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn is_active(&self) -> bool {
        self.status & S_DRIVER_OK != 0 && self.status & S_NEEDS_RESET == 0
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// See [`Interrupt::reassert`].
    pub fn reassert_interrupt(&self) {
        self.interrupt.reassert();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(&self.device);
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    /// The device status state machine (virtio 1.x, 3.1.1): each step adds one bit in order;
    /// anything else is refused, and 0 resets the device.
    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        if new & S_FAILED != 0 {
            self.status |= S_FAILED;
            return;
        }
        let added = new & !self.status;
        if new & self.status != self.status {
            tracing::warn!("virtio: driver cleared status bits {:#x}; ignored", self.status & !new);
            return;
        }
        match added {
            S_ACK if self.status == 0 => self.status = new,
            S_DRIVER if self.status == S_ACK => self.status = new,
            S_FEATURES_OK if self.status == S_ACK | S_DRIVER => {
                let offered = self.device.avail_features();
                if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    // Leaving FEATURES_OK clear tells the driver its feature set was refused.
                    tracing::warn!(
                        "virtio: driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                        self.driver_features
                    );
                    return;
                }
                self.device.set_acked_features(self.driver_features);
                self.status = new;
            }
            S_DRIVER_OK if self.status == S_ACK | S_DRIVER | S_FEATURES_OK => {
                self.status = new;
                self.activate();
            }
            _ => tracing::warn!("virtio: invalid status transition {:#x} -> {new:#x}", self.status),
        }
    }

    fn activate(&mut self) {
        let all_valid = self.queues.iter().all(|q| q.ready() && q.is_valid(&self.mem));
        let result = if all_valid {
            // The device gets its own queues; the transport keeps the driver's view of them.
            let queues = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()).expect("a queue that passed is_valid rebuilds"))
                .collect();
            self.device.activate(self.mem.clone(), queues, self.interrupt.clone())
        } else {
            Err(ActivateError::QueueNotReady)
        };
        if let Err(e) = result {
            tracing::warn!("virtio: cannot activate device: {e}");
            self.status |= S_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            self.interrupt.signal(INT_CONFIG);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let queue_max = |t: &mut Self| t.selected_queue().map(|q| q.max_size() as u32).unwrap_or(0);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue_max(self),
            0x44 => self.selected_queue().map(|q| q.ready() as u32).unwrap_or(0),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                tracing::debug!("virtio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // Queue layout may only change while the driver is setting the device up.
        let queue_setup = self.status & (S_FEATURES_OK | S_DRIVER_OK) == S_FEATURES_OK;
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 if self.status & S_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value as u64,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | ((value as u64) << 32),
                _ => {}
            },
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    // Sizes the queue cannot take leave it invalid; activation then refuses it.
                    q.set_size(value as u16);
                }
            }
            0x44 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x50 => {
                // Normally an ioeventfd catches this write inside KVM; reaching here means the
                // notification came through a path without one, so serve it directly.
                if self.is_active() {
                    self.device.process_queue(value as usize);
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_setup => {
                let (lo, hi) = if offset & 4 == 0 { (Some(value), None) } else { (None, Some(value)) };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!("virtio: write {value:#x} to register {offset:#x} ignored (status {:#x})", self.status),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            let v = self.read_register(offset);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let (4, 0) = (data.len(), offset % 4) {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            self.write_register(offset, v);
        } else {
            tracing::debug!("virtio: {}-byte register write at {offset:#x} ignored", data.len());
        }
    }
}

mod persist;
pub use self::persist::{MmioRestoreError, MmioState, QueueSnapshot, TransportArgs};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Default)]
    pub struct Probe {
        pub acked: u64,
        pub activated: Option<Vec<Queue>>,
        pub resets: u32,
        pub notified: Vec<usize>,
        pub config: [u8; 8],
    }

    pub struct FakeDevice(pub Arc<Mutex<Probe>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn set_acked_features(&mut self, features: u64) {
            self.0.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let c = self.0.lock().unwrap().config;
            for (i, b) in data.iter_mut().enumerate() {
                *b = c.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut p = self.0.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = p.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn activate(&mut self, _m: GuestMemoryMmap, q: Vec<Queue>, _i: Arc<Interrupt>) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activated = Some(q);
            Ok(())
        }
        fn process_queue(&mut self, index: usize) {
            self.0.lock().unwrap().notified.push(index);
        }
        fn reset(&mut self) {
            let mut p = self.0.lock().unwrap();
            p.resets += 1;
            p.activated = None;
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            let p = self.0.lock().unwrap();
            p.activated.iter().flatten().map(|q| q.state()).collect()
        }
    }

    pub fn transport() -> (MmioTransport<FakeDevice>, Arc<Mutex<Probe>>, EventFd) {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Interrupt::new(evt.try_clone().unwrap()));
        (MmioTransport::new(FakeDevice(probe.clone()), mem, irq), probe, evt)
    }

    pub fn rd(t: &mut MmioTransport<FakeDevice>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr(t: &mut MmioTransport<FakeDevice>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport the way Linux's virtio_mmio driver does, up to FEATURES_OK.
    pub fn negotiate(t: &mut MmioTransport<FakeDevice>, features: u64) {
        wr(t, 0x70, S_ACK);
        wr(t, 0x70, S_ACK | S_DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, features as u32);
        wr(t, 0x24, 1);
        wr(t, 0x20, (features >> 32) as u32);
        wr(t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    }

    pub fn setup_queue(t: &mut MmioTransport<FakeDevice>, index: u32, base: u64) {
        wr(t, 0x30, index);
        wr(t, 0x38, 16);
        wr(t, 0x80, base as u32);
        wr(t, 0x84, 0);
        wr(t, 0x90, (base + 0x100) as u32);
        wr(t, 0x94, 0);
        wr(t, 0xa0, (base + 0x200) as u32);
        wr(t, 0xa4, 0);
        wr(t, 0x44, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, 0x00), MAGIC);
        assert_eq!(rd(&mut t, 0x04), 2);
        assert_eq!(rd(&mut t, 0x08), 42);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 is bit 32");
        wr(&mut t, 0x14, 0);
        assert_eq!(rd(&mut t, 0x10), 0b101);
        wr(&mut t, 0x30, 1);
        assert_eq!(rd(&mut t, 0x34), 16);
        wr(&mut t, 0x30, 7);
        assert_eq!(rd(&mut t, 0x34), 0, "queues that do not exist have size 0");
    }

    #[test]
    fn full_handshake_activates_the_device_with_its_queues() {
        let (mut t, probe, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100);
        assert_eq!(rd(&mut t, 0x70), S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(probe.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b100);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        wr(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert!(t.is_active());
        let p = probe.lock().unwrap();
        let qs = p.activated.as_ref().expect("activated");
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[1].desc_table(), 0x2000);
        assert_eq!(qs[1].size(), 16);
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let (mut t, probe, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(rd(&mut t, 0x70) & S_FEATURES_OK, 0);
        assert_eq!(probe.lock().unwrap().acked, 0);
        let (mut t, _, _) = transport();
        negotiate(&mut t, 0b1);
        assert_eq!(rd(&mut t, 0x70) & S_FEATURES_OK, 0, "legacy drivers (no VERSION_1) refused");
    }

    #[test]
    fn driver_ok_with_a_bad_queue_asks_for_a_reset() {
        let (mut t, probe, irq) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        // Queue 1 points outside guest memory.
        setup_queue(&mut t, 1, 0x4000_0000);
        wr(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert!(probe.lock().unwrap().activated.is_none());
        assert_ne!(rd(&mut t, 0x70) & S_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1);
        assert!(!t.is_active());
    }

    #[test]
    fn out_of_order_status_is_ignored_and_zero_resets() {
        let (mut t, probe, _) = transport();
        wr(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(rd(&mut t, 0x70), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(probe.lock().unwrap().resets, 1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_eq!(rd(&mut t, 0x70), S_ACK | S_DRIVER | S_FEATURES_OK, "usable again after reset");
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok_and_config_passes_through() {
        let (mut t, probe, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        wr(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 1, "a running queue cannot be disabled by hand");
        wr(&mut t, 0x50, 1);
        assert_eq!(probe.lock().unwrap().notified, vec![1]);
        t.write(0x102, &[0xab, 0xcd]);
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [0xab, 0xcd]);
        let mut odd = [0u8; 2];
        t.read(0x70, &mut odd);
        assert_eq!(odd, [0, 0], "registers only answer 32-bit accesses");
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (t, _, _) = transport();
        t.interrupt.signal(super::super::INT_VRING | INT_CONFIG);
        let mut t = t;
        wr(&mut t, 0x64, super::super::INT_VRING);
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_and_only_that() {
        let (mut t, _, evt) = transport();
        t.reassert_interrupt();
        assert!(evt.read().is_err(), "nothing pending, nothing raised");
        t.interrupt.signal(super::super::INT_VRING);
        assert_eq!(evt.read().unwrap(), 1);
        t.reassert_interrupt();
        assert_eq!(evt.read().unwrap(), 1, "raised again while the driver has not acknowledged it");
        assert_eq!(rd(&mut t, 0x60), super::super::INT_VRING, "with the same status");
        wr(&mut t, 0x64, super::super::INT_VRING);
        t.reassert_interrupt();
        assert!(evt.read().is_err(), "acknowledged: not raised again");
    }
}
