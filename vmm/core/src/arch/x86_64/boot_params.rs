//! The Linux "zero page" (`struct boot_params`) for a 64-bit direct boot, with its e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};

use super::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id: ember has no id of its own assigned by the kernel.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// `loadflags`: the protected-mode kernel sits at 0x100000 or above.
const LOADED_HIGH: u8 = 0x01;
const E820_RAM: u32 = 1;

/// Inputs of the zero page that vary from boot to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootParamsConfig {
    pub mem_size: u64,
    pub cmdline_addr: u64,
    /// Length of the command line without its terminating NUL.
    pub cmdline_len: usize,
    /// Guest address and length of the initramfs, if any.
    pub initrd: Option<(u64, u64)>,
}

/// Guest RAM ranges for `mem_size` bytes of memory: RAM runs up to the MMIO hole and resumes
/// above 4 GiB. The same ranges back the memory slots and the e820 map.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem_size - MMIO_HOLE_START)]
    }
}

/// Builds the zero page. RAM below 1 MiB stops at the EBDA so that the MP table stays reserved.
pub fn build(cfg: &BootParamsConfig) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = cfg.cmdline_addr as u32;
    params.hdr.cmdline_size = cfg.cmdline_len as u32;
    if let Some((addr, len)) = cfg.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }

    let mut entries = vec![(0, EBDA_START)];
    for (start, len) in ram_ranges(cfg.mem_size) {
        let start = start.max(HIMEM_START);
        let end = start.max(if start >= MMIO_HOLE_END { start + len } else { len });
        if end > start {
            entries.push((start, end - start));
        }
    }
    for (i, (addr, size)) in entries.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = entries.len() as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e820(p: &boot_params) -> Vec<(u64, u64)> {
        p.e820_table[..p.e820_entries as usize]
            .iter()
            .map(|e| (e.addr, e.size))
            .collect()
    }

    #[test]
    fn small_guest_has_low_and_high_ram_and_no_ebda() {
        let p = build(&BootParamsConfig {
            mem_size: 128 << 20,
            cmdline_addr: 0x20000,
            cmdline_len: 42,
            initrd: Some((0x700_0000, 0x1234)),
        });
        assert_eq!(e820(&p), vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let mem = 5u64 << 30;
        let p = build(&BootParamsConfig {
            mem_size: mem,
            cmdline_addr: 0x20000,
            cmdline_len: 1,
            initrd: None,
        });
        assert_eq!(
            e820(&p),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_HOLE_START - HIMEM_START),
                (MMIO_HOLE_END, mem - MMIO_HOLE_START),
            ]
        );
        assert_eq!({ p.hdr.ramdisk_size }, 0);
        assert_eq!(ram_ranges(mem), vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem - MMIO_HOLE_START)]);
    }
}
