//! The guest kernel command line: ember's defaults, then what the user appends.

use linux_loader::cmdline::Cmdline;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// What the minimal guest kernel needs on an ember VM:
/// - `reboot=k`: reboot through the i8042 reset line, which the VMM catches to end the VM;
/// - `panic=-1`: a panic reboots at once rather than hanging, and the VMM reports it;
/// - `8250.nr_uarts=1`, `pci=off`, `i8042.*`, `io_delay=none`, `no_timer_check`: skip probing
///   hardware that is not there; each probe is a trip out to the VMM;
/// - `quiet`: the boot log costs a VM exit per byte; `--cmdline loglevel=7` brings it back.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
    8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd io_delay=none no_timer_check quiet";

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes: {0}")]
    Invalid(linux_loader::cmdline::Error),
}

/// A virtio-mmio device the guest must be told about: it has no bus to discover it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The root filesystem's block device, e.g. `vda`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDevice {
    pub name: String,
    pub read_only: bool,
}

/// ember's defaults, the devices, the root device, then `extra`: later kernel parameters
/// override earlier ones, so the user has the last word.
pub fn build(extra: Option<&str>, devices: &[MmioDevice], root: Option<&RootDevice>) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::try_from(DEFAULT_CMDLINE, CMDLINE_MAX_SIZE).map_err(CmdlineError::Invalid)?;
    for d in devices {
        cmdline
            .add_virtio_mmio_device(d.size, vm_memory::GuestAddress(d.base), d.irq, None)
            .map_err(CmdlineError::Invalid)?;
    }
    if let Some(root) = root {
        let mode = if root.read_only { "ro" } else { "rw" };
        cmdline.insert_str(format!("root=/dev/{} {mode}", root.name)).map_err(CmdlineError::Invalid)?;
    }
    if let Some(extra) = extra.map(str::trim).filter(|s| !s.is_empty()) {
        cmdline.insert_str(extra).map_err(CmdlineError::Invalid)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn defaults_then_user_parameters() {
        let c = build(Some("  init=/bin/sh loglevel=7 "), &[], None).unwrap();
        let s = text(&c);
        assert!(s.starts_with("console=ttyS0 reboot=k panic=-1"));
        assert!(s.ends_with(" init=/bin/sh loglevel=7"), "{s}");
        assert_eq!(text(&build(None, &[], None).unwrap()), DEFAULT_CMDLINE);
        assert_eq!(text(&build(Some(""), &[], None).unwrap()), DEFAULT_CMDLINE);
    }

    #[test]
    fn devices_and_root_come_before_user_parameters() {
        let devs = [
            MmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 },
            MmioDevice { base: 0xd000_1000, size: 0x1000, irq: 6 },
        ];
        let root = RootDevice { name: "vda".into(), read_only: false };
        let s = text(&build(Some("root=/dev/vdb"), &devs, Some(&root)).unwrap());
        assert!(
            s.ends_with(
                " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 root=/dev/vda rw root=/dev/vdb"
            ),
            "{s}"
        );
        let ro = RootDevice { name: "vdc".into(), read_only: true };
        assert!(text(&build(None, &[], Some(&ro)).unwrap()).ends_with(" root=/dev/vdc ro"));
    }

    #[test]
    fn too_long_is_an_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = build(Some(&long), &[], None).unwrap_err().to_string();
        assert!(err.contains("longer than 4096"), "{err}");
    }
}
