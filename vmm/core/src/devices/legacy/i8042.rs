//! The i8042 keyboard controller, only for its CPU reset line: with `reboot=k` a guest reboot
//! writes 0xfe to port 0x64, which is how an ember VM ends.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// Ports 0x60..0x64: data at offset 0, command/status at offset 4.
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORTS: u64 = 5;

pub struct I8042(pub I8042Device<EventFdTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            if let Err(e) = self.0.write(offset as u8, *b) {
                tracing::error!("cannot signal the guest's reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_fires_the_reset_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042(I8042Device::new(EventFdTrigger(evt.try_clone().unwrap())));
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "a data-port write is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
